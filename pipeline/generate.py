"""Distributed trajectory generation: a Ray job that writes every teacher PF-ODE trajectory into a Zarr store.

    python pipeline/generate.py --teacher DIR --steps 16 --num-trajectories 4096
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipeline/generate.py ...

The unit of work is one shard of the store. Each Ray actor loads the teacher once and writes whole shards,
only its own. Sample i's prior noise depends only on (seed, i), so the store's bytes do not depend on the
number of workers, the shard order or interruptions; re-running the same command resumes (committed shards
are skipped) and a complete store is a cache hit that costs no teacher evaluation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.generate_options import GenerateConfig, GenerateError, parse_args, resolve_defaults, resolve_precision
from pipeline.paths import CACHE_ENV_VAR, LocationError, join, location, trajectory_cache_root
from pipeline.ray_cluster import check_cluster, connect_ray  # sets Ray's environment before anything imports Ray
from pipeline.shard_dispatch import DispatchOutcome, ShardDispatcher, is_no_space
from pipeline.shard_worker import labels_for, start_shard_workers
from pipeline.teacher_identity import TeacherIdentity, teacher_identity
from storage_schema import (
    CREATE,
    ClaimRecord,
    GenerationSpec,
    NotAStoreError,
    ShardClaims,
    SpecMismatchError,
    StoreError,
    TrajectoryStore,
    cache_path,
    create_store,
    open_or_create_store,
    open_store,
    store_claims,
)
from storage_schema.spec import has_url_scheme

SUMMARY_PREFIX = "GENERATE_SUMMARY "


@dataclass(frozen=True)
class GenerateResult:
    """What a job did: where the store is, whether it was a cache hit, and what it cost."""

    url: str
    cache_hit: bool
    dry_run: bool
    shards_written: tuple[int, ...]
    trajectories_written: int
    teacher_forward_samples: int
    seconds: float
    summary: dict[str, Any]


def _check_labels_option(cfg: GenerateConfig, num_classes: int | None) -> None:
    """Refuse conditioning options that do not fit the teacher."""
    if num_classes is None and cfg.labels is not None:
        raise GenerateError("--labels was given but the teacher is unconditional: drop --labels")
    if num_classes is None and cfg.guidance is not None:
        raise GenerateError("--guidance was given but the teacher is unconditional: drop --guidance")
    labels_for(np.arange(1), cfg.labels, num_classes, cfg.seed)


def _check_writable(url: str) -> None:
    """Refuse a local output location that cannot be created or written, before any teacher work."""
    if has_url_scheme(url):
        return
    path = Path(url)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK) or (probe == path and not probe.is_dir()):
        raise GenerateError(
            f"output {url} is not writable ({probe} does not allow writing): choose --out or --cache-root "
            f"in a directory you can write to"
        )


UNRESOLVED_FINGERPRINT = "unresolved"
# Stored bytes over raw bytes of the storage dtype with the default codec, measured on digits trajectories by
# jobs/bench_generate.py (float16: 0.416 of float32 = 0.83 of float16; float32: 0.79); an estimate elsewhere.
ESTIMATED_COMPRESSION = {"float16": 0.83, "float32": 0.79}


def _identity_for(cfg: GenerateConfig) -> TeacherIdentity:
    """The teacher's identity; a dry run of a teacher that cannot be loaded here plans with the declared shape."""
    try:
        return teacher_identity(cfg.teacher, cfg.revision, cfg.scheduler)
    except Exception as error:  # noqa: BLE001 - only a dry run with a declared shape may go on without the teacher
        if not (cfg.dry_run and cfg.sample_shape):
            raise
        print(f"note: teacher {cfg.teacher} is not available here ({str(error).splitlines()[0]}); planning with the "
              f"declared sample_shape {list(cfg.sample_shape)}; the cache key is provisional", file=sys.stderr)
        return TeacherIdentity(UNRESOLVED_FINGERPRINT, tuple(cfg.sample_shape), cfg.num_classes)


