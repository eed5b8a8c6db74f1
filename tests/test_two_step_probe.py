"""jobs/two_step_probe.py: a student's own pair of maps is its 2-step sampler; hybrids mix two students' maps; the
draws are the runs' evaluation noise and fd_redraws' re-draws; CM-form exports and τ_mid outside (0, τ_max) are
refused in the CLI's words."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from jobs.fd_redraws import redraw_eval_seed
from jobs.two_step_probe import draw_noise, main, probe, two_step
from pipeline.solvers import prior_noise
from pipeline.teacher import load_teacher
from tests.test_compare_inits import tiny_teacher_dir
from trainer.student import FlowMapStudent


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny teacher's MF-form student (a), a perturbed copy (b) and its CM-form student, exported."""
    root = tmp_path_factory.mktemp("two_step")
    teacher = load_teacher(tiny_teacher_dir(root / "teacher"))
    student = FlowMapStudent.from_teacher(teacher, second_time_input=True)
    student.save_pretrained(root / "a")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    student.save_pretrained(root / "b")
    FlowMapStudent.from_teacher(teacher).save_pretrained(root / "cm")
    return {name: str(root / name) for name in ("a", "b", "cm")}


def test_a_students_own_maps_are_its_two_step_sampler_and_hybrids_mix_them(exports):
    a, b = (FlowMapStudent.from_pretrained(exports[name]).eval() for name in ("a", "b"))
    noise = torch.randn(6, *a.sample_shape, generator=torch.Generator().manual_seed(0))
    own = two_step(a, a, noise, 0.6, batch_size=4)  # two batches: the result must not depend on the batching
    assert torch.allclose(own, a.sample(noise, 2, intermediate=0.6), rtol=1e-5, atol=1e-5)
    tau_max, z = a.mf_prior(noise)
    expected = b.flow_map(a.flow_map(z, t=tau_max, r=0.6), t=0.6, r=0.0)
    hybrid = two_step(a, b, noise, 0.6)
    assert torch.allclose(hybrid, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(hybrid, own) and not torch.allclose(hybrid, two_step(b, b, noise, 0.6))
    assert torch.equal(draw_noise(a, 2, 5), prior_noise(list(range(redraw_eval_seed(2), redraw_eval_seed(2) + 5)),
                                                         a.sample_shape))


def test_probe_scores_every_pair_and_draw_with_fresh_mean_over_draws_from_one(exports, tmp_path, capsys):
    result = probe({"a": exports["a"], "b": exports["b"]}, intermediates=[0.5], draws=[0, 1, 2], num=16,
                   hybrids=True)
    assert [(row["first"], row["second"]) for row in result["rows"]] == [("a", "a"), ("a", "b"), ("b", "a"),
                                                                         ("b", "b")]
    for row in result["rows"]:
        assert set(row["fd"]) == {0, 1, 2}
        assert row["fresh_mean"] == pytest.approx(statistics.fmean([row["fd"][1], row["fd"][2]]), rel=1e-12)
    out = tmp_path / "two_step.json"
    assert main(["--student", f"a={exports['a']}", "--intermediate", "0.5", "0.8", "--draws", "0", "--num", "8",
                 "--json", str(out)]) == 0
    assert "| a | a | 0.8 |" in capsys.readouterr().out
    assert [row["tau_mid"] for row in json.loads(out.read_text())["rows"]] == [0.5, 0.8]


def test_cm_exports_bad_times_and_unnamed_students_are_refused(exports, capsys):
    for arguments, message in (
        ([f"cm={exports['cm']}"], "is a CM-form export: this probe reads MF-form students"),
        ([f"a={exports['a']}", "--intermediate", "1.0"], "τ_mid must lie in (0, τ_max = "),
        ([exports["a"]], "write NAME=EXPORT_DIR"),
        ([f"a={exports['a']}", "--draws", "-1"], "--draws must be >= 0"),
    ):
        assert main(["--student", *arguments[:1], "--num", "4", "--draws", "0", *arguments[1:]]) == 2
        assert message in capsys.readouterr().err
