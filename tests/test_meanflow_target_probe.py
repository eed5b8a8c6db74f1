"""jobs/meanflow_target_probe.py: its reference (the teacher's flow map by Heun) matches the Gaussian oracle's closed
form; the probe scores an MF-form student on the pairs asked (r = 0 probed at τ_min), the secant window of the width
asked; a CM-form export and malformed pairs are refused in the CLI's words."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler

from jobs.meanflow_target_probe import TAU_MIN, main, probe, teacher_flow_map
from pipeline.oracle import flow_map, make_oracle_teacher
from pipeline.teacher import load_teacher
from tests.test_compare_inits import tiny_teacher_dir
from trainer.student import FlowMapStudent


@pytest.mark.parametrize("scheduler", [DDPMScheduler(beta_schedule="squaredcos_cap_v2"), EDMEulerScheduler()],
                         ids=["vp", "edm"])
def test_the_reference_flow_map_is_the_oracles_closed_form(scheduler):
    mu, s = 0.3, 0.5
    teacher = make_oracle_teacher(scheduler, (1, 4, 4), mu, s)
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for t, r in ((0.9, 0.3), (0.5, 0.01), (0.3, 0.25)):
        exact = (1 - r) * flow_map(z.double() / (1 - t), t / (1 - t), r / (1 - r), mu, s)
        errors = [float((teacher_flow_map(teacher, z, t, r, steps=steps).double() - exact).norm() / exact.norm())
                  for steps in (24, 48)]
        assert errors[1] < 1e-3, (t, r, errors)
        if errors[0] > 1e-5:  # above float32 rounding: Heun is second order, 4× smaller per halved step
            assert errors[1] < errors[0] / 3, (t, r, errors)


@pytest.fixture(scope="module")
def tiny_mf(tmp_path_factory):
    """A tiny teacher and two teacher-init exports of it: MF form (second time input) and CM form."""
    root = tmp_path_factory.mktemp("mf_probe")
    teacher_dir = tiny_teacher_dir(root / "teacher")
    teacher = load_teacher(teacher_dir)
    FlowMapStudent.from_teacher(teacher, second_time_input=True).save_pretrained(root / "mf")
    FlowMapStudent.from_teacher(teacher).save_pretrained(root / "cm")
    return {"teacher": str(teacher_dir), "mf": str(root / "mf"), "cm": str(root / "cm")}


def test_probe_scores_the_pairs_asked_with_r_zero_at_tau_min(tiny_mf, tmp_path, capsys):
    result = probe(tiny_mf["teacher"], tiny_mf["mf"], pairs=("max:0", "0.5:0.4"), num=8, secants=(0.02, 0.1),
                   centrals=(1e-4, 0.02), ode_steps=4)
    first, second = result["rows"]
    lowest = load_teacher(tiny_mf["teacher"]).sigma_edm_range[0]  # this VP table ends above τ_min
    assert first["t"] == result["tau_max"] and first["r"] == pytest.approx(max(TAU_MIN, lowest / (1 + lowest)))
    assert (second["t"], second["r"]) == (0.5, 0.4)
    assert first["target_central"]["0.02"] is None  # τ_max + 0.02 ≥ 1: a time the student never sees
    for row in result["rows"]:
        values = [row["reference"], row["student"], row["target_jvp"], *row["target_secant"].values(),
                  row["target_central"]["0.0001"]]
        assert all(math.isfinite(value) and value >= 0 for value in values)
        # the JVP is du/dt: the central difference at δ = 1e-4 gives the same target
        assert row["target_central"]["0.0001"] == pytest.approx(row["target_jvp"], rel=1e-2, abs=1e-6)
        assert list(row["target_secant"]) == ["0.02", "0.1"]
        assert row["target_secant"]["0.02"] != row["target_secant"]["0.1"]  # the window's width matters
    out = tmp_path / "probe.json"
    assert main(["--teacher", tiny_mf["teacher"], "--student", tiny_mf["mf"], "--num", "4", "--pairs", "0.5:0",
                 "--ode-steps", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| t | r | ‖u_ref‖² | student | target, JVP | target, secant ±0.05 | target, secant ±0.1 |" in printed
    assert json.loads(out.read_text())["rows"][0]["r"] == first["r"]


def test_cm_form_students_and_malformed_pairs_are_refused(tiny_mf, capsys):
    assert main(["--teacher", tiny_mf["teacher"], "--student", tiny_mf["cm"], "--num", "4"]) == 2
    assert "is a CM-form export: MeanFlow trains MF-form students (mid-training form=mf)" in capsys.readouterr().err
    for pair, message in (("0.5", "write T:R in τ, e.g. 0.5:0 or max:0"), ("0.3:0.5", "≤ r < t ≤ τ_max")):
        assert main(["--teacher", tiny_mf["teacher"], "--student", tiny_mf["mf"], "--pairs", pair]) == 2
        assert message in capsys.readouterr().err
