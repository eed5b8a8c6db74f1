"""Helpers shared by several test files: a free loopback port, the tiny 1×8×8 UNet most tests use as a teacher, and a
solved trajectory store written without Ray."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel

from pipeline.solvers import solve
from storage_schema import GenerationSpec, create_store


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_unet(*, seed: int = 0, dropout: float = 0.0, attention: bool = False, channels=(8, 16),
              num_class_embeds: int | None = None) -> UNet2DModel:
    """A tiny random 1×8×8 UNet2DModel (digits-shaped), optionally with dropout, an attention level or classes."""
    torch.manual_seed(seed)
    down, up = ["DownBlock2D", "DownBlock2D"], ["UpBlock2D", "UpBlock2D"]
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=channels, layers_per_block=1,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=4, dropout=dropout,
                       num_class_embeds=num_class_embeds)


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
