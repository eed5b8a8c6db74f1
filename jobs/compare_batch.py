"""Each cell of a comparison at its own best batch size (`jobs/compare_inits.py --batch-sizes B ...`).

Without --batch-sizes every post-training run trains at the post preset's batch. With them, every (method, init) cell
first trains one run per candidate batch size B on its selection seed, each for the cell's step count scaled by
reference batch / B: the same number of training samples. That is equal compute only where a step's cost grows in
proportion to its batch; a step's fixed cost makes small batches dearer, so the tables charge the seconds each run
logged, and the accounting table gives each cell's achieved ratio to the CMT pipeline's charge. The candidate with
the lowest final 1-step FD (then 2-step, then the smaller batch) becomes the cell's batch size, and the cell's other
seeds train at it. With --redraws N (the default) the FD ranked is the mean over the runs' own evaluation draw and N
fresh ones (`jobs/fd_redraws.py`), every candidate on the same draws: one FD of 1,000 samples swings by about 2×
between draws, and a near-tie is otherwise decided by one draw's luck. Sweeps recorded before that rule ranked on
the runs' draw alone (their records have no `ranked_on_draws`). The learning rate and every other setting stay as
they are: the sweep finds the best batch size under those settings, not the best (batch size, learning rate) pair.

A sweep is kept in <out>/batch_choices.json under a key of the cell and everything its runs depend on except the
seeds (the names its candidate runs would have for seed 0: every setting, step count and cap; not --redraws, which
only ranks them: a recorded sweep ranked on another number of draws is kept, and the driver says so), so seeds added
later reuse the choice, as baseline_budgets.json keeps step counts. Its runs train outside the record's lock, so run
the invocation that sweeps first (`--seeds 0 --batch-sizes ...`) and add seeds after it: invocations started together
each sweep on their own first seed, and the first sweep recorded is the one every invocation keeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jobs.compare_config import STEP_COUNTS, CompareError, override_key
from jobs.study_records import update_record
from jobs.study_runs import preset_settings, short_hash

BATCH_RECORD = "batch_choices.json"
BATCH_KEY = "batch_per_process"


def preset_batch(preset: str | Path) -> int:
    """The batch size a stage preset trains at (its `batch_per_process`)."""
    batch = run_batch((), preset)
    if batch is None:
        raise CompareError(f"--post-preset {preset} sets no {BATCH_KEY}, and --batch-sizes converts step counts from "
                           f"the preset's batch size: add `{BATCH_KEY}: N` to the preset")
    return batch


def scaled_steps(steps: int, reference_batch: int, batch: int) -> int:
    """The step count that trains on as many samples at `batch` as `steps` steps do at `reference_batch`."""
    return max(1, round(steps * reference_batch / batch))


def best_batch(finals: Mapping[int, Mapping[int, float]]) -> int:
    """The candidate with the lowest final 1-step FD, then 2-step FD, then the smaller batch ({batch: {steps: FD}}); a
    diverged run (a non-finite FD) ranks last."""
    def rank(batch: int) -> tuple:
        fds = [finals[batch][steps] for steps in STEP_COUNTS]
        return (not all(math.isfinite(fd) for fd in fds), *fds, batch)

    return min(finals, key=rank)


def batch_key(method: str, init: str, candidate_runs: Sequence[str]) -> str:
    """The record's key: the cell and the names its candidate runs have for seed 0 (every setting and step count)."""
    return f"{method}-{init}-{short_hash(sorted(candidate_runs))}"


def chosen_batch(out: Path, key: str, sweep: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The sweep recorded under `key`; else `sweep()` (trained outside the lock) recorded there, unless another
    invocation recorded one first (then that one is kept)."""
    existing = update_record(out / BATCH_RECORD, key, lambda entry: entry)
    if existing is not None:
        return existing
    made = sweep()
    return update_record(out / BATCH_RECORD, key, lambda entry: entry if entry is not None else made)


def run_batch(overrides: Sequence[str], preset: str | Path) -> int | None:
    """The batch size a run trains at: its last `batch_per_process=` override, else its preset's (None if neither)."""
    for text in reversed(overrides):
        if override_key(text) == BATCH_KEY:
            return int(text.partition("=")[2])
    settings = preset_settings(str(preset)) or {}
    return int(settings[BATCH_KEY]) if BATCH_KEY in settings else None
