"""Golden tests over diffusers' scheduler configuration space: solve() against diffusers' own scheduler loop.

For each scheduler `pipeline.solvers.solve` drives, hypothesis draws the teacher's scheduler flags (timestep spacing,
steps_offset, final-level handling, prediction type, beta schedule, zero terminal SNR, karras / exponential / beta /
λ-uniform sigmas, flow shift, clipping and thresholding) and a step count K. The teacher is the exact Gaussian oracle
(`pipeline.oracle`) under those flags, and the reference is diffusers' own loop — `scale_model_input`, the model at
`scheduler.timesteps` with its native prediction type, `step` — driven here from the same prior state (the DDIM and
DDPM pipelines have no `callback_on_step_end` to read states from). Every state, every recorded (α, σ), the endpoint
and `time_grid` (what a store records) are checked.

Deliberate differences, each checked where it applies:
- The project ends at σ = 0: DDIM with `set_alpha_to_one=False` and DPM-Solver / Euler with
  `final_sigmas_type="sigma_min"` would stop at the scheduler's last level (ᾱ_0, σ̃_min). The endpoint equals
  diffusers' loop with the final level set to 0 (the scheduler's own x̂0 at its last level) and is recorded as
  (α, σ) = (1, 0); where the teacher's flags end at a level σ_L > 0 with a first-order last step, diffusers' endpoint
  is exactly that step from the project's point K−1 to σ_L (x_L = α_L·x̂0 + σ_L·ε̂).
- Clipping and thresholding of x̂0 are off (not part of the ODE): the reference runs with them off whatever the
  teacher's config says.
- DDIM spacings whose steps do not chain (the next model call is at another timestep than the state's level) and
  ε-prediction teachers at α = 0 (zero terminal SNR, where diffusers' own loop returns NaN) are refused.
- EDM teachers: the prior state is `init_noise_sigma·ε` of the solver's scheduler (Euler: σ_max·ε, as EDM's own
  sampler), where diffusers' EDM schedulers start from √(σ_max² + 1)·ε, so their loop starts from the project's prior.

Tolerance: float32 relative to the largest value the computation goes through (`tests.helpers.assert_close`): the
prior state's size, over α_0 where a VP-space solver turns an ε-prediction into x̂0 = (x − σ·ε)/α.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pipeline.oracle import make_oracle_teacher
from pipeline.solvers import SolverError, prior_noise, solve, time_grid
from pipeline.noise_schedule import SigmaRangeError, UnsupportedSchedulerError
from tests.helpers import assert_close

MU, S = 0.3, 0.5
SHAPE = (1, 4, 4)
SEEDS = [11, 12, 13, 14]
STEPS = st.sampled_from([1, 2, 3, 5, 10, 16])
# Reproducible and quick: the same examples on every run, no example database, no per-example deadline.
GOLDEN = settings(max_examples=24, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
CLIPPING_OFF = {"clip_sample": False, "thresholding": False}
ENDS_AT_ZERO = {"set_alpha_to_one": True, "final_sigmas_type": "zero"}
VP_SPACE_SOLVERS = ("ddim", "dpmpp-2m", "dpmpp-3m")

VP_FLAGS = {
    "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
    "prediction_type": st.sampled_from(["epsilon", "v_prediction", "sample"]),
    "timestep_spacing": st.sampled_from(["linspace", "leading", "trailing"]),
    "steps_offset": st.sampled_from([0, 1]),
}
SIGMA_FLAGS = st.sampled_from([{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
                               {"use_beta_sigmas": True}])


@dataclass(frozen=True)
class Reference:
    """diffusers' own loop: its full-step states and the scheduler's own level of each."""

    states: torch.Tensor  # [B, K+1, *S], index 0 = the prior state
    alpha: np.ndarray  # float64 [K+1], in the scheduler's sample space
    sigma: np.ndarray  # float64 [K+1]


def _accepted(cls: type, config: dict) -> dict:
    """The entries of `config` that `cls.__init__` takes."""
    names = inspect.signature(cls.__init__).parameters
    return {key: value for key, value in config.items() if key in names}


def _levels(scheduler, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(α, σ) [K+1] of the states diffusers' loop produces, read from the scheduler's own tables."""
    if isinstance(scheduler, DDIMScheduler):
        timesteps = scheduler.timesteps.numpy()  # [K]
        landing = timesteps - scheduler.config.num_train_timesteps // steps  # where each step lands
        table = scheduler.alphas_cumprod.double()
        final = float(scheduler.final_alpha_cumprod)
        alpha_bar = np.array([float(table[timesteps[0]])] + [float(table[t]) if t >= 0 else final for t in landing])
        return alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    sigmas = scheduler.sigmas.double().numpy()
    if isinstance(scheduler, HeunDiscreteScheduler):
        sigmas = np.append(sigmas[0::2], sigmas[-1])  # [K+1]: s0, s1, s1, ..., s_{K−1}, s_{K−1}, 0 → full steps
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return 1.0 - sigmas, sigmas
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        alpha = 1.0 / (1.0 + sigmas**2) ** 0.5  # DPM-Solver's VP space
        return alpha, sigmas * alpha
    return np.ones_like(sigmas), sigmas  # EDM space: Euler, Heun, EDM schedulers


