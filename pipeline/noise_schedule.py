"""The teacher's noise schedule: timestep ↔ EDM level σ̃ ↔ native (α, σ), and its EDM preconditioning.

Three schedule families are understood (ARCHITECTURE.md, "Time convention"):

- ``vp``   discrete variance-preserving (DDPM-style ``alphas_cumprod``; DDPM/DDIM/Euler/Heun/DPM-Solver/...
           configs). The model sees ``x_vp = α·x0 + σ·ε`` at an integer or fractional timestep; a level σ̃ maps
           to a fractional timestep by interpolating log σ̃ linearly over the schedule's table (the table is
           computed in float32 exactly as diffusers' schedulers compute theirs, so table levels map to
           integer timesteps exactly).
- ``edm``  EDM / VE-Karras (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``): α = 1; the model is
           called through the scheduler's own ``precondition_inputs/noise/outputs`` (c_in, c_noise, c_skip, c_out).
- ``flow`` flow matching (``FlowMatchEulerDiscreteScheduler``): α = 1 − t, σ = t; the model sees
           ``x_fm`` at timestep ``t·num_train_timesteps`` and predicts the velocity ``ε − x0``.

`NoiseSchedule.from_scheduler` reads one from a diffusers scheduler instance; `pipeline/teacher.py` drives the
network with it, and students initialised from the teacher's network reuse `edm_preconditioning`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.teacher_files import TeacherLoadError
from pipeline.time_convention import vp_alpha_sigma

__all__ = [
    "SUPPORTED_SCHEDULER_FAMILIES",
    "NoiseSchedule",
    "SigmaRangeError",
    "UnsupportedSchedulerError",
    "edm_preconditioning",
]

SUPPORTED_SCHEDULER_FAMILIES = {
    "vp": "DDPM-style discrete schedules with alphas_cumprod (DDPMScheduler, DDIMScheduler, PNDMScheduler, "
    "EulerDiscreteScheduler, HeunDiscreteScheduler, DPMSolverMultistepScheduler, ...)",
    "edm": "EDMEulerScheduler, EDMDPMSolverMultistepScheduler",
    "flow": "FlowMatchEulerDiscreteScheduler",
}
_SIGMA_LOG_TOLERANCE = 1e-4  # how far (in log σ̃) a level may sit outside a VP table before it is refused


class UnsupportedSchedulerError(TeacherLoadError):
    """The teacher's scheduler does not belong to a schedule family this project can drive."""



class SigmaRangeError(ValueError):
    """A noise level outside what the teacher's schedule can represent."""


def _scheduler_family(scheduler: Any) -> str:
    """Classify a diffusers scheduler instance into 'vp', 'edm' or 'flow', or refuse it."""
    name = type(scheduler).__name__
    if name.startswith("FlowMatch"):
        return "flow"
    if name.startswith("EDM") and hasattr(scheduler, "precondition_outputs"):
        return "edm"
    if isinstance(getattr(scheduler, "alphas_cumprod", None), torch.Tensor):
        if getattr(scheduler.config, "use_flow_sigmas", False):
            raise UnsupportedSchedulerError(
                f"{name} with use_flow_sigmas=True describes a flow-matching teacher: give the teacher its "
                "FlowMatchEulerDiscreteScheduler config instead (scheduler=...)"
            )
        return "vp"
    supported = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_SCHEDULER_FAMILIES.items())
    raise UnsupportedSchedulerError(
        f"scheduler {name} is not supported (its noise schedule cannot be mapped to x = α·x0 + σ·ε here). "
        f"Supported schedule families — {supported}. Pass one of these as scheduler=... (the one the teacher "
        "was trained with)"
    )


