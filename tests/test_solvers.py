"""The PF-ODE solver: goldens against diffusers pipelines, convergence order on an exact teacher, bookkeeping."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from pipeline.oracle import flow_map, make_oracle_teacher
from pipeline.solvers import GRIDS, SOLVERS, SolverError, prior_noise, solve, time_grid
from pipeline.teacher import load_teacher
from pipeline.time_convention import edm_from_native, per_sample
from tests.test_teacher import tiny_dit, tiny_unet, tiny_vae

MU, S = 0.3, 0.5
SHAPE = (1, 4, 4)


def _public(config) -> dict:
    """A scheduler config without diffusers' private keys (so every value is passed on explicitly)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _to_pipeline_image(x: torch.Tensor) -> torch.Tensor:
    """What diffusers image pipelines return for output_type='pt': (x/2 + 1/2) clamped to [0, 1]."""
    return (x / 2 + 0.5).clamp(0, 1)


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """‖ours − reference‖ / ‖reference‖ in float64."""
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


# ---------------------------------------------------------------------------------------------------------------
# Goldens


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_endpoint_equals_diffusers_ddim_pipeline(prediction_type):
    """solve(ddim, scheduler grid) reproduces DDIMPipeline(eta=0) from the same seeds (rel. error ≤ 1e-5)."""
    unet = tiny_unet()
    # beta_end 0.002 keeps the random UNet's endpoint mostly inside the pipeline's [0, 1] clamp
    scheduler = DDIMScheduler(clip_sample=False, prediction_type=prediction_type, beta_end=0.002)
    seeds, steps = [3, 4, 5, 6], 10
    pipeline = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    reference = pipeline(batch_size=4, generator=generators, num_inference_steps=steps, eta=0.0, output_type="pt")
    reference = reference.images  # [4, 3, 8, 8]
    trajectory = solve(load_teacher(unet, scheduler=scheduler), seeds, steps=steps, solver="ddim", grid="scheduler")
    ours = _to_pipeline_image(trajectory.points[:, -1])
    unclamped = ((reference > 0) & (reference < 1)).float().mean().item()
    assert unclamped > 0.4, "the golden must compare mostly unclamped values"
    assert _relative_error(ours, reference) <= 1e-5
    assert trajectory.sigma[-1] == 0 and trajectory.alpha[-1] == 1


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m", "dpmpp-3m"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_latent_endpoint_equals_diffusers_dit_pipeline(solver, guidance_scale):
    """solve on a DiT + VAE teacher reproduces DiTPipeline (classifier-free guidance included) after decoding.

    DiTPipeline steps from the scheduler-scaled model input, which is only right for schedulers whose
    scale_model_input is the identity (DDIM, DPM-Solver), so Euler/Heun are checked through the DDIM
    equivalence and the order tests instead.
    """
    dit, vae, base = tiny_dit(), tiny_vae(), DDPMScheduler()
    solver_scheduler = {
        "ddim": lambda: DDIMScheduler.from_config(_public(base.config), clip_sample=False),
        "dpmpp-2m": lambda: DPMSolverMultistepScheduler.from_config(_public(base.config), solver_order=2),
        "dpmpp-3m": lambda: DPMSolverMultistepScheduler.from_config(_public(base.config), solver_order=3),
    }[solver]()
    labels, seeds, steps = [1, 7, 999, 0], [3, 4, 5, 6], 10
    pipeline = DiTPipeline(transformer=dit, vae=vae, scheduler=solver_scheduler)
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    reference = pipeline(
        labels, guidance_scale=guidance_scale, generator=generators, num_inference_steps=steps, output_type="pt"
    ).images  # [4, 3, 8, 8]
    teacher = load_teacher(dit, scheduler=base, vae=vae)
    guidance = guidance_scale if guidance_scale > 1 else None
    trajectory = solve(
        teacher, seeds, steps=steps, solver=solver, grid="scheduler", labels=labels, guidance_scale=guidance
    )
    ours = _to_pipeline_image(teacher.decode(trajectory.points[:, -1]))
    assert ((reference > 0) & (reference < 1)).float().mean().item() > 0.9
    assert _relative_error(ours, reference) <= 1e-5


