"""data=online (trainer/data/online.py): batches of freshly solved trajectories as the CMT authors build them, equal to what
generation writes for the same seeds, deterministic, resumable, one set of trajectories per rank; mid-training on them
in one and two real processes; the refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from pipeline.solvers import prior_noise, time_grid
from pipeline.teacher import load_teacher
from tests.helpers import HANG_LIMIT_S, assert_close, free_port, tiny_unet, write_solved_store
from trainer.config import ConfigError, load_config
from trainer.data import StreamConfig, TrajectoryStream
from trainer.data.online import SEED_STRIDE, OnlineOptions, OnlineSourceError, OnlineTrajectories, open_online_source
from trainer.loop import complete_checkpoints
from trainer.mid import MidConfig, main, run
from trainer.run_dir import RunDir

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_PRESET = REPO_ROOT / "jobs" / "tiny" / "mid.yaml"
K = 4  # solver steps of every source here: 5 points, 4 CM samples and 10 MF pairs per trajectory


def save_tiny_teacher(directory: Path, *, seed: int = 0) -> Path:
    """A tiny random 1×8×8 DDPM teacher directory (cosine schedule, ε-prediction)."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=tiny_unet(seed=seed), scheduler=scheduler).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The teacher directory, the loaded teacher and a float32 store of its first 16 trajectories (seeds 0..15)."""
    root = tmp_path_factory.mktemp("online")
    teacher_dir = save_tiny_teacher(root / "teacher")
    teacher = load_teacher(teacher_dir)
    store = write_solved_store(teacher, root / "store.zarr", num_trajectories=16, steps=K, shard_size=8)
    return {"root": root, "teacher_dir": teacher_dir, "teacher": teacher, "store": store}


def source(teacher, *, mode="cm", batch=8, seed=0, rank=0, world_size=1, **options) -> OnlineTrajectories:
    """An online source over `teacher` with K = 4 DPM-Solver++(3M) steps on the log-SNR grid."""
    return OnlineTrajectories(teacher, OnlineOptions(steps=K, **options), mode=mode, batch_per_process=batch, seed=seed,
                              rank=rank, world_size=world_size)


def take(batches, count: int) -> list[dict[str, torch.Tensor]]:
    """The next `count` batches of an iterator."""
    return [next(batches) for _ in range(count)]


def assert_batches_equal(first: list[dict], second: list[dict]) -> None:
    """Bitwise equal batch sequences (same keys, same values)."""
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


# -------------------------------------------------------------------------------------------------------------
# Batch structure, determinism, equality with generation


def test_cm_batches_hold_all_k_points_of_batch_over_k_fresh_trajectories(tiny):
    teacher = tiny["teacher"]
    online = source(teacher, batch=8)
    assert (online.trajectories_per_batch, online.samples_per_trajectory) == (2, K)
    alpha, sigma = time_grid(teacher, K, "dpmpp-3m", "logsnr")
    levels = torch.from_numpy(sigma[:K] / alpha[:K]).float()  # σ̃ of the K non-final points, noisiest first
    batches = iter(online)
    first, second = take(batches, 2)
    for batch in (first, second):
        assert set(batch) == {"x_t", "sigma", "x0"}
        assert batch["x_t"].shape == batch["x0"].shape == (8, 1, 8, 8) and batch["sigma"].shape == (8,)
        assert torch.equal(batch["sigma"], levels.repeat(2))  # row t·K + i is point i of trajectory t
        for t in range(2):
            rows = batch["x0"][t * K : (t + 1) * K]
            assert all(torch.equal(row, rows[0]) for row in rows)  # one endpoint per trajectory
    assert not torch.equal(first["x0"][0], first["x0"][K])  # two different trajectories
    # fresh noise every step: batch b solves trajectories 2b, 2b+1, whose prior noise is prior_noise([seed]) itself
    assert online.trajectory_indices(0).tolist() == [0, 1] and online.trajectory_indices(1).tolist() == [2, 3]
    init_sigma = float(np.sqrt(1.0 + levels[0].double() ** 2))  # DPM-Solver++'s prior state is ε, x̃ = ε·√(1+σ̃²)
    for batch, seeds in ((first, [0, 1]), (second, [2, 3])):
        assert_close(batch["x_t"][::K], prior_noise(seeds, (1, 8, 8)) * init_sigma, what="x̃ at point 0")
    assert online.teacher_forward_samples == 2 * 2 * K  # K network evaluations per trajectory, 2 per batch
    report = online.report()
    assert report["first_batch_seeds"] == [0, 2] and report["last_batch_seeds"] == [2, 4]


