"""The trajectory store a study trains on, and what it cost: made (or found cached) by `pipeline/generate.py`, its
generation seconds measured when made, recorded in <out>/generation.json, or re-timed by re-solving a part of it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.compare_config import CompareConfig, CompareError
from jobs.launcher import StageFailed, generation_summary, run_stage
from jobs.study_records import update_record

GENERATION_RECORD = "generation.json"


def generation_command(cfg: CompareConfig) -> list[str]:
    """The `pipeline/generate.py` flags of the comparison's store spec."""
    command = ["--teacher", cfg.teacher, "--num-trajectories", str(cfg.num_trajectories),
               "--steps", str(cfg.solver_steps), "--solver", cfg.solver, "--grid", cfg.grid,
               "--num-workers", str(cfg.generation_workers), "--cpus-per-worker", str(cfg.threads), "--no-progress"]
    return command + (["--cache-root", cfg.cache_root] if cfg.cache_root else [])


def make_store(cfg: CompareConfig, log_dir: Path) -> dict[str, Any]:
    """Generate the store (or find it cached); {url, cache_hit, seconds} with the job's own wall time."""
    if cfg.store is not None:
        return {"url": cfg.store, "cache_hit": True, "seconds": None}
    if cfg.launcher == "inprocess":
        from pipeline.generate import GenerateConfig, GenerateError
        from pipeline.generate import run as generate

        try:
            result = generate(GenerateConfig(
                teacher=cfg.teacher, num_trajectories=cfg.num_trajectories, steps=cfg.solver_steps,
                solver=cfg.solver, grid=cfg.grid, num_workers=cfg.generation_workers, cpus_per_worker=cfg.threads,
                cache_root=cfg.cache_root, progress=False))
        except GenerateError as error:
            raise CompareError(f"trajectory generation failed: {error}") from error
        return {"url": result.url, "cache_hit": result.cache_hit, "seconds": result.seconds}
    try:
        summary = generation_summary(run_stage("generate", generation_command(cfg), log_path=log_dir / "generate.log"))
    except StageFailed as error:
        raise CompareError(f"trajectory generation failed: {error}") from error
    return {"url": summary["url"], "cache_hit": bool(summary["cache_hit"]), "seconds": float(summary["seconds"])}


def time_generation(teacher_dir: str, url: str, num_probe: int, threads: int) -> dict[str, Any]:
    """Seconds to generate the store at `url`, estimated now: re-solve `num_probe` of its trajectories, scale to N."""
    import torch

    from pipeline.shard_worker import solve_samples
    from pipeline.teacher import load_teacher
    from storage_schema import open_store

    spec = open_store(url).spec
    teacher = load_teacher(teacher_dir)
    if teacher.fingerprint != spec.teacher_fingerprint:
        raise CompareError(
            f"store {url} was made by teacher {spec.teacher_fingerprint[:12]}…, not by --teacher {teacher_dir} "
            f"({teacher.fingerprint[:12]}…): pass the teacher that made it, or drop --store to generate one"
        )
    count = min(num_probe, spec.num_trajectories)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)

    def solve_range(start: int, stop: int) -> None:
        """Solve trajectories [start, stop) of the store's spec, as generation does."""
        solve_samples(teacher, spec, np.arange(start, stop))

    try:
        solve_range(0, min(2, count))  # warm-up (allocator, kernels), not timed
        started = time.perf_counter()
        for start in range(0, count, 256):
            solve_range(start, min(start + 256, count))
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
    return {"seconds": seconds * spec.num_trajectories / count, "num_trajectories": spec.num_trajectories,
            "source": f"estimated: {count} of {spec.num_trajectories} trajectories re-solved in this invocation "
                      f"({threads} thread(s)), scaled linearly; Ray start-up and writes not included"}


def generation_cost(cfg: CompareConfig, out: Path) -> dict[str, Any]:
    """The store's URL and generation seconds G: measured now, recorded earlier in <out>/generation.json, or probed."""
    made = make_store(cfg, out / "logs")

    def decide(recorded: dict[str, Any] | None) -> dict[str, Any]:
        if not made["cache_hit"]:
            from storage_schema import open_store

            return {"seconds": made["seconds"], "num_trajectories": open_store(made["url"]).spec.num_trajectories,
                    "source": "measured: pipeline.generate.run wall time in the invocation that made the store "
                              "(Ray start-up, solving, compression, writes, validation)"}
        if recorded is not None:
            return recorded
        return time_generation(cfg.teacher, made["url"], cfg.generation_probe_trajectories, cfg.threads)

    entry = update_record(out / GENERATION_RECORD, made["url"], decide)  # parallel invocations probe once
    return {**entry, "url": made["url"]}
