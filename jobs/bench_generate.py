"""Benchmark of trajectory generation; prints one JSON object (issue targets in brackets).

    python jobs/bench_generate.py --teacher runs/digits/pretrain/export --num-trajectories 4096 --steps 16

- throughput_ratio [≥ 0.95]: the full job's steady-state trajectories/s (Ray + solver + compression + writes,
  between the first and the last shard's end) over the bare in-memory solver loop's, same teacher, batch and
  threads, measured in this one run (the bare loop before and after the job, averaged).
- Ray start-up and the first shard (actor start + teacher load + first shard) are reported apart.
- bytes_ratio [≤ 0.45 for float16]: bytes on disk per stored point over raw float32 bytes, for float16/float32
  and every codec, on real trajectories of this teacher (the bare loop's output re-encoded).
- float16_worst_relative_error: max |x16 − x32| / |x32| over elements with |x32| ≥ 1e-2 (and the max absolute error).
- cache_hit_ratio [≤ 0.05]: wall time of re-running the same command (a cache hit) over the original run.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run by path: the project root first on sys.path
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.generate import SUMMARY_PREFIX
from storage_schema import CODECS, GenerationSpec, create_store

REPO = Path(__file__).resolve().parents[1]


def bare_solver_rate(teacher, *, num: int, batch: int, steps: int, seed: int) -> tuple[float, np.ndarray]:
    """Trajectories/s of the solver loop alone, in memory (float32 output kept for the codec study)."""
    import torch

    from pipeline.solvers import solve

    started = time.perf_counter()
    outputs = []
    for lo in range(0, num, batch):
        with torch.no_grad():
            outputs.append(solve(teacher, list(range(seed + lo, seed + lo + batch)), steps=steps).points.numpy())
    return num / (time.perf_counter() - started), np.concatenate(outputs)


def run_job(args: argparse.Namespace, out: Path, env: dict[str, str]) -> tuple[float, dict]:
    """Run pipeline/generate.py as a user would; (wall seconds, printed summary)."""
    command = [
        sys.executable, str(REPO / "pipeline" / "generate.py"), "--teacher", args.teacher,
        "--num-trajectories", str(args.num_trajectories), "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--chunk-size", str(args.chunk_size),
        "--cpus-per-worker", str(args.threads), "--num-workers", "1", "--codec", args.codec, "--out", str(out),
        "--no-progress",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"generate.py failed:\n{done.stdout}\n{done.stderr}")
    line = next(line for line in done.stdout.splitlines() if line.startswith(SUMMARY_PREFIX))
    return seconds, json.loads(line.removeprefix(SUMMARY_PREFIX))


def codec_study(points: np.ndarray, workdir: Path, steps: int, alpha: np.ndarray, sigma: np.ndarray) -> dict:
    """Bytes per stored point over raw float32 bytes, per dtype × codec, on real trajectories [n, K+1, *S]."""
    n = points.shape[0]
    raw_float32 = points[0, 0].size * 4
    ratios = {}
    for dtype in ("float16", "float32"):
        for codec in CODECS:
            spec = GenerationSpec(
                teacher_fingerprint="bench", sample_shape=tuple(points.shape[2:]), solver="dpmpp-3m", steps=steps,
                grid="logsnr", seed_base=0, num_trajectories=n, shard_size=n, chunk_size=min(64, n), dtype=dtype,
                codec=codec,
            )
            url = workdir / f"codec-{dtype}-{codec}.zarr"
            store = create_store(str(url), spec, alpha, sigma)
            store.write_shard(0, points, np.arange(n))
            traj_bytes = sum(f.stat().st_size for f in (url / "traj").rglob("*") if f.is_file())
            ratios[f"{dtype}/{codec}"] = traj_bytes / (n * (steps + 1)) / raw_float32
            shutil.rmtree(url)
    return ratios


def float16_errors(points: np.ndarray) -> dict:
    """Worst relative error of the float16 round trip (elements with |x| ≥ 1e-2) and worst absolute error."""
    rounded = points.astype(np.float16).astype(np.float32)
    error = np.abs(rounded - points)
    significant = np.abs(points) >= 1e-2
    return {
        "float16_worst_relative_error": float((error[significant] / np.abs(points[significant])).max()),
        "float16_worst_absolute_error": float(error.max()),
    }


def main() -> int:
    """Run the benchmark and print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--num-trajectories", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--codec", default="blosc-zstd-shuffle")
    parser.add_argument("--bare-trajectories", type=int, default=1024)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import torch

    from pipeline.solvers import time_grid
    from pipeline.teacher import load_teacher

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-generate-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMT_CACHE_DIR=str(workdir / "cache"))

    started = time.perf_counter()
    teacher = load_teacher(args.teacher)
    teacher_load_seconds = time.perf_counter() - started
    bare = {"num": args.bare_trajectories, "batch": args.batch_size, "steps": args.steps}
    bare_solver_rate(teacher, seed=0, num=args.batch_size, batch=args.batch_size, steps=args.steps)  # warm-up
    rate_before, points = bare_solver_rate(teacher, seed=10**6, **bare)
    job_seconds, summary = run_job(args, workdir / "store.zarr", env)
    rate_after, _ = bare_solver_rate(teacher, seed=2 * 10**6, **bare)
    hit_seconds, hit_summary = run_job(args, workdir / "store.zarr", env)
    bare_rate = (rate_before + rate_after) / 2

    alpha, sigma = time_grid(teacher, args.steps, "dpmpp-3m", "logsnr")
    result = {
        "teacher": args.teacher,
        "trajectories": args.num_trajectories,
        "points_per_trajectory": args.steps + 1,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "codec": args.codec,
        "bare_solver_trajectories_per_s": bare_rate,
        "bare_solver_before_after": [rate_before, rate_after],
        "job_steady_trajectories_per_s": summary["steady_trajectories_per_s"],
        "throughput_ratio": summary["steady_trajectories_per_s"] / bare_rate,
        "worker_trajectories_per_s": summary["worker_trajectories_per_s"],
        "worker_write_fraction": summary["worker_write_fraction"],
        "ray_start_seconds": summary["ray_start_seconds"],
        "first_shard_seconds": summary["first_shard_seconds"],
        "teacher_load_seconds_in_process": teacher_load_seconds,
        "job_wall_seconds": job_seconds,
        "job_store_bytes_ratio": summary["bytes_stored"] / (args.num_trajectories * (args.steps + 1) * points[0, 0].size * 4),
        "bytes_ratio": codec_study(points, workdir, args.steps, alpha, sigma),
        **float16_errors(points),
        "cache_hit_wall_seconds": hit_seconds,
        "cache_hit_teacher_forward_samples": hit_summary["teacher_forward_samples"],
        "cache_hit_ratio": hit_seconds / job_seconds,
    }
    print(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
