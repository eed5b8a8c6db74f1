"""Tests for trainer/schedules.py: hand values, large-sample distribution checks with fixed generators, determinism."""

import math

import pytest
import torch

from trainer.schedules import (
    SIGMA_MAX,
    SIGMA_MIN,
    clamp_sigma,
    ect_q_schedule,
    ect_r_from_t,
    sample_cmt_index_pairs,
    sample_cmt_point_indices,
    sample_ect_times,
    sample_meanflow_times,
)

torch.set_num_threads(1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logit(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x / (1 - x))


def test_ect_times_are_log_normal_with_the_requested_moments():
    t = sample_ect_times(200_000, p_mean=-1.1, p_std=2.0, generator=generator(0))
    assert t.shape == (200_000,) and t.dtype == torch.float64
    assert bool((t > 0).all())
    log_t = t.log()
    # standard errors: 2/√2e5 ≈ 0.0045 for the mean, ≈ 0.0032 for the std
    assert log_t.mean().item() == pytest.approx(-1.1, abs=0.02)
    assert log_t.std().item() == pytest.approx(2.0, abs=0.02)


def test_sampling_is_deterministic_given_the_generator():
    assert torch.equal(sample_ect_times(64, generator=generator(3)), sample_ect_times(64, generator=generator(3)))
    assert not torch.equal(sample_ect_times(64, generator=generator(3)), sample_ect_times(64, generator=generator(4)))
    first, second = sample_meanflow_times(64, generator=generator(5)), sample_meanflow_times(64, generator=generator(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(sample_cmt_point_indices(64, 16, generator=generator(6)),
                       sample_cmt_point_indices(64, 16, generator=generator(6)))
    pairs_a = sample_cmt_index_pairs(64, 16, generator=generator(7))
    pairs_b = sample_cmt_index_pairs(64, 16, generator=generator(7))
    assert torch.equal(pairs_a[0], pairs_b[0]) and torch.equal(pairs_a[1], pairs_b[1])


def test_ect_r_from_t_hand_values():
    t = torch.tensor([2.0, 4.0])
    # b = 0: sigmoid(0) = 1/2, so with k = 8, q = 10 the ratio is 1 − (1 + 4)/10 = 1/2
    assert torch.allclose(ect_r_from_t(t, 10.0, k=8.0, b=0.0), torch.tensor([1.0, 2.0]))
    # q = 2 gives a negative ratio 1 − 5/2, clamped to r = 0
    assert torch.equal(ect_r_from_t(t, 2.0, k=8.0, b=0.0), torch.zeros(2))
    # k = 0: r = t·(1 − 1/q) = 4·3/4 = 3
    assert ect_r_from_t(torch.tensor([4.0]), 4.0, k=0.0).item() == pytest.approx(3.0)
    # large t: sigmoid(−80) ≈ 0, so Δt = t − r ≈ t/q
    t_large = torch.tensor([80.0], dtype=torch.float64)
    assert (t_large - ect_r_from_t(t_large, 4096.0)).item() == pytest.approx(80.0 / 4096.0, rel=1e-6)
    with pytest.raises(ValueError, match="q must be > 0"):
        ect_r_from_t(t, 0.0)


def test_ect_r_stays_in_zero_to_t_for_sampled_times():
    t = sample_ect_times(50_000, generator=generator(1))
    for q in (2.0, 16.0, 4096.0):
        r = ect_r_from_t(t, q)
        assert bool((r >= 0).all()) and bool((r < t).all())
    # with q = 4096 every Δt lies between t/q and (1 + k/2)·t/q (sigmoid(−t) ≤ 1/2 for t ≥ 0)
    delta = t - ect_r_from_t(t, 4096.0)
    assert bool((delta >= t / 4096.0 * (1 - 1e-9)).all()) and bool((delta <= 5.0 * t / 4096.0 * (1 + 1e-9)).all())


def test_ect_q_schedule_fixed_and_doubling():
    assert ect_q_schedule(0, mode="fixed", q_start=4096) == 4096.0
    assert ect_q_schedule(10**6, mode="fixed", q_start=4096) == 4096.0
    doubling = dict(mode="doubling", q_start=2, double_every_steps=100)
    assert [ect_q_schedule(step, **doubling) for step in (0, 99, 100, 199, 200, 250, 700)] == [2, 2, 4, 4, 8, 8, 256]
    assert ect_q_schedule(1000, q_max=8, **doubling) == 8.0
    with pytest.raises(ValueError, match="double_every_steps"):
        ect_q_schedule(0, mode="doubling", q_start=2)
    with pytest.raises(ValueError, match="unknown ECT q mode"):
        ect_q_schedule(0, mode="halving", q_start=2)
    with pytest.raises(ValueError, match="step must be >= 0"):
        ect_q_schedule(-1, mode="fixed", q_start=2)


def test_clamp_sigma_to_the_edm_range():
    sigma = torch.tensor([0.001, 1.0, 100.0])
    assert torch.equal(clamp_sigma(sigma), torch.tensor([SIGMA_MIN, 1.0, SIGMA_MAX]))
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        clamp_sigma(sigma, 1.0, 0.5)


def test_meanflow_times_order_range_and_exact_fraction():
    batch = 100_000
    t, r = sample_meanflow_times(batch, p_mean=-0.4, p_std=1.0, fraction_r_neq_t=0.25, generator=generator(2))
    assert t.shape == r.shape == (batch,)
    assert bool((r <= t).all()) and bool((r > 0).all()) and bool((t < 1).all())
    distinct = r != t
    assert int(distinct.sum()) == 25_000
    small_t, small_r = sample_meanflow_times(8, fraction_r_neq_t=0.25, generator=generator(2))
    assert int((small_r != small_t).sum()) == 2  # round(0.25·8)


def test_meanflow_times_are_sorted_logit_normal_pairs():
    t, r = sample_meanflow_times(100_000, p_mean=-0.4, p_std=1.0, fraction_r_neq_t=0.25, generator=generator(8))
    distinct = r != t
    pooled = torch.cat([logit(t[distinct]), logit(r[distinct])])  # both draws of a pair: N(−0.4, 1) together
    assert pooled.mean().item() == pytest.approx(-0.4, abs=0.02)
    assert pooled.std().item() == pytest.approx(1.0, abs=0.02)
    # where r = t, t is the larger of two N(μ, σ) draws in logit space: E = μ + σ/√π = −0.4 + 0.5642
    assert logit(t[~distinct]).mean().item() == pytest.approx(-0.4 + 1 / math.sqrt(math.pi), abs=0.02)


def test_meanflow_fraction_extremes():
    t, r = sample_meanflow_times(1000, fraction_r_neq_t=0.0, generator=generator(9))
    assert torch.equal(t, r)
    t, r = sample_meanflow_times(1000, fraction_r_neq_t=1.0, generator=generator(9))
    assert bool((r < t).all())
    with pytest.raises(ValueError, match="fraction_r_neq_t"):
        sample_meanflow_times(10, fraction_r_neq_t=1.5, generator=generator(9))


def test_cmt_point_indices_cover_the_non_final_points():
    indices = sample_cmt_point_indices(10_000, 16, generator=generator(10))
    assert indices.dtype == torch.int64
    assert set(indices.unique().tolist()) == set(range(16))  # every non-final point, never the endpoint 16
    with pytest.raises(ValueError, match="num_steps"):
        sample_cmt_point_indices(4, 0, generator=generator(10))


def test_cmt_index_pairs_are_ordered_and_uniform_over_pairs():
    num_steps, batch = 3, 60_000  # 4 points → 6 pairs
    noisy, clean = sample_cmt_index_pairs(batch, num_steps, generator=generator(11))
    assert bool((noisy < clean).all()) and bool((noisy >= 0).all()) and bool((clean <= num_steps).all())
    counts = torch.bincount(noisy * 4 + clean, minlength=16).double() / batch
    for a in range(4):
        for b in range(4):
            expected = 1 / 6 if a < b else 0.0
            assert counts[a * 4 + b].item() == pytest.approx(expected, abs=0.01)
    only_pair = sample_cmt_index_pairs(5, 1, generator=generator(12))  # K = 1: the single pair (0, 1)
    assert torch.equal(only_pair[0], torch.zeros(5, dtype=torch.int64))
    assert torch.equal(only_pair[1], torch.ones(5, dtype=torch.int64))
