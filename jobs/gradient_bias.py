"""CMT's gradient-bias claim checked exactly on Gaussian data: post-training gradient vs oracle gradient at init.

    python jobs/gradient_bias.py [--quick] [--out DIR] [--pair shared_noise|ode] [--q Q] [--reading direct|edm|epsilon]
        [--dry-run]

Claim (CMT, Hu et al., arXiv 2509.24526, Sec. 5): post-training a consistency model with
L_post(θ) = E‖f_θ(x_t, t) − sg f_θ(x_r, r)‖² follows a gradient that is biased relative to the oracle
L_oracle(θ) = E‖f_θ(x_t, t) − Ψ_{t→0}(x_t)‖². At initialisation the bias is O(ε + Δt^p) for a CMT-initialised
student (it matches the K-step, order-p solver's flow map to error ε), carries the extra gap between
E[x0 | x_t] and Ψ_{t→0}(x_t) for a diffusion-initialised student, and is O(1) for a random one.

Setting (everything exact; design.md, "Testing with an exact oracle"):

- Data x0 ~ N(μ, s²I) in d dims, EDM view x = x0 + σε; μ_j = mu_center + mu_spread·linspace(−1, 1, d).
- Noise levels: the ECT chain σ_0 = σ_max, σ_{n+1} = r(σ_n) with ECT's r(t) = t·(1 − (1 + 8·sigmoid(−t))/q)
  (`trainer.schedules.ect_r_from_t`, q fixed as in CMT's post-training recipe), continued until it falls
  below σ_min; the last level σ_N only ever serves as a target. Post-training pairs (t, r) = (σ_n, σ_{n+1}),
  so Δt is set by q alone and does NOT depend on the number of solver steps K.
- σ distribution (both losses): ECT's ln σ ~ N(P_mean, P_std²) clamped to [σ_min, σ_max] (as
  `trainer.schedules.clamp_sigma` does), discretised exactly onto the chain: level n gets the normal mass of its
  cell in ln σ (cell edges at midpoints; the clamped tails go to the end levels).
- Student: one affine map per level acting on EDM's scaled input, f_θ(x, σ_n) = θ^a_n·c_in(σ_n)·x + θ^b_n with
  c_in = 1/√(σ² + s²) (the teacher scheduler's `precondition_inputs`, σ_data = s), θ^a_n scalar, θ^b_n ∈ R^d. The
  scaling keeps the Jacobian O(1) at every σ, as the theorem's Lipschitz assumption does (with a raw slope on x the
  σ = 80 levels would outweigh the rest by σ² ≈ 6400). Because f is affine and every law is Gaussian, both gradients
  are closed-form expectations (no Monte Carlo): with the target T = f_{n+1}(x_{σ_{n+1}}) and e = T − Ψ_{σ_n→0}(x),
  the level's gradient difference is ∇_{θ_n}ℓ_oracle − ∇_{θ_n}ℓ_post = 2·E[Jᵀe] = 2·(c_in·Σ_j E[x_j e_j], E[e]).
- Reported bias: bias_sq = Σ_n w_n·‖∇_{θ_n}ℓ_oracle − ∇_{θ_n}ℓ_post‖² = E_σ‖∇_{θ(σ)}(ℓ_oracle − ℓ_post)‖². This is
  ‖∇_θ L_oracle − ∇_θ L_post‖² for a student whose per-σ functions θ(σ) are expanded in any complete basis that is
  orthonormal under the σ distribution (Parseval), so it does not depend on how finely σ is tabulated. (The plain
  Euclidean norm of the raw table's gradient, Σ_n w_n²‖·‖², shrinks like 1/N with the table size and is dominated by
  the two clamped end levels, which carry the log-normal's tails as point masses; it measures the table, not the
  method.) Also reported: oracle_loss = L_oracle(θ_init) = ε², the init's mean squared distance to the flow map.
- Pairs: "shared_noise" (ECT / consistency training: x_r = x0 + r·ε with the same x0, ε) or "ode" (consistency
  distillation with the exact teacher: x_r = Ψ_{t→r}(x_t)). For an affine student E[T | x_t] under shared noise is
  exactly the student applied to one Euler PF-ODE step, so the two differ only by that step's O(Δt²) error.

Inits (every affine coefficient is read off the project's own maps by evaluating them at x = 0 and x = 1):

- cmt-<solver>: CMT's CM-form objective solved in closed form. `pipeline.solvers.solve` runs the K-step solver on
  the oracle teacher (`make_oracle_teacher`, EDM schedule, log-SNR grid σ_max → σ_min) from prior noise; at each of
  the K non-final solver levels σ_i the least-squares affine map from x̂_{t_i} (EDM view via
  `time_convention.edm_from_native`) to the trajectory's own endpoint x̂_{t_0} is the exact minimiser of
  E d(f(x̂_{t_i}, t_i), x̂_{t_0}) with d = squared L2 (the solver map is affine here, so the fit residual is float32
  rounding; it is reported). Between solver levels the student interpolates its fitted (a, b) by a cubic spline in
  ln σ, as a network trained on K levels has to generalise across σ. So ε = solver discretisation error +
  interpolation error; both shrink as K grows (the first at the solver's order p, the second as K^-4).
- diffusion: the posterior mean E[x0 | x] (`pipeline.oracle.posterior_mean`), what a perfect diffusion model outputs.
- random: θ^a(σ), θ^b(σ) smooth random functions of ln σ (Chebyshev degree 3, coefficients N(0, 1/(k+1)²)), like a
  random network's dependence on its noise embedding; bias_sq is averaged over `random_draws` draws (range in JSON).
- flow_map (reference): the exact Ψ_{σ→0} (`pipeline.oracle.flow_map`), ε = 0: what is left is the pure Δt term
  (O(Δt²) per level for shared noise, exactly 0 for "ode" pairs).

Only the CMT init depends on K; diffusion, random and flow_map are constant in K and drawn as flat lines. Slopes
are numpy polyfits of ln bias_sq vs ln K over K ≥ fit_min_steps. Since bias_sq is a squared norm, an O(ε) bias with
ε ~ K^-p shows as slope −2p. With very few steps (K = 2, 4) the CMT student sees only K levels across
σ ∈ [0.002, 80] and its interpolation error can exceed the diffusion init's gap; the curves show it as it is.
A Monte-Carlo check recomputes the per-level bias with autograd through the project's
losses (`trainer.losses.cmt_cm_loss`, `ect_target`, `squared_l2`) and reports the worst deviation in standard errors.
Outputs in --out: gradient_bias.json (config, raw values, slopes, checks) and gradient_bias.png (log-log plots).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.interpolate import CubicSpline
from scipy.special import ndtr

from pipeline.noise_schedule import edm_preconditioning
from pipeline.oracle import flow_map, make_oracle_teacher, posterior_mean
from pipeline.solvers import GRIDS, SOLVERS, solve
from pipeline.teacher import Teacher
from pipeline.time_convention import edm_from_native
from trainer.losses import cmt_cm_loss, ect_target, squared_l2
from trainer.schedules import SIGMA_MAX, SIGMA_MIN, ect_r_from_t

PAIRS = ("shared_noise", "ode")
READINGS = ("direct", "edm", "epsilon")
CMT_SOLVERS = tuple(name for name in SOLVERS if name != "ddim")  # every solver that drives the oracle's EDM schedule
MAX_LEVELS = 200_000
RANDOM_DEGREE = 3
JSON_NAME = "gradient_bias.json"
PLOT_NAME = "gradient_bias.png"
ROUNDING_ZERO = 1e-20  # values below this fraction of the diffusion init's are float64 rounding, not bias

__all__ = [
    "QUICK",
    "AffineStudent",
    "CMTFit",
    "GradientBiasConfig",
    "GradientBiasConfigError",
    "affine_coefficients",
    "cmt_student",
    "diffusion_student",
    "ect_level_chain",
    "flow_map_student",
    "gradient_bias",
    "input_scale",
    "level_bias",
    "level_weights",
    "output_scale",
    "main",
    "monte_carlo_level_bias",
    "oracle_loss_per_level",
    "oracle_teacher",
    "random_student",
    "run",
]


class GradientBiasConfigError(ValueError):
    """A GradientBiasConfig value that cannot work; the message names the field and the fix."""


@dataclass(frozen=True)
class GradientBiasConfig:
    """Settings of the gradient-bias study (defaults: the full run, < 2 min on 2 CPU cores)."""

    dim: int = 16  # d, data dimension
    mu_center: float = 0.3  # μ_j = mu_center + mu_spread·linspace(−1, 1, d)
    mu_spread: float = 0.5
    s: float = 0.5  # data standard deviation
    steps: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)  # K, solver steps of the CMT init
    solvers: tuple[str, ...] = ("dpmpp-2m", "euler")  # one CMT curve each (pipeline.solvers names)
    grid: str = "logsnr"  # the solver's time grid (CMT's CIFAR recipe)
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    q: float = 4096.0  # ECT's r(t) parameter, fixed (CMT's post-training recipe); sets Δt
    pair: Literal["shared_noise", "ode"] = "shared_noise"
    # How the student's parameters reach f (the student parameterisation): f = c_skip·x + c_out·F_θ. "direct": c_out = 1
    # (F is f itself); "edm": EDM's c_out = σ·s/√(σ² + s²) with σ_data = s (the default student's reading, bounded by
    # s); "epsilon": an ε-prediction teacher's own c_out = −σ (up to −80). c_skip carries no parameter, so the reading
    # scales level n's parameter gradient by c_out(σ_n) and bias² by c_out(σ_n)² (chain rule), nothing else.
    reading: Literal["direct", "edm", "epsilon"] = "direct"
    p_mean: float = -1.1  # ECT's ln σ ~ N(p_mean, p_std²)
    p_std: float = 2.0
    num_trajectories: int = 256  # solver trajectories per CMT fit
    random_draws: int = 16
    seed: int = 0
    fit_min_steps: int = 16  # slopes are fitted over K ≥ this
    mc_samples: int = 8192  # per checked level; 0 skips the Monte-Carlo check
    mc_levels: int = 6
    out: str = "runs/gradient_bias"

    def validate(self) -> GradientBiasConfig:
        """Raise GradientBiasConfigError naming the first bad field and its fix; return self."""
        if self.dim < 1:
            raise GradientBiasConfigError(f"dim={self.dim}: pass a data dimension ≥ 1")
        if not self.s > 0:
            raise GradientBiasConfigError(f"s={self.s}: the data standard deviation must be > 0")
        if not self.steps or any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in self.steps):
            raise GradientBiasConfigError(f"steps={self.steps}: pass solver step counts K ≥ 2, e.g. (2, 4, 8, 16)")
        if list(self.steps) != sorted(set(self.steps)):
            raise GradientBiasConfigError(f"steps={self.steps}: list each K once, in increasing order")
        fitted = [k for k in self.steps if k >= self.fit_min_steps]
        if len(fitted) < 2:
            raise GradientBiasConfigError(
                f"fit_min_steps={self.fit_min_steps} leaves {len(fitted)} of steps={self.steps} for the slope fit: "
                "lower fit_min_steps or add larger K so at least two remain"
            )
        if not self.solvers or any(name not in CMT_SOLVERS for name in self.solvers):
            raise GradientBiasConfigError(
                f"solvers={self.solvers}: choose from {', '.join(CMT_SOLVERS)} (the solvers that drive the oracle's "
                "EDM schedule; ddim needs a VP teacher)"
            )
        if self.grid not in GRIDS or self.grid == "scheduler":
            raise GradientBiasConfigError(f"grid={self.grid!r}: use 'logsnr' or 'karras' (σ_max → σ_min)")
        if not 0 < self.sigma_min < self.sigma_max:
            raise GradientBiasConfigError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not self.q >= 16:
            raise GradientBiasConfigError(f"q={self.q}: pass q ≥ 16 so ECT's r(t) stays well above 0 (CMT uses 4096)")
        if self.pair not in PAIRS:
            raise GradientBiasConfigError(f"pair={self.pair!r}: choose one of {', '.join(PAIRS)}")
        if self.reading not in READINGS:
            raise GradientBiasConfigError(f"reading={self.reading!r}: choose one of {', '.join(READINGS)}")
        if not self.p_std > 0:
            raise GradientBiasConfigError(f"p_std={self.p_std}: the log-normal's spread must be > 0")
        if self.num_trajectories < 4:
            raise GradientBiasConfigError(f"num_trajectories={self.num_trajectories}: pass ≥ 4 for the CMT fit")
        if self.random_draws < 1:
            raise GradientBiasConfigError(f"random_draws={self.random_draws}: pass ≥ 1")
        if self.mc_samples < 0 or (self.mc_samples > 0 and (self.mc_samples < 64 or self.mc_levels < 1)):
            raise GradientBiasConfigError(
                f"mc_samples={self.mc_samples}, mc_levels={self.mc_levels}: pass mc_samples=0 to skip the Monte-Carlo "
                "check, or mc_samples ≥ 64 with mc_levels ≥ 1"
            )
        return self


QUICK = GradientBiasConfig(
    steps=(2, 4, 8, 16), q=256.0, num_trajectories=64, random_draws=4, fit_min_steps=4, mc_samples=2048, mc_levels=4
)


# ---------------------------------------------------------------------------------------------------------------
# Noise levels and the σ distribution


def ect_level_chain(sigma_max: float, sigma_min: float, q: float) -> np.ndarray:
    """σ_0 = σ_max, σ_{n+1} = ECT's r(σ_n; q) until the first level below σ_min (kept as the last, target-only level)."""
    levels = [float(sigma_max)]
    current = torch.tensor([float(sigma_max)], dtype=torch.float64)  # [1]
    while levels[-1] >= sigma_min:
        current = ect_r_from_t(current, q)
        levels.append(float(current.item()))
        if len(levels) > MAX_LEVELS:
            raise GradientBiasConfigError(f"q={q} gives more than {MAX_LEVELS} levels between σ_max and σ_min: lower q")
    return np.asarray(levels)  # [N+1]


