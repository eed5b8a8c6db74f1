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
- precision (``--precisions fp32,bf16``, side by side in the same run): per teacher precision, the seconds per
  network forward of one sample (in batches of ``--precision-batch`` trajectories, doubled under guidance) over a
  K-step solve of the same seeds and labels, and the clean endpoint's error against fp32 (max |x − x_fp32| and
  ‖x − x_fp32‖ / ‖x_fp32‖).

    python jobs/bench_generate.py --teacher facebook/DiT-XL-2-256 --studies precision --precisions fp32,bf16 \\
        --steps 8 --precision-batch 4 --guidance 1.5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.generate import SUMMARY_PREFIX
from storage_schema import CODECS, GenerationSpec, create_store

REPO = Path(__file__).resolve().parents[1]


def _solve(teacher, seeds: list[int], steps: int, guidance: float | None = None):
    """The PF-ODE solve generate.py runs for these seeds (uniform labels from the seeds for a conditional teacher)."""
    import torch

    from pipeline.shard_worker import labels_for
    from pipeline.solvers import solve

    labels = labels_for(np.asarray(seeds), "uniform", teacher.num_classes, 0)
    with torch.no_grad():
        return solve(teacher, seeds, steps=steps, labels=None if labels is None else torch.as_tensor(labels),
                     guidance_scale=guidance if teacher.num_classes is not None else None).points


def bare_solver_rate(teacher, *, num: int, batch: int, steps: int, seed: int) -> tuple[float, np.ndarray]:
    """Trajectories/s of the solver loop alone, in memory (float32 output kept for the codec study)."""
    started = time.perf_counter()
    outputs = [_solve(teacher, list(range(seed + lo, seed + lo + batch)), steps).numpy() for lo in range(0, num, batch)]
    return num / (time.perf_counter() - started), np.concatenate(outputs)


def precision_study(args: argparse.Namespace) -> dict:
    """Per precision: seconds per forward and the clean endpoint's error against fp32, same seeds, labels and grid."""
    import torch

    from pipeline import precision as precisions
    from pipeline.teacher import load_teacher

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seeds = list(range(args.precision_batch))
    reference, rows = None, {}
    for name in ["fp32", *[p for p in args.precisions.split(",") if p and p != "fp32"]]:
        precisions.check_device(name, device)
        precisions.apply(name, device)
        teacher = load_teacher(args.teacher, revision=args.revision, device=device, dtype=precisions.compute_dtype(name))
        _solve(teacher, seeds, 1, args.guidance)  # warm-up: kernels, allocator
        before, started = teacher.forward_samples, time.perf_counter()
        endpoint = _solve(teacher, seeds, args.steps, args.guidance)[:, -1].double().cpu()  # [B, *S]
        if device == "cuda":
            torch.cuda.synchronize()
        seconds, forwards = time.perf_counter() - started, teacher.forward_samples - before
        reference = endpoint if reference is None else reference
        error = endpoint - reference
        rows[name] = {
            "seconds_per_forward_sample": seconds / forwards,
            "forward_samples_per_s": forwards / seconds,
            "endpoint_max_abs_error_vs_fp32": float(error.abs().max()),
            "endpoint_relative_rms_error_vs_fp32": float(error.norm() / reference.norm()),
        }
        del teacher
    return {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({args.threads} threads)",
            "trajectories": len(seeds), "network_batch": len(seeds) * (2 if args.guidance not in (None, 1.0) else 1),
            "steps": args.steps, "guidance": args.guidance, "precisions": rows}


def run_job(args: argparse.Namespace, out: Path, env: dict[str, str]) -> tuple[float, dict]:
    """Run pipeline/generate.py as a user would; (wall seconds, printed summary)."""
    command = [
        sys.executable, str(REPO / "pipeline" / "generate.py"), "--teacher", args.teacher,
        "--num-trajectories", str(args.num_trajectories), "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--chunk-size", str(args.chunk_size),
        "--cpus-per-worker", str(args.threads), "--num-workers", "1", "--codec", args.codec, "--out", str(out),
        "--no-progress", *(["--revision", args.revision] if args.revision else []),
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
    parser.add_argument("--revision", default=None, help="hub ids: branch, tag, commit or refs/pr/N")
    parser.add_argument("--studies", default="job,precision", help="comma-separated: job, precision")
    parser.add_argument("--precisions", default="fp32,bf16", help="teacher precisions to compare against fp32")
    parser.add_argument("--precision-batch", type=int, default=8, help="samples per forward in the precision study")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (conditional teachers)")
    args = parser.parse_args()

    import torch

    from pipeline.solvers import time_grid
    from pipeline.teacher import load_teacher

    torch.set_num_threads(args.threads)
    studies = set(args.studies.split(","))
    result = {"precision": precision_study(args)} if "precision" in studies else {}
    if "job" not in studies:
        print(json.dumps(result, indent=2))
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-generate-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMT_CACHE_DIR=str(workdir / "cache"))

    started = time.perf_counter()
    teacher = load_teacher(args.teacher, revision=args.revision)
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
        **result,
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