@dataclass(frozen=True)
class NoiseSchedule:
    """The teacher's noise schedule: timestep ↔ EDM level σ̃ ↔ native (α, σ), for one family."""

    family: str  # "vp" | "edm" | "flow"
    num_train_timesteps: int
    log_sigma_table: np.ndarray | None  # vp: float64 [T], log σ̃ at integer timesteps (increasing)
    sigma_edm_min: float  # smallest σ̃ the teacher represents
    sigma_edm_max: float  # largest σ̃ the teacher represents (inf for flow matching)
    template: Any  # the scheduler instance the schedule was read from (EDM preconditioning lives there)

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """Read the schedule of a diffusers scheduler instance."""
        family = _scheduler_family(scheduler)
        T = int(getattr(scheduler.config, "num_train_timesteps", 1000) or 1000)
        if family == "vp":
            alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)  # [T], float32 as in diffusers
            sigma_table = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # [T], σ̃ of each integer timestep
            log_table = np.log(sigma_table.double().numpy())
            if not np.all(np.diff(log_table) > 0):
                zero_snr_hint = (
                    " With rescale_betas_zero_snr, this scheduler class replaces the last alphas_cumprod (0) by "
                    "2**-24, above the level before it for this beta schedule: load the teacher with its "
                    "DDPMScheduler / DDIMScheduler config (which keeps alphas_cumprod[-1] = 0) or use beta_schedule 'scaled_linear' "
                    "or 'squaredcos_cap_v2'"
                    if getattr(scheduler.config, "rescale_betas_zero_snr", False) else ""
                )
                raise UnsupportedSchedulerError(
                    f"{type(scheduler).__name__}: the noise level σ̃(t) of this schedule is not strictly increasing "
                    f"in t (check betas / trained_betas: every beta must be > 0).{zero_snr_hint}"
                )
            return cls("vp", T, log_table, float(np.exp(log_table[0])), float(np.exp(log_table[-1])), scheduler)
        if family == "edm":
            probe = torch.tensor([2.0], dtype=torch.float64)
            if not torch.allclose(scheduler.precondition_noise(probe), 0.25 * torch.log(probe)):
                raise UnsupportedSchedulerError(
                    f"{type(scheduler).__name__}: only the EDM noise conditioning c_noise = ¼·ln σ is supported"
                )
            lo, hi = float(scheduler.config.sigma_min), float(scheduler.config.sigma_max)
            return cls("edm", T, None, lo, hi, scheduler)
        return cls("flow", T, None, 0.0, math.inf, scheduler)

    def timestep_from_sigma_edm(self, sigma_edm: np.ndarray) -> np.ndarray:
        """Model timestep of EDM level σ̃ (vp: fractional index by log-σ̃ interpolation; edm: ¼·ln σ̃; flow: τ·T).

        vp: σ̃ = ∞ is the last timestep of a zero-terminal-SNR table (whose last level is ∞) and refused elsewhere.
        """
        sigma_edm = np.asarray(sigma_edm, dtype=np.float64)
        if self.family == "vp":
            with np.errstate(divide="ignore"):
                log_sigma = np.log(sigma_edm)
            table = self.log_sigma_table
            terminal = np.isposinf(log_sigma) & np.isposinf(table[-1])
            bad = ~(np.isfinite(log_sigma) | terminal) | (log_sigma < table[0] - _SIGMA_LOG_TOLERANCE)
            bad |= log_sigma > table[-1] + _SIGMA_LOG_TOLERANCE
            if bad.any():
                raise SigmaRangeError(
                    f"noise level σ̃={sigma_edm[bad][0]!r} (EDM view) is outside this VP teacher's schedule "
                    f"[{self.sigma_edm_min:.6g}, {self.sigma_edm_max:.6g}]: choose sigma_max/sigma_min inside it"
                )
            with np.errstate(invalid="ignore"):
                fractional = np.interp(log_sigma, table, np.arange(len(table), dtype=np.float64))
            return np.where(terminal, len(table) - 1.0, fractional)
        if self.family == "edm":
            return 0.25 * np.log(sigma_edm)
        tau = sigma_edm / (1.0 + sigma_edm)
        return tau * self.num_train_timesteps

    def timestep_from_sigma_edm_torch(self, sigma_edm: torch.Tensor) -> torch.Tensor:
        """Differentiable float64 torch twin of :meth:`timestep_from_sigma_edm` (for trained students).

        vp levels outside the table are clamped to its ends instead of refused (σ̃ → 0 maps to timestep 0), so a
        student can be evaluated down to its boundary σ̃ = 0; inside the table both methods agree exactly.
        """
        sigma_edm = sigma_edm.to(torch.float64)
        if self.family == "vp":
            table = torch.as_tensor(self.log_sigma_table, dtype=torch.float64, device=sigma_edm.device)  # [T]
            log_sigma = torch.log(sigma_edm).clamp(min=float(table[0]), max=float(table[-1]))
            index = (torch.searchsorted(table, log_sigma.detach(), right=True) - 1).clamp(0, len(table) - 2)
            fraction = (log_sigma - table[index]) / (table[index + 1] - table[index])
            return index.to(torch.float64) + fraction
        if self.family == "edm":
            return 0.25 * torch.log(sigma_edm)
        return sigma_edm / (1.0 + sigma_edm) * self.num_train_timesteps

    def sigma_edm_from_timestep(self, timesteps: Any) -> np.ndarray:
        """EDM level σ̃ of model timesteps (the exact inverse of :meth:`timestep_from_sigma_edm`)."""
        t = np.asarray(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps, np.float64)
        if self.family == "vp":
            table = self.log_sigma_table
            return np.exp(np.interp(t, np.arange(len(table), dtype=np.float64), table))
        if self.family == "edm":
            return np.exp(4.0 * t)
        tau = t / self.num_train_timesteps
        return tau / (1.0 - tau)

    def alpha_sigma(self, timesteps: Any) -> tuple[np.ndarray, np.ndarray]:
        """Native float64 (α_t, σ_t) of model timesteps: vp α=1/√(1+σ̃²), σ=σ̃α; edm (1, σ̃); flow (1−t/T, t/T)."""
        t = np.asarray(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps, np.float64)
        if self.family == "flow":
            tau = t / self.num_train_timesteps
            return 1.0 - tau, tau
        sigma_edm = self.sigma_edm_from_timestep(t)
        if self.family == "edm":
            return np.ones_like(sigma_edm), sigma_edm
        return vp_alpha_sigma(sigma_edm)


