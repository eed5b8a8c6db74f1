"""Trajectory generation with real Ray: local clusters from the driver, worker and driver kills, bad input."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from pipeline.generate import SUMMARY_PREFIX, GenerateConfig, GenerateError, run
from pipeline.fault_points import POINT_ENV, RELEASE_FILE_ENV, SOLVED_STAGE, hold_line, shard_stage
from pipeline.solvers import solve
from pipeline.teacher import TeacherLoadError, load_teacher
from storage_schema import open_store
from tests.helpers import HANG_LIMIT_S

REPO = Path(__file__).resolve().parents[1]


def tiny_unet(seed: int = 0) -> UNet2DModel:
    """A 0.16M-parameter 8×8 UNet: fast enough for many solver steps on one CPU thread."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A saved DDPMPipeline teacher directory."""
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(path)
    return path


def base_config(teacher_dir: Path, out: Path, **overrides) -> GenerateConfig:
    """A small job: 3 shards of 16 trajectories, 6 DPM-Solver++ steps."""
    fields = dict(
        teacher=str(teacher_dir),
        num_trajectories=40,
        steps=6,
        shard_size=16,
        chunk_size=8,
        batch_size=16,
        out=None if out is None else str(out),
        progress=False,
    )
    fields.update(overrides)
    return GenerateConfig(**fields)


def store_files(path: Path) -> dict[str, str]:
    """sha256 of every file of a store, by relative path."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.rglob("*")) if f.is_file()
    }


@pytest.fixture(scope="module")
def reference_store(teacher_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The store of an uninterrupted one-worker run, and its summary."""
    out = tmp_path_factory.mktemp("reference") / "store.zarr"
    result = run(base_config(teacher_dir, out, num_workers=1))
    return out, result.summary


def test_store_matches_the_solver_and_deep_validates(reference_store, teacher_dir):
    out, summary = reference_store
    store = open_store(str(out))
    assert store.is_complete and store.validate(deep=True).ok
    assert summary["trajectories_written"] == 40 and summary["teacher_forward_samples"] == 40 * 6
    assert summary["worker_niceness"] == [os.nice(0)], "workers of a local run compete like the command that started them"
    teacher = load_teacher(str(teacher_dir))
    expected = solve(teacher, list(range(16, 32)), steps=6).points.numpy()  # shard 1, solved as the worker batches it
    stored = store.read_points(16, 32)
    assert np.array_equal(stored, expected.astype(np.float16))


def test_one_and_two_workers_give_byte_identical_stores_and_a_rerun_is_a_cache_hit(reference_store, teacher_dir, tmp_path):
    reference, _ = reference_store
    out = tmp_path / "two.zarr"
    two = run(base_config(teacher_dir, out, num_workers=2))
    assert sorted(two.shards_written) == [0, 1, 2]
    assert store_files(out) == store_files(reference)

    again = run(base_config(teacher_dir, out, num_workers=2))
    assert again.cache_hit and again.teacher_forward_samples == 0 and again.shards_written == ()
    assert store_files(out) == store_files(reference)


def test_cache_root_maps_the_same_spec_to_the_same_store(teacher_dir, tmp_path):
    plan_a = run(base_config(teacher_dir, None, cache_root=str(tmp_path), dry_run=True)).summary["plan"]
    plan_b = run(base_config(teacher_dir, None, cache_root=str(tmp_path), dry_run=True)).summary["plan"]
    plan_c = run(base_config(teacher_dir, None, cache_root=str(tmp_path), steps=7, dry_run=True)).summary["plan"]
    assert plan_a["url"] == plan_b["url"] and plan_a["url"].startswith(str(tmp_path))
    assert plan_c["url"] != plan_a["url"]
    assert plan_a["shards_to_write"] == 3 and plan_a["teacher_forward_samples"] == 40 * 6
    assert list(tmp_path.iterdir()) == [], "a dry run writes nothing"