def build_spec(cfg: GenerateConfig, teacher: TeacherIdentity, precision: str = "fp32") -> GenerationSpec:
    """The store's generation spec for this job, teacher and teacher precision (the cache key is derived from it)."""
    grid_params = tuple(
        (name, float(value)) for name, value in (("sigma_max", cfg.sigma_max), ("sigma_min", cfg.sigma_min)) if value is not None
    )
    return GenerationSpec(
        teacher_fingerprint=teacher.fingerprint,
        sample_shape=tuple(int(s) for s in teacher.sample_shape),
        solver=cfg.solver,
        steps=cfg.steps,
        grid=cfg.grid,
        seed_base=cfg.seed,
        num_trajectories=cfg.num_trajectories,
        shard_size=cfg.shard_size,
        chunk_size=cfg.chunk_size,
        dtype=cfg.dtype,
        codec=cfg.codec,
        guidance_scale=cfg.guidance,
        num_classes=teacher.num_classes,
        label_plan=None if teacher.num_classes is None else (cfg.labels or "uniform"),
        grid_params=grid_params,
        teacher_precision=precision,
    )


def forward_evaluations_per_trajectory(solver: str, steps: int, guidance: float | None) -> int:
    """Network evaluations per trajectory: K (2K−1 for Heun), doubled under classifier-free guidance."""
    per = 2 * steps - 1 if solver == "heun" else steps
    return per * (2 if guidance is not None and guidance != 1.0 else 1)


def _bytes_to_write(spec: GenerationSpec, missing: Sequence[int]) -> tuple[int, int, int]:
    """(trajectories, uncompressed bytes, estimated stored bytes) of the shards `missing`."""
    per_traj_raw = (spec.steps + 1) * int(np.prod(spec.sample_shape)) * np.dtype(spec.dtype).itemsize
    trajectories = sum(spec.shard_bounds(i)[1] - spec.shard_bounds(i)[0] for i in missing)
    return trajectories, trajectories * per_traj_raw, int(trajectories * per_traj_raw * ESTIMATED_COMPRESSION[spec.dtype])


def _plan(
    cfg: GenerateConfig, spec: GenerationSpec, url: str, missing: Sequence[int], state: str, precision_source: str
) -> dict[str, Any]:
    """The job's plan: shards, bytes, teacher evaluations and their cost, each number with its source."""
    from pipeline.cost import cost_plan, teacher_forward_macs

    missing_traj, raw_bytes, stored_bytes = _bytes_to_write(spec, missing)
    forward = int(missing_traj * forward_evaluations_per_trajectory(spec.solver, spec.steps, spec.guidance_scale))
    macs, macs_source = teacher_forward_macs(cfg.teacher, cfg.revision)
    workers = min(cfg.num_workers, max(1, len(missing)))
    return {
        "url": url,
        "spec": spec.to_dict(),
        "cache_key": spec.cache_key() + (" (provisional: teacher not loaded)" if spec.teacher_fingerprint == UNRESOLVED_FINGERPRINT else ""),
        "store_state": state,
        "shards_total": spec.num_shards,
        "shards_to_write": len(missing),
        "trajectories_to_write": missing_traj,
        "points_per_trajectory": spec.steps + 1,
        "uncompressed_bytes_to_write": raw_bytes,
        "estimated_stored_bytes": stored_bytes,
        "teacher_forward_samples": forward,
        "workers": workers,
        **cost_plan(
            forward, macs=macs, macs_source=macs_source, precision=spec.teacher_precision,
            precision_source=precision_source, gpu=cfg.gpu, gpus=cfg.num_workers * cfg.gpus_per_worker,
            measured=cfg.forward_samples_per_gpu_s, measured_source=cfg.throughput_source,
        ),
    }


