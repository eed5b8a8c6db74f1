"""s3:// stores for real: a moto S3 server on loopback, s3fs as the filesystem, the standard AWS variables only.

Store round trip and `validate --deep` from the CLI, mid-training streaming from S3, `pipeline/generate.py --out s3://`
and a writer killed half-way through a shard then resumed by the same command.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from diffusers import DDPMPipeline, DDPMScheduler

from pipeline.fault_points import hold_line, shard_stage
from pipeline.teacher import load_teacher
from storage_schema import open_store
from tests.helpers import HANG_LIMIT_S, process_ended, tiny_unet, wait_until, write_solved_store
from tests.s3_server import new_bucket, object_digests
from tests.test_generate import _cli_args, _spawn_generate, _summary
from tests.test_mid import TINY_PRESET, logged_losses
from trainer.config import load_config
from trainer.mid import MidConfig, run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A saved tiny DDPMPipeline teacher directory."""
    path = tmp_path_factory.mktemp("s3_teacher") / "tiny"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def solved(teacher_dir, tmp_path_factory, s3_server) -> dict[str, str]:
    """The same 4-shard store (32 trajectories × 5 points) written to local disk and to S3 by storage_schema."""
    teacher = load_teacher(teacher_dir)
    local = tmp_path_factory.mktemp("s3_local") / "store.zarr"
    remote = f"{new_bucket()}/trajectories/store.zarr"
    for url in (local, remote):
        write_solved_store(teacher, url, num_trajectories=32, steps=4, shard_size=8)
    return {"local": str(local), "s3": remote}


