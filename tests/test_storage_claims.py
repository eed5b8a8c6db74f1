"""Writer claims across real processes: one winner per claim, stale claims taken over, lost claims never commit,
and one creation among writers that open the same store at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage_schema import (
    ClaimLostError,
    SpecMismatchError,
    create_store,
    open_or_create_store,
    open_store,
    store_claims,
)
from storage_schema.claims import CLAIM_DIR
from tests.helpers import HANG_LIMIT_S, wait_until
from tests.test_storage_schema import fill_store, schedule, shard_data, small_spec

REPO_ROOT = Path(__file__).resolve().parents[1]

RACING_CLAIMER = r"""
import json, pathlib, sys, time
from storage_schema import store_claims

url, ready_dir, name, hang_limit_s = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
claims = store_claims(url)
(ready_dir / name).write_text("ready")
deadline = time.monotonic() + hang_limit_s
while len(list(ready_dir.iterdir())) < 2:  # barrier: both claimers start together
    if time.monotonic() > deadline:
        sys.exit("the other claimer never became ready")
    time.sleep(0.001)
won = [shard for shard in map(str, range(8)) if claims.try_acquire(shard) is None]
print(json.dumps({"owner": claims.owner, "won": won}))
"""

CLAIM_AND_EXIT = r"""
import sys
from storage_schema import store_claims
url, owner, name = sys.argv[1:4]
assert store_claims(url, owner=owner).try_acquire(name) is None
"""

CREATOR = r"""
import json, pathlib, sys, time
import numpy as np
from storage_schema import GenerationSpec, open_or_create_store

url, spec_json, log_dir, release_file, hang_limit_s = sys.argv[1:6]
spec = GenerationSpec.from_dict(json.loads(spec_json))
log = pathlib.Path(log_dir)

def schedule():
    (log / f"schedule-{sys.argv[6]}").write_text("called")
    deadline = time.monotonic() + float(hang_limit_s)
    while not pathlib.Path(release_file).exists():  # the test holds the creation here until the other process waits
        if time.monotonic() > deadline:
            sys.exit("never released")
        time.sleep(0.01)
    return np.ones(spec.num_points), np.geomspace(80.0, 0.002, spec.num_points)

def on_wait(claim):
    (log / f"waited-{sys.argv[6]}").write_text(claim.describe())

store = open_or_create_store(url, spec, schedule, on_wait=on_wait, poll_s=0.05)
print(json.dumps({"missing": store.missing_shards()}))
"""


def _python(script: str, *args: str) -> subprocess.Popen:
    """Start `python -c script args...` in the repository root."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finished(process: subprocess.Popen) -> str:
    """stdout of a process that must exit with status 0."""
    stdout, stderr = process.communicate(timeout=HANG_LIMIT_S)
    assert process.returncode == 0, stderr
    return stdout


def test_two_processes_racing_for_the_same_claims_never_both_win(tmp_path):
    url = str(tmp_path / "store.zarr")
    ready = tmp_path / "ready"
    ready.mkdir()
    racers = [_python(RACING_CLAIMER, url, str(ready), name, str(HANG_LIMIT_S)) for name in ("a", "b")]
    results = [json.loads(_finished(racer)) for racer in racers]
    won_a, won_b = (set(result["won"]) for result in results)
    assert not won_a & won_b and won_a | won_b == set(map(str, range(8)))
    records = store_claims(url).records()
    owners = {result["owner"]: set(result["won"]) for result in results}
    assert {name: record.owner for name, record in records.items()} == {
        name: owner for owner, names in owners.items() for name in names
    }


def test_a_claim_left_by_a_dead_process_is_taken_over_and_its_writer_cannot_commit(tmp_path):
    spec = small_spec()
    url = str(tmp_path / "store.zarr")
    store = create_store(url, spec, *schedule(spec))
    _finished(_python(CLAIM_AND_EXIT, url, "dead-writer", "1"))
    taker = store.claims()
    holder = taker.records()["1"]
    assert holder.owner == "dead-writer" and not taker.is_live(holder)
    assert taker.try_acquire("1") is None and taker.holds("1")
    assert sorted(os.listdir(tmp_path / "store.zarr" / CLAIM_DIR)) == ["1.0", "1.1"]

    with pytest.raises(ClaimLostError, match="shard 1 .* claimed by another writer"):
        store.write_shard(1, *shard_data(spec, 1), claims=store.claims(owner="dead-writer"))
    assert store.shard_digest(1) is None
    store.write_shard(1, *shard_data(spec, 1), claims=taker)
    taker.release("1")
    assert store.shard_digest(1) is not None and os.listdir(tmp_path / "store.zarr" / CLAIM_DIR) == []


def test_a_live_claim_of_this_host_is_respected(tmp_path):
    url = str(tmp_path / "store.zarr")
    holder, other = store_claims(url), store_claims(url)
    assert holder.try_acquire("0") is None
    live = other.try_acquire("0")
    assert live is not None and live.owner == holder.owner and live.pid == os.getpid()
    holder.release("0")
    assert other.try_acquire("0") is None