def _existing_store(url: str, spec: GenerationSpec, overwrite: bool) -> tuple[TrajectoryStore | None, bool]:
    """The store of this spec already at url (None when there is none), and whether a store of another spec that lies
    there is to be replaced (--overwrite)."""
    try:
        return open_store(url, "r", expected_spec=spec), False
    except NotAStoreError:
        return None, False
    except SpecMismatchError as error:
        if overwrite:
            return None, True
        raise GenerateError(
            f"{error}\nThe store at {url} was made from another spec and was left untouched: choose another --out, "
            f"use the cache (--cache-root, the default) or pass --overwrite to replace it"
        ) from error


def _unreachable_message(url: str, error: Exception) -> str:
    """Why the output location could not be opened, and what the user sets to fix it."""
    return (
        f"cannot open {url} ({type(error).__name__}: {error}); nothing was written. Install the fsspec backend for "
        f"this URL (s3://: pip install -e '.[s3]') and give it credentials and an endpoint the standard way (S3: "
        f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, plus AWS_ENDPOINT_URL for an S3-compatible server), "
        f"or choose another --out / --cache-root"
    )


def _run_shards(cfg: GenerateConfig, store: TrajectoryStore, claims: ShardClaims, missing: list[int]) -> DispatchOutcome:
    """Write the missing shards this run can claim on Ray actors, wait for the ones other runs hold; live progress bar."""
    from tqdm import tqdm

    actors = start_shard_workers(cfg, store.spec, store.url, min(cfg.num_workers, len(missing)), claims.owner)
    total = sum(store.shard_bounds(i)[1] - store.shard_bounds(i)[0] for i in missing)
    with tqdm(total=total, unit="traj", desc="trajectories", disable=not cfg.progress, file=sys.stderr,
              mininterval=1.0) as bar:
        return ShardDispatcher(store, claims, actors, bar).run(missing)


def _schedule(cfg: GenerateConfig, spec: GenerationSpec) -> tuple[np.ndarray, np.ndarray]:
    """α and σ [K+1] of the job's time grid on its teacher; a combination the teacher cannot run is refused."""
    from pipeline.solvers import SolverError, time_grid
    from pipeline.teacher import load_teacher

    teacher = load_teacher(cfg.teacher, revision=cfg.revision, scheduler=cfg.scheduler)
    if teacher.fingerprint != spec.teacher_fingerprint:
        raise GenerateError(f"teacher {cfg.teacher} changed while the job started: re-run the same command")
    try:
        return time_grid(teacher, cfg.steps, cfg.solver, cfg.grid, sigma_max=cfg.sigma_max, sigma_min=cfg.sigma_min)
    except SolverError as error:
        raise GenerateError(
            f"--solver {cfg.solver} --grid {cfg.grid} --steps {cfg.steps} cannot run on the teacher {cfg.teacher}: "
            f"{error}"
        ) from error


def output_url(cfg: GenerateConfig, spec: GenerationSpec) -> str:
    """Where the store goes: --out, else <--cache-root or $CMT_CACHE_DIR/trajectories>/<cache key>.zarr."""
    if cfg.out:
        return location(cfg.out, named="--out")
    root = location(cfg.cache_root, named="--cache-root") if cfg.cache_root else trajectory_cache_root()
    return cache_path(root, spec)


def _locate(cfg: GenerateConfig, spec: GenerationSpec) -> tuple[str, TrajectoryStore | None, bool, str | None]:
    """Where the store goes, the store of this spec already there (or None), whether a store of another spec there is
    to be replaced (--overwrite), and why the location's state is unknown (a dry run that cannot reach it; else None)."""
    try:
        url = output_url(cfg, spec)
    except LocationError as error:  # a dry run still plans where the filesystem package is missing
        if not cfg.dry_run:
            raise
        root = cfg.cache_root or join(os.environ.get(CACHE_ENV_VAR, ""), "trajectories")
        return cfg.out or cache_path(root, spec), None, False, f"unknown ({error})"
    _check_writable(url)
    try:
        store, replace = _existing_store(url, spec, cfg.overwrite)
    except (GenerateError, StoreError):
        raise
    except Exception as error:  # noqa: BLE001 - the location cannot be reached: no backend, credentials or endpoint
        if not cfg.dry_run:
            raise GenerateError(_unreachable_message(url, error)) from error
        return url, None, False, f"unknown ({type(error).__name__}: {error})"
    return url, store, replace, None


