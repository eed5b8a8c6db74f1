"""The baselines' step budgets of a comparison, fixed by the invocation that first fits them.

A baseline's step count converts the CMT pipeline's mean charged seconds into steps (`jobs/compare_inits.py`). The
step count is part of a run's name, so refitting it whenever seeds are added would rename every finished baseline run
and train it again. The first fit is therefore recorded in <out>/baseline_budgets.json under a key of everything the
budget depends on except the seeds (the method, the CMT post-training run's settings with the seed left out, the
generation seconds charged and whether baselines are charged for them); a later invocation with more seeds reuses
it, and a changed setting gets a new key and a new fit. Delete the file to fit again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from jobs.study_runs import short_hash
from pipeline.paths import write_text

BUDGET_RECORD = "baseline_budgets.json"


def budget_key(method: str, cmt_plan_name: str, generation_seconds: float, baselines_read_store: bool) -> str:
    """The record's key; `cmt_plan_name` is the method's CMT post-training run of seed 0, whatever seeds are run."""
    return f"{method}-{short_hash([cmt_plan_name, round(generation_seconds, 6), baselines_read_store])}"


def recorded_budget(out: Path, key: str) -> dict[str, Any] | None:
    """The budget fitted earlier under `key`, or None."""
    path = out / BUDGET_RECORD
    return json.loads(path.read_text()).get(key) if path.exists() else None


def record_budget(out: Path, key: str, budget: dict[str, Any]) -> dict[str, Any]:
    """Keep a fitted budget (`baseline_steps_for_equal_compute`, the seconds and fit behind it, `fitted_on_seeds`)."""
    path = out / BUDGET_RECORD
    records = json.loads(path.read_text()) if path.exists() else {}
    records[key] = {**budget, "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.mkdir(parents=True, exist_ok=True)
    write_text(str(path), json.dumps(records, indent=2))  # whole: a parallel invocation may read it now
    return records[key]
