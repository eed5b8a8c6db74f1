"""The one PF-ODE solver: drive a real diffusers scheduler step by step and keep every solver point.

``solve`` builds a FRESH scheduler per call from the teacher's scheduler config (multistep solvers keep
history), feeds it the teacher's clean-sample prediction D (``Teacher.denoise_native``) at the noise level
of the current state — on the ``scheduler`` grid with the network called at the scheduler's own timesteps, as
diffusers pipelines call it (fractional for Euler/Heun, rounded for DPM-Solver's karras/exponential/beta/λ
sigmas), on custom grids at the teacher's timestep of each level — and records the K+1 full-step states
(index 0 = prior, index K = clean endpoint) with the float64 (α, σ) of each state *in the scheduler's own sample
space*, so that x = α·x0 + σ·ε holds:

=============  =====================================  ========================  =========================
solver         diffusers scheduler                    sample space (α, σ)        drives schedule families
=============  =====================================  ========================  =========================
ddim           DDIMScheduler (eta = 0)                VP (√ᾱ_t, √(1−ᾱ_t))        vp; grid "scheduler" only
euler          EulerDiscreteScheduler                 EDM (1, σ̃)                vp, edm, flow
heun           HeunDiscreteScheduler                  EDM (1, σ̃)                vp, edm
dpmpp-2m/3m    DPMSolverMultistepScheduler,           VP (1/√(1+σ̃²), σ̃·α)      vp, edm, flow
               algorithm_type="dpmsolver++", order 2/3
flow-euler     FlowMatchEulerDiscreteScheduler        FM (1−τ, τ)               vp, edm, flow
=============  =====================================  ========================  =========================

Grids (K steps → K+1 levels; all but ``cmt-authors`` end at σ = 0):

- ``scheduler``: the solver scheduler's own ``set_timesteps(K)`` spacing on the teacher's schedule (teacher's
  ``timestep_spacing``, ``steps_offset``, ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas`` /
  ``use_lu_lambdas``, flow ``shift`` / ``shift_terminal``, ``rescale_betas_zero_snr`` honoured). For an EDM teacher
  the levels of its own EDM scheduler are used. Not available where the solver's scheduler cannot run the
  teacher's schedule natively (e.g. ``euler`` on a flow-matching teacher, whose first level is σ̃ = ∞), nor where
  its own grid is not K+1 finite levels ending at 0 (Euler's ``interpolation_type="log_linear"`` makes K+1 levels
  for K steps and stops at σ_min; ``shift_terminal`` with K = 1 makes NaN).
- ``karras``: σ_i = (σ_max^{1/ρ} + i/(K−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7 (EDM eq. 5).
- ``logsnr``: K levels uniform in log-SNR λ = −2·ln σ̃ from σ_max down to σ_min, then a last step to σ = 0 (the
  endpoint is the solver's own x̂0 at σ = 0).
- ``cmt-authors``: the CMT authors' CIFAR recipe exactly (sony/cmt ``DPMSolverLoss``: ``get_time_steps('logSNR', 80,
  0.002, N=16)`` and ``sample(method='multistep', order=3, lower_order_final=True)``): K + 1 levels uniform in log-SNR
  from σ_max to σ_min with NO σ = 0 point, so the last recorded state (the regression target) lies at σ̃ = σ_min and the
  store's α/σ say so; step orders 1, 2, 3, …, 3, 2, 1 (the last step first order, the one before second order, for any
  K). DPM-Solver++ (``dpmpp-3m``; ``dpmpp-2m`` gives 1, 2, …, 2, 1) only.

``sigma_max``/``sigma_min`` are EDM-view levels σ̃ (defaults 80 and 0.002) and are clamped to what the teacher's
schedule represents: a DDPM linear schedule (β 1e-4…0.02, T = 1000) spans σ̃ ∈ [0.0100, 157], so the CMT
recipe becomes 80 → 0.0100 there (a warning is issued only when a value the caller gave is clamped).

Custom grids are installed through each scheduler's own features: ``set_timesteps(sigmas=…)`` for Euler and
flow-Euler (flow shift disabled so τ is used as given), ``set_timesteps(timesteps=…)`` for Heun on a VP teacher
(fractional timesteps found by inverting Heun's own linear σ(t) interpolation). ``DPMSolverMultistepScheduler
.set_timesteps`` only takes integer timesteps, and an EDM teacher's config has no β table for Heun's σ(t), so for
these two the levels are written into ``scheduler.sigmas`` after ``set_timesteps(K)`` (Heun's as its interleaved
s_0, s_1, s_1, …, s_{K−1}, s_{K−1}, 0); their step reads nothing else.

Where ``grid="scheduler"`` differs from diffusers' own loop over the teacher's scheduler config, on purpose
(tests/test_solver_goldens.py checks every state against that loop at float32 tolerance, across the flags above):

- Every solver ends at σ = 0, recorded as (α, σ) = (1, 0): the endpoint is the scheduler's own x̂0 at its last level.
  A teacher config with DDIM ``set_alpha_to_one=False`` or ``final_sigmas_type="sigma_min"`` (DPM-Solver, Euler,
  EDM schedulers) makes diffusers' last step land on that level instead (ᾱ_0; σ̃_min); all earlier states agree.
  On the Gaussian oracle teacher at K = 10 the two DDIM endpoints differ by 1e-4…1e-2 (relative), depending on
  spacing and β schedule.
- Clipping / thresholding of x̂0 is turned off (it is not part of the ODE), whatever the teacher's config says.
- The prior state is ``init_noise_sigma``·ε of the solver's scheduler, recorded at its first level. For an EDM
  teacher, Euler (EDM space) starts from σ_max·ε as EDM's own sampler does; diffusers' EDM schedulers start from
  √(σ_max² + 1)·ε.
- Refused with a SolverError / SigmaRangeError that names the fix: DDIM spacings whose steps do not chain (diffusers
  would call the model at another timestep than the state's level), and an ε-prediction teacher at α = 0 (the first
  level of a trailing zero-terminal-SNR grid, where ε says nothing about x0 and diffusers returns NaN). A v- or
  sample-prediction zero-SNR teacher starts at α = 0: its prior point is recorded as (0, 1).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.solver_names import GRIDS, SCHEDULER_GRID_ONLY, SOLVERS
from pipeline.teacher import Teacher
from pipeline.time_convention import fm_alpha_sigma, vp_alpha_sigma

__all__ = ["GRIDS", "SOLVERS", "SolverError", "Trajectory", "prior_noise", "solve", "time_grid"]

ENDS_AT_SIGMA_MIN = ("cmt-authors",)  # grids whose last level is σ_min, not 0
DEFAULT_SIGMA_MAX = 80.0
DEFAULT_SIGMA_MIN = 0.002
KARRAS_RHO = 7.0

_FAMILIES_BY_SOLVER = {
    "ddim": ("vp",),
    "euler": ("vp", "edm", "flow"),
    "heun": ("vp", "edm"),
    "dpmpp-2m": ("vp", "edm", "flow"),
    "dpmpp-3m": ("vp", "edm", "flow"),
    "flow-euler": ("vp", "edm", "flow"),
}
_NATIVE_SOLVERS = {"vp": ("ddim", "euler", "heun", "dpmpp-2m", "dpmpp-3m"), "edm": (), "flow": ("flow-euler",)}


class SolverError(ValueError):
    """Bad solver request (unknown solver/grid, K < 1, a schedule the scheduler cannot drive); names the fix."""


@dataclass(frozen=True)
class Trajectory:
    """K+1 solver points per sample; points[:, i] = alpha[i]·x0 + sigma[i]·ε in the solver's sample space."""

    points: torch.Tensor  # [B, K+1, *S], float32 on CPU; index 0 = prior state, index K = clean endpoint
    alpha: np.ndarray  # float64 [K+1]
    sigma: np.ndarray  # float64 [K+1]; sigma[K] == 0 and alpha[K] == 1 when the solver ends at x0
    labels: torch.Tensor | None  # int64 [B] for class-conditional teachers


