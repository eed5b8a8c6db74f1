"""Manage cached trajectory stores: `python -m pipeline.cache list|show|rm`.

Stores live at `<cache root>/<cache key>.zarr` (cache root: --cache-root, else $CMT_CACHE_DIR/trajectories,
else ~/.cache/cmt-pipeline/trajectories). Removing a store needs `--yes`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from pipeline.paths import trajectory_cache_root
from storage_schema import StoreError, open_store


def _size_on_disk(path: Path) -> int:
    """Bytes of every file below path."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def entry(path: Path) -> dict[str, Any]:
    """One cached store: key, spec summary, size on disk and completeness (or the problem opening it)."""
    row: dict[str, Any] = {"key": path.name.removesuffix(".zarr"), "path": str(path), "bytes": _size_on_disk(path)}
    try:
        store = open_store(str(path), "r")
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


def list_stores(root: Path) -> list[dict[str, Any]]:
    """Every `*.zarr` directory directly under the cache root, oldest first."""
    if not root.is_dir():
        return []
    return [entry(p) for p in sorted(root.glob("*.zarr"), key=lambda p: p.stat().st_mtime)]


def _find(root: Path, key: str) -> Path:
    """The store whose key starts with `key` (a unique prefix is enough)."""
    matches = [p for p in root.glob("*.zarr") if p.name.startswith(key)]
    if len(matches) != 1:
        found = "no store" if not matches else f"{len(matches)} stores"
        raise SystemExit(f"error: {found} in {root} match key {key!r}; run `python -m pipeline.cache list` for the keys")
    return matches[0]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-root", type=Path, default=None)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list cached stores")
    show = commands.add_parser("show", help="describe one store")
    show.add_argument("key")
    remove = commands.add_parser("rm", help="delete one store")
    remove.add_argument("key")
    remove.add_argument("--yes", action="store_true", help="confirm the deletion")
    args = parser.parse_args(argv)
    root = args.cache_root or trajectory_cache_root()

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
    path = _find(root, args.key)
    if args.command == "show":
        try:
            print(json.dumps(open_store(str(path), "r").describe(), indent=2, default=str))
        except StoreError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    if not args.yes:
        print(f"error: refusing to delete {path} without --yes", file=sys.stderr)
        return 2
    shutil.rmtree(path)
    print(f"removed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