def level_weights(levels: np.ndarray, p_mean: float, p_std: float) -> np.ndarray:
    """Mass of ECT's clamped ln σ ~ N(p_mean, p_std²) on each loss level levels[:-1] (cells split at ln-σ midpoints)."""
    log_levels = np.log(levels[:-1])  # [N], decreasing
    edges = np.concatenate([[np.inf], 0.5 * (log_levels[1:] + log_levels[:-1]), [-np.inf]])  # [N+1]
    cdf = ndtr((edges - p_mean) / p_std)  # [N+1]
    return cdf[:-1] - cdf[1:]  # [N], sums to 1


# ---------------------------------------------------------------------------------------------------------------
# Students: one affine map per level


@dataclass(frozen=True)
class AffineStudent:
    """f(x, σ_n) = a[n]·x + b[n] on the level chain (a is the effective slope; θ_n = (a[n]/c_in(σ_n), b[n]))."""

    a: np.ndarray  # float64 [N+1]
    b: np.ndarray  # float64 [N+1, d]


def affine_coefficients(level_map: Callable[[np.ndarray, np.ndarray], np.ndarray], sigma: np.ndarray, dim: int):
    """(slope [L], intercept [L, d]) of an affine, isotropic map x ↦ level_map(x, σ) read off at x = 0 and x = 1."""
    zeros, ones = np.zeros((len(sigma), dim)), np.ones((len(sigma), dim))  # [L, d] each
    intercept = np.asarray(level_map(zeros, sigma), dtype=np.float64)  # [L, d]
    slopes = np.asarray(level_map(ones, sigma), dtype=np.float64) - intercept  # [L, d]
    rounding = 1e-12 * (1.0 + np.abs(intercept).max())  # x ↦ map(1) − map(0) cancels digits of the intercept
    if not np.allclose(slopes, slopes[:, :1], rtol=0.0, atol=rounding):
        raise ValueError("the map is not isotropic (one slope per level); this study's student has a scalar slope")
    return slopes.mean(1), intercept