def prior_noise(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal prior [B, *S]; sample i is drawn from a CPU torch.Generator seeded with seeds[i] alone."""
    samples = [
        torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)
        for seed in seeds
    ]
    if not samples:
        return torch.empty((0, *shape), dtype=dtype)
    return torch.stack(samples).to(dtype)  # [B, *S]


@dataclass(frozen=True)
class _Plan:
    """A configured fresh scheduler plus the native (α, σ) of every model evaluation and every recorded point."""

    scheduler: Any
    space: str  # "vp" | "edm" | "fm": the scheduler's sample space
    eval_alpha: np.ndarray  # float64 [J]: native α of the state the model sees at scheduler step j
    eval_sigma: np.ndarray  # float64 [J]
    record_after: np.ndarray  # bool [J]: whether the state after step j is a recorded (full-step) point
    alpha: np.ndarray  # float64 [K+1]
    sigma: np.ndarray  # float64 [K+1]
    eval_timesteps: np.ndarray | None = None  # float64 [J]: the scheduler's own model timesteps (native grids)
    second_order_step: int | None = None  # multistep index whose update is capped at second order (cmt-authors)


def _fresh(cls: type, teacher: Teacher, **overrides: Any) -> Any:
    """A new scheduler of class `cls` from the teacher's scheduler config, with the overrides it accepts."""
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in dict(teacher.scheduler.config).items() if not k.startswith("_") and k in accepted}
    config.update({k: v for k, v in overrides.items() if k in accepted})
    return cls(**config)


