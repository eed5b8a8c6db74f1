"""`python -m storage_schema describe|validate URL`: inspect a trajectory store from the shell.

`validate URL --deep --uncommit-corrupt` also clears the commit record of every shard that fails the deep check, so
re-running the store's generation command regenerates exactly those shards (byte-identical to the originals).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from storage_schema.errors import StoreBusyError, StoreError
from storage_schema.opening import open_store

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_CANNOT_OPEN = 2
EXIT_BUSY = 3  # --remove-partial met a live writer


@dataclass(frozen=True)
class CliConfig:
    """One CLI invocation: which command, on which store, with which options."""

    command: str
    url: str
    deep: bool = False
    require_complete: bool = False
    remove_partial: bool = False
    uncommit_corrupt: bool = False


@dataclass(frozen=True)
class CliResult:
    """Exit status, JSON-ready payload and human-readable text of one invocation."""

    exit_code: int
    payload: dict[str, Any]
    text: str


def _describe_text(summary: dict[str, Any]) -> str:
    """Human-readable lines for a describe() summary."""
    ratio = summary["compression_ratio"]
    per_point = summary["traj_bytes_per_point"]
    lines = [
        f"store      {summary['url']}",
        f"key        {summary['key']}  (schema {summary['schema_version']}, written by {summary['package_version']})",
        f"teacher    {summary['teacher_fingerprint']}",
        f"solver     {summary['solver']}, {summary['steps']} steps, grid {summary['grid']}",
        f"traj       {summary['traj_shape']} {summary['dtype']}, codec {summary['codec']}, "
        f"chunks of {summary['chunk_size']}, shards of {summary['shard_size']}"
        + (", conditional" if summary["conditional"] else ""),
        f"shards     {summary['shards_committed']}/{summary['shards_total']} committed "
        f"({summary['trajectories_committed']}/{summary['num_trajectories']} trajectories)",
        f"bytes      {summary['bytes_stored']} stored, {summary['raw_float32_bytes']} as raw float32"
        + (f", ratio {ratio:.2f}" if ratio else "")
        + (f", {per_point:.1f} bytes/point" if per_point else ""),
    ]
    return "\n".join(lines)


def _validate_text(url: str, report: dict[str, Any]) -> str:
    """Human-readable lines for a validation report."""
    kind = "deep" if report["deep"] else "shallow"
    status = "OK" if report["ok"] else f"{len(report['problems'])} PROBLEM(S)"
    lines = [f"{kind} validation of {url}: {status}"]
    lines += [f"  problem: {problem}" for problem in report["problems"]]
    lines.append(f"  committed shards checked: {len(report['checked_shards'])}")
    missing = report["missing_shards"]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
        lines.append(f"  shards not committed ({len(missing)}): {shown}")
    removed, partial = report.get("removed_partial_files", {}), report["partial_files"]
    if removed:
        lines.append(f"  removed {len(removed)} partial file(s) of interrupted writes ({sum(removed.values())} bytes)")
    if partial:
        shown = ", ".join(sorted(partial)[:5]) + (", ..." if len(partial) > 5 else "")
        lines.append(
            f"  partial files of interrupted writes ({len(partial)}, {sum(partial.values())} bytes, never read): {shown}; "
            f"remove them with `python -m storage_schema validate {url} --remove-partial` when no writer is running"
        )
    if report.get("uncommitted_shards"):
        lines.append(
            f"  uncommitted the corrupt shards {report['uncommitted_shards']}: re-run the store's generation command "
            "to regenerate them (it writes only uncommitted shards)"
        )
    return "\n".join(lines)


def run(cfg: CliConfig) -> CliResult:
    """Execute one describe/validate command; never raises for store problems, reports them instead."""
    try:
        store = open_store(cfg.url, "r+" if cfg.uncommit_corrupt else "r")
    except StoreError as error:
        payload = {"ok": False, "error": type(error).__name__, "message": str(error)}
        return CliResult(EXIT_CANNOT_OPEN, payload, f"error: {type(error).__name__}: {error}")
    if cfg.command == "describe":
        summary = store.describe()
        return CliResult(EXIT_OK, summary, _describe_text(summary))
    removed = {}
    if cfg.remove_partial:
        try:
            removed = store.remove_partial_files()
        except StoreBusyError as error:
            payload = {"ok": False, "error": type(error).__name__, "message": str(error)}
            return CliResult(EXIT_BUSY, payload, f"error: {error}")
    report = {**store.validate(deep=cfg.deep).to_dict(), "removed_partial_files": removed}
    if cfg.uncommit_corrupt and cfg.deep:
        for shard in report["corrupt_shards"]:
            store.uncommit_shard(shard)
        report["uncommitted_shards"] = list(report["corrupt_shards"])
    if cfg.require_complete and report["missing_shards"]:
        report["problems"].append(f"{len(report['missing_shards'])} shard(s) not committed (--require-complete)")
        report["ok"] = False
    exit_code = EXIT_OK if report["ok"] else EXIT_PROBLEMS
    return CliResult(exit_code, report, _validate_text(cfg.url, report))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print text (or JSON with --json) and return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m storage_schema", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    describe = commands.add_parser("describe", help="summarise a store (spec, progress, bytes, compression)")
    validate = commands.add_parser("validate", help="check a store; exit status 1 on any problem")
    validate.add_argument("--deep", action="store_true", help="decode every committed shard and re-check its digest")
    validate.add_argument("--require-complete", action="store_true", help="treat uncommitted shards as problems")
    validate.add_argument("--remove-partial", action="store_true",
                          help="first delete the *.partial files of interrupted writes (refused while a writer runs)")
    validate.add_argument("--uncommit-corrupt", action="store_true",
                          help="with --deep: uncommit shards that fail it, so the generation command regenerates them")
    for sub in (describe, validate):
        sub.add_argument("url", help="store path or fsspec URL")
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    if getattr(args, "uncommit_corrupt", False) and not args.deep:
        parser.error("--uncommit-corrupt needs --deep (only the deep check finds corrupt shards)")
    result = run(
        CliConfig(
            command=args.command,
            url=args.url,
            deep=getattr(args, "deep", False),
            require_complete=getattr(args, "require_complete", False),
            remove_partial=getattr(args, "remove_partial", False),
            uncommit_corrupt=getattr(args, "uncommit_corrupt", False),
        )
    )
    if args.json:
        print(json.dumps(result.payload, indent=2, default=str))
    else:
        print(result.text, file=sys.stderr if result.exit_code in (EXIT_CANNOT_OPEN, EXIT_BUSY) else sys.stdout)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
