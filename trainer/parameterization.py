"""How a student reads its network's output: the c_skip / c_out of f_θ(x̃, σ̃) = c_skip·x̃ + c_out·F(c_in·x̃, c_noise).

The network F keeps the teacher's input scaling c_in and time input c_noise (it was trained on exactly those inputs);
a parameterisation only chooses how its output becomes the clean-sample prediction (EDM, Karras et al. 2022, eq. 7):

- ``teacher``: the teacher's own preconditioning (`pipeline.noise_schedule.edm_preconditioning`). At init from the teacher's
  weights f IS the teacher's denoiser D(x̃, σ̃). For an ε-prediction VP teacher c_out = −σ̃ (up to −80 at the prior):
  a 1-step sample multiplies every error of the network's output by up to 80.
- ``edm``: EDM's bounded coefficients c_skip = σ_d²/(σ̃² + σ_d²), |c_out| = σ̃·σ_d/√(σ̃² + σ_d²) ≤ σ_d (EDM eq. 7 with
  Table 1's c_skip, c_out). The sign of c_out follows the teacher's (negative for ε, v and flow teachers, positive for
  EDM and x0 teachers), so at low noise, where ε̂ and the EDM target agree, the network starts where the teacher's
  reading was. With σ_d = 1 and a negative sign this is the v-prediction reading (c_skip = 1/(1+σ̃²),
  c_out = −σ̃/√(1+σ̃²)). At high noise the teacher's network output means something else under this reading, so an
  ε-teacher's student starts far from the teacher; `trainer/mid.py`'s preconditioning transfer (``student.
  transfer_steps``) regresses it onto the teacher's denoiser first.

Both satisfy the consistency boundary condition: c_skip(0) = 1, c_out(0) = 0 (and the student enforces f(x̃, 0) = x̃).
``auto`` resolves to ``teacher`` where the teacher's own reading is bounded (|c_out| ≤ 1 at every level: v, EDM, flow,
x0 teachers) and to ``edm`` otherwise (ε-prediction VP teachers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.noise_schedule import NoiseSchedule, edm_preconditioning

__all__ = ["PARAMETERIZATION_NAMES", "Parameterization", "resolve_parameterization"]

PARAMETERIZATION_NAMES = ("auto", "teacher", "edm")
DEFAULT_SIGMA_DATA = 0.5  # EDM's σ_data (the authors' CIFAR teachers)
_BOUNDED_C_OUT = 1.0  # a teacher reading whose |c_out| stays below this at every level is already well-conditioned
_PROBE_LEVELS = (0.002, 0.1, 1.0, 10.0, 80.0)


@dataclass(frozen=True)
class Parameterization:
    """A resolved output reading: ``teacher`` or ``edm`` (with σ_d and the sign of c_out)."""

    name: str  # "teacher" | "edm"
    sigma_data: float | None = None  # edm only
    c_out_sign: float | None = None  # edm only: +1 or −1, the sign of the teacher's c_out

    def __post_init__(self) -> None:
        """Refuse names and values that cannot be read back."""
        if self.name not in ("teacher", "edm"):
            raise ValueError(
                f"unknown parameterization {self.name!r}: choose one of {', '.join(PARAMETERIZATION_NAMES)}"
            )
        if self.name == "edm":
            if self.sigma_data is None or not self.sigma_data > 0 or not math.isfinite(self.sigma_data):
                raise ValueError(f"parameterization 'edm' needs sigma_data > 0, got {self.sigma_data!r}")
            if self.c_out_sign not in (1.0, -1.0):
                raise ValueError(f"parameterization 'edm' needs c_out_sign +1 or -1, got {self.c_out_sign!r}")

    def coefficients(
        self, schedule: NoiseSchedule, prediction_type: str, sigma_edm: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_in, c_noise, c_skip, c_out), float64 [B]: the teacher's c_in, c_noise and this reading's c_skip, c_out."""
        c_in, c_noise, c_skip, c_out = edm_preconditioning(schedule, prediction_type, sigma_edm)
        if self.name == "teacher":
            return c_in, c_noise, c_skip, c_out
        sigma = sigma_edm.to(torch.float64)  # [B]
        sigma_data = float(self.sigma_data)
        denominator = sigma * sigma + sigma_data * sigma_data  # [B]
        c_skip = sigma_data * sigma_data / denominator  # [B], EDM Table 1
        c_out = self.c_out_sign * sigma * sigma_data / torch.sqrt(denominator)  # [B]
        return c_in, c_noise, c_skip, c_out

    def reads_like_teacher(self, schedule: NoiseSchedule, prediction_type: str) -> bool:
        """Whether this reading's c_skip, c_out equal the teacher's own at the probe levels (then a transfer would
        regress the network onto itself: "edm" with σ_d = 1 is a v-teacher's own reading)."""
        if self.name == "teacher":
            return True
        levels = _probe_levels(schedule)  # [P]
        own = edm_preconditioning(schedule, prediction_type, levels)  # 4 × [P]
        mine = self.coefficients(schedule, prediction_type, levels)  # 4 × [P]
        return all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(own[2:], mine[2:]))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form recorded in a student export (student.json)."""
        if self.name == "teacher":
            return {"name": "teacher"}
        return {"name": "edm", "sigma_data": self.sigma_data, "c_out_sign": self.c_out_sign}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Parameterization:
        """Read back :meth:`to_dict` (a ValueError names what is wrong)."""
        if not isinstance(data, dict) or "name" not in data:
            raise ValueError(f"parameterization must be a mapping with a 'name', got {data!r}")
        return cls(str(data["name"]), data.get("sigma_data"), data.get("c_out_sign"))

    def describe(self) -> str:
        """One line for logs and dry runs."""
        if self.name == "teacher":
            return "teacher (the teacher's own c_skip, c_out)"
        return f"edm (σ_d = {self.sigma_data:g}, c_out sign {'+' if self.c_out_sign > 0 else '−'})"


def _probe_levels(schedule: NoiseSchedule) -> torch.Tensor:
    """A few σ̃ levels inside the teacher's schedule → float64 [P]."""
    lo, hi = schedule.sigma_edm_min, min(schedule.sigma_edm_max, 80.0)
    return torch.tensor([min(max(level, lo), hi) for level in _PROBE_LEVELS if level > 0], dtype=torch.float64)


def _teacher_c_out(schedule: NoiseSchedule, prediction_type: str) -> torch.Tensor:
    """The teacher's own c_out at a few probe levels inside its schedule → float64 [P]."""
    return edm_preconditioning(schedule, prediction_type, _probe_levels(schedule))[3]


def resolve_parameterization(
    name: str, schedule: NoiseSchedule, prediction_type: str, *, sigma_data: float = DEFAULT_SIGMA_DATA
) -> Parameterization:
    """The reading `name` ("auto" | "teacher" | "edm") stands for with this teacher (see the module docstring)."""
    if name not in PARAMETERIZATION_NAMES:
        raise ValueError(f"unknown parameterization {name!r}: choose one of {', '.join(PARAMETERIZATION_NAMES)}")
    c_out = _teacher_c_out(schedule, prediction_type)  # [P]
    if name == "teacher" or (name == "auto" and float(c_out.abs().max()) <= _BOUNDED_C_OUT):
        return Parameterization("teacher")
    sign = 1.0 if float(c_out[0]) > 0 else -1.0  # at the lowest level, where every reading is ≈ x̃ ± σ̃·F
    return Parameterization("edm", float(sigma_data), sign)
