"""How a stage builds its student from the teacher: parameterisation, dropout and the preconditioning transfer.

One config type for every stage that builds a `FlowMapStudent` from a teacher (`trainer/mid.py`, and `trainer/post.py`
for inits "teacher" and "random"): key `student` in the stage presets.

The transfer default ("auto") is measured (README "Studies: well-conditioned students", jobs/study_conditioning.py on
the ε-prediction digits teacher, fresh-noise 1-step FD-digits): a re-read student with 200 transfer steps and gradient
clipping 1.0 reaches MF 58.9 ± 10.4 where the re-read student without transfer reaches 1344.5 and the v-teacher's own
student 67.4; in the CM form it is level with the untransferred one (28.6 vs 28.9). Unclipped, the transfer diverges at
lr 2e-3 (its loss starts near 1,600 per sample at σ̃ = 80).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from trainer.config import ConfigError
from trainer.parameterization import DEFAULT_SIGMA_DATA, PARAMETERIZATION_NAMES

__all__ = ["StudentOptions", "TransferPlan", "build_student", "plan_transfer", "plan_transfer_for", "set_dropout"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class StudentOptions:
    """The student's output reading (trainer.parameterization), its dropout and the preconditioning transfer."""

    # "auto": the teacher's own c_skip/c_out where they are bounded (v, EDM, flow, x0 teachers), EDM's bounded reading
    # for ε-prediction teachers (whose own c_out = −σ̃ multiplies network errors by up to 80 in a 1-step sample).
    parameterization: Literal["auto", "teacher", "edm"] = "auto"
    sigma_data: float = DEFAULT_SIGMA_DATA  # σ_d of the "edm" reading (EDM's 0.5)
    # Mid-training only, the preconditioning transfer: the first `transfer_steps` steps regress f_θ onto the teacher's
    # denoiser at the store's points (in the network's output space, ‖(f_θ − D)/c_out‖²), so a re-read network starts
    # as the teacher before CMT begins. "auto": only when the student reads the network differently from the teacher
    # (ε-teachers under "auto"), and only when the run is longer than the transfer; "on" / "off" force it.
    transfer: Literal["auto", "on", "off"] = "auto"
    transfer_steps: int = 200
    # The gradient-norm clip of a run that transfers, for the whole run as measured, where loop.grad_clip is none
    # (the authors clip nothing); none runs the transfer unclipped.
    transfer_grad_clip: float | None = 1.0
    dropout: float | None = None  # dropout probability of every dropout layer of the student; None keeps the teacher's

    def __post_init__(self) -> None:
        """Refuse values that cannot work, naming the fix."""
        if self.parameterization not in PARAMETERIZATION_NAMES:
            raise ConfigError(
                f"student.parameterization={self.parameterization!r} is unknown: choose one of "
                f"{', '.join(PARAMETERIZATION_NAMES)}"
            )
        if not self.sigma_data > 0:
            raise ConfigError(f"student.sigma_data must be > 0, got {self.sigma_data}")
        if self.transfer_steps < 0:
            raise ConfigError(f"student.transfer_steps must be >= 0, got {self.transfer_steps}")
        if self.transfer_grad_clip is not None and not self.transfer_grad_clip > 0:
            raise ConfigError(f"student.transfer_grad_clip must be > 0 or none, got {self.transfer_grad_clip}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"student.dropout must be in [0, 1) or none (keep the teacher's), got {self.dropout}")


@dataclass(frozen=True)
class TransferPlan:
    """What a mid-training run does before CMT: `steps` transfer steps (0: none) and the run's gradient clip."""

    steps: int
    grad_clip: float | None
    reason: str

    def summary(self) -> dict[str, Any]:
        """The plan as the stage's dry run and summary report it."""
        return {"transfer_steps": self.steps, "grad_clip": self.grad_clip, "transfer_reason": self.reason}


def plan_transfer(
    options: StudentOptions, student: Any, *, total_steps: int, loop_grad_clip: float | None
) -> TransferPlan:
    """Resolve `student.transfer` for this student and run (a ConfigError names the fix when "on" cannot run)."""
    re_read = not student.parameterization.reads_like_teacher(student.schedule, student.prediction_type)
    return plan_transfer_for(options, re_read=re_read, total_steps=total_steps, loop_grad_clip=loop_grad_clip)


def plan_transfer_for(
    options: StudentOptions, *, re_read: bool, total_steps: int, loop_grad_clip: float | None
) -> TransferPlan:
    """`plan_transfer` for a student that does (`re_read`) or does not read the network differently from its
    teacher, without building it (jobs/study_conditioning.py plans its runs with it)."""
    if options.transfer == "off" or options.transfer_steps == 0:
        return TransferPlan(0, loop_grad_clip, "student.transfer=off" if options.transfer == "off"
                            else "student.transfer_steps=0")
    if options.transfer == "auto" and not re_read:
        return TransferPlan(0, loop_grad_clip, "the student reads the network as the teacher does")
    if options.transfer_steps >= total_steps:
        if options.transfer == "on":
            raise ConfigError(
                f"student.transfer_steps={options.transfer_steps} leaves no CMT step of loop.total_steps="
                f"{total_steps}: use fewer transfer steps or more total steps"
            )
        log.warning("student.transfer=auto: the %d transfer steps would leave no CMT step of loop.total_steps=%d, so "
                    "this run does not transfer; set student.transfer_steps below it to transfer",
                    options.transfer_steps, total_steps)
        return TransferPlan(0, loop_grad_clip, f"loop.total_steps={total_steps} <= student.transfer_steps")
    reason = "student.transfer=on" if options.transfer == "on" else "the student re-reads the teacher's network"
    clip = loop_grad_clip if loop_grad_clip is not None else options.transfer_grad_clip
    return TransferPlan(options.transfer_steps, clip, reason)


def set_dropout(net: torch.nn.Module, probability: float) -> int:
    """Set p of every torch dropout layer of `net` (diffusers blocks keep theirs even at p = 0) → how many."""
    layers = [module for module in net.modules() if isinstance(module, torch.nn.modules.dropout._DropoutNd)]
    for layer in layers:
        layer.p = float(probability)
    return len(layers)


def build_student(teacher: Any, options: StudentOptions, *, second_time_input: bool, init: str, seed: int) -> Any:
    """A `FlowMapStudent` of `teacher` with `options`' parameterisation and dropout."""
    from trainer.student import FlowMapStudent

    student = FlowMapStudent.from_teacher(
        teacher, second_time_input=second_time_input, init=init, seed=seed,
        parameterization=options.parameterization, sigma_data=options.sigma_data,
    )
    if options.dropout is not None and set_dropout(student.net, options.dropout) == 0 and options.dropout > 0:
        raise ConfigError(
            f"student.dropout={options.dropout} but {type(student.net).__name__} has no dropout layers: drop the key"
        )
    return student
