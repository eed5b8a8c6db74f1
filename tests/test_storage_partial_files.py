"""Temporary `*.partial` files of a local writer killed mid-write: reported by validate, not counted as stored bytes,
removed by `validate --remove-partial` (refused while the writer lives), and the store resumes as usual."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from storage_schema import create_store, open_store
from tests.helpers import HANG_LIMIT_S, wait_until
from tests.test_storage_schema import fill_store, schedule, shard_data, small_spec

REPO_ROOT = Path(__file__).resolve().parents[1]

# Holds inside zarr's own atomic write of shard 1's traj object: its temporary file is complete, the rename not done.
WRITER_HELD_BEFORE_RENAME = r"""
import json, pathlib, sys, threading
from storage_schema import GenerationSpec, open_store
from tests.test_storage_schema import shard_data

url, spec_json, ready_file = sys.argv[1:4]
spec = GenerationSpec.from_dict(json.loads(spec_json))
rename = pathlib.Path.replace

def hold_before_renaming_traj(self, target):
    if self.name.endswith(".partial") and "/traj/" in str(target):
        pathlib.Path(ready_file).write_text(self.name)
        threading.Event().wait()  # until the parent kills this process
    return rename(self, target)

pathlib.Path.replace = hold_before_renaming_traj
store = open_store(url, "r+", expected_spec=spec)
claims = store.claims()
assert claims.try_acquire("1") is None
store.write_shard(1, *shard_data(spec, 1), claims=claims)
"""


def _validate(url: str, *flags: str) -> tuple[int, dict, str]:
    """`python -m storage_schema validate URL FLAGS --json`: exit status, JSON payload, stderr."""
    done = subprocess.run([sys.executable, "-m", "storage_schema", "validate", url, *flags, "--json"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=HANG_LIMIT_S)
    return done.returncode, json.loads(done.stdout), done.stderr


def test_partial_files_of_a_killed_writer_are_reported_not_counted_and_removed(tmp_path):
    spec = small_spec()
    url = str(tmp_path / "store.zarr")
    store = create_store(url, spec, *schedule(spec))
    fill_store(store, shards=[0])
    bytes_before = store.describe()["bytes_stored"]
    ready = tmp_path / "held"
    writer = subprocess.Popen([sys.executable, "-c", WRITER_HELD_BEFORE_RENAME, url, spec.canonical_json(), str(ready)],
                              cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                              stderr=subprocess.PIPE, text=True)
    wait_until(lambda: ready.exists() or writer.poll() is not None, "the writer holds before its rename")
    assert ready.exists(), writer.stderr.read()
    partial_name = ready.read_text()

    status, busy, stderr = _validate(url, "--remove-partial")
    assert status == 3 and "is being written" in busy["message"] and "after that writer ends" in busy["message"]
    assert [Path(name).name for name in open_store(url).partial_files()] == [partial_name], "nothing removed"

    os.kill(writer.pid, signal.SIGKILL)
    assert writer.wait(timeout=HANG_LIMIT_S) == -signal.SIGKILL
    status, report, _ = _validate(url, "--deep")
    assert status == 0 and report["ok"] and report["missing_shards"] == [1, 2]
    (partial_path, partial_bytes), = report["partial_files"].items()
    assert Path(partial_path).name == partial_name and partial_path.startswith("traj/c/1/") and partial_bytes > 0
    assert open_store(url).describe()["bytes_stored"] == bytes_before, "partial files are not stored bytes"

    status, report, _ = _validate(url, "--deep", "--remove-partial")
    assert status == 0 and report["ok"] and list(report["removed_partial_files"]) == [partial_path]
    assert report["partial_files"] == {} and not list((tmp_path / "store.zarr").rglob("*.partial"))

    store = open_store(url, "r+", expected_spec=spec)
    fill_store(store, shards=store.missing_shards())
    assert store.is_complete and store.validate(deep=True).ok
    assert open_store(url).read_shard(1)["traj"].tobytes() == shard_data(spec, 1)[0].astype("<f2").tobytes()