def diffusion_student(levels: np.ndarray, mu: np.ndarray, s: float) -> AffineStudent:
    """The perfect diffusion model: f(x, σ) = E[x0 | x] = μ + s²/(s²+σ²)·(x − μ)."""
    return AffineStudent(*affine_coefficients(lambda x, sigma: posterior_mean(x, sigma, mu, s), levels, len(mu)))


def flow_map_student(levels: np.ndarray, mu: np.ndarray, s: float) -> AffineStudent:
    """The exact consistency function f(x, σ) = Ψ_{σ→0}(x) (ε = 0; only the Δt term of the bias is left)."""
    return AffineStudent(*affine_coefficients(lambda x, sigma: flow_map(x, sigma, 0.0, mu, s), levels, len(mu)))


def random_student(levels: np.ndarray, c_in: np.ndarray, dim: int, rng: np.random.Generator) -> AffineStudent:
    """θ^a(σ), b(σ) = Σ_k c_k·T_k(ℓ), ℓ = ln σ mapped onto [−1, 1], c_k ~ N(0, 1/(k+1)²); slope a = c_in·θ^a."""
    log_levels = np.log(levels)  # [N+1]
    ell = 2.0 * (log_levels - log_levels.min()) / (log_levels.max() - log_levels.min()) - 1.0  # [N+1]
    basis = np.polynomial.chebyshev.chebvander(ell, RANDOM_DEGREE)  # [N+1, P]
    scale = 1.0 / np.arange(1, RANDOM_DEGREE + 2)  # [P]
    a = c_in * (basis @ (scale * rng.standard_normal(RANDOM_DEGREE + 1)))  # [N+1]
    b = basis @ (scale[:, None] * rng.standard_normal((RANDOM_DEGREE + 1, dim)))  # [N+1, d]
    return AffineStudent(a, b)


