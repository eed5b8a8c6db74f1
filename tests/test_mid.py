"""Stage 2 (CMT mid-training): smoke run with checkpoint / SIGKILL / resume / export, two real ranks, bad inputs,
and the Gaussian oracle (loss at the exact flow map = solver discretisation error; a trained student approaches Ψ)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from pipeline.fault_points import HOLD_FILE_ENV, MID_STEP, POINT_ENV
from pipeline.oracle import flow_map, make_oracle_teacher, posterior_mean
from pipeline.solvers import solve
from pipeline.teacher import load_teacher
from tests.helpers import HANG_LIMIT_S, free_port, tiny_unet, wait_until
from tests.helpers import write_solved_store as write_store
from trainer.config import ConfigError, load_config
from trainer.loop import complete_checkpoints
from trainer.losses import squared_l2
from trainer.methods.cmt import build_distance, cm_loss
from trainer.mid import (
    MidConfig,
    MidDataError,
    check_stores,
    main,
    preload_pairs,
    run,
)
from trainer.run_dir import RunDir
from trainer.student import FlowMapStudent

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_PRESET = REPO_ROOT / "jobs" / "tiny" / "mid.yaml"
DIGITS_PRESET = REPO_ROOT / "jobs" / "digits" / "mid.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny teacher directory and a complete 4-shard store of its trajectories (32 × 5 points)."""
    root = tmp_path_factory.mktemp("tiny_mid")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(root / "teacher", safe_serialization=True)
    teacher = load_teacher(root / "teacher")
    write_store(teacher, root / "store.zarr", num_trajectories=32, steps=4, shard_size=8)
    return {"root": root, "teacher": root / "teacher", "store": root / "store.zarr"}


