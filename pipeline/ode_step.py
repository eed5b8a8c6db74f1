"""One PF-ODE step between arbitrary per-sample noise levels, for consistency distillation with a live teacher.

`pipeline/solvers.py`'s `solve` walks one grid shared by the whole batch with a diffusers scheduler; ECD's live
teacher step (`trainer/methods/ect.py`, `ecd.teacher_step`) needs a single step from each sample's own (t, r) in the
EDM view, which is this module.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.solvers import SolverError
from pipeline.teacher import Teacher

__all__ = ["ODE_STEP_METHODS", "ode_step"]

ODE_STEP_METHODS = ("euler", "heun")


@torch.no_grad()
def ode_step(
    teacher: Teacher,
    x_edm: torch.Tensor,
    sigma_from: Any,
    sigma_to: Any,
    *,
    method: str = "heun",
    labels: Any = None,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """One PF-ODE step dx̃/dσ̃ = (x̃ − D(x̃, σ̃))/σ̃ from σ̃_from to σ̃_to, per sample, in the EDM view → [B, *S].

    :func:`solve` walks one grid shared by the whole batch; consistency distillation needs a single step from each
    sample's own (t, r), so this is that step (EDM, Karras et al. 2022, Algorithm 1 without churn): Euler
    x̃_r = x̃_t + (r − t)·d_t with d_t = (x̃_t − D(x̃_t, t))/t, and for "heun" the trapezoidal correction with
    d_r at the Euler point wherever r lies inside the teacher's schedule (elsewhere, r = 0 included, the Euler
    step, as EDM's last step). σ̃_from must lie inside the teacher's schedule; σ̃_to may be anything in [0, σ̃_from].
    """
    if method not in ODE_STEP_METHODS:
        raise SolverError(f"unknown ODE step method {method!r}: choose one of {', '.join(ODE_STEP_METHODS)}")
    x_edm = torch.as_tensor(x_edm).to(device=teacher.device, dtype=torch.float32)  # [B, *S]
    batch = x_edm.shape[0]
    view = (batch,) + (1,) * (x_edm.dim() - 1)

    def levels(value: Any, name: str) -> torch.Tensor:
        """A scalar or per-sample level as float64 [B] on the teacher's device."""
        value = torch.as_tensor(value, dtype=torch.float64).to(teacher.device).reshape(-1)
        if value.numel() not in (1, batch):
            raise SolverError(f"{name} has {value.numel()} levels for {batch} samples: pass a scalar or one per sample")
        return value.expand(batch)  # [B]

    t, r = levels(sigma_from, "sigma_from"), levels(sigma_to, "sigma_to")  # [B] each
    if bool((t <= 0).any()) or bool((r < 0).any()) or bool((r > t).any()):
        raise SolverError("ode_step integrates towards the data: need sigma_from > 0 and 0 <= sigma_to <= sigma_from")
    denoised = teacher.denoise(x_edm, t, labels=labels, guidance_scale=guidance_scale)  # [B, *S]
    d_t = (x_edm - denoised) / t.to(torch.float32).reshape(view)  # [B, *S], dx̃/dσ̃ at t
    step = (r - t).to(torch.float32).reshape(view)  # [B, 1, ...]
    x_euler = x_edm + step * d_t  # [B, *S]
    if method == "euler":
        return x_euler
    lo = teacher.sigma_edm_range[0]
    corrected = r >= lo  # [B]
    if not bool(corrected.any()):
        return x_euler
    r_safe = torch.where(corrected, r, torch.full_like(r, lo))  # [B], inside the schedule everywhere
    denoised_r = teacher.denoise(x_euler, r_safe, labels=labels, guidance_scale=guidance_scale)  # [B, *S]
    d_r = (x_euler - denoised_r) / r_safe.to(torch.float32).reshape(view)  # [B, *S], dx̃/dσ̃ at r
    x_heun = x_edm + step * 0.5 * (d_t + d_r)  # [B, *S]
    return torch.where(corrected.reshape(view), x_heun, x_euler)

