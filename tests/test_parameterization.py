"""Student parameterisations: which reading "auto" picks, the boundary condition, bounded output error, export."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import assert_close
from tests.test_student import SCHEDULERS, tiny_teacher
from trainer.parameterization import Parameterization, resolve_parameterization
from trainer.student import FlowMapStudent, StudentLoadError
from trainer.student_export import STUDENT_FORMAT_VERSION


@pytest.mark.parametrize("kind, expected", [("vp-epsilon", "edm"), ("vp-v", "teacher"), ("edm", "teacher"),
                                            ("flow", "teacher")])
def test_auto_keeps_the_teachers_reading_unless_its_c_out_is_unbounded(kind, expected):
    teacher = tiny_teacher(kind)
    resolved = resolve_parameterization("auto", teacher.schedule, teacher.prediction_type)
    assert resolved.name == expected
    if expected == "edm":
        assert resolved.sigma_data == 0.5 and resolved.c_out_sign == -1.0  # ε: c_out = −σ̃ is negative
    with pytest.raises(ValueError, match="auto, teacher, edm"):
        resolve_parameterization("eps", teacher.schedule, teacher.prediction_type)


def test_edm_coefficients_are_edms_table_1_and_bounded_by_sigma_data():
    teacher = tiny_teacher("vp-epsilon")
    sigma = torch.tensor([1e-3, 0.1, 0.5, 2.0, 80.0], dtype=torch.float64)
    for sigma_data in (0.5, 1.0):
        reading = Parameterization("edm", sigma_data, -1.0)
        c_in, _, c_skip, c_out = reading.coefficients(teacher.schedule, "epsilon", sigma)
        assert torch.allclose(c_skip, sigma_data**2 / (sigma**2 + sigma_data**2), rtol=1e-12)
        assert torch.allclose(c_out, -sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2), rtol=1e-12)
        assert bool((c_out.abs() <= sigma_data).all())
        assert torch.allclose(c_in, 1 / torch.sqrt(1 + sigma**2), rtol=1e-12)  # the teacher's input scaling is kept


def test_edm_reading_with_unit_sigma_data_is_the_v_prediction_reading():
    """c_skip = 1/(1+σ̃²), c_out = −σ̃/√(1+σ̃²): what a v-prediction teacher's own preconditioning is."""
    teacher = tiny_teacher("vp-v")
    own = FlowMapStudent.from_teacher(teacher, parameterization="teacher")
    v_reading = FlowMapStudent.from_teacher(teacher, parameterization=Parameterization("edm", 1.0, -1.0))
    x = torch.randn(4, 1, 8, 8) * 3
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    with torch.no_grad():
        assert_close(v_reading.denoise(x, sigma), own.denoise(x, sigma), magnitude=float(x.abs().max()))


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
@pytest.mark.parametrize("init", ["teacher", "random"])
def test_edm_reading_keeps_the_boundary_condition_exactly(kind, init):
    student = FlowMapStudent.from_teacher(tiny_teacher(kind), parameterization="edm", init=init, seed=2)
    assert student.parameterization.name == "edm"
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(student.denoise(x, 0.0), x)
        gaps = [(student.denoise(x, s) - x).abs().max().item() for s in (1e-1, 1e-2, 1e-3)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2  # f(x, σ̃) → x continuously as σ̃ → 0


def test_mf_velocity_under_edm_reading_is_the_velocity_of_its_cm_reading():
    """u(z, t, t) = (z − f(z/(1−τ), τ/(1−τ)))/τ at every τ, with bounded coefficients up to τ → 1."""
    teacher = tiny_teacher("vp-epsilon")
    mf = FlowMapStudent.from_teacher(teacher, second_time_input=True, parameterization="edm")
    tau = torch.tensor([0.002, 0.3, 0.9, 0.98], dtype=torch.float64)
    z = torch.randn(4, 1, 8, 8)
    column = tau.float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        u = mf.velocity(z, t=tau)
        f = mf.denoise(z / (1 - column), tau / (1 - tau))
    expected = (z - f) / column
    for i in range(len(tau)):  # float32 rounding of f (magnitude |x̃|) is divided by τ
        magnitude = float((z[i] / (1 - column[i])).abs().max() / column[i])
        assert_close(u[i], expected[i], magnitude=magnitude, what=f"τ = {float(tau[i])}")


def test_a_network_error_reaches_a_one_step_sample_scaled_by_c_out():
    """Adding δ to the network's output moves the 1-step sample by |c_out(σ̃_max)|·δ: 80·δ under an ε-teacher's own
    reading, at most σ_d·δ under the EDM reading. This is what makes the EDM reading well-conditioned."""
    teacher = tiny_teacher("vp-epsilon")
    noise = torch.randn(2, 1, 8, 8)
    delta = 1e-2
    moved = {}
    for name in ("teacher", "edm"):
        student = FlowMapStudent.from_teacher(teacher, parameterization=name)
        before = student.sample(noise, 1)
        with torch.no_grad():
            student.net.conv_out.bias.add_(delta)
        moved[name] = (student.sample(noise, 1) - before).abs().mean().item()
    sigma_max = FlowMapStudent.from_teacher(teacher).default_sigma_max()
    assert math.isclose(moved["teacher"], sigma_max * delta, rel_tol=1e-3)
    assert math.isclose(moved["edm"], sigma_max * 0.5 / math.hypot(sigma_max, 0.5) * delta, rel_tol=1e-3)


def test_export_records_the_parameterization_and_reads_it_back(tmp_path):
    teacher = tiny_teacher("vp-epsilon")
    student = FlowMapStudent.from_teacher(teacher, parameterization="edm", sigma_data=0.75)
    export = student.save_pretrained(tmp_path / "export")
    meta = json.loads((export / "student.json").read_text())
    assert meta["format_version"] == STUDENT_FORMAT_VERSION >= 2  # format 2 introduced the recorded parameterisation
    assert meta["parameterization"] == {"name": "edm", "sigma_data": 0.75, "c_out_sign": -1.0}
    loaded = FlowMapStudent.from_pretrained(export)
    assert loaded.parameterization == student.parameterization
    x, sigma = torch.randn(2, 1, 8, 8) * 5, torch.tensor([0.3, 20.0])
    with torch.no_grad():
        assert torch.equal(loaded.denoise(x, sigma), student.denoise(x, sigma))


def test_a_format_1_export_loads_as_the_teachers_reading_with_a_warning(tmp_path):
    teacher = tiny_teacher("vp-epsilon")
    export = FlowMapStudent.from_teacher(teacher, parameterization="teacher").save_pretrained(tmp_path / "old")
    meta = json.loads((export / "student.json").read_text())
    del meta["parameterization"]
    (export / "student.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.warns(UserWarning, match="format-1 student export.*parameterization 'teacher'.*Re-export"):
        loaded = FlowMapStudent.from_pretrained(export)
    assert loaded.parameterization.name == "teacher"


def test_an_unknown_recorded_parameterization_is_refused_with_the_known_names(tmp_path):
    export = FlowMapStudent.from_teacher(tiny_teacher()).save_pretrained(tmp_path / "export")
    meta = json.loads((export / "student.json").read_text())
    (export / "student.json").write_text(json.dumps({**meta, "parameterization": {"name": "magic"}}))
    with pytest.raises(StudentLoadError, match="'magic'.*known: teacher, edm.*re-export"):
        FlowMapStudent.from_pretrained(export)
