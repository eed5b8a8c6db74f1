"""Helpers shared by several test files: a free loopback port and a solved trajectory store written without Ray."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np

from pipeline.solvers import solve
from storage_schema import GenerationSpec, create_store


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_solved_store(teacher, url: Path, *, num_trajectories: int, steps: int, shard_size: int,
                       chunk_size: int | None = None, solver: str = "dpmpp-3m", shards: list[int] | None = None,
                       dtype: str = "float32") -> Path:
    """Solve the teacher's PF-ODE and write a trajectory store the way pipeline/generate.py does (without Ray)."""
    spec = GenerationSpec(
        teacher_fingerprint=teacher.fingerprint, sample_shape=tuple(teacher.sample_shape), solver=solver,
        steps=steps, grid="logsnr", seed_base=0, num_trajectories=num_trajectories, shard_size=shard_size,
        chunk_size=chunk_size or max(1, shard_size // 2), dtype=dtype,
    )
    trajectory = solve(teacher, list(range(num_trajectories)), steps=steps, solver=solver, grid="logsnr")
    store = create_store(str(url), spec, trajectory.alpha, trajectory.sigma)
    for shard in range(spec.num_shards) if shards is None else shards:
        start, stop = spec.shard_bounds(shard)
        store.write_shard(shard, trajectory.points[start:stop].numpy(), np.arange(start, stop))
    return url