def test_ddim_and_euler_are_the_same_method_in_the_edm_view():
    """DDIM (VP space) and Euler (EDM space) on the same timesteps give the same EDM-view trajectory."""
    scheduler = DDPMScheduler(timestep_spacing="leading")
    teacher = load_teacher(tiny_unet(), scheduler=scheduler)
    ddim = solve(teacher, [0, 1], steps=6, solver="ddim", grid="scheduler")
    euler = solve(teacher, [0, 1], steps=6, solver="euler", grid="scheduler")
    assert np.allclose(ddim.sigma / ddim.alpha, euler.sigma / euler.alpha, rtol=1e-6)
    assert np.allclose(euler.alpha, 1.0) and not np.allclose(ddim.alpha[:-1], 1.0)
    ddim_edm = ddim.points / per_sample(torch.from_numpy(ddim.alpha), ddim.points, axis=1)
    assert _relative_error(ddim_edm, euler.points) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Convergence order on the exact Gaussian teacher


def _endpoint_error(teacher, solver: str, grid: str, steps: int) -> float:
    """Relative endpoint error against the closed-form flow map Ψ_{σ̃0→0} applied to the recorded prior state."""
    trajectory = solve(teacher, list(range(8)), steps=steps, solver=solver, grid=grid)
    prior = trajectory.points[:, 0].double()
    if trajectory.alpha[0] == 0:  # flow matching at τ = 1: the prior is ε and Ψ_{∞→0}(ε) = μ + s·ε
        exact = MU + S * prior
    else:
        x_edm, sigma_edm = edm_from_native(prior, trajectory.alpha[0], trajectory.sigma[0])
        exact = flow_map(x_edm, sigma_edm, 0.0, MU, S)
    return _relative_error(trajectory.points[:, -1], exact)


ORDER_CASES = {
    # name: (scheduler, solver, grid, steps, expected order); β from 1e-6 puts σ̃_min ≈ 0.001 below the grid
    "ddim": (DDPMScheduler(beta_start=1e-6, timestep_spacing="trailing"), "ddim", "scheduler", (20, 40, 100, 200), 1),
    "euler": (DDPMScheduler(beta_start=1e-6), "euler", "logsnr", (16, 32, 64, 128), 1),
    "flow-euler": (DDPMScheduler(beta_start=1e-6), "flow-euler", "logsnr", (16, 32, 64, 128), 1),
    "heun": (DDPMScheduler(beta_start=1e-6), "heun", "karras", (16, 32, 64, 128), 2),
    "heun-edm": (EDMEulerScheduler(), "heun", "karras", (16, 32, 64, 128), 2),
    "dpmpp-2m": (DDPMScheduler(beta_start=1e-6), "dpmpp-2m", "logsnr", (32, 64, 128), 2),
    "dpmpp-2m-edm": (EDMEulerScheduler(), "dpmpp-2m", "karras", (32, 64, 128), 2),
    "flow-euler-flow": (FlowMatchEulerDiscreteScheduler(), "flow-euler", "scheduler", (16, 32, 64, 128), 1),
}


@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_endpoint_error_falls_at_the_solver_order(case):
    """log-log slope of endpoint error vs K is within 0.3 of the solver's order (exact Gaussian teacher)."""
    scheduler, solver, grid, ks, order = ORDER_CASES[case]
    teacher = make_oracle_teacher(scheduler, SHAPE, MU, S)
    errors = np.array([_endpoint_error(teacher, solver, grid, k) for k in ks])
    slope = -np.polyfit(np.log(ks), np.log(errors), 1)[0]
    assert np.all(np.diff(errors) < 0), f"{case}: errors {errors}"
    assert abs(slope - order) <= 0.3, f"{case}: slope {slope:.2f}, errors {errors}"


