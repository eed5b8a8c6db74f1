"""Fault points: the one way a test stops a run at a known place, to kill it there or let it go on.

Runs pass named points as they work: `mid-step` and `post-step` (the start of training step N of trainer/mid.py and
trainer/post.py), `shard-solved` (generation's shard N solved, not yet written) and `shard-<stage>` for each write
stage of `storage_schema`'s `write_shard` (e.g. `shard-traj_written`: the shard half-written). When the environment
names the point a run reaches,

    CMT_HOLD_POINT=<point>:<N>     e.g. post-step:4, shard-traj_written:1

the process prints `hold <point>:<N> pid=<pid>[ <where>]` (flushed; Ray forwards a worker's line to the driver),
writes the same line to the file $CMT_HOLD_FILE when that is set, and then waits until the file $CMT_RELEASE_FILE
exists, or forever (until killed) when that is not set. Nothing happens at any other point, or without the variable.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

POINT_ENV = "CMT_HOLD_POINT"
HOLD_FILE_ENV = "CMT_HOLD_FILE"
RELEASE_FILE_ENV = "CMT_RELEASE_FILE"
HOLD_PREFIX = "hold "
MID_STEP, POST_STEP = "mid-step", "post-step"  # training step N of trainer/mid.py, trainer/post.py
SHARD_PREFIX = "shard-"
SOLVED_STAGE = "solved"  # generation's shard N solved, not yet written: point shard-solved
POLL_SECONDS = 0.05

__all__ = [
    "HOLD_FILE_ENV",
    "HOLD_PREFIX",
    "MID_STEP",
    "POINT_ENV",
    "POST_STEP",
    "RELEASE_FILE_ENV",
    "SHARD_PREFIX",
    "SOLVED_STAGE",
    "armed",
    "hold_line",
    "reach",
    "shard_stage",
]


def hold_line(point: str, index: int) -> str:
    """The start of the line a run prints when it holds at (point, index), followed by ` pid=...`."""
    return f"{HOLD_PREFIX}{point}:{index} "


def armed(prefix: str = "") -> bool:
    """Whether the environment names a point starting with `prefix` (a caller may skip installing its hooks)."""
    named = os.environ.get(POINT_ENV)
    return named is not None and named.startswith(prefix)


def shard_stage(stage: str) -> str:
    """The point of a write stage of generation's shard (`shard-solved`, `shard-traj_written`, ...)."""
    return f"{SHARD_PREFIX}{stage}"


def reach(point: str, index: int, *, where: str = "") -> None:
    """Pass point (point, index): hold there when $CMT_HOLD_POINT names it (see the module docstring)."""
    if os.environ.get(POINT_ENV) != f"{point}:{index}":
        return
    line = f"{hold_line(point, index)}pid={os.getpid()}" + (f" {where}" if where else "")
    print(line, flush=True)
    announce = os.environ.get(HOLD_FILE_ENV)
    if announce:
        temporary = Path(f"{announce}.tmp-{os.getpid()}")
        temporary.write_text(line + "\n")
        os.replace(temporary, announce)  # a test never reads a half-written file
    release = os.environ.get(RELEASE_FILE_ENV)
    while release is None or not os.path.exists(release):
        time.sleep(POLL_SECONDS)  # the held run polls for its release; the test waits on the hold file or line