def _custom_levels(
    teacher: Teacher, steps: int, grid: str, sigma_max: float | None, sigma_min: float | None
) -> np.ndarray:
    """EDM-view levels σ̃ [K+1] of a karras / logsnr grid (σ_max → σ_min, then 0), clamped to the teacher."""
    lo, hi = teacher.sigma_edm_range
    bounds = {}
    for name, given, default in (
        ("sigma_max", sigma_max, DEFAULT_SIGMA_MAX),
        ("sigma_min", sigma_min, DEFAULT_SIGMA_MIN),
    ):
        value = float(default if given is None else given)
        if not np.isfinite(value) or value <= 0:
            raise SolverError(f"{name}={given!r}: pass a finite EDM noise level σ̃ > 0")
        clamped = min(max(value, lo), hi)
        if given is not None and clamped != value:
            warnings.warn(
                f"{name}={value:g} is outside the teacher's schedule [{lo:.6g}, {hi:.6g}] (EDM σ̃); using {clamped:.6g}",
                stacklevel=3,
            )
        bounds[name] = clamped
    smax, smin = bounds["sigma_max"], bounds["sigma_min"]
    if not smax > smin:
        raise SolverError(
            f"sigma_max ({smax:g}) must exceed sigma_min ({smin:g}) after clamping to the teacher's schedule "
            f"[{lo:.6g}, {hi:.6g}]: pass sigma_max > sigma_min inside it"
        )
    if grid in ENDS_AT_SIGMA_MIN:
        return np.exp(np.linspace(np.log(smax), np.log(smin), steps + 1))  # [K+1], uniform in log-SNR, no σ = 0
    if grid == "karras":
        ramp = np.linspace(0.0, 1.0, steps)
        levels = (smax ** (1 / KARRAS_RHO) + ramp * (smin ** (1 / KARRAS_RHO) - smax ** (1 / KARRAS_RHO))) ** KARRAS_RHO
    else:
        levels = np.exp(np.linspace(np.log(smax), np.log(smin), steps))
    return np.append(levels, 0.0)


def _edm_template_levels(teacher: Teacher, steps: int) -> np.ndarray:
    """σ̃ levels [K+1] of an EDM teacher's own scheduler (its sigma_schedule, rho and range) ending at 0."""
    template = _fresh(type(teacher.scheduler), teacher, final_sigmas_type="zero")
    template.set_timesteps(steps)
    return template.sigmas.double().cpu().numpy()


