"""The baselines' step budgets of a comparison, fixed by the invocation that first fits them.

A baseline's step count converts the CMT pipeline's mean charged seconds into steps (`jobs/compare_inits.py`). The
step count is part of a run's name, so refitting it whenever seeds are added would rename every finished baseline run
and train it again. The first fit is therefore recorded in <out>/baseline_budgets.json under a key of everything the
budget depends on except the seeds (the method, the CMT post-training run's settings with the seed left out, the
generation seconds charged and whether baselines are charged for them); a later invocation with more seeds reuses
it, and a changed setting gets a new key and a new fit. Invocations in parallel share it (`jobs/study_records.py`):
the first to fit wins. Delete the file to fit again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.study_records import update_record
from jobs.study_runs import short_hash

BUDGET_RECORD = "baseline_budgets.json"


def budget_key(method: str, cmt_plan_name: str, generation_seconds: float, baselines_read_store: bool) -> str:
    """The record's key; `cmt_plan_name` is the method's CMT post-training run of seed 0, whatever seeds are run."""
    return f"{method}-{short_hash([cmt_plan_name, round(generation_seconds, 6), baselines_read_store])}"


def baseline_budget(out: Path, key: str, fit: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The budget recorded under `key`, else `fit()` recorded there (`baseline_steps_for_equal_compute`, the seconds
    and fit behind it, `fitted_on_seeds`)."""
    return update_record(out / BUDGET_RECORD, key, lambda existing: existing if existing is not None else fit())
