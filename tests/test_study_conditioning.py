"""jobs/study_conditioning.py end to end on a tiny teacher: store, mid runs per reading, FD re-draws, table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HANG_LIMIT_S

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_study_runs_every_distinct_reading_and_writes_the_table(tmp_path):
    teacher = tmp_path / "teacher"
    pretrain = [sys.executable, "trainer/pretrain.py", "--config", "jobs/tiny/pretrain.yaml",
                f"loop.output_dir={teacher}", "loop.eval_every_steps=0"]
    assert subprocess.run(pretrain, cwd=REPO, capture_output=True, timeout=HANG_LIMIT_S).returncode == 0
    study = [sys.executable, "jobs/study_conditioning.py", "--teacher", f"eps={teacher / 'export'}", "--variants",
             "default", "own", "auto", "auto+transfer", "--forms", "cm", "--mid-steps", "3", "--eval-every", "2",
             "--transfer-steps", "1", "--redraws", "2", "--num-eval-samples", "32", "--num-trajectories", "32",
             "--jobs", "1", "--out", str(tmp_path / "study")]
    done = subprocess.run(study, cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "study" / "study.json").read_text())
    readings = {row["variant"]: row["reading"] for row in summary["rows"]}
    assert readings["own"].startswith("teacher") and readings["auto"].startswith("edm (σ_d = 0.5")
    assert readings["auto+transfer"].endswith("+ transfer 1, clip none")
    assert readings["default"] == readings["auto"] + " + transfer 1, clip 1.0"  # an ε-teacher's default transfers
    for row in summary["rows"]:
        assert row["early_step"] == 2 and len(row["seeds"]) == 1
        assert row["redraw_fd_1step"]["n"] == 2 and row["final_fd_1step"]["mean"] > 0
    assert "| eps | auto: edm" in (tmp_path / "study" / "study.md").read_text()