def edm_preconditioning(
    schedule: NoiseSchedule, prediction_type: str, sigma_edm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_in, c_noise, c_skip, c_out), float64 [B], with D(x̃, σ̃) = c_skip·x̃ + c_out·F(c_in·x̃, c_noise) (EDM eq. 7).

    The same denoiser as :meth:`Teacher.denoise_native` written as differentiable torch coefficients of σ̃, for
    students initialised from the teacher's network (F = the network, c_noise = its timestep input):
    vp ε: c_in = 1/√(1+σ̃²), c_skip = 1, c_out = −σ̃; vp v: c_skip = 1/(1+σ̃²), c_out = −σ̃/√(1+σ̃²);
    vp sample: c_skip = 0, c_out = 1; edm: the scheduler's own preconditioning; flow: c_in = c_skip = 1/(1+σ̃),
    c_out = −τ = −σ̃/(1+σ̃), c_noise = τ·T. vp levels below the table clamp c_noise to timestep 0.
    """
    sigma = sigma_edm.to(torch.float64)  # [B]
    c_noise = schedule.timestep_from_sigma_edm_torch(sigma) if schedule.family != "edm" else None
    if schedule.family == "vp":
        alpha_vp = 1.0 / torch.sqrt(1.0 + sigma * sigma)  # [B]
        if prediction_type == "epsilon":
            return alpha_vp, c_noise, torch.ones_like(sigma), -sigma
        if prediction_type == "v_prediction":
            return alpha_vp, c_noise, alpha_vp * alpha_vp, -sigma * alpha_vp
        if prediction_type == "sample":
            return alpha_vp, c_noise, torch.zeros_like(sigma), torch.ones_like(sigma)
    elif schedule.family == "edm":
        template = schedule.template
        ones = torch.ones_like(sigma)
        c_in = template.precondition_inputs(ones, sigma)  # [B]
        c_skip = template.precondition_outputs(ones, torch.zeros_like(sigma), sigma)  # [B]
        c_out = template.precondition_outputs(torch.zeros_like(sigma), ones, sigma)  # [B]
        return c_in, template.precondition_noise(sigma).reshape(sigma.shape), c_skip, c_out
    elif prediction_type == "flow":
        scale = 1.0 / (1.0 + sigma)  # [B], 1 − τ
        return scale, c_noise, scale, -sigma * scale
    raise UnsupportedSchedulerError(
        f"prediction_type {prediction_type!r} is not supported for a {schedule.family} schedule"
    )
