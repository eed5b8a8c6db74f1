"""ECT and ECD, the post-training objectives of Ψ_{t→0} (ECT: Geng et al. 2024, arXiv 2406.14548; iCT: Song &
Dhariwal, arXiv 2310.14189): config, time sampling with its Δt schedule, pair construction and the loss callables
`trainer/post.py` trains with.

Everything here is in the EDM view (x̃ = x0 + σ̃·ε, `pipeline/time_convention.py`): the times t and r are σ̃ levels,
0 <= r < t, and the student is `FlowMapStudent.denoise`, f_θ(x̃, σ̃) (its CM form).

- ECT (`ECTLoss`): ln t ~ N(P_mean, P_std²) clamped to [sigma_min, sigma_max], r = t·(1 − (1 + k·sigmoid(−b·t))/q)
  (ECT's Δt schedule; q fixed, 4096 after CMT, or doubled every `double_every_steps` for the diffusion-initialised
  baseline); x_t = x0 + t·ε and x_r = x0 + r·ε share ε AND the dropout mask; per-sample loss
  d(f_θ(x_t, t), sg(f_θ(x_r, r)))/(t − r) with the target x0 where r = 0 (`trainer.losses.ect_loss`, `ect_target`).
  Batch keys read: "x0" [B, *S] (a store's clean endpoints, `trainer.data` mode "endpoints", or dataset images) and
  "labels" [B] for class-conditional students.
- ECD from a store (`StoredECDLoss`): the pair is two consecutive stored solver points, so no teacher runs. Batch keys
  read: "x_t", "sigma_t" (σ̃ of x_t), "x_r", "sigma_r" (σ̃ of x_r < σ̃ of x_t) (`trainer.data` mode "ecd") and "labels".
- ECD with a live teacher (`LiveECDLoss`, data from a dataset): t, r as in ECT, x_r = one teacher PF-ODE step from
  (x_t, t) to r (`pipeline.ode_step.ode_step`). Batch keys read: "x0" and "labels".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

from pipeline.fault_points import POST_STEP, reach
from trainer.config import ConfigError
from trainer.losses import column
from trainer.methods.per_step import (
    attention_context,
    conditioning_labels,
    same_dropout,
    step_generator,
    step_seed,
)

__all__ = [
    "ECDConfig",
    "ECTConfig",
    "ECTLoss",
    "LiveECDLoss",
    "StoredECDLoss",
    "consistency_pair_loss",
    "ect_sigma_range",
    "ect_times",
    "noised_ect_pair",
    "paired_denoise",
]


@dataclass(frozen=True, kw_only=True)
class ECTConfig:
    """ECT / ECD time sampling, Δt schedule and loss weighting (ECT's defaults; q fixed at 4096 after CMT)."""

    p_mean: float = -1.1
    p_std: float = 2.0
    k: float = 8.0
    b: float = 1.0
    q_mode: Literal["fixed", "doubling"] = "fixed"
    q_start: float = 4096.0  # "fixed": the q used throughout; "doubling": ECT's start (2)
    double_every_steps: int | None = None  # "doubling": steps per ECT stage (q doubles after each)
    q_max: float | None = None
    weighting: Literal["pseudo_huber", "power"] = "pseudo_huber"
    c: float | None = None  # pseudo_huber: None → iCT's 0.00054·√d; power: None → 1e-3
    p: float = 0.5  # power weighting's exponent
    sigma_min: float = 0.002  # t is clamped to [sigma_min, sigma_max] (sigma_max also to the schedule's largest σ̃)
    sigma_max: float = 80.0

    def __post_init__(self) -> None:
        """Reject schedules the losses would refuse mid-run, naming the fix."""
        if not self.q_start > 0:
            raise ConfigError(f"ect.q_start must be > 0, got {self.q_start}")
        if self.q_mode == "doubling" and (self.double_every_steps is None or self.double_every_steps < 1):
            raise ConfigError("ect.q_mode=doubling needs ect.double_every_steps >= 1 (optimizer steps per ECT stage)")
        if self.p_std < 0 or self.k < 0:
            raise ConfigError("ect.p_std and ect.k must be >= 0")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"need 0 < ect.sigma_min < ect.sigma_max, got {self.sigma_min} and {self.sigma_max}")


@dataclass(frozen=True, kw_only=True)
class ECDConfig:
    """ECD with a live teacher (`--data dataset:`): the ODE step method and the teacher's guidance."""

    teacher_step: Literal["euler", "heun"] = "heun"
    guidance_scale: float | None = None


def ect_sigma_range(ect: ECTConfig, schedule: Any, teacher: Any = None) -> tuple[float, float]:
    """t range of ECT / ECD: [sigma_min, sigma_max] within the schedule's top level (and the teacher's bottom one)."""
    low = ect.sigma_min if teacher is None else max(ect.sigma_min, teacher.sigma_edm_range[0])
    high = min(ect.sigma_max, schedule.sigma_edm_max)
    if teacher is not None:
        high = min(high, teacher.sigma_edm_range[1])
    if not low < high:
        raise ConfigError(f"ECT time range [{low}, {high}] is empty for this schedule: adjust ect.sigma_min/sigma_max")
    return low, high


def paired_denoise(
    model: torch.nn.Module, x_t: Tensor, x_r: Tensor, *, t: Tensor, r: Tensor, labels: Tensor | None, dropout_seed: int
) -> tuple[Tensor, Tensor]:
    """(f_θ(x_t, t) with gradient through `model`, sg(f_θ(x_r, r)) without): both forwards with ONE dropout mask.

    t, r: σ̃ [B] of x_t and x_r (EDM view).

    The target pass runs on the unwrapped module under no_grad; the prediction pass through `model` (DDP-wrapped
    in multi-process runs, so its backward all-reduces the gradients).
    """
    with same_dropout(dropout_seed, x_t.device):
        f_t = model("cm", x_t, t, labels)  # [B, *S]
    with torch.no_grad(), same_dropout(dropout_seed, x_t.device):
        f_r = extract_model_from_parallel(model)("cm", x_r, r, labels)  # [B, *S]
    return f_t, f_r