def test_dpmpp_3m_is_at_least_second_order():
    """DPM-Solver++(3M) with its first-order start converges at least at order ~2 and beats 2M."""
    teacher = make_oracle_teacher(DDPMScheduler(beta_start=1e-6), SHAPE, MU, S)
    ks = (32, 64, 128)
    errors = np.array([_endpoint_error(teacher, "dpmpp-3m", "logsnr", k) for k in ks])
    slope = -np.polyfit(np.log(ks), np.log(errors), 1)[0]
    assert slope >= 1.8, f"slope {slope:.2f}"
    assert errors[-1] < _endpoint_error(teacher, "dpmpp-2m", "logsnr", ks[-1])


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping: grids, recorded (α, σ), prior noise


@pytest.mark.parametrize("solver", SOLVERS)
def test_time_grid_is_what_solve_records(solver):
    """time_grid returns solve's (α, σ) [K+1]: prior first, then the clean endpoint (α = 1, σ = 0)."""
    teacher = make_oracle_teacher(DDPMScheduler(), SHAPE, MU, S)
    grid = "scheduler" if solver == "ddim" else "logsnr"
    alpha, sigma = time_grid(teacher, 5, solver, grid)
    trajectory = solve(teacher, [0, 1, 2], steps=5, solver=solver, grid=grid)
    assert trajectory.points.shape == (3, 6, *SHAPE)
    assert np.array_equal(alpha, trajectory.alpha) and np.array_equal(sigma, trajectory.sigma)
    assert alpha.dtype == np.float64 and (alpha[-1], sigma[-1]) == (1.0, 0.0)
    assert np.all(np.diff(sigma / alpha) < 0)


def test_logsnr_grid_is_uniform_in_log_snr_clamped_to_the_vp_schedule_then_zero():
    """16 levels uniform in log-SNR from σ̃ = 80 to 0.002 (clamped to the DDPM table's 0.0100), then σ = 0."""
    teacher = make_oracle_teacher(DDPMScheduler(), SHAPE, MU, S)
    alpha, sigma = time_grid(teacher, 16, "dpmpp-3m", "logsnr")
    levels = sigma[:-1] / alpha[:-1]  # [16], EDM view
    assert levels[0] == pytest.approx(80.0, rel=1e-6)
    assert levels[-1] == pytest.approx(teacher.sigma_edm_range[0], rel=1e-6) and levels[-1] > 0.002
    assert np.allclose(np.diff(np.log(levels)), np.log(levels[-1] / levels[0]) / 15, rtol=1e-5)
    with pytest.warns(UserWarning, match="outside the teacher's schedule"):
        time_grid(teacher, 16, "dpmpp-3m", "logsnr", sigma_min=0.002)
    edm_alpha, edm_sigma = time_grid(make_oracle_teacher(EDMEulerScheduler(), SHAPE), 16, "euler", "logsnr")
    assert np.allclose(edm_alpha, 1.0) and edm_sigma[15] == pytest.approx(0.002, rel=1e-6)


def _dpmpp_first_order(x_s, sigma_s, sigma_t, denoised_s):
    """DPM-Solver++ first-order step in the EDM view: x̃_t = e^{−h}·x̃_s + (1 − e^{−h})·D_s, h = λ_t − λ_s, λ = −ln σ̃."""
    decay = sigma_t / sigma_s  # e^{−h}
    return decay * x_s + (1 - decay) * denoised_s