def _levels_for(
    teacher: Teacher, steps: int, solver: str, grid: str, sigma_max: Any, sigma_min: Any
) -> np.ndarray | None:
    """Custom σ̃ levels to install, or None when the solver's scheduler uses its own set_timesteps(K) spacing."""
    family = teacher.schedule.family
    if grid != "scheduler":
        return _custom_levels(teacher, steps, grid, sigma_max, sigma_min)
    if sigma_max is not None or sigma_min is not None:
        raise SolverError("sigma_max/sigma_min only apply to grid='karras' or 'logsnr': drop them or change the grid")
    if solver in _NATIVE_SOLVERS[family]:
        return None
    if family == "edm":
        return _edm_template_levels(teacher, steps)
    raise SolverError(
        f"grid='scheduler' means the spacing of {solver}'s own scheduler on the teacher's schedule, and it cannot "
        f"run a {family} schedule natively ({type(teacher.scheduler).__name__}): use grid='logsnr' or 'karras', or "
        f"solver {' / '.join(_NATIVE_SOLVERS[family]) or 'euler'}"
    )


def _own_timesteps(scheduler: Any) -> np.ndarray:
    """The model timesteps a diffusers pipeline calls the network at on this scheduler's own grid, float64 [J]."""
    return scheduler.timesteps.double().cpu().numpy()


def _ddim_plan(teacher: Teacher, steps: int) -> _Plan:
    """DDIMScheduler (eta = 0) on the teacher's integer timesteps; refuses spacings whose steps do not chain."""
    from diffusers import DDIMScheduler

    scheduler = _fresh(
        DDIMScheduler, teacher, prediction_type="sample", clip_sample=False, thresholding=False, set_alpha_to_one=True
    )
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.cpu().numpy().astype(np.int64)  # [K]
    targets = timesteps - scheduler.config.num_train_timesteps // steps  # [K], where each step lands
    if not np.array_equal(targets[:-1], timesteps[1:]):
        raise SolverError(
            f"DDIMScheduler with timestep_spacing={scheduler.config.timestep_spacing!r} and K={steps} steps to "
            f"t−{scheduler.config.num_train_timesteps // steps} but evaluates the model at the next grid timestep "
            f"({targets[:3].tolist()} vs {timesteps[1:4].tolist()}), so its states are not a consistent ODE "
            "discretisation: use timestep_spacing 'leading' (or 'trailing' with K dividing num_train_timesteps), or "
            "solver='euler' (the same first-order method on any grid)"
        )
    sigma_table = np.exp(teacher.schedule.log_sigma_table)
    eval_alpha, eval_sigma = vp_alpha_sigma(sigma_table[timesteps])
    last = (1.0, 0.0) if targets[-1] < 0 else vp_alpha_sigma(float(sigma_table[targets[-1]]))
    alpha = np.append(eval_alpha, last[0])
    sigma = np.append(eval_sigma, last[1])
    return _Plan(scheduler, "vp", eval_alpha, eval_sigma, np.ones(steps, bool), alpha, sigma,
                 eval_timesteps=_own_timesteps(scheduler))


def _euler_plan(teacher: Teacher, steps: int, levels: np.ndarray | None) -> _Plan:
    """EulerDiscreteScheduler in the EDM-scaled space (α = 1, σ = σ̃)."""
    from diffusers import EulerDiscreteScheduler

    overrides = {"prediction_type": "sample", "final_sigmas_type": "zero", "timestep_type": "discrete"}
    if levels is None:
        scheduler = _fresh(EulerDiscreteScheduler, teacher, **overrides)
        scheduler.set_timesteps(steps)
    else:
        off = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
        scheduler = _fresh(EulerDiscreteScheduler, teacher, **overrides, **off)
        scheduler.set_timesteps(sigmas=levels.tolist())
    sigmas = scheduler.sigmas.double().cpu().numpy()  # [K+1]
    own_timesteps = _own_timesteps(scheduler) if levels is None else None
    return _Plan(scheduler, "edm", np.ones(steps), sigmas[:-1], np.ones(steps, bool), np.ones(steps + 1), sigmas,
                 eval_timesteps=own_timesteps)