def local_digests(path: Path) -> dict[str, str]:
    """sha256 of every file of a local store, keyed by its path relative to the store."""
    files = (f for f in path.rglob("*") if f.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_an_s3_store_holds_the_same_objects_as_on_disk_and_validates_deep_from_the_cli(solved):
    assert object_digests(solved["s3"]) == local_digests(Path(solved["local"]))
    done = subprocess.run([sys.executable, "-m", "storage_schema", "validate", solved["s3"], "--deep", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["deep"] and report["checked_shards"] == [0, 1, 2, 3], report
    described = open_store(solved["s3"]).describe()
    assert described["bytes_stored"] == open_store(solved["local"]).describe()["bytes_stored"] > 0


def test_mid_training_streams_from_an_s3_store_exactly_as_from_disk(teacher_dir, solved, tmp_path):
    overrides = ["loop.total_steps=3", "loop.checkpoint_every_steps=3", "stream.num_workers=1"]
    local_dir, s3_dir = tmp_path / "local", tmp_path / "s3"
    local = run(load_config(MidConfig, TINY_PRESET, [
        f"teacher={teacher_dir}", f"stores=[{solved['local']}]", f"loop.output_dir={local_dir}", *overrides]))
    assert local.loop.final_step == 3
    trained = subprocess.run(
        [sys.executable, "trainer/mid.py", "--config", str(TINY_PRESET), f"teacher={teacher_dir}",
         f"stores=[{solved['s3']}]", f"loop.output_dir={s3_dir}", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT_S,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert sorted(logged_losses(s3_dir)) == [1, 2, 3]
    assert logged_losses(s3_dir) == logged_losses(local_dir)  # the same batches: floats compared exactly


def test_the_cache_cli_lists_shows_and_removes_stores_under_an_s3_cache_root(teacher_dir, s3_server):
    root = f"{new_bucket()}/trajectories"
    teacher = load_teacher(teacher_dir)
    for name, shards in (("complete", None), ("partial", [1])):
        write_solved_store(teacher, f"{root}/{name}.zarr", num_trajectories=16, steps=2, shard_size=8, shards=shards)

    def cache(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cache", "--cache-root", root, *args], cwd=REPO,
                              capture_output=True, text=True, timeout=HANG_LIMIT_S)

    listed = cache("--json", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {row["key"]: row for row in json.loads(listed.stdout)}
    assert {key: row["shards"] for key, row in rows.items()} == {"complete": "2/2", "partial": "1/2"}
    assert rows["complete"]["path"] == f"{root}/complete.zarr"
    assert rows["complete"]["bytes"] == open_store(f"{root}/complete.zarr").describe()["bytes_stored"]
    shown = cache("show", "comp")
    assert shown.returncode == 0 and json.loads(shown.stdout)["shards_committed"] == 2, shown.stderr
    def stores_on_s3() -> set[str]:
        return {path.split("/", 1)[0] for path in object_digests(root)}

    assert cache("rm", "partial").returncode == 2 and stores_on_s3() == {"complete.zarr", "partial.zarr"}
    removed = cache("rm", "partial", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert stores_on_s3() == {"complete.zarr"}


@pytest.mark.slow  # botocore's credential chain takes ~18 s to give up, twice
def test_an_s3_output_without_credentials_is_refused_in_cli_words_and_a_dry_run_still_plans(teacher_dir, tmp_path):
    no_credentials = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    no_credentials.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                          AWS_EC2_METADATA_DISABLED="true")
    args = [sys.executable, str(REPO / "pipeline" / "generate.py"), *_cli_args(teacher_dir, "s3://nowhere/x.zarr")]
    refused = subprocess.run(args, cwd=REPO, env=no_credentials, capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert refused.returncode == 1 and "cannot open s3://nowhere/x.zarr" in refused.stderr, refused.stderr
    assert "AWS_ACCESS_KEY_ID" in refused.stderr and "nothing was written" in refused.stderr
    planned = subprocess.run([*args, "--dry-run"], cwd=REPO, env=no_credentials, capture_output=True, text=True,
                             timeout=HANG_LIMIT_S)
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["store_state"].startswith("unknown (NoCredentialsError") and plan["shards_to_write"] == 3


def _generate(args: list[str]) -> subprocess.CompletedProcess:
    """`python pipeline/generate.py ARGS` as a user types it."""
    return subprocess.run([sys.executable, str(REPO / "pipeline" / "generate.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=HANG_LIMIT_S)


@pytest.fixture(scope="module")
def generated(teacher_dir, s3_server) -> str:
    """A store written by an uninterrupted `pipeline/generate.py --out s3://...` (3 shards, 40 trajectories)."""
    url = f"{new_bucket()}/reference.zarr"
    done = _generate(_cli_args(teacher_dir, url, num_workers=1))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _summary(done.stdout)["trajectories_written"] == 40
    return url


@pytest.mark.slow
def test_generate_writes_an_s3_store_that_validates_deep(generated):
    done = subprocess.run([sys.executable, "-m", "storage_schema", "validate", generated, "--deep",
                           "--require-complete"], cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout and "committed shards checked: 3" in done.stdout


@pytest.mark.slow
def test_a_writer_killed_half_way_through_a_shard_on_s3_is_resumed_by_the_same_command(
    teacher_dir, generated, tmp_path, monkeypatch
):
    url = f"{new_bucket()}/resumed.zarr"
    args = _cli_args(teacher_dir, url, num_workers=1)
    # hold after shard 1's traj object is on S3, before its seeds
    driver = _spawn_generate(args, hold_shard=1, hold_file=tmp_path / "never", stage="traj_written")
    output = []
    for line in driver.stdout:  # a hang here is caught by pytest's outer limit
        output.append(line)
        if hold_line(shard_stage("traj_written"), 1) in line:
            break
    writer_process = psutil.Process(int(output[-1].rsplit("pid=", 1)[1].split()[0]))
    writer_process.send_signal(signal.SIGKILL)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=HANG_LIMIT_S)
    wait_until(lambda: process_ended(writer_process), "the killed writer is gone")

    half_written = object_digests(url)
    assert "traj/c/1/0/0/0/0" in half_written and "commit/c/1/0" not in half_written, sorted(half_written)
    assert open_store(url).committed_shards() == [0], "".join(output)

    resumed = _generate(args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _summary(resumed.stdout)["trajectories_written"] == 16 + 8, "only shards 1 and 2 were generated again"
    assert open_store(url).validate(deep=True).ok
    assert object_digests(url) == object_digests(generated)
