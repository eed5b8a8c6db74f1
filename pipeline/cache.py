"""Manage cached trajectory stores: `python -m pipeline.cache list|show|rm`.

Stores live at `<cache root>/<cache key>.zarr`. The cache root is a directory or an fsspec URL such as
`s3://bucket/trajectories` (--cache-root, else $CMT_CACHE_DIR/trajectories, else ~/.cache/cmt-pipeline/trajectories).
Removing a store needs `--yes`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import fsspec

from pipeline import paths
from storage_schema import StoreError, open_store


def _stores(root: str) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The filesystem of a cache root and its `*.zarr` entries, {store location (path or URL, under root as given): fsspec
    info}."""
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.isdir(path):
        return fs, {}
    named = {info["name"].rstrip("/").rsplit("/", 1)[-1]: info for info in fs.ls(path, detail=True)
             if info["type"] == "directory"}
    return fs, {paths.join(root, name): info for name, info in named.items() if name.endswith(".zarr")}


def _key(location: str) -> str:
    """Cache key of a store location: its last path component without `.zarr`."""
    return location.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")


def entry(fs: Any, location: str) -> dict[str, Any]:
    """One cached store: key, spec summary, bytes stored and completeness (or the problem opening it)."""
    row: dict[str, Any] = {"key": _key(location), "path": location, "bytes": fs.du(location)}
    try:
        store = open_store(location, "r")
    except StoreError as error:
        row["error"] = str(error)
        return row
    spec = store.spec
    committed = len(store.committed_shards())
    row.update(
        teacher=spec.teacher_fingerprint[:12],
        solver=spec.solver,
        steps=spec.steps,
        grid=spec.grid,
        trajectories=spec.num_trajectories,
        shape=list(spec.sample_shape),
        dtype=spec.dtype,
        shards=f"{committed}/{store.num_shards}",
        complete=committed == store.num_shards,
    )
    return row


def list_stores(root: str) -> list[dict[str, Any]]:
    """Every `*.zarr` store directly under the cache root, oldest first (by key where no time is kept, as on S3)."""
    fs, stores = _stores(root)
    ordered = sorted(stores, key=lambda location: (stores[location].get("mtime", 0), location))
    return [entry(fs, location) for location in ordered]


def _find(root: str, key: str) -> tuple[Any, str]:
    """The filesystem and location of the store whose key starts with `key` (a unique prefix is enough)."""
    fs, stores = _stores(root)
    matches = [location for location in stores if _key(location).startswith(key)]
    if len(matches) != 1:
        found = "no store" if not matches else f"{len(matches)} stores"
        raise SystemExit(f"error: {found} in {root} match key {key!r}; run `python -m pipeline.cache list` for the keys")
    return fs, matches[0]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-root", default=None, help="cache directory or URL (s3://bucket/trajectories ...)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list cached stores")
    show = commands.add_parser("show", help="describe one store")
    show.add_argument("key")
    remove = commands.add_parser("rm", help="delete one store")
    remove.add_argument("key")
    remove.add_argument("--yes", action="store_true", help="confirm the deletion")
    args = parser.parse_args(argv)
    try:
        root = paths.location(args.cache_root, named="--cache-root") if args.cache_root else paths.trajectory_cache_root()
    except paths.LocationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.command == "list":
        rows = list_stores(root)
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no cached stores in {root}")
        for row in [] if args.json else rows:
            if "error" in row:
                print(f"{row['key']}  unreadable: {row['error']}")
                continue
            print(
                f"{row['key']}  {row['shards']:>7} shards  {row['trajectories']:>7} traj  K={row['steps']:<3} "
                f"{row['solver']}/{row['grid']}  {row['dtype']}  {row['bytes'] / 2**20:8.1f} MiB  teacher {row['teacher']}"
            )
        return 0
    fs, location = _find(root, args.key)
    if args.command == "show":
        try:
            print(json.dumps(open_store(location, "r").describe(), indent=2, default=str))
        except StoreError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    if not args.yes:
        print(f"error: refusing to delete {location} without --yes", file=sys.stderr)
        return 2
    fs.rm(location, recursive=True)
    print(f"removed {location}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