@dataclass(frozen=True)
class CMTFit:
    """A CMT init plus what its fit left: ε parts measured at the solver's own levels."""

    student: AffineStudent
    fit_residual: float  # mean CMT loss d(f(x̂_{t_i}), x̂_{t_0}) of the fitted maps on the trajectories (float32 noise)
    solver_level_error: float  # max_i |a_i − g(σ_i)|: the solver's flow-map error at its own levels


def oracle_teacher(cfg: GradientBiasConfig, mu: np.ndarray) -> Teacher:
    """The exact Gaussian teacher on an EDM schedule spanning [sigma_min, sigma_max]."""
    from diffusers import EDMEulerScheduler

    scheduler = EDMEulerScheduler(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigma_data=cfg.s)
    return make_oracle_teacher(scheduler, (cfg.dim,), mu.tolist(), cfg.s)


def input_scale(teacher: Teacher, levels: np.ndarray) -> np.ndarray:
    """EDM's c_in(σ) = 1/√(σ² + σ_data²) of the oracle teacher's scheduler (σ_data = s) at each level; [N+1]."""
    return edm_preconditioning(teacher.schedule, "sample", torch.as_tensor(levels))[0].numpy()


def cmt_student(
    teacher: Teacher, levels: np.ndarray, *, steps: int, solver: str, cfg: GradientBiasConfig, mu: np.ndarray
) -> CMTFit:
    """CMT's CM-form objective E_i E_{x_T} ‖f(x̂_{t_i}, t_i) − x̂_{t_0}‖², solved per solver level by least squares,
    then (a, b) interpolated across σ by a cubic spline in ln σ."""
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_trajectories))
    trajectory = solve(teacher, seeds, steps=steps, solver=solver, grid=cfg.grid,
                       sigma_max=cfg.sigma_max, sigma_min=cfg.sigma_min)
    points = trajectory.points.double()  # [B, K+1, d], native
    endpoint = points[:, -1]  # [B, d], x̂_{t_0} (α = 1, σ = 0)
    solver_sigma = trajectory.sigma[:steps] / trajectory.alpha[:steps]  # [K], EDM levels of the non-final points
    fit_a, fit_b, residuals = np.empty(steps), np.empty((steps, cfg.dim)), []
    for i in range(steps):
        x_edm, _ = edm_from_native(points[:, i], trajectory.alpha[i], trajectory.sigma[i])  # [B, d]
        x_centered, y_centered = x_edm - x_edm.mean(0), endpoint - endpoint.mean(0)  # [B, d] each
        slope = float((x_centered * y_centered).sum() / (x_centered * x_centered).sum())
        intercept = endpoint.mean(0) - slope * x_edm.mean(0)  # [d]
        prediction = slope * x_edm + intercept  # [B, d]
        residuals.append(float(cmt_cm_loss(prediction, endpoint, squared_l2).mean()))
        fit_a[i], fit_b[i] = slope, intercept.numpy()
    exact_a, _ = affine_coefficients(lambda x, sigma: flow_map(x, sigma, 0.0, mu, cfg.s), solver_sigma, cfg.dim)
    order = np.argsort(np.log(solver_sigma))  # CubicSpline needs increasing abscissae
    log_levels = np.log(levels)  # [N+1]
    a = CubicSpline(np.log(solver_sigma)[order], fit_a[order])(log_levels)  # [N+1]
    b = CubicSpline(np.log(solver_sigma)[order], fit_b[order], axis=0)(log_levels)  # [N+1, d]
    return CMTFit(AffineStudent(a, b), float(np.mean(residuals)), float(np.max(np.abs(fit_a - exact_a))))