def test_pairs_equal_what_generation_writes_for_the_same_seeds(tiny):
    stream = TrajectoryStream(StreamConfig(urls=(str(tiny["store"]),), mode="cm", batch_per_process=8,
                                           shuffle_buffer=8, num_workers=0, include_indices=True), rank=0, world_size=1)
    stored = {}
    batches = iter(stream)
    for _ in range(stream.batches_per_epoch()):  # one epoch: every (trajectory, point) of the 16 trajectories
        batch = next(batches)
        for row, (index, point) in enumerate(zip(batch["index"].tolist(), batch["point"].tolist())):
            stored[index, point] = {key: batch[key][row] for key in ("x_t", "sigma", "x0")}
    assert len(stored) == 16 * K
    online = iter(source(tiny["teacher"], batch=8, seed=0))  # seed_base 0: the store's seeds 0..15
    for b in range(8):
        batch = next(online)
        for row in range(8):
            index, point = 2 * b + row // K, row % K
            expected = stored[index, point]
            assert torch.equal(batch["sigma"][row], expected["sigma"])
            for key in ("x_t", "x0"):
                assert_close(batch[key][row], expected[key], what=f"trajectory {index} point {point} {key}")


def test_mf_batches_take_every_pair_or_a_drawn_subset_per_trajectory(tiny):
    teacher = tiny["teacher"]
    every = next(iter(source(teacher, mode="mf", batch=20)))  # 10 pairs per trajectory, 2 trajectories
    assert set(every) == {"z_t", "t", "z_r", "r"} and every["z_t"].shape == (20, 1, 8, 8)
    assert bool((every["t"] > every["r"]).all())
    assert len({(float(t), float(r)) for t, r in zip(every["t"][:10], every["r"][:10])}) == 10
    subset = source(teacher, mode="mf", batch=8, pairs_per_trajectory=4)
    assert subset.trajectories_per_batch == 2
    drawn = take(iter(subset), 2)
    again = take(iter(source(teacher, mode="mf", batch=8, pairs_per_trajectory=4)), 2)
    assert_batches_equal(drawn, again)
    pairs = [{(float(t), float(r)) for t, r in zip(batch["t"][:4], batch["r"][:4])} for batch in drawn]
    assert all(len(chosen) == 4 for chosen in pairs)


