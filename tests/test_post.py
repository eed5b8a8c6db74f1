"""Stage 3 (post-training: ECT, ECD, MeanFlow): the loss glue on small tensors, JVP vs finite differences, two real
ranks with JVP, the Gaussian oracle (CMT init vs diffusion init), ECD without a teacher, SIGKILL + resume, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, EDMEulerScheduler, UNet2DModel

from pipeline.fault_points import HOLD_FILE_ENV, POINT_ENV, POST_STEP
from pipeline.ode_step import ode_step
from pipeline.oracle import flow_map, make_oracle_teacher
from pipeline.solvers import solve
from pipeline.teacher import Teacher, load_teacher
from storage_schema import open_store
from tests.helpers import HANG_LIMIT_S, assert_close, free_port, tiny_unet, wait_until, write_solved_store
from trainer.batches import InMemoryBatches
from trainer.config import ConfigError, load_config
from trainer.evaluation import parameter_hash
from trainer.loop import LoopConfig, complete_checkpoints, make_accelerator, train_loop
from trainer.losses import (
    cmt_cm_loss,
    meanflow_target,
    squared_l2,
    total_derivative_jvp,
)
from trainer.methods.ect import ECTConfig, ECTLoss, StoredECDLoss, paired_denoise
from trainer.methods.meanflow import (
    DerivativeBackendError,
    guided_target_velocity,
    jvp_attention_context,
    meanflow_prediction_and_derivative,
    teacher_velocity,
)
from trainer.methods.per_step import same_dropout
from trainer.post import (
    PostConfig,
    describe,
    main,
    run,
    store_stream,
)
from trainer.run_dir import RunDir
from trainer.schedules import clamp_sigma, ect_r_from_t, sample_ect_times
from trainer.student import FlowMapStudent

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_PRESET = REPO_ROOT / "jobs" / "tiny" / "post.yaml"
BATCH = 8  # batch_per_process of the tiny preset


def write_store(teacher, url: Path, *, num_trajectories: int = 32, steps: int = 4, shard_size: int = 16) -> Path:
    """A float32 DPM-Solver++(3M) store of the tiny teacher (pipeline/generate.py's layout, without Ray)."""
    return write_solved_store(teacher, url, num_trajectories=num_trajectories, steps=steps, shard_size=shard_size)


def save_teacher(directory: Path, unet: UNet2DModel, scheduler: DDPMScheduler | None = None) -> Path:
    """A DDPMPipeline teacher directory (what trainer/pretrain.py exports)."""
    DDPMPipeline(unet=unet, scheduler=scheduler or DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(
        directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny teacher, a 2-shard store of its trajectories, and a CM-form student export (mid-training's format)."""
    root = tmp_path_factory.mktemp("post")
    teacher_dir = save_teacher(root / "teacher", tiny_unet())
    teacher = load_teacher(teacher_dir)
    store = write_store(teacher, root / "store.zarr")
    cmt_export = FlowMapStudent.from_teacher(teacher).save_pretrained(root / "cmt_export")
    return {"teacher": teacher_dir, "store": store, "cmt": cmt_export, "root": root}


def tiny_cfg(tiny: dict[str, Path], output_dir: Path, *overrides: str) -> PostConfig:
    """The tiny preset pointed at the fixture's teacher, with overrides."""
    return load_config(PostConfig, TINY_PRESET, [f"teacher={tiny['teacher']}", f"loop.output_dir={output_dir}",
                                                 *overrides])


def logged_losses(output_dir: Path) -> dict[int, float]:
    """step → loss of every metrics.jsonl record with a loss."""
    return {record["step"]: record["loss"] for record in RunDir(output_dir).read_metrics() if "loss" in record}


class RecordingStudent(FlowMapStudent):
    """The real student, recording the inputs and outputs of every CM-form call (for checking the loss glue)."""

    calls: list

    def denoise(self, x_edm, sigma_edm, labels=None):
        out = super().denoise(x_edm, sigma_edm, labels)
        self.calls.append((x_edm.detach().clone(), torch.as_tensor(sigma_edm).detach().clone(), out.detach().clone()))
        return out


# ---------------------------------------------------------------------------------------------------------------
# Loss glue on small tensors


def test_ect_pairs_share_noise_and_dropout_mask_and_the_loss_matches_the_hand_formula():
    teacher = Teacher(tiny_unet(dropout=0.5), DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    student = RecordingStudent.from_teacher(teacher).train()
    student.calls = []
    x = torch.randn(4, 1, 8, 8)
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0], dtype=torch.float64)
    # Identical inputs and seed → identical outputs although dropout is active; another seed → another mask.
    f_t, f_r = paired_denoise(student, x, x, t=sigma, r=sigma, labels=None, dropout_seed=3)
    assert torch.equal(f_t, f_r) and f_t.requires_grad and not f_r.requires_grad
    with same_dropout(4, x.device):
        assert not torch.equal(student.denoise(x, sigma).detach(), f_r)

    # One ECT step with q = 2: r = t·(1 − (1 + 8·sigmoid(−t))/2) is clamped to 0 for t < ln 7, positive above.
    ect = ECTConfig(q_start=2.0)
    x0 = torch.rand(64, 1, 8, 8) * 2 - 1
    student.calls = []
    torch.manual_seed(0)
    loss = ECTLoss(ect, (0.002, 80.0))(student, {"x0": x0}, 0)
    (x_t, t, f_t), (x_r, r, f_r) = student.calls
    assert torch.equal(r, ect_r_from_t(t, 2.0)) and bool((r == 0).any()) and bool((r > 0).any())
    noise_t = (x_t - x0) / t.float().reshape(-1, 1, 1, 1)  # [B, 1, 8, 8]
    positive = r > 0
    noise_r = (x_r[positive] - x0[positive]) / r[positive].float().reshape(-1, 1, 1, 1)
    # the same ε for x_t and x_r, up to float32 rounding of x_r (magnitude |x_r|) divided by r
    rounding = 64 * torch.finfo(torch.float32).eps * x_r[positive].abs().flatten(1).amax(1).clamp(min=1.0)
    assert bool(((noise_t[positive] - noise_r).abs().flatten(1).amax(1) <= rounding / r[positive].float()).all())
    assert torch.equal(x_r[~positive], x0[~positive])  # r = 0: x_r is the clean sample
    target = torch.where(positive.reshape(-1, 1, 1, 1), f_r, x0)  # ECT target: x0 where r = 0
    c = 0.00054 * math.sqrt(64)
    by_hand = (torch.sqrt(((f_t - target) ** 2).flatten(1).sum(1).double() + c * c) - c) / (t - r)
    assert torch.allclose(loss.double(), by_hand, rtol=1e-5)


def test_stored_ecd_batches_pair_consecutive_solver_points_and_the_loss_uses_them(tiny, tmp_path):
    cfg = tiny_cfg(tiny, tmp_path, "method=ecd", f"init=cmt:{tiny['cmt']}", f"data=store:{tiny['store']}")
    student = RecordingStudent.from_pretrained(tiny["cmt"])
    batch = next(iter(store_stream(cfg, student, rank=0, world_size=1)))
    store = open_store(str(tiny["store"]))
    points = torch.from_numpy(np.concatenate([store.read_shard(s)["traj"] for s in range(store.num_shards)]))
    alpha, sigma = torch.from_numpy(np.array(store.alpha)), torch.from_numpy(np.array(store.sigma))
    x_edm = points.double() / alpha.reshape(1, -1, 1, 1, 1)  # [N, K+1, 1, 8, 8], EDM view of every stored point
    sigma_edm = sigma / alpha  # [K+1]
    for x_t, s_t, x_r, s_r in zip(batch["x_t"], batch["sigma_t"], batch["x_r"], batch["sigma_r"]):
        distances = (x_edm - x_t.double()).flatten(2).abs().amax(dim=2)  # [N, K+1]
        n, i = divmod(int(distances.argmin()), distances.shape[1])
        tolerance = 1e-6 * max(1.0, x_t.abs().max().item())  # float32 rounding of the rescaled state
        assert distances[n, i] < tolerance and i < distances.shape[1] - 1
        assert torch.isclose(s_t.double(), sigma_edm[i], rtol=1e-6)
        next_point = x_edm[n, i + 1]  # the NEXT point of the same trajectory
        assert (x_r.double() - next_point).abs().max() < 1e-6 * max(1.0, next_point.abs().max().item())
        assert torch.isclose(s_r.double(), sigma_edm[i + 1], rtol=1e-6, atol=1e-12)
    student.calls = []
    StoredECDLoss(cfg.ect)(student, batch, 0)
    (seen_x_t, seen_t, _), (seen_x_r, seen_r, _) = student.calls
    assert torch.equal(seen_x_t, batch["x_t"]) and torch.equal(seen_x_r, batch["x_r"])
    assert torch.equal(seen_t.float(), batch["sigma_t"]) and torch.equal(seen_r.float(), batch["sigma_r"])


def test_live_ecd_step_is_the_exact_flow_map_to_second_order_on_the_oracle():
    teacher = make_oracle_teacher(DDPMScheduler(beta_schedule="squaredcos_cap_v2"), (1, 4, 4), 0.3, 0.5)
    x = 0.3 + torch.randn(6, 1, 4, 4) * 2.0
    t = torch.tensor([0.2, 0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    errors = {}
    for method in ("euler", "heun"):
        for ratio in (0.9, 0.99):
            r = t * ratio
            step = ode_step(teacher, x, t, r, method=method)
            exact = flow_map(x.double(), t, r, 0.3, 0.5)
            errors[method, ratio] = (step.double() - exact).abs().max().item()
    # local error O(Δt²) for Euler, O(Δt³) for Heun: 10× smaller Δt → ~100× / ~1000× smaller error
    assert errors["euler", 0.99] < errors["euler", 0.9] / 50
    assert errors["heun", 0.99] < errors["heun", 0.9] / 200 + 1e-6 and errors["heun", 0.9] < errors["euler", 0.9] / 5
    to_zero = ode_step(teacher, x, t, torch.zeros(6), method="heun")  # r = 0: one Euler step = D(x_t, t)
    assert_close(to_zero, teacher.denoise(x, t.numpy()), magnitude=float(x.abs().max()), what="Euler step to r = 0")


def test_meanflow_jvp_and_finite_difference_targets_agree_with_one_dropout_mask():
    teacher = Teacher(tiny_unet(dropout=0.2, attention=True), DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    student = FlowMapStudent.from_teacher(teacher, second_time_input=True).train()
    torch.nn.init.normal_(student.second_time.embedding.linear_2.weight, std=0.02)  # make u depend on r
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(8, 1, 8, 8, generator=generator)
    t = 0.1 + 0.8 * torch.rand(8, generator=generator, dtype=torch.float64)
    r = t * torch.rand(8, generator=generator, dtype=torch.float64)
    z = (1 - t.float()).reshape(-1, 1, 1, 1) * x0 + t.float().reshape(-1, 1, 1, 1) * noise
    v = noise - x0
    u_jvp, du_jvp = meanflow_prediction_and_derivative(student, z, t=t, r=r, v=v, labels=None, method="jvp",
                                                       fd_delta=1e-4, dropout_seed=5)
    with jvp_attention_context(student):  # the same kernels and memory layouts as the JVP path → the same masks
        u_fd, du_fd = meanflow_prediction_and_derivative(student, z, t=t, r=r, v=v, labels=None, method="fd",
                                                         fd_delta=1e-4, dropout_seed=5)
    target_jvp, target_fd = meanflow_target(v, du_jvp, t=t, r=r), meanflow_target(v, du_fd, t=t, r=r)
    relative = ((target_jvp - target_fd).norm() / target_jvp.norm()).item()
    assert relative <= 1e-2, relative
    assert ((du_jvp - du_fd).norm() / du_jvp.norm()).item() <= 1e-2 and du_jvp.abs().mean() > 0.1
    assert torch.equal(u_jvp, u_fd) and u_jvp.requires_grad and not du_jvp.requires_grad

    def u_fn(z_in, *, t, r):
        with same_dropout(5, z.device):
            return student("mf", z_in, t=t, r=r)

    with torch.no_grad(), jvp_attention_context(student):
        primal, _ = total_derivative_jvp(u_fn, z, t=t, r=r, v=v)
    assert torch.equal(primal, u_jvp.detach())  # the JVP's u and the trained prediction saw the same dropout mask


@pytest.mark.parametrize("scheduler", [DDPMScheduler(beta_schedule="squaredcos_cap_v2"), EDMEulerScheduler()],
                         ids=["vp", "edm"])
def test_meanflow_teacher_velocity_is_the_time_derivative_of_the_oracles_flow(scheduler):
    """meanflow.velocity=teacher: v(z, τ) = d/dτ of the PF-ODE path through z, in the flow-matching view
    z = x̃/(1 + σ̃), τ = σ̃/(1 + σ̃); checked against the oracle's closed-form flow map, differentiated numerically."""
    mu, s = 0.3, 0.5
    teacher = make_oracle_teacher(scheduler, (1, 4, 4), mu, s)
    tau = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    z = (1 - tau).reshape(-1, 1, 1, 1) * mu + torch.randn(5, 1, 4, 4, dtype=torch.float64)  # [5, 1, 4, 4]
    velocity = teacher_velocity(teacher, z.float(), tau, labels=None).double()

    def path(to: torch.Tensor) -> torch.Tensor:
        """z at τ' on the PF-ODE path through (z, τ)."""
        sigma_from, sigma_to = tau / (1 - tau), to / (1 - to)
        x_edm = flow_map(z / (1 - tau).reshape(-1, 1, 1, 1), sigma_from, sigma_to, mu, s)
        return (1 - to).reshape(-1, 1, 1, 1) * x_edm

    delta = 1e-5
    derivative = (path(tau + delta) - path(tau - delta)) / (2 * delta)
    # the teacher runs in float32, and (z − x̂0)/τ scales its rounding by 1/τ
    assert_close(velocity.float(), derivative.float(), magnitude=float(z.abs().max() / tau.min()),
                 what="teacher velocity")


class ToyConditionalVelocity(torch.nn.Module):
    """u(z, t, r | y) = w_y·z + (t − r)/2 with a null class (id 3): a hand-checkable class-conditional MF model."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, -1.0]))

    def forward(self, form, z, *, t, r, labels):
        gap = (torch.as_tensor(t) - torch.as_tensor(r)).float().reshape(-1, 1, 1, 1)
        return self.w[labels].reshape(-1, 1, 1, 1) * z + 0.5 * gap


def test_meanflow_guided_velocity_is_the_official_formula_inside_the_interval_and_v_outside(tiny, tmp_path):
    """ṽ = ω·v + (1 − ω − κ)·u(z, t, t | ∅) + κ·u(z, t, t | c) for t in [t_min, t_max], v elsewhere (official
    MeanFlow `guidance_fn`; κ = 0 is its other branch u(∅) + ω·(v − u(∅)))."""
    z, v = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])
    model = ToyConditionalVelocity()
    u_cond = model.w.detach()[labels].reshape(-1, 1, 1, 1) * z  # u(z, t, t | c) = w_c·z (t − r = 0)
    u_null = -1.0 * z  # the null class (id 3) has w = −1
    inside = torch.tensor([False, True, True, False]).reshape(-1, 1, 1, 1)
    guided = guided_target_velocity(model, z, t=t, v=v, labels=labels, omega=2.0, kappa=0.5, interval=(0.3, 0.7),
                                    null_class=3, dropout_seed=0)
    by_hand = torch.where(inside, 2.0 * v + (1 - 2.0 - 0.5) * u_null + 0.5 * u_cond, v)
    assert_close(guided, by_hand, what="guided velocity with κ and the interval")
    plain = guided_target_velocity(model, z, t=t, v=v, labels=labels, omega=3.0, kappa=0.0, interval=(0.0, 1.0),
                                   null_class=3, dropout_seed=0)
    assert_close(plain, u_null + 3.0 * (v - u_null), what="guided velocity with κ = 0")
    with pytest.raises(ConfigError, match="class-conditional student"):
        run(tiny_cfg(tiny, tmp_path, "--method", "meanflow", "meanflow.guidance_scale=2.0"))
    with pytest.raises(ConfigError, match="set meanflow.guidance_scale"):
        tiny_cfg(tiny, tmp_path, "--method", "meanflow", "meanflow.guidance_kappa=0.5")
    with pytest.raises(ConfigError, match="label_dropout with ECD from a dataset"):
        tiny_cfg(tiny, tmp_path, "--method", "ecd", "--data", "dataset:digits", "label_dropout=0.1")
    with pytest.raises(ConfigError, match="meanflow.velocity=teacher with meanflow.guidance_scale"):
        tiny_cfg(tiny, tmp_path, "--method", "meanflow", "meanflow.velocity=teacher", "meanflow.guidance_scale=2.0")
    with pytest.raises(ConfigError, match="label_dropout with meanflow.velocity=teacher.*meanflow.velocity=conditional"):
        tiny_cfg(tiny, tmp_path, "--method", "meanflow", "meanflow.velocity=teacher", "label_dropout=0.1")
    with pytest.raises(ConfigError, match="label_dropout needs a class-conditional student"):
        run(tiny_cfg(tiny, tmp_path, "--method", "ect", "label_dropout=0.1"))
    with pytest.raises(ConfigError, match="guidance_t_min < meanflow.guidance_t_max"):
        tiny_cfg(tiny, tmp_path, "--method", "meanflow", "meanflow.guidance_scale=2", "meanflow.guidance_t_min=0.8",
                 "meanflow.guidance_t_max=0.2")


# ---------------------------------------------------------------------------------------------------------------
# Runs


def test_two_processes_meanflow_with_jvp_keep_identical_parameters(tiny, tmp_path):
    output_dir = tmp_path / "run"
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "trainer/post.py", "--config", str(TINY_PRESET), "--method", "meanflow", "--init", "teacher",
        "--data", f"store:{tiny['store']}", f"teacher={tiny['teacher']}", f"loop.output_dir={output_dir}",
        "meanflow.derivative=jvp", "loop.total_steps=3", "loop.checkpoint_every_steps=0",
        "meanflow.fraction_r_neq_t=0.5", "loop.torch_threads=none",
    ]
    launched = subprocess.run(command, check=False, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                              timeout=HANG_LIMIT_S)
    assert launched.returncode == 0, launched.stderr[-3000:]
    reports = [json.loads((output_dir / "ranks" / f"rank_{rank}.json").read_text()) for rank in range(2)]
    assert [report["world_size"] for report in reports] == [2, 2]
    assert [report["derivative"] for report in reports] == ["jvp", "jvp"]
    assert [report["skipped_steps"] for report in reports] == [0, 0]
    assert reports[0]["parameter_sha256"] == reports[1]["parameter_sha256"]
    torch.manual_seed(0)
    initial = FlowMapStudent.from_teacher(load_teacher(tiny["teacher"]), second_time_input=True, seed=0)
    assert reports[0]["parameter_sha256"] != parameter_hash(initial)
    assert FlowMapStudent.from_pretrained(output_dir / "export").second_time_input


def test_store_runs_after_cmt_never_load_the_teacher_and_live_ecd_runs_it(tiny, tmp_path):
    for method, extra in (("ecd", ()), ("ect", ("ect.q_mode=doubling", "ect.q_start=2", "ect.double_every_steps=1"))):
        stored = run(tiny_cfg(tiny, tmp_path / method, "--method", method, "--init", f"cmt:{tiny['cmt']}", "--data",
                              f"store:{tiny['store']}", "teacher=none", "loop.total_steps=3", *extra))
        assert stored.loop.final_step == 3 and stored.loop.skipped_steps == 0
        assert stored.rank_report["teacher_in_training"] is False and stored.rank_report["teacher_forward_samples"] == 0
        exported = FlowMapStudent.from_pretrained(tmp_path / method / "export")
        assert parameter_hash(exported) != parameter_hash(FlowMapStudent.from_pretrained(tiny["cmt"]))
    live = run(tiny_cfg(tiny, tmp_path / "live", "--method", "ecd", "--init", "teacher", "--data", "dataset:digits",
                        "loop.total_steps=3", "ecd.teacher_step=euler"))
    assert live.rank_report["teacher_in_training"] is True
    assert live.rank_report["teacher_forward_samples"] == 3 * BATCH  # one teacher evaluation per sample and step
    distilled = run(tiny_cfg(tiny, tmp_path / "meanflow_teacher", "--method", "meanflow", "--init", "teacher",
                             "--data", "dataset:digits", "loop.total_steps=3", "meanflow.velocity=teacher",
                             "meanflow.derivative=fd", "meanflow.p_mean=-8.0"))  # t at tau_min: below the VP table
    assert distilled.rank_report["teacher_in_training"] is True and distilled.loop.skipped_steps == 0
    assert distilled.rank_report["teacher_forward_samples"] == 3 * BATCH  # v(z, t): one forward per sample and step
    with pytest.raises(ConfigError, match="meanflow.velocity=teacher takes the teacher's velocity"):
        tiny_cfg(tiny, tmp_path, "--method", "meanflow", "--init", f"cmt:{tiny['cmt']}", "meanflow.velocity=teacher",
                 "teacher=none")
    with pytest.raises(ConfigError, match="meanflow.velocity` must be one of 'conditional', 'teacher'"):
        tiny_cfg(tiny, tmp_path, "--method", "meanflow", "meanflow.velocity=student")


def test_resume_after_sigkill_gives_bitwise_the_same_losses_and_weights(tiny, tmp_path):
    overrides = ("--method", "meanflow", "--init", "teacher", "--data", f"store:{tiny['store']}",
                 "meanflow.fraction_r_neq_t=0.5")
    reference = run(tiny_cfg(tiny, tmp_path / "reference", *overrides))
    killed_dir, hold_file = tmp_path / "killed", tmp_path / "hold"
    command = [sys.executable, "trainer/post.py", "--config", str(TINY_PRESET), f"teacher={tiny['teacher']}",
               f"loop.output_dir={killed_dir}", *overrides]
    environment = {**os.environ, POINT_ENV: f"{POST_STEP}:4", HOLD_FILE_ENV: str(hold_file)}
    child = subprocess.Popen(command, cwd=REPO_ROOT, env=environment,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: hold_file.exists() or child.poll() is not None, "the run reaches step 4 or exits")
    assert hold_file.exists(), f"the run never reached step 4 (exit code {child.poll()})"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert [step for step, _ in complete_checkpoints(killed_dir)] == [3]
    resumed = run(tiny_cfg(tiny, killed_dir, *overrides))
    assert resumed.loop.start_step == 3 and resumed.loop.final_step == 6
    assert logged_losses(killed_dir) == logged_losses(tmp_path / "reference")
    assert sorted(logged_losses(killed_dir)) == [1, 2, 3, 4, 5, 6]
    assert resumed.rank_report["parameter_sha256"] == reference.rank_report["parameter_sha256"]


# ---------------------------------------------------------------------------------------------------------------
# The Gaussian oracle: CMT init vs diffusion init under ECT

MU, S, SHAPE = 0.3, 0.5, (1, 4, 4)


class GaussianFlowMap(torch.nn.Module):
    """f(x̃, σ̃) = μ + (c²/(c² + σ̃²))^β·(x̃ − μ): β = 1, c = s is the posterior mean (a perfect diffusion model's x0
    prediction), β = ½, c = s the exact PF-ODE map Ψ_{σ̃→0}; both live in this 2-parameter family."""

    num_classes = None

    def __init__(self, c: float, beta: float):
        super().__init__()
        self.log_c = torch.nn.Parameter(torch.tensor(math.log(c), dtype=torch.float64))
        self.beta = torch.nn.Parameter(torch.tensor(float(beta), dtype=torch.float64))

    def forward(self, form: str, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
        c2 = torch.exp(2 * self.log_c)
        return (MU + (c2 / (c2 + sigma * sigma)) ** self.beta * (x - MU)).to(x.dtype)


def distance_to_flow_map(model: torch.nn.Module, num: int = 4096) -> float:
    """E ‖f(x_t, t) − Ψ_{t→0}(x_t)‖² over ECT's time distribution and the data (fixed draws)."""
    generator = torch.Generator().manual_seed(0)
    t = clamp_sigma(sample_ect_times(num, generator=generator), 0.002, 80.0)  # [N]
    x0 = MU + S * torch.randn(num, *SHAPE, generator=generator, dtype=torch.float64)
    x_t = x0 + t.reshape(-1, 1, 1, 1) * torch.randn(num, *SHAPE, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        return ((model("cm", x_t, t) - flow_map(x_t, t, 0.0, MU, S)) ** 2).flatten(1).sum(1).mean().item()


def test_on_the_gaussian_oracle_a_cmt_init_starts_closer_to_the_flow_map_than_the_diffusion_init(tmp_path):
    # CMT-like init: a short CMT fit (CM form, squared L2) on the exact teacher's 16-step DPM-Solver++ trajectories.
    teacher = make_oracle_teacher(DDPMScheduler(beta_schedule="squaredcos_cap_v2"), SHAPE, MU, S)
    trajectory = solve(teacher, list(range(512)), steps=16)
    steps = trajectory.points.shape[1] - 1
    x_edm = trajectory.points.double() / torch.from_numpy(trajectory.alpha).reshape(1, -1, 1, 1, 1)
    inputs = x_edm[:, :steps].flatten(0, 1)  # [N·K, *S]
    levels = torch.from_numpy(trajectory.sigma / trajectory.alpha)[:steps].repeat(512)  # [N·K]
    endpoints = x_edm[:, steps:].expand(-1, steps, *SHAPE).flatten(0, 1)  # [N·K, *S]
    cmt = GaussianFlowMap(S, 1.0)  # starts at the diffusion model, as CMT does
    optimizer = torch.optim.Adam(cmt.parameters(), lr=0.05)
    for _ in range(300):
        loss = cmt_cm_loss(cmt("cm", inputs, levels), endpoints, squared_l2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(cmt.beta.item() - 0.5) < 0.02 and abs(math.exp(cmt.log_c.item()) - S) < 0.03

    diffusion = GaussianFlowMap(S, 1.0)
    start = {"cmt": distance_to_flow_map(cmt), "diffusion": distance_to_flow_map(diffusion)}
    assert start["cmt"] < start["diffusion"] / 100, start

    # The same ECT run (q = 4096 fixed, pseudo-Huber, 200 steps) from both inits: the CMT start stays near Ψ, the
    # diffusion start moves towards it but is still far behind.
    data = MU + S * torch.randn(2048, *SHAPE, generator=torch.Generator().manual_seed(3))
    after = {}
    for name, model in (("cmt", cmt), ("diffusion", diffusion)):
        cfg = LoopConfig(output_dir=str(tmp_path / name), total_steps=200, lr=1e-3, lr_schedule="constant",
                         checkpoint_every_steps=0, log_every_steps=50, eval_every_steps=0, ema_decay=0.0,
                         grad_clip=None, torch_threads=1)
        batches = InMemoryBatches({"x0": data}, batch_per_process=256, seed=0, rank=0, world_size=1)
        result = train_loop(cfg, model=model, loss_fn=ECTLoss(ECTConfig(q_start=4096.0), (0.002, 80.0)),
                            batches=batches, accelerator=make_accelerator(cfg))
        assert result.skipped_steps == 0
        after[name] = distance_to_flow_map(model)
    assert after["diffusion"] < start["diffusion"] / 2, (start, after)
    assert after["cmt"] < after["diffusion"] / 100, (start, after)


# ---------------------------------------------------------------------------------------------------------------
# Errors and the CLI


def test_init_of_another_architecture_time_convention_or_form_is_refused(tiny, tmp_path, capsys):
    wide = FlowMapStudent.from_teacher(load_teacher(save_teacher(tmp_path / "wide", tiny_unet(channels=(16, 32)))))
    wide_dir = wide.save_pretrained(tmp_path / "wide_export")
    v_teacher = save_teacher(tmp_path / "v", tiny_unet(), DDPMScheduler(prediction_type="v_prediction"))
    v_dir = FlowMapStudent.from_teacher(load_teacher(v_teacher)).save_pretrained(tmp_path / "v_export")
    cases = [
        (["--init", f"cmt:{wide_dir}"], "another architecture"),
        (["--init", f"cmt:{v_dir}"], "another time convention"),
        (["--init", f"cmt:{tiny['teacher']}"], "not a student export"),
        (["--init", f"cmt:{tiny['cmt']}", "--method", "meanflow"], "second time input"),
        (["--init", f"cmt:{tiny['cmt']}", "--data", "dataset:mnist"], "shape"),
    ]
    for extra, message in cases:
        arguments = ["--config", str(TINY_PRESET), f"teacher={tiny['teacher']}", f"loop.output_dir={tmp_path / 'x'}",
                     *extra]
        assert main(arguments) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_jvp_with_an_attention_backend_without_forward_ad_is_refused_or_falls_back(tiny, tmp_path):
    with pytest.raises(DerivativeBackendError, match="attention=sdpa"):
        tiny_cfg(tiny, tmp_path, "--method", "meanflow", "attention=flash", "meanflow.derivative=jvp")
    with pytest.warns(UserWarning, match="finite difference"):
        plan = describe(tiny_cfg(tiny, tmp_path, "--method", "meanflow", "attention=flash", "meanflow.derivative=auto"))
    assert plan["derivative"] == "fd"
    assert describe(tiny_cfg(tiny, tmp_path, "--method", "meanflow"))["derivative"] == "jvp"
    secant = ("--method", "meanflow", "meanflow.derivative=secant")
    assert describe(tiny_cfg(tiny, tmp_path, *secant, "attention=flash"))["derivative"] == "secant"  # forward only
    trained = run(tiny_cfg(tiny, tmp_path / "secant", *secant, "attention=flash", "loop.total_steps=2",
                           "meanflow.fraction_r_neq_t=1.0"))
    assert trained.rank_report["derivative"] == "secant" and trained.loop.skipped_steps == 0
    assert math.isfinite(trained.loop.metrics["loss"])
    with pytest.raises(ConfigError, match=r"meanflow.secant_delta must lie in \(0, 0.5\]"):
        tiny_cfg(tiny, tmp_path, *secant, "meanflow.secant_delta=0")
    # Why: torch has no forward-mode formula for the flash SDPA kernel.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    student = FlowMapStudent.from_teacher(Teacher(tiny_unet(attention=True), DDPMScheduler()), second_time_input=True)
    z, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.6], dtype=torch.float64)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(lambda z_in, t_in: student("mf", z_in, t=t_in), (z, t),
                       (torch.ones_like(z), torch.ones_like(t)))


def test_dry_run_prints_the_plan_and_bad_flags_name_the_fix(tiny, tmp_path, capsys):
    output_dir = tmp_path / "never"
    arguments = ["--config", str(TINY_PRESET), f"teacher={tiny['teacher']}", f"loop.output_dir={output_dir}"]
    assert main([*arguments, "--method", "ecd", "--data", f"store:{tiny['store']}", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["loss"] == "StoredECDLoss" and plan["teacher_runs_during_training"] is False
    assert plan["config"]["method"] == "ecd" and not output_dir.exists()
    for extra, message in ((["--data", "digits"], "dataset:<name>"), (["--init", "cmt"], "cmt:<dir>"),
                           (["--method", "sct"], "one of 'ect', 'ecd', 'meanflow'"),
                           (["--init", "random", "teacher=none"], "pass teacher=")):
        assert main([*arguments, *extra]) == 2
        assert message in capsys.readouterr().err, extra
    with pytest.raises(ConfigError, match="double_every_steps"):
        tiny_cfg(tiny, tmp_path, "ect.q_mode=doubling")