def run(cfg: GenerateConfig) -> GenerateResult:
    """Generate (or resume, or find cached) the trajectory store for cfg; raise GenerateError on any failure.

    `cfg` checked its own options when it was built (GenerateConfig); what needs the teacher is checked here."""
    started = time.perf_counter()
    cfg, notes = resolve_defaults(cfg)
    for note in notes:
        print(note, file=sys.stderr)
    precision, precision_source = resolve_precision(cfg)
    identity = _identity_for(cfg)
    _check_labels_option(cfg, identity.num_classes)
    spec = build_spec(cfg, identity, precision)
    url, store, replace, unknown = _locate(cfg, spec)
    missing = list(range(spec.num_shards)) if store is None else store.missing_shards()
    if cfg.dry_run:
        if store is None and spec.teacher_fingerprint != UNRESOLVED_FINGERPRINT:
            _schedule(cfg, spec)  # refuses a solver/grid/steps the teacher cannot run, as the real run would
        state = unknown or ("replace" if replace else "new" if store is None else "complete" if not missing else "partial")
        plan = _plan(cfg, spec, url, missing, state, precision_source)
        return GenerateResult(url, False, True, (), 0, 0, time.perf_counter() - started, {"plan": plan})
    if not missing:
        summary = _finish(url, started, cache_hit=True, results=[])
        return GenerateResult(url, True, False, (), 0, 0, summary["seconds"], summary)
    if cfg.gpus_per_worker <= 0:
        from pipeline.precision import check_device

        check_device(precision, "cpu")
    try:
        return _generate(cfg, spec, url, replace, started)
    except OSError as error:
        if not is_no_space(error):
            raise
        raise GenerateError(_no_space_message(spec, url, "the store's metadata or claims")) from error


def _generate(cfg: GenerateConfig, spec: GenerationSpec, url: str, replace: bool, started: float) -> GenerateResult:
    """Check the Ray cluster can run the workers, then create or join the store (next to other runs of the same spec),
    write the shards nobody holds and wait for the rest."""
    with store_claims(url).keep_alive() as claims:
        ray_started = time.perf_counter()
        owns_ray = connect_ray(cfg)
        ray_seconds = time.perf_counter() - ray_started
        try:
            check_cluster(cfg, url)  # before anything is written
            if replace:  # --overwrite: the store of another spec that lies at url goes
                create_store(url, spec, *_schedule(cfg, spec), overwrite=True)
            store = open_or_create_store(url, spec, lambda: _schedule(cfg, spec), claims=claims,
                                         on_wait=lambda claim: print(_creation_wait_message(url, claim), file=sys.stderr))
            missing = store.missing_shards()
            shards_started = time.perf_counter()
            outcome = _run_shards(cfg, store, claims, missing) if missing else DispatchOutcome()
        finally:
            if owns_ray:
                import ray

                ray.shutdown()
    results = outcome.results
    if outcome.no_space:
        shards = sorted(failure["index"] for failure in outcome.failures)
        raise GenerateError(_no_space_message(spec, url, f"shard(s) {', '.join(map(str, shards))}"))
    if outcome.failures:
        lines = "\n".join(f"  shard {f['index']}: {f['error']}" for f in sorted(outcome.failures, key=lambda f: f["index"]))
        raise GenerateError(
            f"{len(outcome.failures)} of {len(missing)} shards failed; the {len(results)} that succeeded are committed "
            f"in {url} and re-running the same command retries only the failed ones:\n{lines}"
        )
    summary = _finish(url, started, cache_hit=False, results=results, claims=claims)
    summary["shards_written"] = sorted(result["index"] for result in results)
    summary["shards_joined"] = sorted(outcome.joined)
    summary.update(_timings(results, ray_seconds=ray_seconds, shards_started=shards_started))
    return GenerateResult(
        url,
        False,
        False,
        tuple(sorted(r["index"] for r in results)),
        sum(r["trajectories"] for r in results),
        sum(r["forward_samples"] for r in results),
        summary["seconds"],
        summary,
    )