def reference_scheduler(cls: type, config: dict, steps: int):
    """A diffusers scheduler of class `cls` from `config` (the entries it takes), set to K steps."""
    scheduler = cls(**_accepted(cls, config))
    with np.errstate(invalid="ignore"):  # FlowMatch's shift_terminal with K = 1 divides 0 by 0 (refused by solve)
        scheduler.set_timesteps(steps)
    return scheduler


def diffusers_loop(scheduler, model, steps: int, prior: torch.Tensor | None = None) -> Reference:
    """Run diffusers' scheduler loop from `prior` (default init_noise_sigma·noise), keeping every full-step state."""
    noise = prior_noise(SEEDS, SHAPE)
    x = noise * float(getattr(scheduler, "init_noise_sigma", 1.0)) if prior is None else prior
    states = [x]
    timesteps = scheduler.timesteps
    for index, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(model_input, t).sample, t, x).prev_sample
        # Heun's predictor half-steps leave it in its second-order state; its last step (to σ = 0) is a plain Euler step
        if getattr(scheduler, "state_in_first_order", True) or index == len(timesteps) - 1:
            states.append(x)
    alpha, sigma = _levels(scheduler, steps)
    return Reference(torch.stack(states, dim=1), alpha, sigma)


def _magnitude(trajectory, teacher, solver: str) -> float:
    """Largest value the computation goes through: the prior state; over α_0 where a VP-space solver's teacher
    computes in the EDM view (x̃ = x/α) or turns ε into x̂0 = (x − σ·ε)/α; times max σ_j/σ_{j+1} for Heun, whose
    corrector divides the predicted state (and its rounding) by σ_{j+1} and multiplies it by the step σ_j − σ_{j+1}."""
    magnitude = max(float(trajectory.points[:, 0].abs().max()), 1.0)
    if solver in VP_SPACE_SOLVERS and (teacher.prediction_type == "epsilon" or teacher.schedule.family == "edm"):
        magnitude /= float(trajectory.alpha[0])
    if solver == "heun":
        levels = trajectory.sigma[:-1]  # [K], all > 0
        magnitude *= max(float(np.max(levels[:-1] / levels[1:], initial=1.0)), 1.0)
    return magnitude


def _in_reference_space(trajectory, reference: Reference) -> tuple[torch.Tensor, np.ndarray]:
    """The trajectory's points and σ rescaled to the reference's sample space (the same σ̃, the reference's α)."""
    scale = np.where(trajectory.alpha > 0, reference.alpha / np.where(trajectory.alpha > 0, trajectory.alpha, 1), 1.0)
    points = trajectory.points * torch.from_numpy(scale).float().reshape(1, -1, *([1] * len(SHAPE)))  # [B, K+1, *S]
    return points, trajectory.sigma * scale


