"""`python -m pipeline.cache` and `python -m pipeline.store_statistics` on real stores written by storage_schema."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import dask
import numpy as np
import pytest
from PIL import Image

from pipeline.store_statistics import trajectory_statistics
from storage_schema import GenerationSpec, cache_path, create_store, open_store
from tests.helpers import HANG_LIMIT_S

REPO = Path(__file__).resolve().parents[1]


def make_store(url: str, *, num_trajectories=96, shard_size=32, chunk_size=16, steps=4, write=(0, 1, 2)) -> GenerationSpec:
    """A store of random trajectories with the given shards written and committed."""
    spec = GenerationSpec(
        teacher_fingerprint="f" * 64, sample_shape=(1, 8, 8), solver="euler", steps=steps, grid="logsnr",
        seed_base=0, num_trajectories=num_trajectories, shard_size=shard_size, chunk_size=chunk_size,
    )
    sigma = np.linspace(80.0, 0.0, steps + 1)
    store = create_store(url, spec, np.ones(steps + 1), sigma)
    rng = np.random.default_rng(0)
    for index in write:
        start, stop = spec.shard_bounds(index)
        traj = rng.normal(size=(stop - start, steps + 1, 1, 8, 8)) * (1 + sigma[None, :, None, None, None])
        store.write_shard(index, traj, np.arange(start, stop))
    return spec


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT_S)


def test_inspect_statistics_equal_numpy_over_committed_shards(tmp_path):
    url = str(tmp_path / "s.zarr")
    make_store(url, write=(0, 2))
    store = open_store(url)
    stats = trajectory_statistics(store)
    data = np.concatenate([store.read_shard(i)["traj"] for i in (0, 2)]).astype(np.float64)  # [64, 5, 1, 8, 8]
    assert stats["trajectories"] == 64
    np.testing.assert_allclose([p["mean"] for p in stats["points"]], data.mean(axis=(0, 2, 3, 4)), rtol=1e-9)
    np.testing.assert_allclose([p["std"] for p in stats["points"]], data.std(axis=(0, 2, 3, 4)), rtol=1e-6)
    assert stats["endpoint_max"] == data[:, -1].max() and all(p["nan"] == 0 for p in stats["points"])


def _peak_bytes_of_statistics(url: str) -> int:
    """Peak traced allocation while computing a store's statistics (numpy allocations are traced)."""
    store = open_store(url)
    with dask.config.set(scheduler="synchronous"):
        tracemalloc.start()
        trajectory_statistics(store)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_inspect_memory_does_not_grow_with_the_store(tmp_path):
    small, big = str(tmp_path / "small.zarr"), str(tmp_path / "big.zarr")
    make_store(small, num_trajectories=1024, shard_size=256, chunk_size=128, steps=8, write=range(4))
    make_store(big, num_trajectories=8192, shard_size=256, chunk_size=128, steps=8, write=range(32))
    peak_small, peak_big = _peak_bytes_of_statistics(small), _peak_bytes_of_statistics(big)
    added_float16_bytes = (8192 - 1024) * 9 * 64 * 2
    # 8× the data: the peak grows only by dask's per-task bookkeeping, a small fraction of the added bytes.
    assert peak_big - peak_small < added_float16_bytes / 4, (peak_small, peak_big, added_float16_bytes)


def test_inspect_cli_writes_a_strip_and_counts_nan(tmp_path):
    url = str(tmp_path / "s.zarr")
    make_store(url)
    strip = tmp_path / "strip.png"
    done = _cli("pipeline.store_statistics", url, "--json", "--strip", str(strip), "--strip-trajectories", "3")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["points"]) == 5
    width, height = Image.open(strip).size
    assert width > height > 0, "one row per trajectory, one column per time point"

    store = open_store(url, "r+")
    bad = store.read_shard(1)["traj"]
    bad[0, 2, 0, 0, 0] = np.nan
    store.write_shard(1, bad, np.arange(32, 64), repair=True)
    done = _cli("pipeline.store_statistics", url, "--json")
    assert done.returncode == 1
    assert [p["nan"] for p in json.loads(done.stdout)["points"]] == [0, 0, 1, 0, 0]


def test_a_strip_is_written_without_importing_torch_or_the_trainer(tmp_path):
    """pipeline/store_statistics.py is torch-free (ARCHITECTURE.md): its strips go through pipeline/png_grid.py."""
    url = str(tmp_path / "s.zarr")
    make_store(url)
    strip = tmp_path / "strip.png"
    script = (
        "import sys\n"
        "from storage_schema import open_store\n"
        "from pipeline.store_statistics import save_strip\n"
        f"save_strip(open_store({url!r}), {str(strip)!r}, num_trajectories=2)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'trainer'}))"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_LIMIT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert Image.open(strip).size[0] > 0


def test_inspect_refuses_a_path_that_is_not_a_store(tmp_path):
    done = _cli("pipeline.store_statistics", str(tmp_path))
    assert done.returncode == 1 and "error" in done.stderr


@pytest.fixture
def cache_root(tmp_path) -> Path:
    """A cache root holding one complete and one partial store at their canonical paths."""
    root = tmp_path / "cache"
    make_store(cache_path(str(root), GenerationSpec(
        teacher_fingerprint="f" * 64, sample_shape=(1, 8, 8), solver="euler", steps=4, grid="logsnr",
        seed_base=0, num_trajectories=96, shard_size=32, chunk_size=16)))
    make_store(str(root / "partial.zarr"), write=(1,))
    return root


def test_cache_list_show_and_rm_with_confirmation(cache_root):
    listed = _cli("pipeline.cache", "--cache-root", str(cache_root), "--json", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {row["key"]: row for row in json.loads(listed.stdout)}
    assert sorted(row["shards"] for row in rows.values()) == ["1/3", "3/3"]
    complete_key = next(k for k, row in rows.items() if row["complete"])

    shown = _cli("pipeline.cache", "--cache-root", str(cache_root), "show", complete_key[:8])
    assert shown.returncode == 0 and json.loads(shown.stdout)["num_trajectories"] == 96

    refused = _cli("pipeline.cache", "--cache-root", str(cache_root), "rm", complete_key)
    assert refused.returncode == 2 and (cache_root / f"{complete_key}.zarr").exists()
    removed = _cli("pipeline.cache", "--cache-root", str(cache_root), "rm", complete_key, "--yes")
    assert removed.returncode == 0 and not (cache_root / f"{complete_key}.zarr").exists()
    assert (cache_root / "partial.zarr").exists()
