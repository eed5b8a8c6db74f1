"""The layout of a training run's directory, owned in one place: what the stages write and what every reader reads.

    <loop.output_dir>/
        config.yaml        the resolved config of the run (trainer/config.py writes it)
        checkpoints/       step_<N>/ complete checkpoints (trainer/loop.py)
        metrics.jsonl      one JSON record per logged step: loss, train_seconds, fd_1step / fd_2step, ...
        init_eval.json     mid and post: FD of the student before its first step (eval_at_init)
        samples/           PNG sample grids of every evaluation
        ranks/rank_<r>.json mid and post: what each rank read and a hash of its final parameters
        export/            the trained model (a teacher pipeline for pretrain, a student directory for mid and post)

Stages (trainer/pretrain.py, trainer/mid.py, trainer/post.py, trainer/loop.py) and the jobs that read runs
(jobs/demo.py, jobs/compare_inits.py and the studies) use these names instead of spelling the paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
INIT_EVAL_FILE = "init_eval.json"
SAMPLES_DIR = "samples"
RANKS_DIR = "ranks"
EXPORT_DIR = "export"


@dataclass(frozen=True)
class RunDir:
    """One run directory (`loop.output_dir`); paths are properties, readers return plain Python values."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def init_eval(self) -> Path:
        return self.root / INIT_EVAL_FILE

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES_DIR

    @property
    def ranks(self) -> Path:
        return self.root / RANKS_DIR

    @property
    def export(self) -> Path:
        return self.root / EXPORT_DIR

    def rank_report(self, rank: int) -> Path:
        """ranks/rank_<rank>.json."""
        return self.ranks / f"rank_{rank}.json"

    def write_rank_report(self, rank: int, report: dict[str, Any]) -> None:
        """Write rank `rank`'s report (ranks/ is created)."""
        self.ranks.mkdir(parents=True, exist_ok=True)
        self.rank_report(rank).write_text(json.dumps(report, indent=2))

    def read_rank_reports(self) -> list[dict[str, Any]]:
        """Every rank's report, in rank order."""
        paths = sorted(self.ranks.glob("rank_*.json"), key=lambda path: int(path.stem.split("_")[1]))
        return [json.loads(path.read_text()) for path in paths]

    def read_metrics(self) -> list[dict[str, Any]]:
        """All records of metrics.jsonl, in order ([] before the first log)."""
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def read_evaluations(self) -> list[dict[str, Any]]:
        """The metrics records that carry an FD evaluation (fd_1step), in order."""
        return [record for record in self.read_metrics() if "fd_1step" in record]

    def read_init_eval(self) -> dict[str, Any] | None:
        """init_eval.json, or None where the run did not evaluate at init."""
        return json.loads(self.init_eval.read_text()) if self.init_eval.exists() else None

    def last_train_seconds(self) -> float | None:
        """Cumulative optimizer-step seconds at the last record that has them (None before any)."""
        timed = [record for record in self.read_metrics() if "train_seconds" in record]
        return float(max(timed, key=lambda record: record["step"])["train_seconds"]) if timed else None

    def finished(self, total_steps: int) -> bool:
        """The run logged its last step and exported (re-launching it would only re-export)."""
        return self.export.is_dir() and any(record.get("step") == total_steps for record in self.read_metrics())