def check_against_diffusers(teacher_cls: type, flags: dict, solver: str, solver_cls: type, steps: int,
                            identity: dict | None = None, same_prior: bool = False) -> None:
    """solve(grid='scheduler') reproduces diffusers' loop over `solver_cls` built from the teacher's flags."""
    teacher = make_oracle_teacher(teacher_cls(**_accepted(teacher_cls, flags)), SHAPE, MU, S)
    config = {key: value for key, value in dict(teacher.scheduler.config).items() if not key.startswith("_")}
    config.update(identity or {}, **CLIPPING_OFF)
    run = partial(solve, teacher, noise=prior_noise(SEEDS, SHAPE), steps=steps, solver=solver, grid="scheduler")
    ending_at_zero = reference_scheduler(solver_cls, {**config, **ENDS_AT_ZERO}, steps)
    levels = _levels(ending_at_zero, steps)[1]
    if len(levels) != steps + 1 or not np.all(np.isfinite(levels)):
        event("refused: the scheduler's own grid is not K+1 finite levels")
        with np.errstate(invalid="ignore"):
            expect_refusal(run, SolverError, "not K\\+1 = .* finite levels that end at 0")
        return
    trajectory = run()
    prior = trajectory.points[:, 0] / float(trajectory.alpha[0]) if same_prior else None  # EDM view of our prior
    at_zero = diffusers_loop(ending_at_zero, teacher.model, steps, prior)
    own = diffusers_loop(reference_scheduler(solver_cls, config, steps), teacher.model, steps, prior)
    points, sigma = _in_reference_space(trajectory, own)
    magnitude = _magnitude(trajectory, teacher, solver)
    # every state before the endpoint is diffusers' state, at the level the scheduler says it is at
    assert_close(points[:, :-1], own.states[:, :-1], magnitude=magnitude, what="states 0..K−1")
    assert_close(torch.from_numpy(sigma[:-1]).float(), torch.from_numpy(own.sigma[:-1]).float(), ulps=16,
                 magnitude=max(float(np.max(own.sigma[:-1])), 1.0), what="σ of states 0..K−1")
    # the endpoint: diffusers' loop ending at σ = 0, recorded as (1, 0); the store records what time_grid returns
    assert (at_zero.alpha[-1], at_zero.sigma[-1]) == (1.0, 0.0)
    assert (trajectory.alpha[-1], trajectory.sigma[-1]) == (1.0, 0.0)
    assert_close(trajectory.points[:, -1], at_zero.states[:, -1], magnitude=magnitude, what="endpoint")
    alpha, sigma_grid = time_grid(teacher, steps, solver, "scheduler")
    assert np.array_equal(alpha, trajectory.alpha) and np.array_equal(sigma_grid, trajectory.sigma)
    if own.sigma[-1] > 0:
        _check_deliberate_end_at_zero(trajectory, own, config, solver, steps, magnitude)


def _check_deliberate_end_at_zero(trajectory, own: Reference, config: dict, solver: str, steps: int,
                                  magnitude: float) -> None:
    """The teacher's flags end at σ_L > 0; the project ends at σ = 0, and a first-order last step links the two."""
    assert own.sigma[-1] > 0 and (trajectory.alpha[-1], trajectory.sigma[-1]) == (1.0, 0.0)
    first_order_last_step = solver in ("ddim", "euler") or steps == 1 or config.get("euler_at_final") or (
        config.get("lower_order_final") and steps < 15)
    event(f"the teacher's flags end at σ_L > 0 (first-order last step: {bool(first_order_last_step)})")
    if not first_order_last_step:
        return
    x0 = trajectory.points[:, -1]  # the scheduler's own x̂0 at its last level
    before, alpha_before, sigma_before = trajectory.points[:, -2], trajectory.alpha[-2], trajectory.sigma[-2]
    epsilon = (before - alpha_before * x0) / sigma_before  # ε̂ of the last model call
    expected = own.alpha[-1] * x0 + own.sigma[-1] * epsilon  # one first-order (DDIM) step to the scheduler's σ_L
    assert_close(own.states[:, -1], expected.float(), magnitude=magnitude, what="diffusers' endpoint at σ_L")


