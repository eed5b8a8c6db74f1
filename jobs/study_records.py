"""Records that parallel invocations of a study share in its output directory (generation.json,
baseline_budgets.json, batch_choices.json): one JSON object of keyed entries, read and updated under an exclusive lock.

Two invocations on one --out (seeds or methods in parallel) must neither read a half-written file nor both make an
entry and keep different ones: the first to make an entry wins and the other reuses it. The lock is an flock on
`<file>.lock`, held while an entry is made (a timing probe, a fit), and the file is written whole (temporary file +
rename), so readers that do not lock still see a complete file.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.paths import write_text


def update_record(path: Path, key: str, make: Callable[[dict[str, Any] | None], dict[str, Any]]) -> dict[str, Any]:
    """The entry under `key` after `make(existing entry or None)` decides it (return the existing one to keep it);
    a new entry gets `recorded_at`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        records = json.loads(path.read_text()) if path.exists() else {}
        existing = records.get(key)
        entry = make(existing)
        if entry is not existing:
            entry = {**entry, "recorded_at": entry.get("recorded_at", time.strftime("%Y-%m-%d %H:%M:%S"))}
            records[key] = entry
            write_text(str(path), json.dumps(records, indent=2))
        return entry
