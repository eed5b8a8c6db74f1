"""pipeline/fault_points.py: a run holds at exactly the named point, announces itself, and goes on when released."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.fault_points import HOLD_FILE_ENV, POINT_ENV, POST_STEP, RELEASE_FILE_ENV, armed, hold_line
from tests.helpers import HANG_LIMIT_S, wait_until

PASS_POINTS = (
    "from pipeline.fault_points import POST_STEP, reach\n"
    "for step in (3, 4, 5):\n"
    "    reach(POST_STEP, step)\n"
    "    print(f'passed {step}', flush=True)\n"
)


def test_a_run_holds_at_the_named_point_only_and_goes_on_once_released(tmp_path):
    hold_file, release = tmp_path / "hold", tmp_path / "release"
    env = {**os.environ, POINT_ENV: f"{POST_STEP}:4", HOLD_FILE_ENV: str(hold_file), RELEASE_FILE_ENV: str(release)}
    child = subprocess.Popen([sys.executable, "-c", PASS_POINTS], env=env, stdout=subprocess.PIPE, text=True)
    wait_until(lambda: hold_file.exists() or child.poll() is not None, "the child reaches post-step 4")
    assert hold_file.read_text() == f"{hold_line(POST_STEP, 4)}pid={child.pid}\n"
    assert child.poll() is None, "it holds until released"
    release.touch()
    output, _ = child.communicate(timeout=HANG_LIMIT_S)
    assert child.returncode == 0
    assert output.splitlines() == ["passed 3", f"{hold_line(POST_STEP, 4)}pid={child.pid}", "passed 4", "passed 5"]


def test_without_the_variable_nothing_holds(monkeypatch):
    monkeypatch.delenv(POINT_ENV, raising=False)
    done = subprocess.run([sys.executable, "-c", PASS_POINTS], env={k: v for k, v in os.environ.items()},
                          capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.stdout.splitlines() == ["passed 3", "passed 4", "passed 5"]
    assert not armed() and not armed("shard-")
    monkeypatch.setenv(POINT_ENV, "shard-solved:1")
    assert armed("shard-") and not armed("post-")