def expect_refusal(call, error: type, match: str) -> None:
    """`call()` raises `error` whose message matches `match` (the fix is named)."""
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------
# The sweeps, one per diffusers scheduler the solvers drive


@GOLDEN
@given(
    flags=st.fixed_dictionaries({
        **VP_FLAGS,
        "timestep_spacing": st.sampled_from(["leading", "trailing", "linspace"]),
        "set_alpha_to_one": st.booleans(),
        "rescale_betas_zero_snr": st.booleans(),
        "clip_sample": st.booleans(),
        "thresholding": st.booleans(),
    }),
    teacher_cls=st.sampled_from([DDIMScheduler, DDPMScheduler]),
    steps=STEPS,
)
@example(  # the case from issue 16: set_alpha_to_one=False ends 1e-2 (relative) away from diffusers' own loop
    flags={"beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "trailing", "steps_offset": 0,
           "set_alpha_to_one": False, "rescale_betas_zero_snr": False, "clip_sample": True, "thresholding": False},
    teacher_cls=DDIMScheduler, steps=10,
)
@example(  # zero terminal SNR with a v-prediction teacher: the first state is pure noise (α = 0)
    flags={"beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing",
           "steps_offset": 1, "set_alpha_to_one": False, "rescale_betas_zero_snr": True, "clip_sample": False,
           "thresholding": False},
    teacher_cls=DDIMScheduler, steps=5,
)
@example(  # the same with an ε-prediction teacher: no x0 at α = 0 (diffusers' loop returns NaN), refused
    flags={"beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "trailing", "steps_offset": 0,
           "set_alpha_to_one": True, "rescale_betas_zero_snr": True, "clip_sample": False, "thresholding": False},
    teacher_cls=DDPMScheduler, steps=4,
)
def test_ddim_reproduces_diffusers_over_its_flags(flags, teacher_cls, steps):
    """DDIM (eta = 0) on the teacher's grid: diffusers' states, levels and endpoint; refusals name the fix."""
    reference = DDIMScheduler(**flags)
    reference.set_timesteps(steps)
    timesteps = reference.timesteps.numpy()
    teacher = make_oracle_teacher(teacher_cls(**_accepted(teacher_cls, flags)), SHAPE, MU, S)
    run = partial(solve, teacher, noise=prior_noise(SEEDS, SHAPE), steps=steps, solver="ddim", grid="scheduler")
    if not np.array_equal(timesteps[1:], timesteps[:-1] - 1000 // steps):
        event("refused: DDIM steps that do not chain")
        expect_refusal(run, SolverError, "not a consistent ODE discretisation")
        return
    if flags["prediction_type"] == "epsilon" and float(reference.alphas_cumprod[timesteps[0]]) == 0:
        event("refused: ε-prediction at α = 0")
        expect_refusal(run, SigmaRangeError, "predicts ε")
        own = diffusers_loop(reference_scheduler(DDIMScheduler, {**flags, **CLIPPING_OFF}, steps), teacher.model, steps)
        assert not torch.isfinite(own.states[:, -1]).all(), "diffusers' own loop has no x0 at α = 0 either"
        return
    check_against_diffusers(teacher_cls, flags, "ddim", DDIMScheduler, steps)


def _without_nonmonotone_zero_snr(flags: dict) -> bool:
    """Euler/DPM-Solver with rescale_betas_zero_snr and linear betas: a non-monotone σ̃(t), refused (tested below)."""
    return not (flags.get("rescale_betas_zero_snr") and flags["beta_schedule"] == "linear")


@GOLDEN
@given(
    flags=st.fixed_dictionaries({
        **VP_FLAGS,
        "rescale_betas_zero_snr": st.booleans(),
        "final_sigmas_type": st.sampled_from(["zero", "sigma_min"]),
        "interpolation_type": st.sampled_from(["linear", "log_linear"]),
    }).filter(_without_nonmonotone_zero_snr),
    sigma_flags=SIGMA_FLAGS,
    steps=STEPS,
)
def test_euler_reproduces_diffusers_over_its_flags(flags, sigma_flags, steps):
    """EulerDiscreteScheduler: the model at the scheduler's own (fractional) timesteps, states in the EDM space."""
    check_against_diffusers(EulerDiscreteScheduler, {**flags, **sigma_flags}, "euler", EulerDiscreteScheduler, steps)


@settings(GOLDEN, max_examples=12)  # HeunDiscreteScheduler() with karras/exponential/beta sigmas takes 0.1-0.3 s
@given(flags=st.fixed_dictionaries({**VP_FLAGS, "clip_sample": st.booleans()}), sigma_flags=SIGMA_FLAGS, steps=STEPS)
def test_heun_reproduces_diffusers_over_its_flags(flags, sigma_flags, steps):
    """HeunDiscreteScheduler: full (second-order) steps recorded, predictor half-steps not."""
    check_against_diffusers(HeunDiscreteScheduler, {**flags, **sigma_flags}, "heun", HeunDiscreteScheduler, steps)


@GOLDEN
@given(
    flags=st.fixed_dictionaries({
        **VP_FLAGS,
        "rescale_betas_zero_snr": st.booleans(),
        "final_sigmas_type": st.sampled_from(["zero", "sigma_min"]),
        "lower_order_final": st.booleans(),
        "euler_at_final": st.booleans(),
        "thresholding": st.booleans(),
    }).filter(_without_nonmonotone_zero_snr),
    sigma_flags=st.one_of(SIGMA_FLAGS, st.just({"use_lu_lambdas": True})),
    order=st.sampled_from([2, 3]),
    teacher_cls=st.sampled_from([DPMSolverMultistepScheduler, DDPMScheduler]),
    steps=STEPS,
)
def test_dpm_solver_reproduces_diffusers_over_its_flags(flags, sigma_flags, order, teacher_cls, steps):
    """DPMSolverMultistepScheduler (DPM-Solver++ 2M / 3M) in the VP space, the model at its own integer timesteps."""
    identity = {"algorithm_type": "dpmsolver++", "solver_order": order}
    check_against_diffusers(teacher_cls, {**flags, **sigma_flags}, f"dpmpp-{order}m", DPMSolverMultistepScheduler,
                            steps, identity)


@GOLDEN
@given(
    flags=st.fixed_dictionaries({
        "shift": st.floats(min_value=0.5, max_value=6.0),
        "shift_terminal": st.sampled_from([None, 0.05, 0.2]),
    }),
    sigma_flags=SIGMA_FLAGS,
    steps=STEPS,
)
def test_flow_euler_reproduces_diffusers_over_its_flags(flags, sigma_flags, steps):
    """FlowMatchEulerDiscreteScheduler on a flow-matching teacher: shift, terminal shift and sigma schedules."""
    check_against_diffusers(FlowMatchEulerDiscreteScheduler, {**flags, **sigma_flags}, "flow-euler",
                            FlowMatchEulerDiscreteScheduler, steps)


@GOLDEN
@given(
    flags=st.fixed_dictionaries({
        "sigma_schedule": st.sampled_from(["karras", "exponential"]),
        "prediction_type": st.sampled_from(["epsilon", "v_prediction"]),
        "sigma_min": st.sampled_from([0.002, 0.02]),
        "sigma_max": st.sampled_from([10.0, 80.0]),
        "rho": st.sampled_from([3.0, 7.0]),
        "final_sigmas_type": st.sampled_from(["zero", "sigma_min"]),
        "lower_order_final": st.booleans(),
        "euler_at_final": st.booleans(),
    }),
    solver=st.sampled_from(["euler", "dpmpp-2m", "dpmpp-3m"]),
    steps=STEPS,
)
def test_edm_teachers_reproduce_diffusers_edm_schedulers(flags, solver, steps):
    """EDM teachers: Euler vs EDMEulerScheduler, DPM-Solver++ (VP space) vs EDMDPMSolverMultistepScheduler."""
    if solver == "euler":
        check_against_diffusers(EDMEulerScheduler, flags, solver, EDMEulerScheduler, steps, same_prior=True)
    else:
        identity = {"algorithm_type": "dpmsolver++", "solver_order": int(solver[-2])}
        check_against_diffusers(EDMDPMSolverMultistepScheduler, flags, solver, EDMDPMSolverMultistepScheduler,
                                steps, identity, same_prior=True)


# ---------------------------------------------------------------------------------------------------------------
# Refusals and the deliberate difference, spelled out


def test_schedules_the_solvers_refuse_name_the_fix():
    """Zero-SNR Euler/DPM tables with linear betas, continuous-time v-prediction, dynamic flow shift: clear errors."""
    for cls in (EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        expect_refusal(lambda: make_oracle_teacher(cls(rescale_betas_zero_snr=True), SHAPE),
                       UnsupportedSchedulerError, "DDPMScheduler / DDIMScheduler config")
    expect_refusal(
        lambda: make_oracle_teacher(EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous"),
                                    SHAPE),
        UnsupportedSchedulerError, "timestep_type='discrete'")
    flow = make_oracle_teacher(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), SHAPE)
    expect_refusal(lambda: solve(flow, SEEDS, steps=4, solver="flow-euler", grid="scheduler"), SolverError,
                   "use grid='logsnr' or 'karras'")


def test_a_zero_snr_teacher_at_pure_noise_records_alpha_zero():
    """A trailing zero-terminal-SNR DDIM grid starts at α = 0: the prior is ε itself and the store says so."""
    teacher = make_oracle_teacher(DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                                prediction_type="v_prediction"), SHAPE, MU, S)
    trajectory = solve(teacher, noise=prior_noise(SEEDS, SHAPE), steps=4, solver="ddim", grid="scheduler")
    assert (trajectory.alpha[0], trajectory.sigma[0]) == (0.0, 1.0)
    assert torch.equal(trajectory.points[:, 0], prior_noise(SEEDS, SHAPE))
    assert bool(torch.isfinite(trajectory.points).all())


