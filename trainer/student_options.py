"""How a stage builds its student from the teacher: parameterisation, dropout and the preconditioning transfer.

One config type for every stage that builds a `FlowMapStudent` from a teacher (`trainer/mid.py`, and `trainer/post.py`
for inits "teacher" and "random"): key `student` in the stage presets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from trainer.config import ConfigError
from trainer.parameterization import DEFAULT_SIGMA_DATA, PARAMETERIZATION_NAMES

__all__ = ["StudentOptions", "build_student", "set_dropout"]


@dataclass(frozen=True, kw_only=True)
class StudentOptions:
    """The student's output reading (trainer.parameterization), its dropout and the preconditioning transfer."""

    # "auto": the teacher's own c_skip/c_out where they are bounded (v, EDM, flow, x0 teachers), EDM's bounded reading
    # for ε-prediction teachers (whose own c_out = −σ̃ multiplies network errors by up to 80 in a 1-step sample).
    parameterization: Literal["auto", "teacher", "edm"] = "auto"
    sigma_data: float = DEFAULT_SIGMA_DATA  # σ_d of the "edm" reading (EDM's 0.5)
    # Mid-training only: the first N steps regress f_θ onto the teacher's denoiser at the store's points (in the
    # network's output space, ‖(f_θ − D)/c_out‖²), so a re-read network starts as the teacher before CMT begins.
    transfer_steps: int = 0
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
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"student.dropout must be in [0, 1) or none (keep the teacher's), got {self.dropout}")


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
