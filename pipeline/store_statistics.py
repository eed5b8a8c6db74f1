"""Out-of-core statistics of a trajectory store with dask: `python -m pipeline.store_statistics URL [--strip PNG]`.

Per time point: mean and std of x_t, NaN/Inf counts; for the endpoint, its value range. Only committed
shards are read, chunk by chunk (dask.array.from_zarr), so the store is never loaded into memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np

from storage_schema import StoreError, open_store


def committed_trajectories(store) -> da.Array:
    """Lazy dask view [n, K+1, *S] over the committed shards of a store, one dask chunk per zarr chunk."""
    traj = da.from_zarr(store.array("traj"))
    parts = [traj[slice(*store.spec.shard_bounds(i))] for i in store.committed_shards()]
    if not parts:
        raise StoreError(f"{store.url}: no committed shards to inspect; run or resume pipeline/generate.py first")
    return da.concatenate(parts, axis=0)


def _chunk_partials(block: np.ndarray) -> dict[str, np.ndarray]:
    """Per-point partial sums of one chunk [n, K+1, *S]: finite count, Σx, Σx², NaN, Inf, endpoint min/max."""
    x = block.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    finite = np.isfinite(x)
    clean = np.where(finite, x, 0.0)
    endpoint = x[:, -1][finite[:, -1]]
    return {
        "count": finite.sum(axis=axes),
        "sum": clean.sum(axis=axes),
        "sumsq": (clean**2).sum(axis=axes),
        "nan": np.isnan(x).sum(axis=axes),
        "inf": np.isinf(x).sum(axis=axes),
        "end_min": endpoint.min(initial=np.inf),
        "end_max": endpoint.max(initial=-np.inf),
    }


def _combine(partials: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Sum the per-chunk partials (min/max for the endpoint range)."""
    combined = {key: sum(p[key] for p in partials) for key in ("count", "sum", "sumsq", "nan", "inf")}
    combined["end_min"] = min(p["end_min"] for p in partials)
    combined["end_max"] = max(p["end_max"] for p in partials)
    return combined


def trajectory_statistics(store) -> dict[str, Any]:
    """Per-point mean/std/NaN/Inf of x_t and the endpoint range, one zarr chunk in memory at a time (float64 sums)."""
    x = committed_trajectories(store)  # [n, K+1, *S]
    partials = [dask.delayed(_chunk_partials)(block) for block in x.to_delayed().ravel()]
    (total,) = dask.compute(dask.delayed(_combine)(partials))
    mean = total["sum"] / total["count"]
    std = np.sqrt(np.maximum(total["sumsq"] / total["count"] - mean**2, 0.0))
    return {
        "url": store.url,
        "trajectories": int(x.shape[0]),
        "points": [
            {
                "index": i,
                "alpha": float(store.alpha[i]),
                "sigma": float(store.sigma[i]),
                "mean": float(mean[i]),
                "std": float(std[i]),
                "nan": int(total["nan"][i]),
                "inf": int(total["inf"][i]),
            }
            for i in range(len(mean))
        ],
        "endpoint_min": float(total["end_min"]),
        "endpoint_max": float(total["end_max"]),
    }


def save_strip(store, path: str, *, num_trajectories: int = 4) -> str:
    """PNG strip: one row per trajectory, noise (left) to sample (right), each point shown as x_t/√(α²+σ²)."""
    from pipeline.png_grid import save_grid

    first = store.committed_shards()[0]
    start, stop = store.spec.shard_bounds(first)
    points = store.read_points(start, min(stop, start + num_trajectories)).astype(np.float32)  # [n, K+1, *S]
    scale = np.sqrt(store.alpha**2 + store.sigma**2).astype(np.float32)  # [K+1]
    points = points / scale.reshape((1, -1) + (1,) * (points.ndim - 2))
    images = points.reshape((-1,) + points.shape[2:])[:, :3]  # [n·(K+1), C≤3, H, W]
    save_grid(np.clip(images, -1, 1), path, nrow=points.shape[1])
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: print statistics (text or --json), optionally write a PNG strip."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.store_statistics", description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--strip", default=None, help="write a PNG strip of a few trajectories here")
    parser.add_argument("--strip-trajectories", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        store = open_store(args.url, "r")
        stats = trajectory_statistics(store)
        if args.strip:
            save_strip(store, args.strip, num_trajectories=args.strip_trajectories)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"{stats['url']}: {stats['trajectories']} committed trajectories")
        print(f"{'i':>3} {'alpha':>10} {'sigma':>10} {'mean':>10} {'std':>10} {'nan':>6} {'inf':>6}")
        for p in stats["points"]:
            print(f"{p['index']:>3} {p['alpha']:>10.4g} {p['sigma']:>10.4g} {p['mean']:>10.4f} {p['std']:>10.4f} {p['nan']:>6} {p['inf']:>6}")
        print(f"endpoint range [{stats['endpoint_min']:.4f}, {stats['endpoint_max']:.4f}]")
    bad = sum(p["nan"] + p["inf"] for p in stats["points"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