def test_cmt_authors_grid_is_the_authors_levels_and_step_orders_in_closed_form():
    """17 levels uniform in log-SNR from 80 to 0.002 with no σ = 0 point; the last step is first order and the one
    before it second order (sony/cmt: multistep order 3, lower_order_final), checked with the exact Gaussian denoiser."""
    teacher = make_oracle_teacher(EDMEulerScheduler(), SHAPE, MU, S)
    steps = 16
    alpha, sigma = time_grid(teacher, steps, "dpmpp-3m", "cmt-authors")
    levels = sigma / alpha  # [17], EDM view
    closed_form = np.exp(np.linspace(np.log(80.0), np.log(0.002), steps + 1))
    assert len(levels) == steps + 1 and levels[-1] > 0
    assert np.allclose(levels, closed_form, rtol=1e-6)  # the scheduler holds its levels in float32
    trajectory = solve(teacher, [0, 1, 2], steps=steps, solver="dpmpp-3m", grid="cmt-authors")
    assert np.array_equal(trajectory.sigma, sigma) and np.array_equal(trajectory.alpha, alpha)
    x_edm = trajectory.points.double() / torch.from_numpy(alpha).reshape(1, -1, 1, 1, 1)  # [3, 17, *S]
    denoise = lambda i: MU + S**2 / (S**2 + levels[i] ** 2) * (x_edm[:, i] - MU)  # noqa: E731  exact D at point i
    last = _dpmpp_first_order(x_edm[:, -2], levels[-2], levels[-1], denoise(steps - 1))
    assert torch.allclose(x_edm[:, -1], last, rtol=1e-4, atol=1e-5 * float(x_edm[:, -2].abs().max()))
    h = np.log(levels[-3] / levels[-2])  # λ_{K−1} − λ_{K−2}
    r0 = np.log(levels[-4] / levels[-3]) / h
    d1 = (denoise(steps - 2) - denoise(steps - 3)) / r0
    second = _dpmpp_first_order(x_edm[:, -3], levels[-3], levels[-2], denoise(steps - 2)) + 0.5 * (
        1 - levels[-2] / levels[-3]) * d1
    assert torch.allclose(x_edm[:, -2], second, rtol=1e-4, atol=1e-5 * float(x_edm[:, -3].abs().max()))
    third_order = solve(teacher, [0, 1, 2], steps=steps, solver="dpmpp-3m", grid="logsnr")  # contrast: 3M to σ = 0
    assert not torch.allclose(third_order.points[:, -2], trajectory.points[:, -2])
    with pytest.raises(SolverError, match="CMT authors' DPM-Solver\\+\\+ recipe.*dpmpp-3m"):
        time_grid(teacher, steps, "euler", "cmt-authors")


def test_heun_on_an_edm_teacher_is_edm_algorithm_1_in_closed_form():
    """Heun on an EDM teacher (EDM Algorithm 1 without churn): from σ_max·ε, x' = x + (σ' − σ)·(d + d')/2 with
    d = (x − D(x, σ))/σ at both ends, and an Euler step into σ = 0; checked with the exact Gaussian denoiser."""
    teacher = make_oracle_teacher(EDMEulerScheduler(), SHAPE, MU, S)
    steps = 4
    trajectory = solve(teacher, [0, 1, 2], steps=steps, solver="heun", grid="karras")
    levels = trajectory.sigma  # [K+1], α = 1 in the EDM space
    assert np.array_equal(trajectory.alpha, np.ones(steps + 1)) and levels[0] == pytest.approx(80.0, rel=1e-6)
    x = prior_noise([0, 1, 2], SHAPE).double() * levels[0]  # [3, *S]
    assert torch.allclose(trajectory.points[:, 0].double(), x, rtol=1e-6)
    slope = lambda x, sigma: (x - (MU + S**2 / (S**2 + sigma**2) * (x - MU))) / sigma  # noqa: E731  d = (x − D)/σ
    for i in range(steps):
        d = slope(x, levels[i])
        euler = x + (levels[i + 1] - levels[i]) * d
        x = euler if levels[i + 1] == 0 else x + (levels[i + 1] - levels[i]) * 0.5 * (d + slope(euler, levels[i + 1]))
        assert torch.allclose(trajectory.points[:, i + 1].double(), x, rtol=1e-4, atol=1e-5 * float(x.abs().max()))