def _claim_from_another_host(url: str, beat: int) -> None:
    """Write claim `0.0` as a writer on another host would (its pid means nothing here)."""
    path = Path(url) / CLAIM_DIR / "0.0"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"owner": "remote", "host": "another-host", "pid": 1, "process_start": None,
                                "beat": beat}))


def test_a_claim_from_another_host_lives_while_its_heartbeat_changes_and_expires_after_the_lease(tmp_path):
    url = str(tmp_path / "store.zarr")
    _claim_from_another_host(url, beat=0)
    lease_s = 0.5
    observer = store_claims(url)
    observer.lease_s = lease_s
    assert observer.try_acquire("0") is not None, "a claim seen for the first time is live"
    for beat in (1, 2, 3):
        seen = time.monotonic()
        wait_until(lambda: time.monotonic() > seen + lease_s, "one lease passes", poll_s=0.05)
        _claim_from_another_host(url, beat=beat)
        assert observer.try_acquire("0") is not None, f"heartbeat {beat} keeps the claim live"
    wait_until(lambda: observer.try_acquire("0") is None, "the claim expires once its heartbeat stops", poll_s=0.05)
    assert observer.holds("0") and observer.records()["0"].epoch == 1


def test_heartbeats_rewrite_only_the_claims_held(tmp_path):
    url = str(tmp_path / "store.zarr")
    claims = store_claims(url)
    assert claims.try_acquire("3") is None
    before = claims.records()["3"].raw
    claims.heartbeat()
    after = claims.records()["3"]
    assert after.raw != before and json.loads(after.raw)["beat"] == 1
    with claims.keep_alive(interval_s=HANG_LIMIT_S):
        assert claims.try_acquire("4") is None
    assert claims.records() == {}, "leaving keep_alive releases every claim"


def test_writers_opening_one_store_at_once_create_it_once_and_the_other_waits_then_joins(tmp_path):
    spec = small_spec()
    url = str(tmp_path / "store.zarr")
    log = tmp_path / "log"
    log.mkdir()
    release = tmp_path / "release"
    first = _python(CREATOR, url, spec.canonical_json(), str(log), str(release), str(HANG_LIMIT_S), "first")
    wait_until(lambda: (log / "schedule-first").exists() or first.poll() is not None, "the first writer creates")
    second = _python(CREATOR, url, spec.canonical_json(), str(log), str(release), str(HANG_LIMIT_S), "second")
    wait_until(lambda: (log / "waited-second").exists() or second.poll() is not None, "the second writer waits")
    release.touch()
    results = [json.loads(_finished(process)) for process in (first, second)]
    assert results == [{"missing": list(range(spec.num_shards))}] * 2
    assert sorted(path.name for path in log.iterdir()) == ["schedule-first", "waited-second"]
    assert (log / "waited-second").read_text() == f"pid {first.pid} on {socket.gethostname()}"
    store = open_store(url, "r+", expected_spec=spec)
    fill_store(store)
    assert store.validate(deep=True).ok


def test_an_interrupted_creation_is_redone_and_a_store_of_another_spec_is_refused(tmp_path):
    spec = small_spec()
    url = str(tmp_path / "store.zarr")
    create_store(url, spec, *schedule(spec))
    metadata = tmp_path / "store.zarr" / "zarr.json"
    attributes = json.loads(metadata.read_text())
    attributes["attributes"]["format"] = "cmt-trajectory-store/creating"  # what a creator killed midway leaves
    metadata.write_text(json.dumps(attributes))
    with pytest.raises(SpecMismatchError, match="unfinished store of another spec"):
        open_or_create_store(url, small_spec(steps=3), lambda: schedule(small_spec(steps=3)))
    store = open_or_create_store(url, spec, lambda: schedule(spec))
    assert store.missing_shards() == list(range(spec.num_shards)) and store.validate().ok


def test_claims_and_joining_work_through_an_fsspec_url():
    spec = small_spec()
    url = "memory://claims/store.zarr"
    first, second = store_claims(url), store_claims(url)
    assert first.try_acquire("create") is None
    assert second.try_acquire("create").owner == first.owner, "exclusive create through fsspec's 'xb' mode"
    first.release("create")
    created = open_or_create_store(url, spec, lambda: schedule(spec), claims=second)
    joined = open_or_create_store(url, spec, lambda: pytest.fail("a store that exists is joined, not created"))
    assert created.spec == joined.spec and joined.missing_shards() == list(range(spec.num_shards))
    assert second.try_acquire("0") is None
    with pytest.raises(ClaimLostError):
        created.write_shard(0, *shard_data(spec, 0), claims=first)
    created.write_shard(0, *shard_data(spec, 0), claims=second)
    second.release("0")
    assert joined.shard_digest(0) is not None and store_claims(url).records() == {}
