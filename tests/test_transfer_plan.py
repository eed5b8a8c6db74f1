"""`student.transfer` (trainer.student_options.plan_transfer): who transfers by default, for how long, clipped how."""

from __future__ import annotations

import logging

import pytest

from tests.test_student import tiny_teacher
from trainer.config import ConfigError
from trainer.parameterization import Parameterization
from trainer.student import FlowMapStudent
from trainer.student_options import StudentOptions, plan_transfer


def student_of(kind: str, parameterization: str | Parameterization = "auto") -> FlowMapStudent:
    """A CM student of a tiny teacher of `kind` (tests.test_student.SCHEDULERS)."""
    return FlowMapStudent.from_teacher(tiny_teacher(kind), parameterization=parameterization)


@pytest.mark.parametrize("kind, transfers", [("vp-epsilon", True), ("vp-v", False), ("edm", False), ("flow", False)])
def test_by_default_only_a_student_that_re_reads_the_teachers_network_transfers(kind, transfers):
    plan = plan_transfer(StudentOptions(), student_of(kind), total_steps=1000, loop_grad_clip=None)
    assert plan.steps == (200 if transfers else 0)
    assert plan.grad_clip == (1.0 if transfers else None)  # the measured default clips only a run that transfers


def test_a_reading_equal_to_the_teachers_own_is_recognised_whatever_it_is_called():
    """EDM's reading with σ_d = 1 and a negative c_out is a v-teacher's own: transferring would regress onto itself."""
    v_teacher = tiny_teacher("vp-v")
    same = Parameterization("edm", 1.0, -1.0)
    assert same.reads_like_teacher(v_teacher.schedule, v_teacher.prediction_type)
    assert not Parameterization("edm", 0.5, -1.0).reads_like_teacher(v_teacher.schedule, v_teacher.prediction_type)
    edm_teacher = tiny_teacher("edm")
    assert Parameterization("edm", 0.5, 1.0).reads_like_teacher(edm_teacher.schedule, edm_teacher.prediction_type)
    assert plan_transfer(StudentOptions(), student_of("vp-v", same), total_steps=1000, loop_grad_clip=None).steps == 0


def test_an_explicit_loop_clip_and_the_off_switch_win():
    student = student_of("vp-epsilon")
    assert plan_transfer(StudentOptions(), student, total_steps=1000, loop_grad_clip=0.3).grad_clip == 0.3
    off = plan_transfer(StudentOptions(transfer="off"), student, total_steps=1000, loop_grad_clip=None)
    assert (off.steps, off.grad_clip) == (0, None)
    unclipped = plan_transfer(StudentOptions(transfer_grad_clip=None), student, total_steps=1000, loop_grad_clip=None)
    assert (unclipped.steps, unclipped.grad_clip) == (200, None)
    forced = plan_transfer(StudentOptions(transfer="on", transfer_steps=5), student_of("vp-v"), total_steps=10,
                           loop_grad_clip=None)
    assert (forced.steps, forced.grad_clip) == (5, 1.0)


def test_a_run_shorter_than_the_transfer_skips_it_under_auto_with_a_warning_and_refuses_it_when_forced(caplog):
    student = student_of("vp-epsilon")
    with caplog.at_level(logging.WARNING, logger="trainer.student_options"):
        plan = plan_transfer(StudentOptions(), student, total_steps=200, loop_grad_clip=None)
    assert (plan.steps, plan.grad_clip) == (0, None)
    assert "set student.transfer_steps below it to transfer" in caplog.text
    with pytest.raises(ConfigError, match="student.transfer_steps=200 leaves no CMT step of loop.total_steps=200"):
        plan_transfer(StudentOptions(transfer="on"), student, total_steps=200, loop_grad_clip=None)


def test_bad_transfer_settings_are_refused_with_the_key_named():
    with pytest.raises(ConfigError, match="student.transfer_grad_clip must be > 0 or none"):
        StudentOptions(transfer_grad_clip=0.0)
    with pytest.raises(ConfigError, match="student.transfer_steps must be >= 0"):
        StudentOptions(transfer_steps=-1)