def _spawn_generate(args: list[str], hold_shard: int, hold_file: Path, stage: str = SOLVED_STAGE) -> subprocess.Popen:
    """Start `python pipeline/generate.py ARGS` as a user would, in its own session, holding one shard at `stage`
    (pipeline.fault_points) until `hold_file` exists."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               **{POINT_ENV: f"{shard_stage(stage)}:{hold_shard}", RELEASE_FILE_ENV: str(hold_file)})
    return subprocess.Popen(
        [sys.executable, str(REPO / "pipeline" / "generate.py"), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _cli_args(teacher_dir: Path, out: Path, **extra) -> list[str]:
    """The CLI flags of base_config (so CLI runs and run() calls describe the same store)."""
    args = [
        "--teacher", str(teacher_dir), "--num-trajectories", "40", "--steps", "6", "--shard-size", "16",
        "--chunk-size", "8", "--batch-size", "16", "--out", str(out), "--no-progress",
    ]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _summary(output: str) -> dict:
    """The JSON summary line printed by a finished job."""
    import json

    lines = [line for line in output.splitlines() if line.startswith(SUMMARY_PREFIX)]
    assert lines, output
    return json.loads(lines[-1].removeprefix(SUMMARY_PREFIX))


def test_a_worker_killed_mid_shard_is_retried_and_the_store_is_unchanged(reference_store, teacher_dir, tmp_path):
    reference, _ = reference_store
    out = tmp_path / "killed.zarr"
    release = tmp_path / "release"
    process = _spawn_generate(_cli_args(teacher_dir, out, num_workers=1), hold_shard=1, hold_file=release)
    killed = None
    output = []
    for line in process.stdout:  # a hang here is caught by the wait below and by pytest's outer limit
        output.append(line)
        if killed is None and hold_line(shard_stage(SOLVED_STAGE), 1) in line:
            killed = int(line.rsplit("pid=", 1)[1].split()[0])
            os.kill(killed, signal.SIGKILL)
            release.touch()
    assert process.wait(timeout=HANG_LIMIT_S) == 0, "".join(output)
    assert killed is not None, "".join(output)
    summary = _summary("".join(output))
    restarted = [pid for pid in summary["worker_pids"] if pid != killed]
    assert killed in summary["worker_pids"] and len(restarted) == 1, "the shards after the kill came from a restarted worker"
    assert store_files(out) == store_files(reference)


@pytest.mark.slow  # two drivers, each starting a local Ray cluster: ~36 s on 2 quiet cores. In the default suite a dead
# run's shards are taken over in test_storage_claims.py and a killed worker's retried in this file
def test_a_killed_driver_is_resumed_by_the_same_command_with_teacher_work_only_for_missing_shards(
    reference_store, teacher_dir, tmp_path
):
    reference, _ = reference_store
    out = tmp_path / "resumed.zarr"
    process = _spawn_generate(_cli_args(teacher_dir, out, num_workers=1), hold_shard=1, hold_file=tmp_path / "never")
    output = []
    for line in process.stdout:
        output.append(line)
        if hold_line(shard_stage(SOLVED_STAGE), 1) in line:
            break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=HANG_LIMIT_S)
    committed = open_store(str(out)).committed_shards()
    assert committed == [0], "".join(output)

    resumed = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "generate.py"), *_cli_args(teacher_dir, out, num_workers=1)],
        cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT_S,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = _summary(resumed.stdout)
    assert summary["trajectories_written"] == 16 + 8, "only shards 1 and 2 were generated again"
    assert summary["teacher_forward_samples"] == (16 + 8) * 6
    assert store_files(out) == store_files(reference)


def test_a_store_of_another_spec_is_refused_and_left_untouched(reference_store, teacher_dir):
    reference, _ = reference_store
    before = store_files(reference)
    with pytest.raises(GenerateError, match="another spec.*--overwrite"):
        run(base_config(teacher_dir, reference, steps=5))
    assert store_files(reference) == before


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"teacher": "/nonexistent/teacher"}, TeacherLoadError, "nonexistent"),
        ({"num_trajectories": 0}, GenerateError, "at least 1"),
        ({"shard_size": 12, "chunk_size": 8}, GenerateError, "--chunk-size 8 does not divide --shard-size 12"),
        ({"labels": "uniform"}, GenerateError, "unconditional"),
    ],
)
def test_bad_input_is_refused_before_any_work(teacher_dir, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        run(base_config(teacher_dir, tmp_path / "out.zarr", **overrides))
    assert not (tmp_path / "out.zarr").exists()


def test_a_gpu_request_the_cluster_cannot_meet_is_refused_before_any_actor_starts(teacher_dir, tmp_path):
    out = tmp_path / "gpu.zarr"
    with pytest.raises(GenerateError, match=r"--gpus-per-worker 1, but no node of the Ray cluster has that much") as info:
        run(base_config(teacher_dir, out, gpus_per_worker=1))
    assert "0 GPU" in str(info.value) and "no actor was started" in str(info.value)
    assert "--gpus-per-worker 0" in str(info.value), "the message names the fix"
    assert not out.exists(), "nothing was written"


def test_a_non_writable_output_is_refused(teacher_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(GenerateError, match="not writable"):
        run(base_config(teacher_dir, blocker / "store.zarr"))
    assert blocker.read_text() == "not a directory"


def test_a_teacher_that_returns_nan_fails_the_shard_and_names_the_seeds(tmp_path):
    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(tmp_path / "nan")
    out = tmp_path / "nan.zarr"
    with pytest.raises(GenerateError, match=r"NaN/Inf .*seeds \[100, 101, 102"):
        run(GenerateConfig(teacher=str(tmp_path / "nan"), num_trajectories=8, steps=2, shard_size=8, chunk_size=8,
                           seed=100, out=str(out), progress=False))
    assert open_store(str(out)).committed_shards() == []


def test_a_cache_hit_does_no_teacher_work_and_never_imports_torch(reference_store, teacher_dir):
    reference, _ = reference_store
    args = _cli_args(teacher_dir, reference)
    code = (
        "import sys\n"
        "from pipeline.generate import main\n"
        f"status = main({args!r})\n"
        "assert 'torch' not in sys.modules, 'a cache hit must not load the teacher'\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cache hit" in done.stdout and _summary(done.stdout)["teacher_forward_samples"] == 0


def _dry_run(preset: str, hf_home: Path, *extra: str) -> dict:
    """The plan `pipeline/generate.py --config jobs/<preset>/generate.yaml --dry-run` prints, offline."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    done = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "generate.py"), "--config", str(REPO / "jobs" / preset / "generate.yaml"),
         "--dry-run", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT_S, env=dict(env, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home)),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("preset, shape, trajectories, evaluations_per_trajectory", [
    ("cifar10", [3, 32, 32], 50000, 16),
    ("imagenet256", [4, 32, 32], 1281167, 32),
])
def test_real_scale_presets_dry_run_offline_without_the_teacher(preset, shape, trajectories, evaluations_per_trajectory,
                                                                tmp_path):
    plan = _dry_run(preset, tmp_path)
    assert "provisional" in plan["cache_key"] and plan["url"].startswith("s3://")
    assert plan["trajectories_to_write"] == trajectories
    assert plan["teacher_forward_samples"] == trajectories * evaluations_per_trajectory
    assert plan["uncompressed_bytes_to_write"] == trajectories * 17 * int(np.prod(shape)) * 2
    assert plan["forward_gmacs"] is None and plan["estimated_gpu_hours"] is None, "no config here: no invented cost"
    assert plan["forward_gmacs_source"].startswith("unknown") and "hub cache" in plan["forward_gmacs_source"]


