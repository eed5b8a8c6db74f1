"""Consistency Mid-Training's objectives (CMT; Hu et al., arXiv 2509.24526): the CM and MF losses trainer/mid.py
trains with, the distance of the CM form, and the preconditioning transfer that may run before them.
No stop-gradient, no time weighting, no JVP:

- form "cm" (Ψ_{t→0}, EDM view, t = σ̃): L = E_i E_{x_T} d(f_θ(x̂_{t_i}, t_i), x̂_{t_0})                  (`cm_loss`)
- form "mf" (Ψ_{t→s}, flow-matching view, t = τ):
  L = E_{i>j} ‖u_θ(x̂_{t_i}, t=t_i, r=t_j) − (x̂_{t_i} − x̂_{t_j})/(t_i − t_j)‖²  (`mf_loss`; the paper's h_θ(x̂_{t_i}, t_i, t_j))

The points come from the teacher's own trajectories (a store through `trainer.data`, preloaded in memory, or solved
online by `trainer.data.online`); which points / pairs a batch holds is the data source's choice (its
`points_per_trajectory` / `pairs_per_trajectory`), and the in-memory source takes every
pair (`trainer.data.batch_schema`).

Batch keys read:
- "cm": "x_t" [B, *S] (trajectory point x̂_{t_i}, EDM view), "sigma" [B] (its σ̃), "x0" [B, *S] (the trajectory's
  clean endpoint x̂_{t_0}, EDM view), "labels" [B] (class-conditional teachers);
- "mf": "z_t" [B, *S] and "t" [B] (the noisier point and its τ), "z_r" [B, *S] and "r" [B] (the cleaner point and its
  τ, r < t), "labels" [B];
- the preconditioning transfer reads the same keys ("x_t", "sigma", or "z_t", "t" read at r = t).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline.fault_points import MID_STEP, reach
from trainer.config import ConfigError

__all__ = ["DistanceSettings", "TransferThenCMT", "build_distance", "cm_loss", "mf_loss"]


class DistanceSettings(Protocol):
    """The CM form's distance settings of a stage config (`trainer.mid.MidConfig`)."""

    distance: str
    pseudo_huber_c: float | None
    lpips_weights: str | None
    lpips_resize_to: int | None


def build_distance(cfg: DistanceSettings, device: torch.device) -> Any:
    """The distance d of the CM form from the config (LPIPS from a local weights file only)."""
    from trainer.losses import distance

    if cfg.distance == "pseudo_huber":
        return distance("pseudo_huber", c=cfg.pseudo_huber_c)
    if cfg.distance == "lpips":
        try:
            return distance("lpips", weights_path=cfg.lpips_weights, resize_to=cfg.lpips_resize_to).to(device)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    return distance("squared_l2")


def cm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], step: int, *, distance: Any) -> torch.Tensor:
    """CMT CM form per sample: d(f_θ(x̂_{t_i}, t_i), x̂_{t_0}) (no stop-gradient, no time weighting); t_i = σ̃."""
    from trainer.losses import cmt_cm_loss

    reach(MID_STEP, step)
    f = model("cm", batch["x_t"], batch["sigma"], batch.get("labels"))  # [B, *S]
    return cmt_cm_loss(f, batch["x0"], distance)  # [B]


def mf_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
    """CMT MF form per sample: ‖u_θ(z_t, t, r) − (z_t − z_r)/(t − r)‖² (average velocity of the stored trajectory);
    t, r = τ."""
    from trainer.losses import cmt_mf_loss

    reach(MID_STEP, step)
    u = model("mf", batch["z_t"], t=batch["t"], r=batch["r"], labels=batch.get("labels"))  # [B, *S]
    return cmt_mf_loss(u, batch["z_t"], batch["z_r"], t_i=batch["t"], t_j=batch["r"])  # [B]


@dataclass
class TransferThenCMT:
    """The stage's loss: the preconditioning transfer for the first `transfer_steps` steps, then the CMT loss.

    Transfer: ‖(f_θ(x̃, σ̃) − D_teacher(x̃, σ̃))/c_out(σ̃)‖² at the batch's trajectory points (EDM view; MF batches are
    read at (z_t, t) as x̃ = z/(1 − τ), σ̃ = τ/(1 − τ), r = t), the teacher under no_grad.
    """

    cmt_loss: Any
    transfer_steps: int
    teacher: Any
    student: Any  # the unwrapped FlowMapStudent, for its c_out (the same module the loop trains)

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        """Per-sample loss [B] of `step`."""
        if step >= self.transfer_steps:
            return self.cmt_loss(model, batch, step)
        from pipeline.time_convention import edm_from_fm
        from trainer.losses import preconditioning_transfer_loss

        reach(MID_STEP, step)
        if "x_t" in batch:
            x_edm, sigma = batch["x_t"], batch["sigma"].to(torch.float64)  # [B, *S], [B]
        else:
            x_edm, sigma = edm_from_fm(batch["z_t"], batch["t"].to(torch.float64))  # [B, *S], [B]
        labels = batch.get("labels")
        with torch.no_grad():
            denoised = self.teacher.denoise(x_edm, sigma, labels=labels)  # [B, *S]
        f = model("cm", x_edm, sigma, labels)  # [B, *S]
        c_out = self.student.coefficients(sigma)[3]  # [B]
        return preconditioning_transfer_loss(f, denoised.to(f.dtype), c_out)  # [B]