def test_set_alpha_to_one_false_is_the_one_ddim_flag_that_moves_the_endpoint():
    """The issue's case: a DDIM teacher with set_alpha_to_one=False ends at ᾱ_0 in diffusers, at σ = 0 here.

    The distance is the last step's target level only: O(σ_L) relative, here 1e-3…1e-2; every other state agrees.
    """
    flags = {"timestep_spacing": "trailing", "set_alpha_to_one": False, "clip_sample": False}
    teacher = make_oracle_teacher(DDIMScheduler(**flags), SHAPE, MU, S)
    trajectory = solve(teacher, noise=prior_noise(SEEDS, SHAPE), steps=10, solver="ddim", grid="scheduler")
    own = diffusers_loop(reference_scheduler(DDIMScheduler, flags, 10), teacher.model, 10)
    ours, theirs = trajectory.points[:, -1].double(), own.states[:, -1].double()
    relative = float((ours - theirs).norm() / theirs.norm())
    assert own.sigma[-1] == pytest.approx((1 - float(DDIMScheduler().alphas_cumprod[0])) ** 0.5)
    assert 1e-3 < relative < 3 * own.sigma[-1], f"relative distance {relative:.3g} for σ_L = {own.sigma[-1]:.3g}"
    magnitude = _magnitude(trajectory, teacher, "ddim")
    assert_close(trajectory.points[:, :-1], own.states[:, :-1], magnitude=magnitude, what="states 0..K−1")
