"""Exact conversions between a teacher's native states and the EDM / flow-matching views.

A teacher state is ``x = α·x0 + σ·ε`` (VP: α² + σ² = 1; VE/EDM: α = 1; flow matching: α = 1 − t, σ = t).
Every other convention is an exact rescaling of it (ARCHITECTURE.md, "Time convention"):

- EDM view: ``x̃ = x/α``, ``σ̃ = σ/α``  (then ``x̃ = x0 + σ̃·ε`` and the PF-ODE is ``dx̃/dσ̃ = (x̃ − D(x̃, σ̃))/σ̃``)
- flow-matching view: ``τ = σ̃/(1 + σ̃)``, ``x_fm = x̃/(1 + σ̃)``  (then ``x_fm = (1 − τ)·x0 + τ·ε``)
- VP view: ``α_vp = 1/√(1 + σ̃²)``, ``σ_vp = σ̃·α_vp``, ``x_vp = α_vp·x̃``

The functions are pure arithmetic: they accept numpy arrays and torch tensors alike (and Python floats for
the noise levels). A noise level is a scalar, or one value per sample (shape ``[B]``), which is broadcast
over the trailing sample dimensions of ``x`` (see :func:`per_sample`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "edm_from_fm",
    "edm_from_native",
    "fm_alpha_sigma",
    "fm_from_edm",
    "native_from_edm",
    "per_sample",
    "vp_alpha_sigma",
]


def _is_numpy(x: Any) -> bool:
    """True for numpy arrays and numpy/Python scalars (anything that is not a torch-like tensor)."""
    return isinstance(x, (np.ndarray, np.generic, float, int))


def per_sample(value: Any, x: Any, axis: int = 0) -> Any:
    """Reshape a scalar or 1-D noise level so it broadcasts against ``x`` along ``axis`` (default: the batch axis).

    A scalar comes back unchanged. A 1-D value of length ``x.shape[axis]`` is reshaped to
    ``[1, …, n, 1, …]`` (n at ``axis``) and converted to the array type of ``x`` (numpy, or torch via
    ``x.new_tensor`` so no torch import is needed here).
    """
    if isinstance(value, (float, int, np.floating, np.integer)):
        return value
    ndim = getattr(value, "ndim", None)
    if ndim == 0:
        return float(value)
    if ndim != 1:
        raise ValueError(
            f"a noise level must be a scalar or 1-D (one value per sample), got shape {tuple(value.shape)}; "
            "pass alpha/sigma with shape [B]"
        )
    if value.shape[0] != x.shape[axis]:
        raise ValueError(
            f"noise level has {value.shape[0]} entries but x has {x.shape[axis]} along axis {axis}; "
            "pass one value per sample"
        )
    shape = [1] * x.ndim
    shape[axis] = value.shape[0]
    if _is_numpy(x):
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else value
        return np.asarray(value, dtype=np.float64).reshape(shape)
    if _is_numpy(value):
        value = x.new_tensor(np.asarray(value, dtype=np.float64))
    return value.to(device=x.device, dtype=x.dtype).reshape(shape)


def edm_from_native(x: Any, alpha: Any, sigma: Any) -> tuple[Any, Any]:
    """Native state (x = α·x0 + σ·ε) → EDM view: x̃ = x/α, σ̃ = σ/α."""
    x_edm = x / per_sample(alpha, x)  # [B, *S]
    return x_edm, sigma / alpha


def native_from_edm(x_edm: Any, sigma_edm: Any, alpha: Any) -> Any:
    """EDM view → native state with scale α: x = α·x̃ (its native σ is α·σ̃)."""
    del sigma_edm  # the state itself only needs α; σ = α·σ̃ follows from the convention
    return x_edm * per_sample(alpha, x_edm)  # [B, *S]


def fm_from_edm(x_edm: Any, sigma_edm: Any) -> tuple[Any, Any]:
    """EDM view → flow-matching view: τ = σ̃/(1+σ̃), x_fm = x̃/(1+σ̃)."""
    x_fm = x_edm / (1 + per_sample(sigma_edm, x_edm))  # [B, *S]
    return x_fm, sigma_edm / (1 + sigma_edm)


def edm_from_fm(x_fm: Any, tau: Any) -> tuple[Any, Any]:
    """Flow-matching view → EDM view: σ̃ = τ/(1−τ), x̃ = x_fm/(1−τ) (τ < 1)."""
    x_edm = x_fm / (1 - per_sample(tau, x_fm))  # [B, *S]
    return x_edm, tau / (1 - tau)


def vp_alpha_sigma(sigma_edm: Any) -> tuple[Any, Any]:
    """(α, σ) of the variance-preserving state with EDM level σ̃: α = 1/√(1+σ̃²), σ = σ̃·α; σ̃ = ∞ gives (0, 1).

    σ̃ = ∞ is the last level of a zero-terminal-SNR schedule (diffusers' ``rescale_betas_zero_snr``): pure noise.
    """
    if isinstance(sigma_edm, (float, int)):
        if math.isinf(sigma_edm):
            return 0.0, 1.0
        alpha = 1.0 / math.sqrt(1.0 + sigma_edm * sigma_edm)
        return alpha, sigma_edm * alpha
    alpha = 1.0 / (1.0 + sigma_edm * sigma_edm) ** 0.5
    infinite = sigma_edm == math.inf
    if _is_numpy(sigma_edm):
        with np.errstate(invalid="ignore"):
            return alpha, np.where(infinite, 1.0, sigma_edm * alpha)
    return alpha, (sigma_edm * alpha).masked_fill(infinite, 1.0)


def fm_alpha_sigma(sigma_edm: Any) -> tuple[Any, Any]:
    """(α, σ) of the flow-matching state with EDM level σ̃: α = 1−τ = 1/(1+σ̃), σ = τ = σ̃/(1+σ̃)."""
    return 1 / (1 + sigma_edm), sigma_edm / (1 + sigma_edm)