# ---------------------------------------------------------------------------------------------------------------
# Exact gradients


def _pair_moments(levels: np.ndarray, mu: np.ndarray, s: float, pair: str) -> tuple[np.ndarray, np.ndarray]:
    """E[x'] [N, d] and E[x·x'] [N, d] per coordinate for x = x0 + σ_n ε and its pair partner x' at σ_{n+1}."""
    sigma, sigma_next = levels[:-1, None], levels[1:, None]  # [N, 1] each
    if pair == "shared_noise":  # x' = x0 + σ'ε
        return np.broadcast_to(mu, (len(sigma), len(mu))), mu * mu + s * s + sigma * sigma_next
    k, offset = affine_coefficients(
        lambda x, level: flow_map(x, level, levels[1:], mu, s), levels[:-1], len(mu)
    )  # x' = Ψ_{σ→σ'}(x) = k·x + offset
    second_moment = mu * mu + s * s + sigma * sigma  # [N, d], E[x²]
    return k[:, None] * mu + offset, k[:, None] * second_moment + offset * mu


def level_bias(
    student: AffineStudent, levels: np.ndarray, c_in: np.ndarray, mu: np.ndarray, s: float, pair: str
) -> np.ndarray:
    """Per-level ∇_{θ_n}(ℓ_oracle − ℓ_post) = 2·E[Jᵀ(f_{n+1}(x') − Ψ_{σ_n→0}(x))] = 2·(c_in·Σ_j E[x_j e_j], E[e]); [N, 1+d].

    θ_n = (a_n/c_in(σ_n), b_n): the slope parameter acts on the EDM-scaled input c_in·x, so ∂f/∂θ^a = c_in·x.
    """
    g, h = affine_coefficients(lambda x, sigma: flow_map(x, sigma, 0.0, mu, s), levels[:-1], len(mu))  # Ψ = g·x + h
    mean_next, cross = _pair_moments(levels, mu, s, pair)  # [N, d] each
    a_next, b_next = student.a[1:, None], student.b[1:]  # [N, 1], [N, d]
    second_moment = mu * mu + s * s + levels[:-1, None] ** 2  # [N, d], E[x²]
    mean_error = a_next * mean_next + b_next - g[:, None] * mu - h  # [N, d], E[e]
    cross_error = a_next * cross + b_next * mu - g[:, None] * second_moment - h * mu  # [N, d], E[x·e]
    slope_part = c_in[:-1, None] * cross_error.sum(1, keepdims=True)  # [N, 1]
    return 2.0 * np.concatenate([slope_part, mean_error], axis=1)  # [N, 1+d]


