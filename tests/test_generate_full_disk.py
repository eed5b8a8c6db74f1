"""Generation onto a full device: a real size-limited tmpfs in a private user+mount namespace (`unshare -rm`, no root
needed), so the mount never exists outside it. The run stops with a clear error, the committed shards stay valid and
resumable, nothing half-written counts as committed, and after space is freed the same command completes the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from diffusers import DDPMPipeline, DDPMScheduler

from storage_schema import open_store
from tests.helpers import HANG_LIMIT_S, wait_until
from tests.test_generate import store_files, tiny_unet

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096  # tmpfs allocates whole pages
NUM_TRAJECTORIES, SHARD_SIZE = 96, 32  # 3 shards of about 18 pages each
SHARDED_ARRAYS = ("traj", "seed", "label", "commit")
pytestmark = pytest.mark.slow  # three generate runs with a Ray cluster each: minutes on 2 cores

# Runs inside `unshare -rm`: mounts the tmpfs, leaves `budget` bytes free with a filler file, generates (fills up),
# validates, copies the store out, frees the filler, runs the same command again, validates, copies the store out.
IN_NAMESPACE = r"""
import json, os, shutil, subprocess, sys
mount, budget, outside, hang_limit_s = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
command = json.loads(sys.argv[5])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mount], check=True)
stat = os.statvfs(mount)
with open(os.path.join(mount, "filler"), "wb") as filler:
    filler.write(b"\0" * (stat.f_bavail * stat.f_frsize - budget))
store = os.path.join(mount, "store.zarr")
steps = {}
for name in ("full", "freed"):
    done = subprocess.run(command + ["--out", store], capture_output=True, text=True, timeout=hang_limit_s)
    check = subprocess.run([sys.executable, "-m", "storage_schema", "validate", store, "--deep", "--json"],
                           capture_output=True, text=True, timeout=hang_limit_s)
    steps[name] = {"status": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
                   "validate_status": check.returncode, "validate": check.stdout + check.stderr}
    shutil.copytree(store, os.path.join(outside, name))
    if name == "full":
        os.remove(os.path.join(mount, "filler"))
with open(os.path.join(outside, "steps.json"), "w") as handle:
    json.dump(steps, handle)
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A saved tiny DDPMPipeline teacher directory."""
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(path)
    return path


def _command(teacher: Path) -> list[str]:
    """The generate command a user types (float32: trajectories that barely compress, so shards are pages large)."""
    return [sys.executable, str(REPO / "pipeline" / "generate.py"), "--teacher", str(teacher), "--num-trajectories",
            str(NUM_TRAJECTORIES), "--steps", "8", "--shard-size", str(SHARD_SIZE), "--dtype", "float32",
            "--no-progress"]


def _pages(size: int) -> int:
    """Bytes a file of `size` bytes takes on tmpfs."""
    return -(-size // PAGE) * PAGE


def _shard_of(name: str) -> int | None:
    """The shard an object of the store belongs to ("traj/c/2/0/0/0/0", "seed/c/2", "commit/c/2/0"), else None."""
    parts = name.split("/")
    return int(parts[2]) if len(parts) >= 3 and parts[0] in SHARDED_ARRAYS and parts[1] == "c" else None


def _mounted_anywhere(mount: Path) -> bool:
    """Whether any process on this machine still sees a mount at `mount`."""
    for process in psutil.process_iter():
        try:
            with open(f"/proc/{process.pid}/mountinfo") as handle:
                if f" {mount} " in handle.read():
                    return True
        except OSError:
            continue
    return False


def test_a_full_disk_stops_with_a_clear_error_and_the_same_command_completes_after_space_is_freed(teacher, tmp_path):
    reference = tmp_path / "reference.zarr"
    done = subprocess.run(_command(teacher) + ["--out", str(reference)], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_LIMIT_S)
    assert done.returncode == 0, done.stderr
    sizes = {name: (reference / name).stat().st_size for name in store_files(reference)}
    shard_bytes = [sum(_pages(size) for name, size in sizes.items() if _shard_of(name) == shard)
                   for shard in range(NUM_TRAJECTORIES // SHARD_SIZE)]
    metadata = sum(_pages(size) for name, size in sizes.items() if _shard_of(name) is None)
    # Room for the metadata (zarr.json twice: it is rewritten through a temporary file), the claims of two shards,
    # shard 0 and half of shard 1: the first shard commits, a later one meets the full device.
    budget = metadata + _pages(sizes["zarr.json"]) + 2 * PAGE + shard_bytes[0] + shard_bytes[1] // 2

    mount, outside = tmp_path / "tmpfs", tmp_path / "copied"
    mount.mkdir()
    outside.mkdir()
    namespace = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", IN_NAMESPACE, str(mount), str(budget), str(outside),
         str(HANG_LIMIT_S), json.dumps(_command(teacher))],
        cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT_S,
    )
    assert namespace.returncode == 0, namespace.stderr
    wait_until(lambda: not _mounted_anywhere(mount), "no process sees the tmpfs once the namespace has ended")
    assert list(mount.iterdir()) == [], "the store was written to the tmpfs, never to the directory under it"
    steps = json.loads((outside / "steps.json").read_text())

    full = steps["full"]
    assert full["status"] == 1, full["stdout"] + full["stderr"]
    error = full["stderr"]
    for words in ("no space left on device while writing shard", str(mount / "store.zarr"), "are kept and valid",
                  "Free space where the store lives", "re-run the same command"):
        assert words in error, error
    report = json.loads(full["validate"])
    assert full["validate_status"] == 0 and report["ok"], full["validate"]
    assert 1 <= len(report["checked_shards"]) < len(shard_bytes) and report["missing_shards"], report
    assert report["partial_files"] == {}, "zarr removed the temporary file of the write that failed"
    after_full = open_store(str(outside / "full"))
    assert after_full.committed_shards() == report["checked_shards"]
    assert after_full.validate(deep=True).ok, "every shard reported committed decodes and matches its digest"

    freed = steps["freed"]
    assert freed["status"] == 0, freed["stdout"] + freed["stderr"]
    assert json.loads(freed["validate"])["ok"]
    assert store_files(outside / "freed") == store_files(reference), "the completed store is the uninterrupted one"