def _heun_plan(teacher: Teacher, steps: int, levels: np.ndarray | None) -> _Plan:
    """HeunDiscreteScheduler in the EDM-scaled space; only full (second-order) steps are recorded.

    Heun's 2nd-order step (EDM Algorithm 1 without churn) on an EDM teacher: the scheduler's own β table is never
    read, the teacher's levels are written into its interleaved sigmas.
    """
    from diffusers import HeunDiscreteScheduler

    overrides = {"prediction_type": "sample", "clip_sample": False}
    if levels is None:
        scheduler = _fresh(HeunDiscreteScheduler, teacher, **overrides)
        scheduler.set_timesteps(steps)
    elif teacher.schedule.family == "edm":
        scheduler = HeunDiscreteScheduler(**overrides, timestep_spacing="linspace")
        scheduler.set_timesteps(steps)
        interleaved = np.concatenate([levels[:1], np.repeat(levels[1:-1], 2), levels[-1:]])  # [2K]
        scheduler.sigmas = torch.from_numpy(interleaved.astype(np.float32))  # read by step() via step_index
    else:
        off = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
        scheduler = _fresh(HeunDiscreteScheduler, teacher, **overrides, **off)
        alphas_cumprod = scheduler.alphas_cumprod
        table = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).double().numpy()  # [T], Heun's own σ(t) table
        timesteps = np.interp(levels[:-1], table, np.arange(len(table), dtype=np.float64))  # inverts Heun's interp
        scheduler.set_timesteps(timesteps=timesteps.tolist())
    sigmas = scheduler.sigmas.double().cpu().numpy()  # [2K]: s0, s1, s1, ..., s_{K-1}, s_{K-1}, 0
    evaluations = len(scheduler.timesteps)  # 2K − 1
    record_after = (np.arange(evaluations) % 2 == 1) | (np.arange(evaluations) == evaluations - 1)
    full = np.concatenate([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])  # [K+1]
    own_timesteps = _own_timesteps(scheduler) if levels is None else None
    return _Plan(scheduler, "edm", np.ones(evaluations), sigmas[:evaluations], record_after, np.ones(steps + 1), full,
                 eval_timesteps=own_timesteps)


def _dpm_plan(teacher: Teacher, steps: int, order: int, levels: np.ndarray | None) -> _Plan:
    """DPMSolverMultistepScheduler (DPM-Solver++, multistep order 2 or 3) in the VP space."""
    from diffusers import DPMSolverMultistepScheduler

    overrides = {
        "algorithm_type": "dpmsolver++",
        "solver_order": order,
        "prediction_type": "sample",
        "thresholding": False,
        "final_sigmas_type": "zero",
        "euler_at_final": False,
        "use_flow_sigmas": False,
        "variance_type": None,
    }
    if levels is None:
        scheduler = _fresh(DPMSolverMultistepScheduler, teacher, **overrides)
        scheduler.set_timesteps(steps)
    else:
        off = {
            "use_karras_sigmas": False,
            "use_lu_lambdas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
        }
        scheduler = _fresh(DPMSolverMultistepScheduler, teacher, **overrides, **off)
        scheduler.set_timesteps(steps)
        scheduler.sigmas = torch.from_numpy(levels.astype(np.float32))  # [K+1]; read by step() via step_index
    if len(scheduler.timesteps) != steps:
        raise SolverError(
            f"DPMSolverMultistepScheduler produced {len(scheduler.timesteps)} timesteps for K={steps}: use K ≤ "
            f"{scheduler.config.num_train_timesteps} or a karras/logsnr grid"
        )
    sigmas = scheduler.sigmas.double().cpu().numpy()  # [K+1], the EDM levels the scheduler steps between
    alpha, sigma = vp_alpha_sigma(sigmas)
    # final_sigmas_type="zero" makes diffusers take a first-order last step for any K; the authors' recipe also caps
    # the step before it at second order, which diffusers does only for K < 15 (lower_order_second)
    second_order_step = steps - 2 if levels is not None and levels[-1] > 0 and order == 3 and steps >= 3 else None
    own_timesteps = _own_timesteps(scheduler) if levels is None else None
    return _Plan(scheduler, "vp", alpha[:-1], sigma[:-1], np.ones(steps, bool), alpha, sigma,
                 eval_timesteps=own_timesteps, second_order_step=second_order_step)