def oracle_loss_per_level(student: AffineStudent, levels: np.ndarray, mu: np.ndarray, s: float) -> np.ndarray:
    """E‖f_n(x) − Ψ_{σ_n→0}(x)‖² per loss level, [N] (the init's ε² at that level)."""
    g, h = affine_coefficients(lambda x, sigma: flow_map(x, sigma, 0.0, mu, s), levels[:-1], len(mu))
    slope_error = student.a[:-1] - g  # [N]
    variance = s * s + levels[:-1] ** 2  # [N], Var(x_j)
    mean_error = slope_error[:, None] * mu + student.b[:-1] - h  # [N, d]
    return len(mu) * slope_error**2 * variance + (mean_error**2).sum(1)


def output_scale(levels: np.ndarray, reading: str, s: float) -> np.ndarray:
    """|c_out(σ_n)| of a student reading, [N+1]: what a parameter gradient of f is multiplied by at each level."""
    if reading == "direct":
        return np.ones_like(levels)
    if reading == "edm":
        return levels * s / np.sqrt(levels**2 + s * s)  # EDM's c_out with σ_data = s (Karras et al. 2022, Table 1)
    return levels.copy()  # ε-prediction: f = x − σ·ε̂, c_out = −σ


def gradient_bias(
    student: AffineStudent, levels: np.ndarray, weights: np.ndarray, c_in: np.ndarray, mu: np.ndarray, s: float,
    pair: str, reading: str = "direct",
) -> dict[str, float]:
    """bias_sq = E_σ‖∇_{θ(σ)}ℓ_oracle − ∇_{θ(σ)}ℓ_post‖² = Σ_n w_n·c_out(σ_n)²·‖·‖² (the reading's chain-rule factor)
    and oracle_loss = L_oracle(θ) = ε² (exact; the reading does not change f, so not ε²)."""
    per_level = level_bias(student, levels, c_in, mu, s, pair) * output_scale(levels, reading, s)[:-1, None]  # [N, 1+d]
    return {
        "bias_sq": float((weights[:, None] * per_level**2).sum()),
        "oracle_loss": float((weights * oracle_loss_per_level(student, levels, mu, s)).sum()),
    }