def tiny_args(tiny: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    """CLI arguments of the tiny preset pointed at the fixture's teacher and store."""
    return ["--config", str(TINY_PRESET), f"teacher={tiny['teacher']}", f"stores=[{tiny['store']}]",
            f"loop.output_dir={output_dir}", *extra]


def logged_losses(output_dir: Path) -> dict[int, float]:
    """{step: loss} of every logged step."""
    return {record["step"]: record["loss"] for record in RunDir(output_dir).read_metrics() if "loss" in record}


# -------------------------------------------------------------------------------------------------------------
# CLI, checkpoint, SIGKILL, resume, export


def test_dry_run_prints_the_plan_and_unknown_keys_fail(tiny, tmp_path, capsys):
    assert main([*tiny_args(tiny, tmp_path / "run"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stores"][0]["committed_shards"] == "4/4"
    assert plan["training_samples_per_epoch"] == 32 * 4  # K = 4 non-final points per trajectory
    assert plan["student"]["form"] == "cm" and plan["student"]["second_time_input"] is False
    assert not (tmp_path / "run").exists()

    assert main([*tiny_args(tiny, tmp_path / "run"), "loop.learning_rate=1"]) == 2
    assert "unknown config key `loop.learning_rate`" in capsys.readouterr().err
    for preset in (TINY_PRESET, DIGITS_PRESET):
        assert isinstance(load_config(MidConfig, preset), MidConfig)


def test_smoke_checkpoint_sigkill_resume_bitwise_and_export(tiny, tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    overrides = ("loop.total_steps=8", "loop.checkpoint_every_steps=3", "eval_every_steps=4")
    reference = run(load_config(MidConfig, TINY_PRESET, tiny_args(tiny, reference_dir, *overrides)[2:]))
    assert reference.loop.final_step == 8
    assert sorted(logged_losses(reference_dir)) == list(range(1, 9))

    command = [sys.executable, "trainer/mid.py", *tiny_args(tiny, killed_dir, *overrides)]
    hold_file = tmp_path / "hold"
    child = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, POINT_ENV: f"{MID_STEP}:5",
                                                          HOLD_FILE_ENV: str(hold_file)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: hold_file.exists() or child.poll() is not None, "the run reaches step 5 or exits")
    assert hold_file.exists(), f"child ended before reaching step 5 (exit code {child.poll()})"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert [step for step, _ in complete_checkpoints(killed_dir)] == [3]
    assert not (killed_dir / "export").exists()

    rerun = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_LIMIT_S, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["start_step"] == 3 and summary["final_step"] == 8
    assert logged_losses(killed_dir) == logged_losses(reference_dir)  # bitwise: floats compared exactly

    for output_dir in (reference_dir, killed_dir):
        student = FlowMapStudent.from_pretrained(output_dir / "export", second_time_input=False)
        assert student.teacher_fingerprint == load_teacher(tiny["teacher"]).fingerprint
        assert (output_dir / "samples" / "step_8_1step.png").is_file()
        assert (output_dir / "samples" / "step_4_2step.png").is_file()
    exported = [FlowMapStudent.from_pretrained(d / "export").net.state_dict() for d in (reference_dir, killed_dir)]
    for name, tensor in exported[0].items():
        assert torch.equal(tensor, exported[1][name]), name
    initial = load_teacher(tiny["teacher"]).model.state_dict()
    assert not torch.equal(exported[0]["conv_in.weight"], initial["conv_in.weight"])  # training moved the weights


def test_evaluations_do_not_change_what_is_trained(tiny, tmp_path):
    """Evaluating (samples, FD) on its own RNG leaves the training streams alone, so the evaluation cadence is not
    part of a study run's identity (jobs/study_runs.py names mid runs without it)."""
    runs = {}
    for every in (0, 2):
        output_dir = tmp_path / f"every_{every}"
        runs[every] = output_dir
        run(load_config(MidConfig, TINY_PRESET, tiny_args(
            tiny, output_dir, "loop.total_steps=6", f"loop.eval_every_steps={every}", "compute_fd=true",
            "fd_dataset=digits")[2:]))
    evaluations = {every: RunDir(runs[every]).read_evaluations() for every in (0, 2)}
    assert [record["step"] for record in evaluations[2]] == [2, 4, 6]
    assert [record["step"] for record in evaluations[0]] == [6]  # the last step is always evaluated
    assert evaluations[2][-1]["fd_1step"] == evaluations[0][-1]["fd_1step"]
    assert logged_losses(runs[2]) == logged_losses(runs[0])  # floats compared exactly
    exported = [FlowMapStudent.from_pretrained(runs[every] / "export").net.state_dict() for every in (0, 2)]
    for name, tensor in exported[0].items():
        assert torch.equal(tensor, exported[1][name]), name


def test_two_real_processes_read_disjoint_shards_and_keep_identical_parameters(tiny, tmp_path):
    output_dir = tmp_path / "ddp"
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "trainer/mid.py",
        *tiny_args(tiny, output_dir, "form=mf", "loop.total_steps=6", "stream.pairs_per_trajectory=4"),
    ]
    launched = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=HANG_LIMIT_S,
                              check=False)
    assert launched.returncode == 0, launched.stderr[-3000:]
    reports = [json.loads((output_dir / "ranks" / f"rank_{rank}.json").read_text()) for rank in range(2)]
    assert [report["rank"] for report in reports] == [0, 1]
    assert all(report["world_size"] == 2 and report["final_step"] == 6 for report in reports)
    assert reports[0]["parameter_sha256"] == reports[1]["parameter_sha256"]
    # the final evaluation (8 samples, 1 and 2 steps) is shared: each rank drew its 4 samples per step count
    assert [report["eval_samples_drawn"] for report in reports] == [8, 8]
    assert (output_dir / "samples" / "step_6_2step.png").is_file()
    epochs = reports[0]["chunks_read"].keys()
    assert epochs and epochs == reports[1]["chunks_read"].keys()
    for epoch in epochs:
        rank0 = {tuple(entry) for entry in reports[0]["chunks_read"][epoch]}
        rank1 = {tuple(entry) for entry in reports[1]["chunks_read"][epoch]}
        assert rank0 and rank1 and not rank0 & rank1, (epoch, rank0, rank1)
    student = FlowMapStudent.from_pretrained(output_dir / "export", second_time_input=True)
    assert student.second_time.embedding.linear_2.weight.abs().sum() > 0  # the (t − r) input was trained


# -------------------------------------------------------------------------------------------------------------
# Bad inputs


def tiny_cfg(tiny: dict[str, Path], *overrides: str, stores: list[Path] | None = None) -> MidConfig:
    """The tiny preset's config with overrides (stores default to the fixture's)."""
    urls = ",".join(str(url) for url in (stores or [tiny["store"]]))
    return load_config(MidConfig, TINY_PRESET, [f"teacher={tiny['teacher']}", f"stores=[{urls}]", *overrides])


def test_incomplete_store_is_refused_unless_allowed(tiny, tmp_path):
    teacher = load_teacher(tiny["teacher"])
    partial_store = write_store(teacher, tmp_path / "partial.zarr", num_trajectories=32, steps=4, shard_size=8,
                                shards=[0, 2])
    with pytest.raises(MidDataError, match=r"incomplete \(2/4 shards.*stream.allow_incomplete=true"):
        check_stores(tiny_cfg(tiny, stores=[partial_store]), sample_shape=teacher.sample_shape,
                     teacher_fingerprint=teacher.fingerprint, world_size=1)
    infos = check_stores(tiny_cfg(tiny, "stream.allow_incomplete=true", stores=[partial_store]),
                         sample_shape=teacher.sample_shape, teacher_fingerprint=teacher.fingerprint, world_size=1)
    assert infos[0].committed_shards == (0, 2)
    out = tmp_path / "run"
    assert main(tiny_args(tiny, out, f"stores=[{partial_store}]")) == 2
    assert not out.joinpath("checkpoints").exists()


def test_store_of_another_shape_or_teacher(tiny, tmp_path):
    teacher = load_teacher(tiny["teacher"])
    other = make_oracle_teacher(DDPMScheduler(beta_schedule="squaredcos_cap_v2"), (1, 4, 4))
    small = write_store(other, tmp_path / "small.zarr", num_trajectories=8, steps=2, shard_size=4)
    with pytest.raises(MidDataError, match=r"shape \[1, 4, 4\].*teacher's samples are \[1, 8, 8\]"):
        check_stores(tiny_cfg(tiny, stores=[small]), sample_shape=teacher.sample_shape,
                     teacher_fingerprint=teacher.fingerprint, world_size=1)

    with pytest.warns(UserWarning, match="stream.strict=true"):
        check_stores(tiny_cfg(tiny), sample_shape=teacher.sample_shape, teacher_fingerprint="0" * 64, world_size=1)
    with pytest.raises(MidDataError, match="not this teacher's ODE"):
        check_stores(tiny_cfg(tiny, "stream.strict=true"), sample_shape=teacher.sample_shape,
                     teacher_fingerprint="0" * 64, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_stores(tiny_cfg(tiny, "stream.strict=true"), sample_shape=teacher.sample_shape,
                     teacher_fingerprint=teacher.fingerprint, world_size=1)


def test_too_few_shards_for_the_ranks_and_other_config_errors(tiny, tmp_path):
    teacher = load_teacher(tiny["teacher"])
    # the fixture's store: 4 shards of 8 trajectories in chunks of 4 → 8 chunks; a shard may be split between readers
    check_stores(tiny_cfg(tiny), sample_shape=teacher.sample_shape, teacher_fingerprint=None, world_size=8)
    with pytest.raises(MidDataError, match="8 committed chunk.*for 9 readers.*smaller --chunk-size"):
        check_stores(tiny_cfg(tiny), sample_shape=teacher.sample_shape, teacher_fingerprint=None, world_size=9)
    with pytest.raises(MidDataError, match="for 10 readers"):
        check_stores(tiny_cfg(tiny, "stream.num_workers=5"), sample_shape=teacher.sample_shape,
                     teacher_fingerprint=None, world_size=2)
    with pytest.raises(MidDataError, match="cannot open trajectory store"):
        check_stores(tiny_cfg(tiny, stores=[tmp_path / "nothing.zarr"]), sample_shape=teacher.sample_shape,
                     teacher_fingerprint=None, world_size=1)
    with pytest.raises(ConfigError, match="lpips_weights"):
        tiny_cfg(tiny, "distance=lpips")
    with pytest.raises(ConfigError, match="label_dropout needs a class-conditional teacher"):
        run(tiny_cfg(tiny, "label_dropout=0.1", f"loop.output_dir={tmp_path / 'dropout'}"))
    with pytest.raises(ConfigError, match=r"label_dropout must lie in \[0, 1\)"):
        tiny_cfg(tiny, "label_dropout=1.5")
    with pytest.raises(ConfigError, match="LPIPS weights file not found"):
        build_distance(tiny_cfg(tiny, "distance=lpips", f"lpips_weights={tmp_path / 'missing.safetensors'}"), "cpu")
    with pytest.raises(ConfigError, match="unknown config key `strict_mode`"):
        tiny_cfg(tiny, "strict_mode=true")
    with pytest.raises(ConfigError, match="form"):
        tiny_cfg(tiny, "form=sm")
    with pytest.raises(ConfigError, match="pairs_per_trajectory is for form=mf"):
        tiny_cfg(tiny, "stream.pairs_per_trajectory=3")
    with pytest.raises(ConfigError, match="points_per_trajectory is for form=cm"):
        tiny_cfg(tiny, "form=mf", "stream.points_per_trajectory=3")


# -------------------------------------------------------------------------------------------------------------
# Gaussian oracle


MU, S = 0.3, 0.5


class ExactFlowMap(torch.nn.Module):
    """f(x̃, σ̃) = Ψ_{σ̃→0}(x̃), the closed-form PF-ODE flow map of N(μ, s²I) data, called like the student ("cm")."""

    def forward(self, form: str, x_edm: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        assert form == "cm"
        return flow_map(x_edm.double(), sigma.double(), 0.0, MU, S).float()


class PerLevelLinear(torch.nn.Module):
    """A tiny CM-form student f(x̃, σ̃_k) = c_k·x̃ + d_k with one (c_k, d_k [*S]) per store level σ̃_k.

    Ψ_{σ̃→0} of Gaussian data is exactly of this form; it starts at the posterior mean (a perfect diffusion model).
    The slope is learned as c_k = w_k·c_in(σ̃_k), c_in = 1/√(1 + σ̃²) (EDM-style input scaling keeps w_k = O(1)).
    """

    def __init__(self, levels: torch.Tensor, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("levels", levels.float())
        self.register_buffer("c_in", (1.0 / torch.sqrt(1.0 + levels.double() ** 2)).float())  # [K]
        c0 = S * S / (S * S + levels.double() ** 2)  # [K] posterior-mean slope
        self.w = torch.nn.Parameter((c0 / self.c_in.double()).float())
        self.d = torch.nn.Parameter(((1 - c0) * MU).float().reshape(-1, *([1] * len(shape))).repeat(1, *shape))

    @property
    def c(self) -> torch.Tensor:
        """Per-level slopes c_k [K]."""
        return self.w * self.c_in

    def level(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index k of each σ̃ among the store levels."""
        return (sigma.reshape(-1, 1) - self.levels.reshape(1, -1)).abs().argmin(dim=1)  # [B]

    def forward(self, form: str, x_edm: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        k = self.level(sigma)  # [B]
        return self.c[k].reshape(-1, *([1] * (x_edm.dim() - 1))) * x_edm + self.d[k]  # [B, *S]


def make_oracle_store(root: Path, steps: int, solver: str) -> dict:
    """A perfect Gaussian teacher, a store of 64 of its trajectories and the solver output itself."""
    teacher = make_oracle_teacher(DDPMScheduler(beta_schedule="squaredcos_cap_v2"), (1, 4, 4), mu=MU, s=S)
    url = write_store(teacher, root / f"oracle_{solver}_{steps}.zarr", num_trajectories=64, steps=steps,
                      shard_size=16, solver=solver)
    trajectory = solve(teacher, list(range(64)), steps=steps, solver=solver, grid="logsnr")
    return {"url": url, "trajectory": trajectory, "teacher": teacher, "root": root}


@pytest.fixture(scope="module")
def oracle_store(tmp_path_factory) -> dict:
    """A coarse store: 4 DPM-Solver++(2M) steps, so the endpoints carry a clearly visible discretisation error."""
    return make_oracle_store(tmp_path_factory.mktemp("oracle"), 4, "dpmpp-2m")


@pytest.fixture(scope="module")
def fine_oracle_store(tmp_path_factory) -> dict:
    """The CMT recipe's store: 16 DPM-Solver++(3M) steps on the log-SNR grid."""
    return make_oracle_store(tmp_path_factory.mktemp("oracle_fine"), 16, "dpmpp-3m")


def oracle_cfg(oracle_store: dict, *overrides: str) -> MidConfig:
    """A MidConfig over the oracle store (teacher path unused by the pure data path)."""
    return load_config(MidConfig, TINY_PRESET, [
        f"stores=[{oracle_store['url']}]", f"loop.output_dir={oracle_store['root'] / 'run'}", "batch_per_process=32",
        *overrides])


def independent_discretisation_errors(trajectory) -> np.ndarray:
    """‖Ψ_{σ̃_i→0}(x̂_i) − x̂_K‖² per (trajectory, point i < K), in float64 straight from the solver output."""
    points = trajectory.points.double().numpy()  # [N, K+1, *S] native
    alpha, sigma = trajectory.alpha, trajectory.sigma  # [K+1]
    endpoint = points[:, -1] / alpha[-1]  # [N, *S]
    errors = []
    for i in range(points.shape[1] - 1):
        x_edm = points[:, i] / alpha[i]
        psi = MU + np.sqrt(S * S / (S * S + (sigma[i] / alpha[i]) ** 2)) * (x_edm - MU)
        errors.append(((psi - endpoint) ** 2).reshape(len(points), -1).sum(axis=1))
    return np.stack(errors, axis=1)  # [N, K]


def test_cm_loss_at_the_exact_flow_map_equals_the_solver_discretisation_error(oracle_store):
    expected = independent_discretisation_errors(oracle_store["trajectory"])  # [N, K]
    assert expected.max() > 1e-6  # 4 solver steps leave a visible error
    cfg = oracle_cfg(oracle_store)
    infos = check_stores(cfg, sample_shape=(1, 4, 4), teacher_fingerprint=oracle_store["teacher"].fingerprint,
                         world_size=1)
    exact = ExactFlowMap()

    memory = preload_pairs(cfg, infos)  # trajectory-major, point-minor
    loss = cm_loss(exact, memory, step=0, distance=squared_l2)  # [N·K]
    np.testing.assert_allclose(loss.double().numpy(), expected.reshape(-1), rtol=2e-3, atol=1e-7)

    from trainer.data import StreamConfig, TrajectoryStream

    stream = TrajectoryStream(StreamConfig(urls=(str(oracle_store["url"]),), mode="cm", batch_per_process=32,
                                           shuffle_buffer=64, num_workers=0), rank=0, world_size=1)
    batches = iter(stream)
    streamed = torch.cat([cm_loss(exact, next(batches), step=0, distance=squared_l2)
                          for _ in range(stream.batches_per_epoch())])  # one epoch = every (trajectory, point)
    assert streamed.numel() == expected.size
    np.testing.assert_allclose(np.sort(streamed.double().numpy()), np.sort(expected.reshape(-1)), rtol=2e-3, atol=1e-7)


def test_cm_trained_student_approaches_the_exact_flow_map(fine_oracle_store):
    oracle_store = fine_oracle_store
    from trainer.data import StreamConfig, TrajectoryStream

    trajectory = oracle_store["trajectory"]
    levels = torch.from_numpy(trajectory.sigma[:-1] / trajectory.alpha[:-1])  # [K] σ̃ of the non-final points
    student = PerLevelLinear(levels, (1, 4, 4))
    stream = TrajectoryStream(StreamConfig(urls=(str(oracle_store["url"]),), mode="cm", batch_per_process=32,
                                           shuffle_buffer=128, num_workers=0, seed=1), rank=0, world_size=1)
    exact_slope = np.sqrt(S * S / (S * S + levels.numpy() ** 2))  # Ψ_{σ̃→0} slope per level

    def flow_map_error() -> float:
        """E‖f(x̂_i, σ̃_i) − Ψ_{σ̃_i→0}(x̂_i)‖² over every stored (trajectory, point)."""
        memory = preload_pairs(oracle_cfg(oracle_store), check_stores(
            oracle_cfg(oracle_store), sample_shape=(1, 4, 4), teacher_fingerprint=None, world_size=1))
        with torch.no_grad():
            return float(squared_l2(student("cm", memory["x_t"], memory["sigma"]),
                                    ExactFlowMap()("cm", memory["x_t"], memory["sigma"])).mean())

    error_at_init = flow_map_error()  # the diffusion model's posterior mean E[x0|x] ≠ Ψ_{t→0}(x)
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-2)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 400)
    batches = iter(stream)
    for step in range(400):
        loss = cm_loss(student, next(batches), step, distance=squared_l2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
    error_after = flow_map_error()
    solver_error = float(independent_discretisation_errors(trajectory).mean())
    slope_gap = np.abs(student.c.detach().double().numpy() - exact_slope).max()
    print(f"flow-map error E‖f − Ψ‖²: init (posterior mean) {error_at_init:.3e} → trained {error_after:.3e}; "
          f"solver discretisation error E‖Ψ − x̂_K‖² {solver_error:.3e}; max slope gap {slope_gap:.3e}")
    assert error_after < 0.05 * error_at_init
    assert error_after < 2 * solver_error + 1e-4  # it converges to the solver's endpoints, within their error
    assert torch.isfinite(student.c).all()
    with torch.no_grad():  # sanity of the oracle itself: posterior mean ≠ flow map away from σ̃ = 0
        x = torch.randn(4, 1, 4, 4) * 3
        assert not torch.allclose(posterior_mean(x, 2.0, MU, S), flow_map(x, 2.0, 0.0, MU, S))


# -------------------------------------------------------------------------------------------------------------
# Parameterisation and the preconditioning transfer


def _distance_to_teacher(student: FlowMapStudent, teacher, store: Path) -> float:
    """Mean ‖(f(x̃, σ̃) − D(x̃, σ̃))/c_out(σ̃)‖² over every non-final point of the store (EDM view): the distance of
    the student's network output to the one that would reproduce the teacher's denoiser."""
    cfg = MidConfig(loop=load_config(MidConfig, TINY_PRESET).loop, teacher="unused", stores=(str(store),))
    pairs = preload_pairs(cfg, check_stores(cfg, sample_shape=teacher.sample_shape, teacher_fingerprint=None,
                                            world_size=1))
    with torch.no_grad():
        f = student.eval().denoise(pairs["x_t"], pairs["sigma"].double())
        target = teacher.denoise(pairs["x_t"], pairs["sigma"].double())
        c_out = student.coefficients(pairs["sigma"].double())[3].float().reshape(-1, 1, 1, 1)
    return float(((f - target) / c_out).pow(2).flatten(1).sum(1).mean())


def test_transfer_steps_compute_the_hand_written_transfer_loss_then_the_cmt_loss(tiny, tmp_path):
    from trainer.methods.cmt import TransferThenCMT

    teacher = load_teacher(tiny["teacher"])
    student = FlowMapStudent.from_teacher(teacher, parameterization="edm")
    cfg = load_config(MidConfig, TINY_PRESET, tiny_args(tiny, tmp_path / "run")[2:])
    batch = {key: value[:6] for key, value in preload_pairs(cfg, check_stores(
        cfg, sample_shape=teacher.sample_shape, teacher_fingerprint=None, world_size=1)).items()}
    cmt = partial_cm_loss = lambda model, b, step: cm_loss(model, b, step, distance=squared_l2)  # noqa: E731
    staged = TransferThenCMT(partial_cm_loss, 2, teacher, student)
    with torch.no_grad():
        sigma = batch["sigma"].double()
        f = student.denoise(batch["x_t"], sigma)
        c_out = -sigma * 0.5 / torch.sqrt(sigma**2 + 0.25)  # EDM's c_out with σ_d = 0.5, the ε-teacher's sign
        by_hand = (((f - teacher.denoise(batch["x_t"], sigma)) / c_out.float().reshape(-1, 1, 1, 1)) ** 2).flatten(1).sum(1)
        assert torch.allclose(staged(student, batch, 1), by_hand, rtol=1e-5)
        assert torch.equal(staged(student, batch, 2), cmt(student, batch, 2))


def test_transfer_brings_a_re_read_student_to_the_teachers_denoiser_and_the_export_records_it(tmp_path):
    """A v-prediction teacher read through EDM's c_skip/c_out with σ_d = 0.5 needs its output doubled at high noise;
    the transfer's regression onto the teacher's denoiser learns that (a random ε-teacher would be a bad probe: its
    denoiser at σ̃ = 80 is 80·ε̂, which no bounded reading should reproduce)."""
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(tmp_path / "teacher", safe_serialization=True)
    teacher = load_teacher(tmp_path / "teacher")
    write_store(teacher, tmp_path / "store.zarr", num_trajectories=32, steps=4, shard_size=8)
    v_tiny = {"teacher": tmp_path / "teacher", "store": tmp_path / "store.zarr"}
    start = _distance_to_teacher(FlowMapStudent.from_teacher(teacher, parameterization="edm"), teacher,
                                 v_tiny["store"])
    result = run(load_config(MidConfig, TINY_PRESET, tiny_args(
        v_tiny, tmp_path / "run", "student.parameterization=edm", "student.transfer_steps=40", "loop.total_steps=41",
        "loop.lr=1e-2", "loop.ema_decay=0.5", "loop.checkpoint_every_steps=0")[2:]))
    exported = FlowMapStudent.from_pretrained(result.loop.export_dir)
    assert exported.parameterization.name == "edm" and exported.parameterization.c_out_sign == -1.0
    after = _distance_to_teacher(exported, teacher, v_tiny["store"])
    assert after < 0.6 * start, (start, after)  # 40 steps halve it (7.8 → 3.6); a wrong target or sign would not


def test_an_eps_teachers_default_student_transfers_first_with_clipped_gradients_and_reports_it(tiny, tmp_path):
    """The tiny ε-teacher's default student re-reads its network (EDM's c_skip/c_out), so `student.transfer=auto`
    runs the transfer, and the run clips its gradients though the preset's loop.grad_clip is none."""
    run_dir = tmp_path / "run"
    assert main(tiny_args(tiny, run_dir, "student.transfer_steps=2", "loop.grad_clip=none")) == 0
    report = json.loads((run_dir / "ranks" / "rank_0.json").read_text())["transfer"]
    assert report == {"transfer_steps": 2, "grad_clip": 1.0,
                      "transfer_reason": "the student re-reads the teacher's network"}
    assert main(tiny_args(tiny, tmp_path / "own", "student.parameterization=teacher", "student.transfer_steps=2",
                          "loop.grad_clip=none")) == 0
    own = json.loads((tmp_path / "own" / "ranks" / "rank_0.json").read_text())["transfer"]
    assert (own["transfer_steps"], own["grad_clip"]) == (0, None)


def test_transfer_steps_that_leave_no_cmt_step_are_refused(tiny, tmp_path, capsys):
    assert main(tiny_args(tiny, tmp_path / "run", "student.transfer=on", "student.transfer_steps=6")) == 2
    assert "student.transfer_steps=6 leaves no CMT step of loop.total_steps=6" in capsys.readouterr().err
    assert main(tiny_args(tiny, tmp_path / "run", "student.parameterization=eps")) == 2
    assert "must be one of 'auto', 'teacher', 'edm', got 'eps'" in capsys.readouterr().err
