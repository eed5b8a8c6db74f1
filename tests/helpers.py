"""Helpers shared by several test files: a free loopback port, the tiny 1×8×8 UNet most tests use as a teacher, a
solved trajectory store written without Ray, and the suite's rules for time and tolerance.

Time: tests wait for conditions (`wait_until`), never for a wall-clock budget. `HANG_LIMIT_S` bounds only hangs: it is
far above what any step takes on a loaded 2-core machine, so reaching it means something is stuck, not slow.
Tolerance: `assert_close` scales with the values' magnitude and the dtype's resolution, never a fixed absolute number.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch
from diffusers import UNet2DModel

from pipeline.solvers import solve
from storage_schema import GenerationSpec, create_store


HANG_LIMIT_S = 1800.0  # outer bound for one subprocess or one wait: catches hangs only, never slowness


def wait_until(condition: Callable[[], object], what: str, *, limit_s: float = HANG_LIMIT_S,
               poll_s: float = 0.05) -> object:
    """Poll `condition()` until it returns something truthy (returned); fail naming `what` only after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting after {limit_s:.0f} s (a hang, not slowness): {what}")
        time.sleep(poll_s)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, ulps: float = 64.0,
                 magnitude: float | None = None, what: str = "") -> None:
    """|actual − expected| ≤ ulps · eps(dtype) · magnitude, elementwise maximum.

    `magnitude` is the size of the largest value the computation went through (default: max |expected|, at least 1):
    float rounding errors scale with it, so a result near 2.75 computed from terms near 150 needs magnitude=150.
    """
    dtype = expected.dtype if expected.is_floating_point() else torch.float32
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1.0) if magnitude is None else magnitude
    tolerance = ulps * torch.finfo(dtype).eps * scale
    error = float((actual.to(expected.dtype) - expected).abs().max()) if expected.numel() else 0.0
    assert error <= tolerance, (
        f"{what} max |error| {error:.3g} > {tolerance:.3g} ({ulps:g} ulps of {dtype} at magnitude {scale:.3g})"
    )


def process_ended(process: psutil.Process) -> bool:
    """True once a process has exited (a zombie that its parent has not reaped yet counts as ended)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


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
    """Solve the teacher's PF-ODE and write a trajectory store the way pipeline/generate.py does (without Ray).

    A class-conditional teacher's trajectory i has class i mod num_classes.
    """
    classes = teacher.num_classes
    spec = GenerationSpec(
        teacher_fingerprint=teacher.fingerprint, sample_shape=tuple(teacher.sample_shape), solver=solver,
        steps=steps, grid="logsnr", seed_base=0, num_trajectories=num_trajectories, shard_size=shard_size,
        chunk_size=chunk_size or max(1, shard_size // 2), dtype=dtype, num_classes=classes,
        label_plan=None if classes is None else "index mod classes",
    )
    return write_store_of_spec(teacher, spec, url, shards=shards)


def write_store_of_spec(teacher, spec: GenerationSpec, url: Path | str, *, shards: list[int] | None = None):
    """The store of `spec` (e.g. pipeline.generate.build_spec's), solved and written without Ray; in a conditional
    spec, trajectory i has class i mod num_classes."""
    grid = dict(spec.grid_params)
    seeds = list(range(spec.seed_base, spec.seed_base + spec.num_trajectories))
    labels = None if spec.num_classes is None else np.arange(spec.num_trajectories) % spec.num_classes  # [N]
    trajectory = solve(teacher, seeds, steps=spec.steps, solver=spec.solver, grid=spec.grid,
                       sigma_max=grid.get("sigma_max"), sigma_min=grid.get("sigma_min"),
                       labels=None if labels is None else torch.from_numpy(labels))
    store = create_store(str(url), spec, trajectory.alpha, trajectory.sigma)
    for shard in range(spec.num_shards) if shards is None else shards:
        start, stop = spec.shard_bounds(shard)
        store.write_shard(shard, trajectory.points[start:stop].numpy(), np.arange(start, stop) + spec.seed_base,
                          None if labels is None else labels[start:stop])
    return url