def monte_carlo_level_bias(
    student: AffineStudent, levels: np.ndarray, c_in: np.ndarray, index: int, mu: np.ndarray, s: float, pair: str,
    *, samples: int, generator: torch.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Autograd estimate of level `index`'s ∇(ℓ_oracle − ℓ_post) through trainer.losses: (mean, standard error), [1+d].

    Each sample gets its own copy of (a_n, b_n), so one backward pass yields exact per-sample gradients.
    """
    dim, mu_t = len(mu), torch.as_tensor(mu)  # [d]
    sigma, sigma_next = float(levels[index]), float(levels[index + 1])
    x0 = mu_t + s * torch.randn(samples, dim, generator=generator, dtype=torch.float64)  # [M, d]
    noise = torch.randn(samples, dim, generator=generator, dtype=torch.float64)  # [M, d]
    x_t = x0 + sigma * noise  # [M, d]
    x_r = x0 + sigma_next * noise if pair == "shared_noise" else flow_map(x_t, sigma, sigma_next, mu_t, s)  # [M, d]
    f_r = float(student.a[index + 1]) * x_r + torch.as_tensor(student.b[index + 1])  # [M, d]
    target_post = ect_target(f_r, x0, r=sigma_next)  # [M, d], sg f(x_r, r)
    target_oracle = flow_map(x_t, sigma, 0.0, mu_t, s)  # [M, d], Ψ_{t→0}(x_t)
    x_scaled = float(c_in[index]) * x_t  # [M, d], the slope parameter's input c_in·x_t
    gradients = []
    for loss_of in (lambda f: cmt_cm_loss(f, target_oracle, squared_l2), lambda f: squared_l2(f, target_post)):
        slope = float(student.a[index] / c_in[index])
        a = torch.full((samples, 1), slope, dtype=torch.float64, requires_grad=True)  # [M, 1], θ^a per sample
        b = torch.as_tensor(student.b[index]).repeat(samples, 1).requires_grad_(True)  # [M, d]
        loss_of(a * x_scaled + b).sum().backward()
        gradients.append(torch.cat([a.grad, b.grad], dim=1))  # [M, 1+d], per-sample ∇ℓ
    difference = (gradients[0] - gradients[1]).numpy()  # [M, 1+d]
    return difference.mean(0), difference.std(0, ddof=1) / np.sqrt(samples)


# ---------------------------------------------------------------------------------------------------------------
# The study


def _slope(steps: list[int], values: list[float], min_steps: int) -> float | None:
    """Least-squares slope of ln value vs ln K over K ≥ min_steps (None where a value is not > 0)."""
    chosen = [(k, v) for k, v in zip(steps, values) if k >= min_steps]
    if any(not v > 0 for _, v in chosen):
        return None
    ks, vs = zip(*chosen)
    return float(np.polyfit(np.log(ks), np.log(vs), 1)[0])


def _plot(result: dict[str, Any], path: Path) -> None:
    """Two log-log panels vs K: ‖∇L_oracle − ∇L_post‖² and ε² = L_oracle(θ_init), one line per init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, config = result["steps"], result["config"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"diffusion": ("tab:red", "-"), "random": ("tab:gray", "-"), "flow_map": ("black", ":")}
    for axis, key, title in ((axes[0], "bias_sq", "‖∇L_oracle − ∇L_post‖² at init"),
                             (axes[1], "oracle_loss", "ε² = L_oracle(θ_init) = E‖f(x_t, t) − Ψ(x_t)‖²")):
        for name, values in result[key].items():
            if not all(v > ROUNDING_ZERO * result[key]["diffusion"][0] for v in values):
                continue  # a rounding zero (exact Ψ with ODE pairs) has no place on a log axis
            if name.startswith("cmt-"):
                slope = result["slopes"][name] if key == "bias_sq" else result["oracle_loss_slopes"][name]
                label = f"{name} (slope {slope:.2f})" if slope is not None else name
                axis.plot(steps, values, "o-", label=label)
            else:
                color, line = styles[name]
                label = {"flow_map": "exact Ψ (Δt floor)", "random": f"random (mean of {config['random_draws']})"}
                label = label.get(name, name)
                axis.plot(steps, values, line, color=color, label=label)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("solver steps K of the CMT init")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Gaussian oracle, d={config['dim']}, ECT pairs q={config['q']:g} ({config['pair']}), "
                    f"{result['num_levels']} levels", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(cfg: GradientBiasConfig) -> dict[str, Any]:
    """Measure the exact gradient bias at init for CMT (per solver, per K), diffusion, random and exact-Ψ students;
    write gradient_bias.json and gradient_bias.png into cfg.out and return the JSON's content."""
    cfg.validate()
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mu = cfg.mu_center + cfg.mu_spread * np.linspace(-1.0, 1.0, cfg.dim)  # [d]
    levels = ect_level_chain(cfg.sigma_max, cfg.sigma_min, cfg.q)  # [N+1]
    weights = level_weights(levels, cfg.p_mean, cfg.p_std)  # [N]
    steps = list(cfg.steps)
    teacher = oracle_teacher(cfg, mu)
    c_in = input_scale(teacher, levels)  # [N+1]

    def measure(student: AffineStudent) -> dict[str, float]:
        """Exact bias and ε² of one init on this study's levels."""
        return gradient_bias(student, levels, weights, c_in, mu, cfg.s, cfg.pair, cfg.reading)

    fixed = {"diffusion": measure(diffusion_student(levels, mu, cfg.s)),
             "flow_map": measure(flow_map_student(levels, mu, cfg.s))}
    rng = np.random.default_rng(cfg.seed)
    random_students = [random_student(levels, c_in, cfg.dim, rng) for _ in range(cfg.random_draws)]
    random_values = [measure(student) for student in random_students]
    fixed["random"] = {key: float(np.mean([v[key] for v in random_values])) for key in ("bias_sq", "oracle_loss")}
    random_bias_range = [min(v["bias_sq"] for v in random_values), max(v["bias_sq"] for v in random_values)]

    bias_sq: dict[str, list[float]] = {}
    oracle_loss: dict[str, list[float]] = {}
    fits: dict[str, dict[str, list[float]]] = {}
    last_fit: dict[str, CMTFit] = {}
    for solver in cfg.solvers:
        name = f"cmt-{solver}"
        bias_sq[name], oracle_loss[name] = [], []
        fits[name] = {"fit_residual": [], "solver_level_error": []}
        for k in steps:
            fit = cmt_student(teacher, levels, steps=k, solver=solver, cfg=cfg, mu=mu)
            values = measure(fit.student)
            bias_sq[name].append(values["bias_sq"])
            oracle_loss[name].append(values["oracle_loss"])
            fits[name]["fit_residual"].append(fit.fit_residual)
            fits[name]["solver_level_error"].append(fit.solver_level_error)
            last_fit[name] = fit
    for name, values in fixed.items():
        bias_sq[name] = [values["bias_sq"]] * len(steps)
        oracle_loss[name] = [values["oracle_loss"]] * len(steps)

    largest = {name: values[-1] for name, values in bias_sq.items()}
    result: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "mu": mu.tolist(),
        "num_levels": len(weights),
        "delta_sigma_relative": [float(np.min(1 - levels[1:] / levels[:-1])), float(np.max(1 - levels[1:] / levels[:-1]))],
        "steps": steps,
        "bias_sq": bias_sq,
        "oracle_loss": oracle_loss,
        "slopes": {name: _slope(steps, values, cfg.fit_min_steps) for name, values in bias_sq.items()},
        "oracle_loss_slopes": {name: _slope(steps, values, cfg.fit_min_steps) for name, values in oracle_loss.items()},
        "fit_range_steps": [k for k in steps if k >= cfg.fit_min_steps],
        "cmt_fit": fits,
        "random_bias_sq_range": random_bias_range,
        "ordering_at_largest_steps": {
            name: bool(largest[name] < largest["diffusion"] < largest["random"]) for name in bias_sq if name.startswith("cmt-")
        },
    }
    if cfg.mc_samples > 0:
        result["monte_carlo_check"] = _monte_carlo_check(
            cfg, levels, weights, c_in, mu,
            {"diffusion": diffusion_student(levels, mu, cfg.s), "random": random_students[0],
             "flow_map": flow_map_student(levels, mu, cfg.s),
             **{f"{name}@K={steps[-1]}": fit.student for name, fit in last_fit.items()}},
        )
    result["wall_s"] = time.perf_counter() - started
    _plot(result, out / PLOT_NAME)
    (out / JSON_NAME).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _monte_carlo_check(
    cfg: GradientBiasConfig, levels: np.ndarray, weights: np.ndarray, c_in: np.ndarray, mu: np.ndarray,
    students: dict[str, AffineStudent],
) -> dict[str, Any]:
    """Closed-form per-level bias vs its autograd Monte-Carlo estimate at `mc_levels` σ-quantile levels, per init.

    z = |MC − exact| / standard error per component (max over levels and components); relative = ‖MC − exact‖/‖exact‖
    (max over levels; it is only small where the bias is large against the Monte-Carlo noise).
    """
    cumulative = np.cumsum(weights)
    quantiles = (np.arange(cfg.mc_levels) + 0.5) / cfg.mc_levels
    indices = sorted({int(np.searchsorted(cumulative, q)) for q in quantiles})
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    per_init = {}
    for name, student in students.items():
        exact = level_bias(student, levels, c_in, mu, cfg.s, cfg.pair)  # [N, 1+d]
        worst_z, worst_relative = 0.0, 0.0
        for index in indices:
            mean, stderr = monte_carlo_level_bias(student, levels, c_in, index, mu, cfg.s, cfg.pair,
                                                  samples=cfg.mc_samples, generator=generator)
            error = mean - exact[index]  # [1+d]
            scale = stderr + 1e-12 * (1.0 + np.abs(exact[index]))  # [1+d]; an exact zero has a zero standard error
            worst_z = max(worst_z, float(np.max(np.abs(error) / scale)))
            worst_relative = max(worst_relative, float(np.linalg.norm(error) / max(np.linalg.norm(exact[index]), 1e-300)))
        per_init[name] = {"max_abs_z": worst_z, "max_relative_error": worst_relative}
    return {"levels_sigma": [float(levels[i]) for i in indices], "samples_per_level": cfg.mc_samples,
            "max_abs_z": max(v["max_abs_z"] for v in per_init.values()), "per_init": per_init}