@pytest.mark.slow  # counting the 35.7M-parameter DDPM UNet takes ~13 s; the plan's arithmetic is in test_cost.py
def test_the_cifar10_plan_derives_gpu_hours_from_the_counted_macs_and_the_presets_gpu(tmp_path):
    import yaml

    from jobs.published_teachers import populate

    populate(tmp_path, scale="published", configs_only=True)
    gpu = yaml.safe_load((REPO / "jobs" / "cifar10" / "generate.yaml").read_text())["gpu"]
    plans = {precision: _dry_run("cifar10", tmp_path, "--precision", precision) for precision in ("fp32", "tf32")}
    for precision, plan in plans.items():
        assert plan["teacher_precision"] == precision and plan["forward_gmacs_source"].startswith("counted")
        macs = plan["forward_gmacs"] * 1e9
        rate = gpu["peak_tflops"][precision] * 1e12 * gpu["utilization"] / (2 * macs)
        assert plan["forward_samples_per_gpu_s"] == pytest.approx(rate, rel=1e-3)
        assert plan["estimated_gpu_hours"] == pytest.approx(plan["teacher_forward_samples"] / rate / 3600, rel=1e-2)
        assert plan["throughput_source"].startswith("derived") and gpu["peak_source"] in plan["throughput_source"]
    assert 5e9 < plans["fp32"]["forward_gmacs"] * 1e9 < 8e9, "the 35.7M-parameter DDPM UNet at 32×32: about 6 GMACs"
    assert plans["fp32"]["cache_key"] != plans["tf32"]["cache_key"]


@pytest.mark.slow  # counting DiT-XL/2 at full size on the meta device takes ~10-30 s
def test_the_imagenet256_plan_counts_dit_xl2_at_the_papers_cost(tmp_path):
    from jobs.published_teachers import populate

    populate(tmp_path, scale="published", configs_only=True)
    bf16, fp32 = _dry_run("imagenet256", tmp_path), _dry_run("imagenet256", tmp_path, "--precision", "fp32")
    assert bf16["forward_gmacs"] == pytest.approx(118.6, rel=5e-3), "DiT paper (Peebles & Xie 2023), Table 4: 118.6"
    assert bf16["teacher_precision"] == "bf16" and "gpu_precision" in bf16["teacher_precision_source"]
    assert fp32["estimated_gpu_hours"] / bf16["estimated_gpu_hours"] == pytest.approx(989.5 / 67.0, rel=1e-2)


def test_cli_flags_override_a_preset_and_unknown_preset_keys_are_named(teacher_dir, tmp_path):
    from pipeline.generate import parse_args

    preset = tmp_path / "preset.yaml"
    preset.write_text(f"teacher: {teacher_dir}\nnum_trajectories: 64\nsteps: 8\nshard-size: 32\n")
    cfg = parse_args(["--config", str(preset), "--steps", "4"])
    assert (cfg.teacher, cfg.num_trajectories, cfg.steps, cfg.shard_size) == (str(teacher_dir), 64, 4, 32)
    preset.write_text("teacher: x\nnum_trajectory: 3\n")
    with pytest.raises(GenerateError, match="num_trajectory.*did you mean 'num_trajectories'"):
        parse_args(["--config", str(preset)])


@pytest.mark.parametrize("preset", ["cifar10", "imagenet256"])
def test_real_scale_training_presets_are_valid_configs(preset):
    from trainer.config import load_config
    from trainer.mid import MidConfig
    from trainer.post import PostConfig

    mid = load_config(MidConfig, REPO / "jobs" / preset / "mid.yaml", [])
    post = load_config(PostConfig, REPO / "jobs" / preset / "post.yaml", [])
    assert mid.form == "cm" and post.init == f"cmt:{mid.loop.output_dir}/export"
    assert post.loop.ema_constant, "post-training from a pretrained init keeps it in the EMA"