def consistency_pair_loss(
    model: torch.nn.Module,
    x_t: Tensor,
    x_r: Tensor,
    *,
    t: Tensor,
    r: Tensor,
    labels: Tensor | None,
    ect: ECTConfig,
    dropout_seed: int,
) -> Tensor:
    """ECT's per-sample loss d(f_θ(x_t, t), sg(f_θ(x_r, r)))/(t − r), target x_r itself where r = 0 (f(x, 0) = x) → [B].

    For ECT x_r = x0 + r·ε, so the r = 0 target is the clean sample; for ECD x_r is the teacher's ODE step.
    """
    from trainer.losses import ect_loss, ect_target

    f_t, f_r = paired_denoise(model, x_t, x_r, t=t, r=r, labels=labels, dropout_seed=dropout_seed)
    target = ect_target(f_r, x_r, r=r)  # [B, *S]
    return ect_loss(f_t, target, t=t, r=r, weighting=ect.weighting, c=ect.c, p=ect.p)  # [B]


def ect_times(
    batch: int, step: int, ect: ECTConfig, sigma_range: tuple[float, float], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(t, r) [B] float64 σ̃ of ECT: ln t ~ N(P_mean, P_std²) clamped to the range, r = ect_r_from_t(t, q(step))."""
    from trainer.schedules import clamp_sigma, ect_q_schedule, ect_r_from_t, sample_ect_times

    t = sample_ect_times(batch, p_mean=ect.p_mean, p_std=ect.p_std, generator=generator)  # [B] float64
    t = clamp_sigma(t, sigma_min=sigma_range[0], sigma_max=sigma_range[1])
    q = ect_q_schedule(step, mode=ect.q_mode, q_start=ect.q_start, double_every_steps=ect.double_every_steps,
                       q_max=ect.q_max)
    return t, ect_r_from_t(t, q, k=ect.k, b=ect.b)


def noised_ect_pair(
    x0: Tensor, step: int, ect: ECTConfig, sigma_range: tuple[float, float]
) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
    """This step's seed, ECT times (t, r) [B], x_t = x0 + t·ε [B, *S] and ε, all drawn from the step's own seed."""
    seed = step_seed()
    generator = step_generator(seed, x0.device)
    t, r = ect_times(x0.shape[0], step, ect, sigma_range, generator)  # [B] each
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # [B, *S]
    return seed, t, r, x0 + column(t, x0) * noise, noise


@dataclass
class ECTLoss:
    """ECT on clean samples (batch keys "x0", "labels"): x_t = x0 + t·ε, x_r = x0 + r·ε share ε and the dropout mask."""

    ect: ECTConfig
    sigma_range: tuple[float, float]
    attention: str = "sdpa"

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Tensor], step: int) -> Tensor:
        """Per-sample ECT loss [B] of one batch."""
        reach(POST_STEP, step)
        seed, t, r, x_t, noise = noised_ect_pair(batch["x0"], step, self.ect, self.sigma_range)
        x_r = batch["x0"] + column(r, noise) * noise  # [B, *S], the same ε as x_t
        with attention_context(self.attention):
            return consistency_pair_loss(model, x_t, x_r, t=t, r=r, labels=conditioning_labels(model, batch),
                                         ect=self.ect, dropout_seed=seed + 1)


@dataclass
class StoredECDLoss:
    """ECD from a store (batch keys "x_t", "sigma_t", "x_r", "sigma_r", "labels"): (x_t, x_r) are consecutive stored
    solver points, so no teacher runs during training."""

    ect: ECTConfig
    attention: str = "sdpa"

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Tensor], step: int) -> Tensor:
        """Per-sample ECD loss [B] on the stored one-step pairs (x_t at σ̃_t, x_r at σ̃_r < σ̃_t)."""
        reach(POST_STEP, step)
        t = batch["sigma_t"].to(torch.float64)  # [B]
        r = batch["sigma_r"].to(torch.float64)  # [B]
        with attention_context(self.attention):
            return consistency_pair_loss(model, batch["x_t"], batch["x_r"], t=t, r=r,
                                         labels=conditioning_labels(model, batch), ect=self.ect,
                                         dropout_seed=step_seed())


@dataclass
class LiveECDLoss:
    """ECD from clean data with the teacher live (batch keys "x0", "labels"): x_r = one teacher ODE step from x_t
    (`pipeline.ode_step.ode_step`)."""

    ect: ECTConfig
    ecd: ECDConfig
    teacher: Any
    sigma_range: tuple[float, float]
    attention: str = "sdpa"

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Tensor], step: int) -> Tensor:
        """Per-sample ECD loss [B]: t, r as in ECT, x_r from the teacher's step from (x_t, t) to r."""
        from pipeline.ode_step import ode_step

        reach(POST_STEP, step)
        x0 = batch["x0"]  # [B, *S]
        seed, t, r, x_t, _ = noised_ect_pair(x0, step, self.ect, self.sigma_range)
        labels = conditioning_labels(model, batch)
        x_r = ode_step(self.teacher, x_t, t, r, method=self.ecd.teacher_step, labels=labels,
                       guidance_scale=self.ecd.guidance_scale).to(x0.device)  # [B, *S]
        with attention_context(self.attention):
            return consistency_pair_loss(model, x_t, x_r, t=t, r=r, labels=labels, ect=self.ect, dropout_seed=seed + 1)
