"""Exact conversions between native (α, σ) states and the EDM / flow-matching views, on numpy and torch."""

import numpy as np
import pytest
import torch

from pipeline.time_convention import (
    edm_from_fm,
    edm_from_native,
    fm_alpha_sigma,
    fm_from_edm,
    native_from_edm,
    per_sample,
    vp_alpha_sigma,
)

BATCH, SHAPE = 5, (2, 3, 3)


def _draws(backend: str):
    """x0, ε [B, *S] and per-sample VP (α, σ) [B] as numpy arrays or torch tensors (float64)."""
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(BATCH, *SHAPE))
    eps = rng.normal(size=(BATCH, *SHAPE))
    sigma_edm = np.exp(rng.uniform(np.log(0.002), np.log(80.0), size=BATCH))
    alpha, sigma = vp_alpha_sigma(sigma_edm)
    if backend == "torch":
        return tuple(torch.from_numpy(a) for a in (x0, eps, sigma_edm, alpha, sigma))
    return x0, eps, sigma_edm, alpha, sigma


def _close(a, b, rtol=1e-12, atol=1e-12):
    """allclose for numpy or torch."""
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    return np.allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_edm_view_of_a_vp_state_is_x0_plus_sigma_edm_noise(backend):
    """x = α·x0 + σ·ε → x̃ = x0 + σ̃·ε with σ̃ = σ/α, and back again."""
    x0, eps, sigma_edm, alpha, sigma = _draws(backend)
    x = per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * eps  # [B, *S]
    x_edm, s_edm = edm_from_native(x, alpha, sigma)
    assert _close(s_edm, sigma_edm)
    assert _close(x_edm, x0 + per_sample(sigma_edm, x0) * eps)
    assert _close(native_from_edm(x_edm, s_edm, alpha), x)
    assert type(x_edm) is type(x)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_flow_matching_view_is_the_linear_interpolation(backend):
    """x̃ = x0 + σ̃ε → x_fm = (1−τ)·x0 + τ·ε with τ = σ̃/(1+σ̃); edm_from_fm inverts it."""
    x0, eps, sigma_edm, _, _ = _draws(backend)
    x_edm = x0 + per_sample(sigma_edm, x0) * eps
    x_fm, tau = fm_from_edm(x_edm, sigma_edm)
    assert _close(tau, sigma_edm / (1 + sigma_edm))
    assert _close(x_fm, per_sample(1 - tau, x0) * x0 + per_sample(tau, x0) * eps)
    back, s_back = edm_from_fm(x_fm, tau)
    assert _close(s_back, sigma_edm, rtol=1e-9)
    assert _close(back, x_edm, rtol=1e-9, atol=1e-9)
    alpha_fm, sigma_fm = fm_alpha_sigma(sigma_edm)
    assert _close(alpha_fm, 1 - tau) and _close(sigma_fm, tau)


def test_vp_alpha_sigma_is_variance_preserving_with_the_right_ratio():
    """α² + σ² = 1 and σ/α = σ̃, for scalars and arrays."""
    levels = np.array([1e-3, 0.5, 1.0, 80.0])
    alpha, sigma = vp_alpha_sigma(levels)
    assert np.allclose(alpha**2 + sigma**2, 1.0) and np.allclose(sigma / alpha, levels)
    a, s = vp_alpha_sigma(3.0)
    assert isinstance(a, float) and a == pytest.approx(1 / np.sqrt(10)) and s == pytest.approx(3 / np.sqrt(10))


def test_vp_alpha_sigma_of_an_infinite_level_is_pure_noise():
    """σ̃ = ∞ (the last level of a zero-terminal-SNR schedule) is (α, σ) = (0, 1) for floats, numpy and torch."""
    assert vp_alpha_sigma(float("inf")) == (0.0, 1.0)
    alpha, sigma = vp_alpha_sigma(np.array([0.0, 2.0, np.inf]))
    assert alpha.tolist() == [1.0, pytest.approx(1 / np.sqrt(5)), 0.0]
    assert sigma.tolist() == [0.0, pytest.approx(2 / np.sqrt(5)), 1.0]
    alpha_t, sigma_t = vp_alpha_sigma(torch.tensor([0.0, 2.0, float("inf")], dtype=torch.float64))
    assert torch.equal(alpha_t, torch.from_numpy(alpha)) and torch.equal(sigma_t, torch.from_numpy(sigma))


def test_float32_round_trip_keeps_float32_precision():
    """Converting a float32 torch batch with float64 numpy levels stays float32 and round-trips to rounding."""
    x = torch.randn(BATCH, *SHAPE)
    alpha, sigma = vp_alpha_sigma(np.linspace(0.01, 50.0, BATCH))
    x_edm, s_edm = edm_from_native(x, alpha, sigma)
    assert x_edm.dtype == torch.float32
    assert torch.allclose(native_from_edm(x_edm, s_edm, alpha), x, rtol=1e-6, atol=1e-6)


def test_per_sample_broadcasts_along_a_chosen_axis():
    """A [K+1] level vector aligns with axis 1 of a trajectory batch [B, K+1, *S]."""
    points = np.ones((2, 4, 3))
    levels = np.array([4.0, 3.0, 2.0, 1.0])
    scaled = points / per_sample(levels, points, axis=1)
    assert np.allclose(scaled[:, :, 0], 1 / levels)
    with pytest.raises(ValueError, match="one value per sample"):
        per_sample(np.ones(3), points, axis=1)
    with pytest.raises(ValueError, match="scalar or 1-D"):
        per_sample(np.ones((2, 2)), points)