def test_deterministic_under_a_seed_fresh_per_seed_and_per_rank(tiny):
    teacher = tiny["teacher"]
    reference = take(iter(source(teacher, seed=3)), 2)
    assert_batches_equal(reference, take(iter(source(teacher, seed=3)), 2))
    other_seed = source(teacher, seed=4)
    assert other_seed.seed_base == 4 * SEED_STRIDE
    assert not torch.equal(next(iter(other_seed))["x0"], reference[0]["x0"])
    ranks = [source(teacher, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    solved = [set(np.concatenate([rank.trajectory_indices(b) for b in range(3)]).tolist()) for rank in ranks]
    assert not solved[0] & solved[1] and solved[0] | solved[1] == set(range(12))  # disjoint, nothing skipped
    first = [next(iter(rank)) for rank in ranks]
    assert not torch.equal(first[0]["x0"], first[1]["x0"])


def test_resume_continues_with_the_batches_the_uninterrupted_source_makes(tiny):
    teacher = tiny["teacher"]
    uninterrupted = take(iter(source(teacher, seed=1)), 5)
    interrupted = source(teacher, seed=1)
    assert_batches_equal(take(iter(interrupted), 2), uninterrupted[:2])
    state = interrupted.state_dict()
    resumed = source(teacher, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # checkpoints hold it as plain data
    assert resumed.teacher_forward_samples == interrupted.teacher_forward_samples
    assert_batches_equal(take(iter(resumed), 3), uninterrupted[2:])
    assert resumed.report()["first_batch_seeds"] == [SEED_STRIDE + 4, SEED_STRIDE + 6]
    with pytest.raises(OnlineSourceError, match=r"batch_per_process: checkpoint 8, now 12.*new loop.output_dir"):
        source(teacher, seed=1, batch=12).load_state_dict(state)
    with pytest.raises(OnlineSourceError, match="not data=online"):
        source(teacher, seed=1).load_state_dict({"format": "cmt-trajectory-stream/1", "epoch": 0})


# -------------------------------------------------------------------------------------------------------------
# Mid-training on online data


def online_args(tiny: dict, output_dir: Path, *extra: str) -> list[str]:
    """trainer/mid.py arguments: the tiny preset on data=online (K = 4, batch 8 = 2 trajectories × 4 points)."""
    return ["--config", str(TINY_PRESET), f"teacher={tiny['teacher_dir']}", "data=online", f"online.steps={K}",
            f"loop.output_dir={output_dir}", *extra]


def logged_losses(output_dir: Path) -> dict[int, float]:
    """{step: loss} of every logged step."""
    return {record["step"]: record["loss"] for record in RunDir(output_dir).read_metrics() if "loss" in record}


def test_mid_training_online_resumes_bitwise_from_a_checkpoint(tiny, tmp_path):
    output_dir = tmp_path / "run"
    cfg = load_config(MidConfig, TINY_PRESET, online_args(tiny, output_dir)[2:])
    first = run(cfg)
    assert first.loop.final_step == 6 and [step for step, _ in complete_checkpoints(output_dir)] == [3, 6]
    losses = logged_losses(output_dir)
    report = json.loads((output_dir / "ranks" / "rank_0.json").read_text())["online"]
    assert report["batches_made"] == 6 and report["first_batch_seeds"] == [0, 2]
    assert report["teacher_forward_samples"] == 6 * 2 * K
    shutil.rmtree(output_dir / "checkpoints" / "step_6")  # as if the run died after its step-3 checkpoint
    shutil.rmtree(output_dir / "export")
    resumed = run(cfg)
    assert resumed.loop.start_step == 3 and resumed.loop.final_step == 6
    assert logged_losses(output_dir) == losses  # bitwise: steps 4-6 trained on the same fresh trajectories
    report = json.loads((output_dir / "ranks" / "rank_0.json").read_text())["online"]
    assert report["first_batch_seeds"] == [6, 8] and report["batches_made"] == 6


@pytest.mark.parametrize("form", ["cm", "mf"])
def test_an_eps_teachers_online_run_transfers_on_fresh_trajectories_first(tiny, tmp_path, form):
    """The default transfer (student.transfer=auto: the tiny ε-teacher's student re-reads its network) runs on the
    online source's batches too, in both forms, and the run reports it."""
    output_dir = tmp_path / "run"
    extra = ("online.pairs_per_trajectory=4",) if form == "mf" else ()
    assert main(online_args(tiny, output_dir, f"form={form}", "student.transfer_steps=2", *extra)) == 0
    report = json.loads((output_dir / "ranks" / "rank_0.json").read_text())
    assert report["transfer"]["transfer_steps"] == 2 and report["transfer"]["grad_clip"] == 1.0
    assert report["final_step"] == 6 and report["online"]["batches_made"] == 6


def test_two_real_processes_solve_their_own_trajectories_and_keep_identical_parameters(tiny, tmp_path):
    output_dir = tmp_path / "ddp"
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "trainer/mid.py", *online_args(tiny, output_dir),
    ]
    launched = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                              timeout=HANG_LIMIT_S, check=False)
    assert launched.returncode == 0, launched.stderr[-3000:]
    reports = [json.loads((output_dir / "ranks" / f"rank_{rank}.json").read_text()) for rank in range(2)]
    assert [report["rank"] for report in reports] == [0, 1]
    assert all(report["world_size"] == 2 and report["final_step"] == 6 for report in reports)
    assert reports[0]["parameter_sha256"] == reports[1]["parameter_sha256"]
    online = [report["online"] for report in reports]
    assert [entry["first_batch_seeds"] for entry in online] == [[0, 2], [2, 4]]  # batch b: ranks take 4b.., 4b+2..
    assert [entry["last_batch_seeds"] for entry in online] == [[20, 22], [22, 24]]
    assert all(entry["batches_made"] == 6 for entry in online)


# -------------------------------------------------------------------------------------------------------------
# Refusals


def test_another_teacher_is_refused_unless_asked(tiny, tmp_path):
    other_dir = save_tiny_teacher(tmp_path / "other", seed=1)
    options = OnlineOptions(steps=K, teacher=str(other_dir))
    arguments = dict(student_teacher_source=str(tiny["teacher_dir"]), mode="cm", batch_per_process=8, seed=0, rank=0,
                     world_size=1)
    with pytest.raises(OnlineSourceError, match=r"is not the teacher the student is built from.*"
                                                r"online.allow_other_teacher=true"):
        open_online_source(options, tiny["teacher"], **arguments)
    allowed = open_online_source(OnlineOptions(steps=K, teacher=str(other_dir), allow_other_teacher=True),
                                 tiny["teacher"], **arguments)
    assert allowed.teacher.fingerprint == load_teacher(other_dir).fingerprint != tiny["teacher"].fingerprint
    same = open_online_source(OnlineOptions(steps=K, teacher=str(tiny["teacher_dir"])), tiny["teacher"], **arguments)
    assert same.teacher.fingerprint == tiny["teacher"].fingerprint
    out = tmp_path / "refused"
    assert main(online_args(tiny, out, f"online.teacher={other_dir}")) == 2
    assert not (out / "checkpoints").exists()


def test_a_solver_grid_the_teacher_cannot_run_is_refused_as_generation_refuses_it(tiny, tmp_path, capsys):
    from pipeline.generate import main as generate_main

    flags = ["--solver", "ddim", "--grid", "logsnr", "--steps", str(K)]
    assert generate_main(["--teacher", str(tiny["teacher_dir"]), "--num-trajectories", "8", *flags,
                          "--out", str(tmp_path / "never.zarr"), "--no-progress"]) != 0
    generation_error = capsys.readouterr().err.strip()
    assert "--solver ddim cannot run --grid logsnr" in generation_error
    assert not (tmp_path / "never.zarr").exists()
    out = tmp_path / "run"
    assert main(online_args(tiny, out, "online.solver=ddim", "online.grid=logsnr")) == 2
    online_error = capsys.readouterr().err.strip()
    assert "online.solver=ddim cannot run online.grid=logsnr" in online_error
    for fix in ("grid scheduler", "solver euler", "solver dpmpp-3m"):  # the same fixes, each in its interface's words
        flag, key = "--" + fix, "online." + fix.replace(" ", "=")
        assert flag in generation_error and key in online_error
    assert not (out / "checkpoints").exists()


def test_other_bad_online_settings_name_the_fix(tiny, tmp_path, capsys):
    teacher = tiny["teacher"]
    with pytest.raises(OnlineSourceError, match=r"batch_per_process=10 must be a multiple of 4: use "
                                                r"batch_per_process=8 or batch_per_process=12"):
        source(teacher, batch=10)
    with pytest.raises(OnlineSourceError, match=r"multiple of 4: use batch_per_process=4$"):
        source(teacher, batch=2)
    with pytest.raises(OnlineSourceError, match=r"pairs_per_trajectory=11 but a trajectory of K=4 offers only 10"):
        source(teacher, mode="mf", batch=22, pairs_per_trajectory=11)
    with pytest.raises(OnlineSourceError, match=r"0 <= loop.seed < 64, got 64"):
        source(teacher, seed=64)
    with pytest.raises(OnlineSourceError, match="online.labels was given but the teacher is unconditional"):
        source(teacher, labels="uniform")
    with pytest.raises(ConfigError, match="stream.points_per_trajectory applies to data=stores"):
        load_config(MidConfig, TINY_PRESET, online_args(tiny, tmp_path, "stream.points_per_trajectory=2")[2:])
    with pytest.raises(ConfigError, match="online.pairs_per_trajectory is for form=mf"):
        load_config(MidConfig, TINY_PRESET, online_args(tiny, tmp_path, "online.pairs_per_trajectory=2")[2:])
    with pytest.raises(ConfigError, match="online.steps must be >= 1"):
        load_config(MidConfig, TINY_PRESET, online_args(tiny, tmp_path, "online.steps=0")[2:])
    with pytest.raises(ConfigError, match="stores is empty.*data=online"):
        load_config(MidConfig, TINY_PRESET, [f"teacher={tiny['teacher_dir']}", "stores=[]"])
    assert main([*online_args(tiny, tmp_path / "dry"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["online"]["trajectories_per_step"] == 2 and plan["online"]["teacher_forward_samples_per_step"] == 8
    assert not (tmp_path / "dry").exists()
