"""One training process per run directory: an exclusive lock on `<loop.output_dir>/.training.lock`.

Two processes training into the same run directory would interleave its checkpoints and metrics: a user relaunching a
run that is still going, or two study drivers that share finished runs. Each stage's main process holds an flock on
the lock file while it trains. The kernel drops the lock when the process ends, however it ends (SIGKILL included),
so a dead run never leaves a stale lock behind and the same command resumes it. A second process is refused at once,
with the holder's pid, before it writes anything. Other ranks of the same run do not take the lock.

flock is reliable on local disks and on most network filesystems mounted with lock support (NFSv4, Lustre with
`flock`); where a filesystem ignores it, two processes are not told apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.config_loader import ConfigError

LOCK_NAME = ".training.lock"


class RunDirectoryBusy(ConfigError):
    """Another live process is training in this run directory (a ConfigError: every stage CLI prints it, exit 2)."""


@contextlib.contextmanager
def training_lock(output_dir: str | os.PathLike, *, hold: bool = True) -> Iterator[None]:
    """Hold the run directory's lock for the block (`hold=False`: a rank that is not the main process; no lock)."""
    if not hold:
        yield
        return
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunDirectoryBusy(
                f"loop.output_dir={directory} is being trained by another process (pid {holder}): wait for it to "
                "finish (the same command then resumes or skips the run), or pass another loop.output_dir"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
