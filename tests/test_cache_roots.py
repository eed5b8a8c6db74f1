"""Cache roots and outputs as local paths or fsspec URLs through one code path (pipeline/paths.py).

In-process checks use fsspec's memory:// filesystem (one process); a URL whose filesystem package is missing (gs://
without gcsfs) is refused in the words the user typed, naming the package. The S3 protocol itself, against a real
S3-compatible server, is tested with the store's concurrency tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from diffusers import DDPMPipeline, DDPMScheduler

from pipeline import cache as cache_cli
from pipeline.generate import GenerateConfig, run
from pipeline.paths import LocationError, location, trajectory_cache_root
from pipeline.teacher import load_teacher
from pipeline.teacher_identity import teacher_identity
from tests.helpers import HANG_LIMIT_S, tiny_unet, write_solved_store

REPO = Path(__file__).resolve().parents[1]
GCSFS_MISSING = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("gcsfs") is not None, reason="needs an environment without gcsfs"
)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A saved DDPMPipeline with the tiny 1×8×8 UNet."""
    path = tmp_path_factory.mktemp("roots") / "teacher"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(path)
    return path


@pytest.fixture
def memory_root(monkeypatch) -> str:
    """CMT_CACHE_DIR set to a fresh memory:// URL."""
    root = f"memory://cmt-cache-{uuid.uuid4().hex}"
    monkeypatch.setenv("CMT_CACHE_DIR", root)
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root.removeprefix("memory://")):
        fs.rm(root.removeprefix("memory://"), recursive=True)


def test_locations_are_absolute_paths_or_checked_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert location("relative/dir", named="--out") == str(tmp_path / "relative" / "dir")
    assert location(f"file://{tmp_path}/x", named="--out") == f"{tmp_path}/x"
    assert location("memory://bucket/root/", named="CMT_CACHE_DIR") == "memory://bucket/root"
    with pytest.raises(LocationError, match=r"--cache-root=nosuch://x: fsspec knows no filesystem for nosuch://"):
        location("nosuch://x", named="--cache-root")


@GCSFS_MISSING
def test_a_url_whose_filesystem_package_is_missing_is_refused_naming_the_variable_and_the_package(teacher_dir, tmp_path):
    base = [sys.executable, str(REPO / "pipeline" / "generate.py"), "--teacher", str(teacher_dir),
            "--num-trajectories", "8", "--steps", "2", "--shard-size", "8", "--chunk-size", "8", "--no-progress"]
    env = dict(os.environ, CMT_CACHE_DIR="gs://bucket/cmt-cache")
    by_env = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert by_env.returncode == 1
    assert "CMT_CACHE_DIR=gs://bucket/cmt-cache" in by_env.stderr and "pip install gcsfs" in by_env.stderr
    by_flag = subprocess.run([*base, "--out", "gs://bucket/store.zarr"], cwd=REPO, capture_output=True, text=True,
                             timeout=HANG_LIMIT_S)
    assert by_flag.returncode == 1 and "--out=gs://bucket/store.zarr" in by_flag.stderr
    assert "'gcsfs'" in by_flag.stderr
    listing = subprocess.run([sys.executable, "-m", "pipeline.cache", "list"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=HANG_LIMIT_S)
    assert listing.returncode == 2 and "CMT_CACHE_DIR=gs://bucket/cmt-cache" in listing.stderr
    assert list(tmp_path.iterdir()) == [], "nothing was written"


def test_teacher_memos_and_planned_stores_live_under_a_url_cache_root(teacher_dir, memory_root, monkeypatch):
    identity = teacher_identity(str(teacher_dir))
    memos = fsspec.filesystem("memory").glob(f"{memory_root.removeprefix('memory://')}/teachers/*.json")
    assert len(memos) == 1 and json.loads(fsspec.filesystem("memory").cat_file(memos[0]))["fingerprint"] == identity.fingerprint

    def no_load(*args, **kwargs):
        raise AssertionError("the memo under the URL cache root must answer without loading the teacher")

    with monkeypatch.context() as patch:  # a dry run of a new store does load it, to check the solver and grid
        patch.setattr("pipeline.teacher.load_teacher", no_load)
        assert teacher_identity(str(teacher_dir)) == identity
    plan = run(GenerateConfig(teacher=str(teacher_dir), num_trajectories=8, steps=2, shard_size=8, chunk_size=8,
                              dry_run=True, progress=False)).summary["plan"]
    assert plan["url"].startswith(f"{memory_root}/trajectories/") and plan["store_state"] == "new"


def test_the_cache_cli_lists_stores_under_a_url_cache_root(teacher_dir, memory_root, capsys):
    teacher = load_teacher(teacher_dir)
    url = f"{trajectory_cache_root()}/solved.zarr"
    write_solved_store(teacher, url, num_trajectories=8, steps=2, shard_size=4, shards=[0])
    assert cache_cli.main(["--json", "list"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["key"], row["shards"], row["complete"]) for row in rows] == [("solved", "1/2", False)]
    assert rows[0]["path"] == url and rows[0]["bytes"] > 0
    assert cache_cli.main(["rm", "solved", "--yes"]) == 0
    assert not fsspec.filesystem("memory").exists(url.removeprefix("memory://"))


def test_bin_weights_convert_into_a_url_cache_root(tmp_path, memory_root):
    import torch

    model = tiny_unet()
    model.save_config(tmp_path / "unet")
    torch.save(dict(model.state_dict()), tmp_path / "unet" / "diffusion_pytorch_model.bin")
    teacher = load_teacher(tmp_path / "unet", scheduler=DDPMScheduler())
    converted = fsspec.filesystem("memory").glob(f"{memory_root.removeprefix('memory://')}/converted-weights/*/*")
    assert len(converted) == 1 and converted[0].endswith("/diffusion_pytorch_model.safetensors")
    expected = model.state_dict()
    assert all(np.array_equal(t.numpy(), expected[k].numpy()) for k, t in teacher.model.state_dict().items())