def _flow_plan(teacher: Teacher, steps: int, levels: np.ndarray | None) -> _Plan:
    """FlowMatchEulerDiscreteScheduler in the flow-matching space (α = 1 − τ, σ = τ)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    overrides = {"stochastic_sampling": False, "invert_sigmas": False}
    if levels is None:
        if getattr(teacher.scheduler.config, "use_dynamic_shifting", False):
            raise SolverError(
                "the teacher's FlowMatchEulerDiscreteScheduler uses use_dynamic_shifting (its grid needs a "
                "resolution-dependent mu): use grid='logsnr' or 'karras'"
            )
        scheduler = _fresh(FlowMatchEulerDiscreteScheduler, teacher, **overrides)
        scheduler.set_timesteps(steps)
    else:
        plain = {
            "shift": 1.0,
            "use_dynamic_shifting": False,
            "shift_terminal": None,
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
        }
        scheduler = _fresh(FlowMatchEulerDiscreteScheduler, teacher, **overrides, **plain)
        tau = fm_alpha_sigma(levels[:-1])[1]  # [K], τ = σ̃/(1+σ̃)
        scheduler.set_timesteps(sigmas=tau.tolist())
    tau = scheduler.sigmas.double().cpu().numpy()  # [K+1]
    own_timesteps = _own_timesteps(scheduler) if levels is None else None
    return _Plan(scheduler, "fm", 1.0 - tau[:-1], tau[:-1], np.ones(steps, bool), 1.0 - tau, tau,
                 eval_timesteps=own_timesteps)


def _plan(teacher: Teacher, steps: Any, solver: str, grid: str, sigma_max: Any, sigma_min: Any) -> _Plan:
    """Validate the request and build the fresh scheduler with its bookkeeping."""
    if solver not in SOLVERS:
        raise SolverError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if grid not in GRIDS:
        raise SolverError(f"unknown grid {grid!r}: choose one of {', '.join(GRIDS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise SolverError(f"steps={steps!r}: the number of solver steps K must be an integer ≥ 1")
    steps = int(steps)
    family = teacher.schedule.family
    if family not in _FAMILIES_BY_SOLVER[solver]:
        able = [name for name in SOLVERS if family in _FAMILIES_BY_SOLVER[name]]
        raise SolverError(
            f"solver {solver!r} cannot drive a {family} schedule ({type(teacher.scheduler).__name__}); solvers "
            f"supported for this teacher: {', '.join(able)}"
        )
    if grid in ENDS_AT_SIGMA_MIN and solver not in ("dpmpp-2m", "dpmpp-3m"):
        raise SolverError(
            f"grid={grid!r} is the CMT authors' DPM-Solver++ recipe (ending at σ_min, orders …, 2, 1): use solver "
            f"dpmpp-3m (or dpmpp-2m), or grid 'logsnr' with {solver}"
        )
    if solver in SCHEDULER_GRID_ONLY:
        if grid != "scheduler" or sigma_max is not None or sigma_min is not None:
            raise SolverError(
                "DDIMScheduler only steps between the teacher's integer timesteps (it has no custom sigmas): use "
                "grid='scheduler' without sigma_max/sigma_min, or solver='euler' — the same first-order method on "
                "any grid — or a dpmpp solver"
            )
        return _ddim_plan(teacher, steps)
    levels = _levels_for(teacher, steps, solver, grid, sigma_max, sigma_min)
    if solver == "euler":
        plan = _euler_plan(teacher, steps, levels)
    elif solver == "heun":
        plan = _heun_plan(teacher, steps, levels)
    elif solver in ("dpmpp-2m", "dpmpp-3m"):
        plan = _dpm_plan(teacher, steps, 2 if solver == "dpmpp-2m" else 3, levels)
    else:
        plan = _flow_plan(teacher, steps, levels)
    if len(plan.sigma) != steps + 1 or not (np.all(np.isfinite(plan.alpha)) and np.all(np.isfinite(plan.sigma))):
        raise SolverError(
            f"{type(plan.scheduler).__name__}.set_timesteps({steps}) with the teacher's scheduler flags makes the "
            f"levels {np.round(plan.sigma, 6).tolist()}, not K+1 = {steps + 1} finite levels that end at 0 (e.g. "
            "interpolation_type='log_linear' makes K+1 levels and stops at σ_min; shift_terminal with K = 1 makes "
            "NaN): use grid='logsnr' or 'karras' (log-uniform / Karras levels ending at σ = 0), or more steps"
        )
    return plan


def time_grid(
    teacher: Teacher,
    steps: int,
    solver: str,
    grid: str,
    sigma_max: float | None = None,
    sigma_min: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The float64 (alpha, sigma) [K+1] that :func:`solve` records for this request, without running the model."""
    plan = _plan(teacher, steps, solver, grid, sigma_max, sigma_min)
    return plan.alpha.copy(), plan.sigma.copy()


