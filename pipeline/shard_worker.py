"""What one shard of a store holds, and the Ray actor that writes it: seeds, labels, the solved trajectories.

Sample i of a store starts from the prior noise of seed ``seed_base + i`` and, for a class-conditional teacher, has
the label `labels_for` gives it, so a shard's bytes depend only on the spec and the teacher. `ShardWorker` is the
actor body (Ray pickles it by reference to this module, which every worker imports); `start_shard_workers` starts
the actors of one job.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fault_points import SHARD_PREFIX, SOLVED_STAGE, armed, reach, shard_stage
from pipeline.generate_options import GenerateConfig, GenerateError
from storage_schema import GenerationSpec, open_store
from storage_schema.store import set_write_stage_hook

__all__ = [
    "ShardWorker",
    "labels_for",
    "start_shard_workers",
]

def labels_for(indices: np.ndarray, plan: str | None, num_classes: int | None, seed_base: int) -> np.ndarray | None:
    """Class label of each sample index: None (unconditional), 'uniform' (from its own seed) or a cycled list."""
    if num_classes is None:
        return None
    if plan in (None, "uniform"):
        return np.array(
            [np.random.default_rng([seed_base + int(i), 1]).integers(num_classes) for i in indices], dtype=np.int64
        )
    classes = [int(c) for c in plan.split(",") if c.strip()]
    if not classes or any(c < 0 or c >= num_classes for c in classes):
        raise GenerateError(
            f"--labels {plan!r}: expected 'uniform' or comma-separated class ids in [0, {num_classes}); "
            f"fix the list or use --labels uniform"
        )
    return np.asarray(classes, dtype=np.int64)[np.asarray(indices) % len(classes)]


class ShardWorker:
    """Ray actor body: loads the teacher once, then generates and writes whole shards by index."""

    def __init__(self, job: dict[str, Any], url: str):
        import torch

        from pipeline import precision
        from pipeline.attention import configure_attention
        from pipeline.teacher import load_teacher

        torch.set_num_threads(max(1, int(job["cpus_per_worker"])))
        device = "cuda" if job["gpus_per_worker"] > 0 else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise GenerateError(
                f"the worker was given a GPU (--gpus-per-worker {job['gpus_per_worker']}) but its torch "
                f"{torch.__version__} sees no CUDA device: install a CUDA build of torch on the workers"
            )
        precision.check_device(job["precision"], device)
        precision.apply(job["precision"], device)
        self.job = job
        self.teacher = load_teacher(job["teacher"], revision=job["revision"], scheduler=job["scheduler"], device=device,
                                    dtype=precision.compute_dtype(job["precision"]))
        if self.teacher.fingerprint != job["fingerprint"]:
            raise GenerateError(
                f"teacher {job['teacher']} changed on disk since the job started "
                f"(fingerprint {self.teacher.fingerprint[:12]} != {job['fingerprint'][:12]}): re-run the job"
            )
        self.attention_backend = configure_attention(self.teacher.model, device)
        self.store = open_store(url, "r+")
        if armed(SHARD_PREFIX):
            set_write_stage_hook(_hold_at_shard)
        self.claims = self.store.claims(owner=job["claims_owner"])  # the driver's claims; the driver keeps them alive

    def generate_shard(self, index: int) -> dict[str, Any]:
        """Solve the PF-ODE for every trajectory of shard `index` and write the shard (commit last)."""
        started, forward_before = time.perf_counter(), self.teacher.forward_samples
        spec = self.store.spec
        start, stop = spec.shard_bounds(index)
        indices = np.arange(start, stop)
        seeds = indices + spec.seed_base
        labels = labels_for(indices, spec.label_plan, spec.num_classes, spec.seed_base)
        batches = []
        for lo in range(0, len(indices), self.job["batch_size"]):
            trajectory = solve_samples(self.teacher, spec, indices[lo:lo + self.job["batch_size"]])
            batches.append(trajectory.points.float().cpu().numpy())  # [b, K+1, *S]
        traj = np.concatenate(batches)  # [n, K+1, *S]
        finite = np.isfinite(traj.reshape(len(traj), -1)).all(axis=1)
        if not finite.all():
            bad = seeds[~finite]
            raise GenerateError(
                f"shard {index}: the teacher produced NaN/Inf for {len(bad)} trajectories, seeds "
                f"{bad[:10].tolist()}{' ...' if len(bad) > 10 else ''}; the shard was not written. "
                f"Check the teacher's weights and the solver settings"
            )
        _hold_at_shard(SOLVED_STAGE, index)
        solved = time.perf_counter()
        digest = self.store.write_shard(index, traj, seeds, labels, claims=self.claims)
        return {
            "index": index,
            "trajectories": len(indices),
            "seconds": time.perf_counter() - started,
            "write_seconds": time.perf_counter() - solved,
            "forward_samples": self.teacher.forward_samples - forward_before,
            "digest": digest,
            "pid": os.getpid(),
            "niceness": os.nice(0),
            "attention": self.attention_backend,
        }


def _hold_at_shard(stage: str, index: int) -> None:
    """Fault point `shard-<stage>` of shard `index` (`pipeline.fault_points`), naming this worker's Ray node."""
    if not armed(shard_stage(stage)):
        return
    import ray

    reach(shard_stage(stage), index, where=f"node={ray.get_runtime_context().get_node_id()}")


def solve_samples(teacher: Any, spec: GenerationSpec, indices: np.ndarray) -> Any:
    """The solver trajectories of samples `indices` of a store's spec: seed `seed_base + i`, the label `labels_for`
    gives, the spec's solver, steps, grid and guidance (what a shard holds; `pipeline.solvers.Trajectory`)."""
    import torch

    from pipeline.solvers import solve

    labels = labels_for(indices, spec.label_plan, spec.num_classes, spec.seed_base)
    grid = dict(spec.grid_params)
    with torch.no_grad():
        return solve(teacher, [int(i) + spec.seed_base for i in indices], steps=spec.steps, solver=spec.solver,
                     grid=spec.grid, sigma_max=grid.get("sigma_max"), sigma_min=grid.get("sigma_min"),
                     labels=None if labels is None else torch.as_tensor(labels), guidance_scale=spec.guidance_scale)


def start_shard_workers(cfg: GenerateConfig, spec: GenerationSpec, url: str, count: int, claims_owner: str) -> list[Any]:
    """`count` ShardWorker actors, each loading the teacher once; Ray restarts one that dies and retries its task."""
    import ray

    job = {
        "teacher": str(Path(cfg.teacher).resolve()) if Path(cfg.teacher).exists() else cfg.teacher,
        "revision": cfg.revision,
        "scheduler": None if cfg.scheduler is None else str(Path(cfg.scheduler).resolve()),
        "precision": spec.teacher_precision,
        "fingerprint": spec.teacher_fingerprint,
        "batch_size": cfg.batch_size,
        "cpus_per_worker": cfg.cpus_per_worker,
        "gpus_per_worker": cfg.gpus_per_worker,
        "claims_owner": claims_owner,
    }
    # A lost worker (its process or its whole node) is restarted up to --max-task-retries times, and its unfinished
    # shards are retried on the restarted actor: with max_task_retries=-1 a task follows its actor's restarts. A finite
    # task budget is spent on "actor unavailable" errors in the seconds before Ray declares a lost node dead.
    actor_class = ray.remote(ShardWorker).options(
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker,
        max_restarts=cfg.max_task_retries,
        max_task_retries=-1,
    )
    return [actor_class.remote(job, url) for _ in range(count)]
