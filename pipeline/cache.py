"""Manage cached trajectory stores: `python -m pipeline.cache list|show|rm`.

Stores live at `<cache root>/<cache key>.zarr` (cache root: --cache-root, else $CMT_CACHE_DIR/trajectories,
else ~/.cache/cmt-pipeline/trajectories; local directories and fsspec URLs alike). Removing a store needs `--yes`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import fsspec

from pipeline.paths import join, location, trajectory_cache_root
from storage_schema import StoreError, open_store


def _filesystem(root: str):
    """The fsspec filesystem and path of a cache root (local directory or URL)."""
    return fsspec.core.url_to_fs(root)


def entry(root: str, name: str) -> dict[str, Any]:
    """One cached store: key, spec summary, size and completeness (or the problem opening it)."""
    fs, path = _filesystem(root)
    url = join(root, name)
    row: dict[str, Any] = {"key": name.removesuffix(".zarr"), "path": url, "bytes": fs.du(f"{path.rstrip('/')}/{name}")}
    try:
        store = open_store(url, "r")
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


def _store_names(root: str) -> list[str]:
    """Names of the `*.zarr` entries directly under the cache root, sorted."""
    fs, path = _filesystem(root)
    if not fs.isdir(path):
        return []
    return sorted(name for name in (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
                  if name.endswith(".zarr"))


def list_stores(root: str) -> list[dict[str, Any]]:
    """Every `*.zarr` store directly under the cache root, by key."""
    return [entry(root, name) for name in _store_names(root)]


def _find(root: str, key: str) -> str:
    """The name of the store whose key starts with `key` (a unique prefix is enough)."""
    matches = [name for name in _store_names(root) if name.startswith(key)]
    if len(matches) != 1:
        found = "no store" if not matches else f"{len(matches)} stores"
        raise SystemExit(f"error: {found} in {root} match key {key!r}; run `python -m pipeline.cache list` for the keys")
    return matches[0]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-root", default=None, help="directory or URL (default $CMT_CACHE_DIR/trajectories)")
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
        root = location(args.cache_root, named="--cache-root") if args.cache_root else trajectory_cache_root()
    except ValueError as error:
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
    name = _find(root, args.key)
    if args.command == "show":
        try:
            print(json.dumps(open_store(join(root, name), "r").describe(), indent=2, default=str))
        except StoreError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    if not args.yes:
        print(f"error: refusing to delete {join(root, name)} without --yes", file=sys.stderr)
        return 2
    fs, path = _filesystem(root)
    fs.rm(f"{path.rstrip('/')}/{name}", recursive=True)
    print(f"removed {join(root, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
