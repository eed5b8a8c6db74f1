"""Time sampling and Δt schedules for post-training (ECT / ECD, MeanFlow) and mid-training (CMT) pairs.

Pure functions: every random draw takes an explicit `torch.Generator` (results are on the generator's
device and depend only on its state), and schedule state such as ECT's q arrives as an argument, computed
from the step by `ect_q_schedule`, never kept between calls.

Time conventions: ECT / ECD times are EDM noise levels t = σ̃ ≥ 0 (x̃ = x0 + σ̃·ε); MeanFlow times are
flow-matching times τ ∈ [0, 1] (z = (1 − τ)·x0 + τ·ε, τ = 1 is noise). CMT pair indices refer to the
trajectory store's layout: index 0 = prior noise, index K = the solver's clean endpoint.

Papers: ECT = Geng et al., arXiv 2406.14548; MeanFlow = Geng et al., arXiv 2505.13447; CMT = Hu et al.,
arXiv 2509.24526; EDM = Karras et al., arXiv 2206.00364 (σ range [0.002, 80]).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0


def _check_batch(batch: int) -> None:
    """Raise a ValueError unless the batch size is a positive int."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")


def _standard_normal(batch: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """[batch] draws of N(0, 1) from `generator`, on the generator's device."""
    return torch.randn(batch, generator=generator, device=generator.device, dtype=dtype)  # [B]


# ---------------------------------------------------------------------------------------------
# ECT / ECD


def sample_ect_times(
    batch: int,
    *,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """EDM noise levels t with ln t ~ N(P_mean, P_std²) (ECT's time distribution, EDM's log-normal p(t)); [batch]."""
    _check_batch(batch)
    if p_std < 0:
        raise ValueError(f"p_std must be >= 0, got {p_std}")
    return torch.exp(p_mean + p_std * _standard_normal(batch, generator, dtype))  # [B]


def clamp_sigma(sigma: Tensor, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> Tensor:
    """Clamp EDM noise levels into [σ_min, σ_max] (EDM's range 0.002..80, the grid CMT trajectories cover)."""
    if not 0 <= sigma_min < sigma_max:
        raise ValueError(f"need 0 <= sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    return sigma.clamp(min=sigma_min, max=sigma_max)


def ect_r_from_t(t: Tensor, q: float, *, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's mapping r = t·(1 − (1 + k·sigmoid(−b·t))/q), clamped at r ≥ 0 (Δt = t − r shrinks as q grows)."""
    if not q > 0:
        raise ValueError(f"ECT q must be > 0 (Δt ≈ t·(1 + k·sigmoid(−b·t))/q), got {q}")
    if k < 0:
        raise ValueError(f"ECT k must be >= 0, got {k}")
    ratio = 1.0 - (1.0 + k * torch.sigmoid(-b * t)) / q  # same shape as t
    return (t * ratio).clamp(min=0.0)


def ect_q_schedule(
    step: int,
    *,
    mode: Literal["fixed", "doubling"],
    q_start: float,
    double_every_steps: int | None = None,
    q_max: float | None = None,
) -> float:
    """ECT's q at a step: "fixed" keeps q_start (4096 after CMT); "doubling" gives q_start·2^⌊step/N⌋, capped at q_max.

    ECT's own code starts at q = 2 and halves Δt each stage, i.e. mode="doubling", q_start=2,
    double_every_steps = steps per stage.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not q_start > 0:
        raise ValueError(f"q_start must be > 0, got {q_start}")
    if mode == "fixed":
        return float(q_start)
    if mode != "doubling":
        raise ValueError(f"unknown ECT q mode {mode!r}; choose 'fixed' or 'doubling'")
    if double_every_steps is None or double_every_steps < 1:
        raise ValueError(f"mode='doubling' needs double_every_steps >= 1, got {double_every_steps}")
    if q_max is not None and q_max < q_start:
        raise ValueError(f"q_max ({q_max}) must be >= q_start ({q_start})")
    q = float(q_start) * 2.0 ** (step // double_every_steps)
    return q if q_max is None else min(q, float(q_max))


# ---------------------------------------------------------------------------------------------
# MeanFlow


def sample_meanflow_times(
    batch: int,
    *,
    p_mean: float = -0.4,
    p_std: float = 1.0,
    fraction_r_neq_t: float = 0.25,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """MeanFlow's (t, r): two logit-normal draws sorted so t ≥ r, then r = t for all but round(fraction·batch) samples.

    Each τ = sigmoid(P_mean + P_std·n), n ~ N(0, 1) (MeanFlow's time sampler). The samples that keep r ≠ t are
    a uniformly random subset of exactly round(fraction_r_neq_t·batch); the rest are plain flow-matching
    samples (r = t). Returns t, r of shape [batch] in (0, 1).
    """
    _check_batch(batch)
    if not 0.0 <= fraction_r_neq_t <= 1.0:
        raise ValueError(f"fraction_r_neq_t must lie in [0, 1], got {fraction_r_neq_t}")
    if p_std < 0:
        raise ValueError(f"p_std must be >= 0, got {p_std}")
    first = torch.sigmoid(p_mean + p_std * _standard_normal(batch, generator, dtype))  # [B]
    second = torch.sigmoid(p_mean + p_std * _standard_normal(batch, generator, dtype))  # [B]
    t, r = torch.maximum(first, second), torch.minimum(first, second)  # [B] each
    num_distinct = round(fraction_r_neq_t * batch)
    keep_distinct = torch.zeros(batch, dtype=torch.bool, device=t.device)  # [B]
    keep_distinct[torch.randperm(batch, generator=generator, device=generator.device)[:num_distinct]] = True
    return t, torch.where(keep_distinct, r, t)


# ---------------------------------------------------------------------------------------------
# CMT trajectory points


def _check_num_steps(num_steps: int) -> None:
    """Raise a ValueError unless K (solver steps; the store holds K + 1 points) is a positive int."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps (K solver steps; the store holds K + 1 points) must be a positive int, "
                         f"got {num_steps!r}")


def sample_cmt_point_indices(batch: int, num_steps: int, *, generator: torch.Generator) -> Tensor:
    """Store indices uniform over the K non-final points 0..K−1 (CMT's CM form uses them all); [batch] int64."""
    _check_batch(batch)
    _check_num_steps(num_steps)
    return torch.randint(0, num_steps, (batch,), generator=generator, device=generator.device)  # [B]


def sample_cmt_index_pairs(batch: int, num_steps: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Store-index pairs (noisy, clean), 0 ≤ noisy < clean ≤ K, uniform over all pairs of points (CMT's MF form, i > j).

    `noisy` is the paper's i (larger time t_i), `clean` its j (t_j < t_i; j may be the clean endpoint K).
    """
    _check_batch(batch)
    _check_num_steps(num_steps)
    num_points = num_steps + 1
    first = torch.randint(0, num_points, (batch,), generator=generator, device=generator.device)  # [B]
    offset = torch.randint(0, num_points - 1, (batch,), generator=generator, device=generator.device)  # [B]
    second = offset + (offset >= first).long()  # [B], uniform over the other K points
    return torch.minimum(first, second), torch.maximum(first, second)