def main(argv: list[str] | None = None) -> int:
    """CLI: python jobs/gradient_bias.py [--quick] [--out DIR] [--pair P] [--q Q] [--reading R] [--dry-run]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small K set and samples (seconds; what the test runs)")
    parser.add_argument("--out", default=None, help=f"output directory (default {GradientBiasConfig.out})")
    parser.add_argument("--pair", choices=PAIRS, default=None, help="post-training pair: ECT shared noise or exact ODE step")
    parser.add_argument("--q", type=float, default=None, help="ECT's q (Δt ≈ t·(1 + 8·sigmoid(−t))/q)")
    parser.add_argument("--reading", choices=READINGS, default=None,
                        help="student parameterisation c_out: direct (1), edm (bounded by σ_data), epsilon (−σ)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else GradientBiasConfig()
    overrides = {key: value for key, value in (("out", args.out), ("pair", args.pair), ("q", args.q),
                                                ("reading", args.reading)) if value is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    try:
        cfg.validate()
    except GradientBiasConfigError as error:
        parser.error(str(error))
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    result = run(cfg)
    summary = {key: result[key] for key in ("steps", "bias_sq", "slopes", "oracle_loss_slopes", "ordering_at_largest_steps")}
    summary["monte_carlo_check"] = result.get("monte_carlo_check")
    summary["wall_s"] = round(result["wall_s"], 2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
