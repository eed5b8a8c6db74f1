"""jobs/gradient_bias.py: the quick study's outputs, CMT's bias ordering, and the closed forms against theory."""

import dataclasses
import json
import math

import numpy as np
import pytest

from jobs.gradient_bias import (
    JSON_NAME,
    PLOT_NAME,
    QUICK,
    GradientBiasConfig,
    GradientBiasConfigError,
    ect_level_chain,
    flow_map_student,
    gradient_bias,
    input_scale,
    level_bias,
    level_weights,
    main,
    oracle_teacher,
    output_scale,
    run,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    """The --quick study, run once through the library entry point; (returned dict, output directory)."""
    out = tmp_path_factory.mktemp("gradient_bias")
    return run(dataclasses.replace(QUICK, out=str(out))), out


def test_quick_run_writes_the_plot_and_a_json_with_slopes_for_every_init(quick_result):
    """gradient_bias.json (same content as returned) and a PNG; slopes for the CMT, diffusion and random inits."""
    result, out = quick_result
    written = json.loads((out / JSON_NAME).read_text())
    assert written["bias_sq"] == result["bias_sq"] and written["slopes"] == result["slopes"]
    assert (out / PLOT_NAME).read_bytes()[:8] == PNG_MAGIC and (out / PLOT_NAME).stat().st_size > 10_000
    cmt_curves = [f"cmt-{solver}" for solver in QUICK.solvers]
    for name in [*cmt_curves, "diffusion", "random"]:
        assert isinstance(written["slopes"][name], float), name
        assert len(written["bias_sq"][name]) == len(QUICK.steps) and all(v > 0 for v in written["bias_sq"][name])
    for name in ("diffusion", "random"):  # their init does not depend on K, so neither does their bias
        assert np.ptp(written["bias_sq"][name]) == 0.0 and abs(written["slopes"][name]) < 1e-9
    resolved = dataclasses.asdict(dataclasses.replace(QUICK, out=str(out)))
    assert written["config"] == json.loads(json.dumps(resolved))  # the resolved config is written with the results


def test_cmt_bias_is_below_diffusion_bias_below_random_bias_at_the_largest_k(quick_result):
    """The theory's ordering at the largest K: CMT (O(ε + Δt^p)) < diffusion (posterior-mean gap) < random (O(1))."""
    result, _ = quick_result
    bias = {name: values[-1] for name, values in result["bias_sq"].items()}
    for solver in QUICK.solvers:
        assert bias[f"cmt-{solver}"] < bias["diffusion"] < bias["random"], bias
    lo, _ = result["random_bias_sq_range"]
    assert bias["diffusion"] < lo, "every random draw should be further off than the diffusion init"


def test_cmt_init_is_the_exact_minimiser_and_its_error_shrinks_with_k(quick_result):
    """The CMT fit leaves only float32 residue on the trajectories, and ε² and the bias fall from K = 8 to K = 16."""
    result, _ = quick_result
    at = {k: i for i, k in enumerate(result["steps"])}
    for solver in QUICK.solvers:
        name = f"cmt-{solver}"
        assert max(result["cmt_fit"][name]["fit_residual"]) < 1e-8
        for key in ("bias_sq", "oracle_loss"):
            assert result[key][name][at[16]] < result[key][name][at[8]], (name, key)


def test_closed_form_bias_matches_autograd_through_the_project_losses(quick_result):
    """Per-level closed forms agree with autograd Monte-Carlo gradients of cmt_cm_loss / squared_l2 / ect_target."""
    check = quick_result[0]["monte_carlo_check"]
    assert check["samples_per_level"] == QUICK.mc_samples and len(check["levels_sigma"]) == QUICK.mc_levels
    assert check["max_abs_z"] < 6.0, check
    for name in ("diffusion", "random"):  # large biases: the estimate is also close in relative terms
        assert check["per_init"][name]["max_relative_error"] < 0.1, check


def test_exact_flow_map_has_only_the_dt_term_of_the_bias():
    """ε = 0: with the exact ODE pair the bias vanishes (semigroup); with shared noise it falls as Δt⁴ (Euler's Δt²)."""
    cfg = GradientBiasConfig()
    mu = cfg.mu_center + cfg.mu_spread * np.linspace(-1.0, 1.0, cfg.dim)
    teacher = oracle_teacher(cfg, mu)
    qs, shared = (64.0, 128.0, 256.0), []
    for q in qs:
        levels = ect_level_chain(cfg.sigma_max, cfg.sigma_min, q)
        weights, c_in = level_weights(levels, cfg.p_mean, cfg.p_std), input_scale(teacher, levels)
        student = flow_map_student(levels, mu, cfg.s)
        ode = gradient_bias(student, levels, weights, c_in, mu, cfg.s, "ode")
        assert ode["bias_sq"] < 1e-20 and ode["oracle_loss"] == 0.0
        shared.append(gradient_bias(student, levels, weights, c_in, mu, cfg.s, "shared_noise")["bias_sq"])
    slope = np.polyfit(np.log(qs), np.log(shared), 1)[0]  # Δt ∝ 1/q
    assert -4.5 < slope < -3.5, (shared, slope)


def test_level_weights_are_the_clamped_lognormal():
    """Weights sum to 1; the end levels carry the clamped tails P(ln σ > ln σ_max), P(ln σ < ln σ_min) and more."""
    levels = ect_level_chain(80.0, 0.002, 256.0)
    weights = level_weights(levels, -1.1, 2.0)
    assert levels[0] == 80.0 and levels[-2] >= 0.002 > levels[-1] and np.all(np.diff(levels) < 0)
    assert len(weights) == len(levels) - 1 and weights.sum() == pytest.approx(1.0, abs=1e-12)
    upper_tail = 0.5 * (1 - math.erf((np.log(80.0) + 1.1) / (2.0 * np.sqrt(2))))
    assert upper_tail < weights[0] < 2 * upper_tail


def test_bad_config_is_refused_with_the_fix_and_dry_run_writes_nothing(tmp_path, capsys):
    """A K below 2 names the fix; --dry-run prints the resolved config and leaves --out empty."""
    with pytest.raises(GradientBiasConfigError, match="K ≥ 2"):
        GradientBiasConfig(steps=(1, 2, 4)).validate()
    with pytest.raises(GradientBiasConfigError, match="fit_min_steps"):
        GradientBiasConfig(steps=(2, 4), fit_min_steps=4).validate()
    out = tmp_path / "never"
    assert main(["--quick", "--dry-run", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == list(QUICK.steps) and printed["out"] == str(out)
    assert not out.exists()


def test_student_reading_weights_each_level_by_its_c_out_squared():
    """--reading: the EDM reading's |c_out| is the project's own EDM preconditioning of the oracle (σ_data = s), the
    ε reading's is σ, and bias² is the direct per-level bias weighted by c_out² (the chain rule through f = … + c_out·F)."""
    import torch

    from pipeline.noise_schedule import edm_preconditioning

    cfg = dataclasses.replace(QUICK, mc_samples=0)
    mu = cfg.mu_center + cfg.mu_spread * np.linspace(-1.0, 1.0, cfg.dim)
    levels = ect_level_chain(cfg.sigma_max, cfg.sigma_min, cfg.q)
    weights = level_weights(levels, cfg.p_mean, cfg.p_std)
    teacher = oracle_teacher(cfg, mu)
    c_in = input_scale(teacher, levels)
    _, _, _, c_out = edm_preconditioning(teacher.schedule, teacher.prediction_type, torch.from_numpy(levels))
    np.testing.assert_allclose(output_scale(levels, "edm", cfg.s), np.abs(c_out.numpy()), rtol=1e-12)
    np.testing.assert_allclose(output_scale(levels, "epsilon", cfg.s), levels, rtol=0)
    student = flow_map_student(levels, mu, cfg.s)
    per_level = level_bias(student, levels, c_in, mu, cfg.s, "shared_noise")
    for reading in ("direct", "edm", "epsilon"):
        scale = output_scale(levels, reading, cfg.s)[:-1, None]
        expected = float((weights[:, None] * (scale * per_level) ** 2).sum())
        got = gradient_bias(student, levels, weights, c_in, mu, cfg.s, "shared_noise", reading)["bias_sq"]
        assert got == pytest.approx(expected, rel=1e-12)
    with pytest.raises(GradientBiasConfigError, match="reading"):
        dataclasses.replace(QUICK, reading="v").validate()