def test_scheduler_grid_of_an_edm_teacher_is_its_own_schedule():
    """grid='scheduler' on an EDM teacher uses its EDMEulerScheduler's Karras levels, installed into each solver."""
    scheduler = EDMEulerScheduler(sigma_min=0.01, sigma_max=40.0)
    teacher = make_oracle_teacher(scheduler, SHAPE, MU, S)
    scheduler.set_timesteps(6)
    own = scheduler.sigmas.double().numpy()  # [7], Karras ρ = 7 from 40 to 0.01, then 0
    for solver in ("euler", "heun", "dpmpp-2m", "flow-euler"):
        alpha, sigma = time_grid(teacher, 6, solver, "scheduler")
        assert np.allclose(sigma / alpha, own, rtol=1e-6), solver


def test_prior_noise_depends_only_on_each_seed():
    """Sample i's noise and trajectory depend on seeds[i] alone, not on the batch around it."""
    noise = prior_noise([5, 6, 7], SHAPE)
    assert torch.equal(noise[1], prior_noise([6], SHAPE)[0])
    assert torch.equal(noise[0], torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(5)))
    teacher = make_oracle_teacher(DDPMScheduler(), SHAPE, MU, S)
    batch = solve(teacher, [5, 6, 7], steps=4, solver="dpmpp-2m", grid="logsnr")
    alone = solve(teacher, [6], steps=4, solver="dpmpp-2m", grid="logsnr")
    assert torch.allclose(batch.points[1], alone.points[0], rtol=1e-6, atol=1e-6)
    given = solve(teacher, noise=noise, steps=4, solver="dpmpp-2m", grid="logsnr")
    assert torch.equal(given.points, batch.points)


def test_solver_errors_name_the_fix():
    """Unknown solver/grid, K < 1, undrivable schedules, bad noise and grid bounds: SolverError with the fix."""
    vp = make_oracle_teacher(DDPMScheduler(), SHAPE, MU, S)
    flow = make_oracle_teacher(FlowMatchEulerDiscreteScheduler(), SHAPE, MU, S)
    with pytest.raises(SolverError, match="choose one of ddim, euler, heun"):
        solve(vp, [0], steps=4, solver="rk45")
    with pytest.raises(SolverError, match=", ".join(GRIDS)):
        solve(vp, [0], steps=4, grid="cosine")
    for bad_steps in (0, -3, 2.5):
        with pytest.raises(SolverError, match="integer ≥ 1"):
            solve(vp, [0], steps=bad_steps)
    with pytest.raises(SolverError, match="supported for this teacher: euler, dpmpp-2m, dpmpp-3m, flow-euler"):
        solve(flow, [0], steps=4, solver="heun")
    with pytest.raises(SolverError, match="use grid='logsnr' or 'karras'"):
        solve(flow, [0], steps=4, solver="euler", grid="scheduler")
    with pytest.raises(SolverError, match="grid='scheduler'"):
        solve(vp, [0], steps=4, solver="ddim", grid="logsnr")
    with pytest.raises(SolverError, match="timestep_spacing 'leading'"):
        solve(
            make_oracle_teacher(DDPMScheduler(timestep_spacing="linspace"), SHAPE),
            [0],
            steps=10,
            solver="ddim",
            grid="scheduler",
        )
    with pytest.raises(SolverError, match=r"pass noise of shape \[B, 1, 4, 4\]"):
        solve(vp, noise=torch.zeros(2, 3, 4, 4), steps=4)
    with pytest.raises(SolverError, match="seeds"):
        solve(vp, steps=4)
    with pytest.raises(SolverError, match="must exceed sigma_min"):
        solve(vp, [0], steps=4, sigma_max=0.5, sigma_min=1.0)
    with pytest.raises(SolverError, match="only apply to grid='karras' or 'logsnr'"):
        solve(vp, [0], steps=4, solver="euler", grid="scheduler", sigma_max=10.0)
