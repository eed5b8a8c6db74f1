"""Trajectory store commit protocol across OS processes: concurrent shard writers and a writer killed mid-shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage_schema import ShardNotCommittedError, create_store, open_store
from tests.helpers import HANG_LIMIT_S, wait_until
from tests.test_storage_schema import fill_store, schedule, shard_data, small_spec

REPO_ROOT = Path(__file__).resolve().parents[1]

CONCURRENT_WRITER = r"""
import json, pathlib, sys, time
from storage_schema import GenerationSpec, open_store
from tests.test_storage_schema import shard_data

url, spec_json, shards_csv, ready_dir, name = sys.argv[1:6]
spec = GenerationSpec.from_dict(json.loads(spec_json))
store = open_store(url, "r+", expected_spec=spec)
ready = pathlib.Path(ready_dir)
(ready / name).write_text("ready")
deadline = time.monotonic() + float(sys.argv[6])  # HANG_LIMIT_S: catches a hang only
while len(list(ready.iterdir())) < 2:  # barrier: both writers opened the store before either writes
    if time.monotonic() > deadline:
        sys.exit("the other writer never became ready")
    time.sleep(0.01)
digests = {index: store.write_shard(index, *shard_data(spec, index)) for index in map(int, shards_csv.split(","))}
print(json.dumps({"key": spec.cache_key(), "digests": digests}))
"""

KILLED_WRITER = r"""
import json, pathlib, sys, threading
import storage_schema.store as store_module
from storage_schema import GenerationSpec, open_store
from tests.test_storage_schema import shard_data

url, spec_json, stop_stage, ready_file, mode = sys.argv[1:6]
spec = GenerationSpec.from_dict(json.loads(spec_json))

def stop_inside_shard_1(stage, index):
    if stage == stop_stage and index == 1:
        pathlib.Path(ready_file).write_text(stage)
        threading.Event().wait()  # hold here until the parent kills this process

store_module.set_write_stage_hook(stop_inside_shard_1)
store = open_store(url, "r+", expected_spec=spec)
if mode == "fresh":
    store.write_shard(0, *shard_data(spec, 0))
traj, seeds, labels = shard_data(spec, 1)
store.write_shard(1, traj + 1.0, seeds, labels, repair=mode == "repair")
"""


def _python(script: str, *args: str, **popen_kwargs) -> subprocess.Popen:
    """Start `python -c script args...` in the repository root."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **popen_kwargs,
    )


def test_two_processes_write_disjoint_shards_concurrently(tmp_path):
    """Two writer processes interleave shards of one conditional store; all shards commit and deep-validate."""
    spec = small_spec(sample_shape=(3, 16, 16), steps=8, num_trajectories=60, shard_size=8, chunk_size=4, num_classes=10)
    url = str(tmp_path / "store.zarr")
    create_store(url, spec, *schedule(spec))
    ready_dir = tmp_path / "ready"
    ready_dir.mkdir()
    plan = {"even": list(range(0, spec.num_shards, 2)), "odd": list(range(1, spec.num_shards, 2))}
    writers = {
        name: _python(CONCURRENT_WRITER, url, spec.canonical_json(), ",".join(map(str, shards)), str(ready_dir), name,
                      str(HANG_LIMIT_S))
        for name, shards in plan.items()
    }
    outputs = {name: writer.communicate(timeout=HANG_LIMIT_S) for name, writer in writers.items()}
    for name, writer in writers.items():
        assert writer.returncode == 0, outputs[name][1]

    store = open_store(url, expected_spec=spec)
    assert store.committed_shards() == list(range(spec.num_shards)) and store.is_complete
    report = store.validate(deep=True)
    assert report.ok, report.problems
    for name, (stdout, _) in outputs.items():
        result = json.loads(stdout)
        assert result["key"] == spec.cache_key()
        assert {int(index): digest for index, digest in result["digests"].items()} == {
            index: store.shard_digest(index) for index in plan[name]
        }
    for index in range(spec.num_shards):
        traj, seeds, labels = shard_data(spec, index)
        shard = store.read_shard(index)
        np.testing.assert_array_equal(shard["traj"], traj.astype(np.float16))
        np.testing.assert_array_equal(shard["label"], labels)


def _wait_for_file(path: Path, process: subprocess.Popen) -> None:
    """Wait until `path` exists; fail early if the process exits first."""
    wait_until(lambda: path.exists() or process.poll() is not None, f"{path.name} appears or the writer exits",
               poll_s=0.01)
    if not path.exists():
        pytest.fail(f"writer exited with {process.returncode} before the stop point: {process.stderr.read()}")


@pytest.mark.parametrize(
    ("mode", "stop_stage"),
    [("fresh", "traj_written"), ("fresh", "data_written"), ("repair", "commit_cleared"), ("repair", "data_written")],
)
def test_writer_killed_inside_a_shard_leaves_it_uncommitted(tmp_path, mode, stop_stage):
    """SIGKILL after part or all of shard 1's data (or a repair's cleared record) leaves shard 1 uncommitted."""
    spec = small_spec()
    url = str(tmp_path / "store.zarr")
    store = create_store(url, spec, *schedule(spec))
    if mode == "repair":
        fill_store(store)
    ready_file = tmp_path / "stopped"
    writer = _python(KILLED_WRITER, url, spec.canonical_json(), stop_stage, str(ready_file), mode)
    _wait_for_file(ready_file, writer)
    os.kill(writer.pid, signal.SIGKILL)
    assert writer.wait(timeout=HANG_LIMIT_S) == -signal.SIGKILL

    store = open_store(url, "r+", expected_spec=spec)
    assert 1 not in store.committed_shards() and 1 in store.missing_shards() and store.shard_digest(1) is None
    with pytest.raises(ShardNotCommittedError):
        store.read_shard(1)
    report = store.validate(deep=True)
    assert report.ok and 1 in report.missing_shards and 0 in report.checked_shards
    traj, seeds, _ = shard_data(spec, 1)
    partial = store.read_shard(1, require_committed=False)
    if stop_stage != "commit_cleared":
        np.testing.assert_array_equal(partial["traj"], (traj + 1.0).astype(np.float16))  # the kill came after the data

    store.write_shard(1, traj, seeds)  # resuming needs no repair flag: the shard is not committed
    fill_store(store, shards=store.missing_shards())
    assert store.is_complete and store.validate(deep=True).ok
    np.testing.assert_array_equal(store.read_shard(1)["traj"], traj.astype(np.float16))