def _creation_wait_message(url: str, claim: ClaimRecord) -> str:
    """What a run says while another run creates the store it joins."""
    return (f"waiting: another generate run ({claim.describe()}) is creating the store at {url}; this run joins it "
            f"when it is ready (or creates it itself if that run dies)")


def _no_space_message(spec: GenerationSpec, url: str, what: str) -> str:
    """The error for a full device: where, what is kept, how much space is still needed, and the fix."""
    try:
        store = open_store(url, "r", expected_spec=spec)
        committed, missing = store.committed_shards(), store.missing_shards()
    except StoreError:
        committed, missing = [], list(range(spec.num_shards))
    needed = _bytes_to_write(spec, missing)[2]
    return (
        f"no space left on device while writing {what} of the store {url}. The {len(committed)} shard(s) committed "
        f"before are kept and valid; nothing half-written counts as committed. Free space where the store lives (the "
        f"{len(missing)} missing shards need about {needed / 2**20:.1f} MiB) and re-run the same command: it writes "
        f"only the missing shards"
    )


def _timings(results: list[dict[str, Any]], *, ray_seconds: float, shards_started: float) -> dict[str, Any]:
    """Start-up costs apart from steady-state throughput (trajectories/s between the first and last shard's end)."""
    ends = sorted((r["finished_at"], r["trajectories"]) for r in results)
    steady = None
    if len(ends) >= 2 and ends[-1][0] > ends[0][0]:
        steady = sum(n for _, n in ends[1:]) / (ends[-1][0] - ends[0][0])
    return {
        "ray_start_seconds": ray_seconds,
        "first_shard_seconds": ends[0][0] - shards_started if ends else None,
        "steady_trajectories_per_s": steady,
    }


def _finish(url: str, started: float, *, cache_hit: bool, results: list[dict[str, Any]],
            claims: ShardClaims | None = None) -> dict[str, Any]:
    """Consolidate metadata, deep-validate, drop the claims of a complete store, and summarise; raise on a problem."""
    store = open_store(url, "r+" if not cache_hit else "r")
    if not cache_hit:
        store.consolidate()
    report = store.validate(deep=not cache_hit)
    if not report.ok:
        raise GenerateError(f"store {url} failed validation:\n  " + "\n  ".join(report.problems))
    if claims is not None and store.is_complete:
        claims.remove({str(index) for index in range(store.num_shards)} | {CREATE})
    info = store.describe()
    solve_seconds = sum(r["seconds"] for r in results)
    trajectories = sum(r["trajectories"] for r in results)
    return {
        "url": url,
        "cache_hit": cache_hit,
        "trajectories_written": trajectories,
        "teacher_forward_samples": sum(r["forward_samples"] for r in results),
        "worker_trajectories_per_s": trajectories / solve_seconds if solve_seconds else None,
        "worker_write_fraction": sum(r["write_seconds"] for r in results) / solve_seconds if solve_seconds else None,
        "attention": sorted({r["attention"] for r in results}),
        "teacher_precision": store.spec.teacher_precision,
        "worker_pids": sorted({r["pid"] for r in results}),
        "worker_niceness": sorted({r["niceness"] for r in results}),
        "bytes_stored": info.get("bytes_stored"),
        "compression_ratio": info.get("compression_ratio"),
        "shards": f"{len(store.committed_shards())}/{store.num_shards}",
        "seconds": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the job, print the plan or the summary as JSON; non-zero exit status on any failure."""
    try:
        cfg = parse_args(argv)
        result = run(cfg)
    except Exception as error:  # noqa: BLE001 - the CLI turns every failure into a message and exit status 1
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result.dry_run:
        print(json.dumps(result.summary["plan"], indent=2, ensure_ascii=False))
    else:
        if result.cache_hit:
            print(f"cache hit: {result.url} is complete; no teacher work done")
        print(SUMMARY_PREFIX + json.dumps(result.summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