@torch.no_grad()
def solve(
    teacher: Teacher,
    seeds: Sequence[int] | None = None,
    *,
    steps: int,
    solver: str = "dpmpp-3m",
    grid: str = "logsnr",
    sigma_max: float | None = None,
    sigma_min: float | None = None,
    labels: Any = None,
    guidance_scale: float | None = None,
    noise: torch.Tensor | None = None,
    progress: bool = False,
) -> Trajectory:
    """Integrate the teacher's PF-ODE from prior noise with a diffusers scheduler; keep all K+1 full-step states.

    The prior state is ``init_noise_sigma · noise`` (as in diffusers pipelines); ``noise`` defaults to
    :func:`prior_noise` of ``seeds``. The whole batch goes through the model at once at every step.
    """
    plan = _plan(teacher, steps, solver, grid, sigma_max, sigma_min)
    if noise is None:
        if seeds is None:
            raise SolverError("pass seeds=[...] (one per trajectory) or noise=<tensor [B, *sample_shape]>")
        noise = prior_noise(seeds, teacher.sample_shape)
    noise = torch.as_tensor(noise)
    if tuple(noise.shape[1:]) != tuple(teacher.sample_shape) or noise.dim() != len(teacher.sample_shape) + 1:
        raise SolverError(
            f"noise has shape {tuple(noise.shape)} but the teacher's samples are {tuple(teacher.sample_shape)}: "
            f"pass noise of shape [B, {', '.join(map(str, teacher.sample_shape))}]"
        )
    if seeds is not None and len(seeds) != noise.shape[0]:
        raise SolverError(f"{len(seeds)} seeds for {noise.shape[0]} noise samples: pass one seed per sample")
    label_tensor = None if labels is None else torch.as_tensor(labels).to(torch.long).reshape(-1).cpu()  # [B]
    scheduler = plan.scheduler
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))  # flow matching: the prior is ε itself
    x = noise.to(device=teacher.device, dtype=torch.float32) * init_noise_sigma  # [B, *S]
    points = [x.cpu()]
    timesteps = scheduler.timesteps
    iterator = range(len(timesteps))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"{solver} K={steps}", leave=False)
    for j in iterator:
        t = timesteps[j]
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(x, t)  # the scheduler's own bookkeeping; the teacher scales its own input
        if j == plan.second_order_step:
            scheduler.lower_order_nums = min(scheduler.lower_order_nums, 1)  # diffusers' own order counter
        timestep = None if plan.eval_timesteps is None else plan.eval_timesteps[j]
        denoised = teacher.denoise_native(
            x, plan.eval_alpha[j], plan.eval_sigma[j], labels=label_tensor, guidance_scale=guidance_scale,
            timestep=timestep,
        )  # [B, *S], x̂0
        if plan.space == "fm":
            model_output = (x - denoised) / float(plan.eval_sigma[j])  # velocity ε − x0 (α + σ = 1)
        else:
            model_output = denoised  # schedulers configured with prediction_type="sample"
        x = scheduler.step(model_output, t, x).prev_sample  # [B, *S]
        if plan.record_after[j]:
            points.append(x.cpu())
    if len(points) != len(plan.alpha):
        raise RuntimeError(f"internal: recorded {len(points)} points for K={steps} (expected {len(plan.alpha)})")
    return Trajectory(
        points=torch.stack(points, dim=1).to(torch.float32),  # [B, K+1, *S]
        alpha=plan.alpha.copy(),
        sigma=plan.sigma.copy(),
        labels=label_tensor,
    )
