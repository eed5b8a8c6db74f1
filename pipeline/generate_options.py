"""Options of the generation job: `GenerateConfig`, its command line and YAML presets, and defaults that adapt.

`GenerateConfig` is a typed frozen config like the stages' ones, loaded by the same loader (`pipeline/config_loader.py`):
the `--config` preset, then the flags given. It checks itself when built (`__post_init__`): everything that can be
judged without the teacher is refused there, before any work, in the words of the flags (the teacher-dependent checks,
such as --labels on an unconditional teacher, stay in `pipeline/generate.py`'s `run`).

A default adapts to the options the user did choose, and says so in one line: `--solver ddim` (a solver that takes no
custom levels) runs on `--grid scheduler`; `--shard-size N` gets a chunk size that divides N; `--chunk-size C` gets a
shard size that is a multiple of C; the teacher runs in fp32 on CPU workers and in the preset's `gpu_precision` on GPU
ones (`resolve_precision`). An explicit choice is never changed: an incompatible pair is refused in the words of the
flags. Torch-free, so a cache hit never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Sequence

from pipeline.config_loader import ConfigError, MissingKeyError, UnknownKeyError, load_config
from pipeline.precision import PRECISIONS, PrecisionError, check_name
from pipeline.solver_names import GRIDS, SCHEDULER_GRID, SCHEDULER_GRID_ONLY, SOLVERS
from storage_schema import CODECS, STORAGE_DTYPES

DEFAULT_GRID = "logsnr"
DEFAULT_SHARD_SIZE = 256
DEFAULT_CHUNK_SIZE = 64


class GenerateError(RuntimeError):
    """A generation job that cannot run as asked; the message names the problem and the fix."""


class GenerateOptionError(GenerateError, ConfigError):
    """Options that cannot make a job, refused by `GenerateConfig` itself: a GenerateError to callers of `run`, and a
    ConfigError to the config loader, which passes it on unchanged (in the words of the flags)."""


@dataclass(frozen=True)
class GenerateConfig:
    """Everything that defines one generation job (the store's spec plus how to run it).

    `grid`, `shard_size` and `chunk_size` left at None take defaults that fit the other options (`resolve_defaults`).
    Options that cannot make a job are refused when the config is built (GenerateOptionError, PrecisionError).
    """

    teacher: str
    num_trajectories: int
    revision: str | None = None  # branch, tag, commit or refs/pr/N of a hub id
    scheduler: str | None = None  # scheduler directory for a bare model directory
    precision: str | None = None  # fp32 | tf32 | bf16 | fp16; None: gpu_precision on GPU workers, fp32 on CPU ones
    gpu_precision: str = "fp32"  # the preset's choice for GPU workers
    solver: str = "dpmpp-3m"
    steps: int = 16
    grid: str | None = None
    sigma_max: float | None = None
    sigma_min: float | None = None
    seed: int = 0
    labels: str | None = None
    guidance: float | None = None
    dtype: str = "float16"
    codec: str = "blosc-zstd-shuffle"
    shard_size: int | None = None
    chunk_size: int | None = None
    batch_size: int = 256
    num_workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    out: str | None = None
    cache_root: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    ray_address: str | None = None
    max_task_retries: int = 3
    progress: bool = True
    # Planning only (--dry-run where the teacher cannot be loaded, e.g. a hub id on an offline machine):
    sample_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    forward_samples_per_gpu_s: float | None = None  # measured network evaluations per GPU-second at the precision
    throughput_source: str | None = None  # where that measurement comes from
    gpu: dict | None = None  # name, peak_tflops {precision: TFLOP/s}, peak_source, utilization, utilization_source

    def __post_init__(self) -> None:
        """Refuse what cannot make a job, in the words of the flags, whatever set the options (preset, flags, code).

        `_resolved_grid` and `_resolved_layout` refuse conflicting pairs here; their adapted values are filled in by
        `resolve_defaults` when the job runs."""
        _check_names(self)
        _resolved_grid(self)
        _resolved_layout(self)
        _check_counts(self)
        _check_precisions(self)
        _check_label_list(self)


def _largest_divisor_up_to(number: int, limit: int) -> int:
    """The largest divisor of `number` that is at most `limit`."""
    return next(size for size in range(min(number, limit), 0, -1) if number % size == 0)


def _check_names(cfg: GenerateConfig) -> None:
    """A solver, grid, storage dtype and codec the project knows (the flags' own choices; a preset is checked alike)."""
    for flag, value, known in (("--solver", cfg.solver, SOLVERS), ("--grid", cfg.grid, GRIDS),
                               ("--dtype", cfg.dtype, STORAGE_DTYPES), ("--codec", cfg.codec, CODECS)):
        if value is not None and value not in known:
            raise GenerateOptionError(f"{flag} {value}: unknown; choose one of {', '.join(known)}")


def _check_counts(cfg: GenerateConfig) -> None:
    """At least one trajectory, solver step, worker and trajectory per batch."""
    if cfg.steps < 1:
        raise GenerateOptionError(f"--steps must be at least 1 (got {cfg.steps}): the store keeps steps + 1 points")
    if cfg.num_trajectories < 1:
        raise GenerateOptionError(f"--num-trajectories must be at least 1 (got {cfg.num_trajectories})")
    if cfg.num_workers < 1 or cfg.batch_size < 1:
        raise GenerateOptionError("--num-workers and --batch-size must be at least 1")


def _check_precisions(cfg: GenerateConfig) -> None:
    """Known precision names: --precision, and the preset's gpu_precision (used whenever workers get GPUs)."""
    if cfg.precision is not None:
        check_name(cfg.precision)
    if cfg.gpu_precision not in PRECISIONS:
        raise PrecisionError(f"gpu_precision {cfg.gpu_precision}: unknown; choose one of {', '.join(PRECISIONS)}")


def _check_label_list(cfg: GenerateConfig) -> None:
    """--labels is 'uniform' or integer class ids; whether they are classes of the teacher is checked with it loaded."""
    if cfg.labels is None or cfg.labels == "uniform":
        return
    for part in filter(str.strip, cfg.labels.split(",")):
        try:
            int(part)
        except ValueError:
            raise GenerateOptionError(
                f"--labels {cfg.labels!r}: expected 'uniform' or comma-separated class ids such as '3,7'; fix the "
                f"list or use --labels uniform"
            ) from None


def _resolved_grid(cfg: GenerateConfig) -> tuple[str, list[str]]:
    """The grid to run (the default adapts to the solver) and the note saying so; refuses incompatible flags."""
    notes = []
    grid = cfg.grid
    if grid is None:
        grid = SCHEDULER_GRID if cfg.solver in SCHEDULER_GRID_ONLY else DEFAULT_GRID
        if grid != DEFAULT_GRID:
            notes.append(f"note: --solver {cfg.solver} steps only between the teacher's own timesteps, so it runs on "
                         f"--grid {grid} (not the default --grid {DEFAULT_GRID})")
    elif cfg.solver in SCHEDULER_GRID_ONLY and grid != SCHEDULER_GRID:
        raise GenerateOptionError(
            f"--solver {cfg.solver} cannot run --grid {grid}: it steps only between the teacher's own timesteps "
            f"(--grid {SCHEDULER_GRID}). Drop --grid, or keep --grid {grid} with --solver euler (the same first-order "
            f"method on any grid) or --solver dpmpp-3m"
        )
    levels = [flag for flag, value in (("--sigma-max", cfg.sigma_max), ("--sigma-min", cfg.sigma_min)) if value is not None]
    if levels and grid == SCHEDULER_GRID:
        reason = f"--solver {cfg.solver} runs only on" if cfg.solver in SCHEDULER_GRID_ONLY else "it uses"
        raise GenerateOptionError(
            f"{' and '.join(levels)} set the end levels of --grid karras or logsnr, but {reason} --grid "
            f"{SCHEDULER_GRID}, whose levels are the scheduler's own: drop {' and '.join(levels)}, or use --grid logsnr "
            f"with a solver other than {', '.join(SCHEDULER_GRID_ONLY)}"
        )
    return grid, notes


def _resolved_layout(cfg: GenerateConfig) -> tuple[int, int, list[str]]:
    """Shard and chunk sizes: a default adapts to the other one when that is given; both given must fit."""
    for flag, value in (("--shard-size", cfg.shard_size), ("--chunk-size", cfg.chunk_size)):
        if value is not None and value < 1:
            raise GenerateOptionError(f"{flag} must be at least 1 (got {value})")
    shard, chunk = cfg.shard_size, cfg.chunk_size
    if shard is not None and chunk is not None:
        if shard % chunk:
            raise GenerateOptionError(
                f"--chunk-size {chunk} does not divide --shard-size {shard} (a shard holds whole chunks): pass a "
                f"--chunk-size that divides {shard} (such as {_largest_divisor_up_to(shard, chunk)}), or drop "
                f"--chunk-size and one is picked"
            )
        return shard, chunk, []
    if shard is not None:
        chunk = _largest_divisor_up_to(shard, DEFAULT_CHUNK_SIZE)
        note = (f"note: --shard-size {shard} is not a multiple of the default --chunk-size {DEFAULT_CHUNK_SIZE}: using "
                f"--chunk-size {chunk}, the largest divisor of {shard} up to {DEFAULT_CHUNK_SIZE}")
        return shard, chunk, [note] if chunk != DEFAULT_CHUNK_SIZE else []
    if chunk is not None:
        shard = max(1, round(DEFAULT_SHARD_SIZE / chunk)) * chunk
        note = (f"note: --chunk-size {chunk} does not divide the default --shard-size {DEFAULT_SHARD_SIZE}: using "
                f"--shard-size {shard}, the multiple of {chunk} nearest {DEFAULT_SHARD_SIZE}")
        return shard, chunk, [note] if shard != DEFAULT_SHARD_SIZE else []
    return DEFAULT_SHARD_SIZE, DEFAULT_CHUNK_SIZE, []


def resolve_defaults(cfg: GenerateConfig) -> tuple[GenerateConfig, list[str]]:
    """The config with every adaptive default filled in, and one note line per default that differs from the usual.

    A conflict between explicit options never reaches here: the config refused it when it was built."""
    grid, grid_notes = _resolved_grid(cfg)
    shard, chunk, layout_notes = _resolved_layout(cfg)
    return dataclasses.replace(cfg, grid=grid, shard_size=shard, chunk_size=chunk), grid_notes + layout_notes


def resolve_precision(cfg: GenerateConfig) -> tuple[str, str]:
    """(teacher precision, where it came from): --precision, else the preset's gpu_precision on GPUs, else fp32."""
    if cfg.precision is not None:
        return check_name(cfg.precision), "--precision (or the preset's precision)"
    if cfg.gpus_per_worker > 0:
        return check_name(cfg.gpu_precision), "gpu_precision: the preset's choice for GPU workers"
    return "fp32", "default for CPU workers (--gpus-per-worker 0)"


def _option_name(field_name: str) -> str:
    """`num_trajectories` → `--num-trajectories`."""
    return "--" + field_name.replace("_", "-")


def parse_args(argv: Sequence[str] | None = None) -> GenerateConfig:
    """Command-line flags → GenerateConfig: built-in defaults, then the --config preset, then explicit flags.

    The preset goes through the project's config loader (types parsed, unknown keys named with the closest one); the
    flags come typed from argparse. Errors speak of the flags and the preset's keys, as the user wrote them."""
    parser = argparse.ArgumentParser(
        prog="pipeline/generate.py",
        description="Generate (or resume, or find in the cache) a store of teacher PF-ODE trajectories with Ray.",
    )
    keep = argparse.SUPPRESS  # flags not given stay absent, so a preset's value is not overridden by a default
    parser.add_argument("--config", default=None, help="YAML preset of these options (flags given here override it)")
    parser.add_argument("--teacher", default=keep, help="diffusers pipeline/model directory or hub id")
    parser.add_argument("--revision", default=keep, help="hub ids: branch, tag, commit or refs/pr/N (default main)")
    parser.add_argument("--scheduler", default=keep, help="scheduler directory, for a model directory without one")
    parser.add_argument("--precision", default=keep, choices=list(PRECISIONS),
                        help="teacher precision (default: fp32 on CPU workers, the preset's gpu_precision on GPUs)")
    parser.add_argument("--num-trajectories", type=int, default=keep)
    parser.add_argument("--solver", default=keep, choices=SOLVERS, help="default dpmpp-3m")
    parser.add_argument("--steps", type=int, default=keep, help="K solver steps (the store keeps K+1 points; default 16)")
    parser.add_argument("--grid", default=keep, choices=GRIDS,
                        help=f"default {DEFAULT_GRID}; {SCHEDULER_GRID} for --solver {' / '.join(SCHEDULER_GRID_ONLY)}")
    parser.add_argument("--sigma-max", type=float, default=keep)
    parser.add_argument("--sigma-min", type=float, default=keep)
    parser.add_argument("--seed", type=int, default=keep, help="seed base: sample i uses seed+i (default 0)")
    parser.add_argument("--labels", default=keep, help="conditional teachers: 'uniform' or class ids '3,7'")
    parser.add_argument("--guidance", type=float, default=keep, help="classifier-free guidance scale")
    parser.add_argument("--dtype", default=keep, choices=STORAGE_DTYPES)
    parser.add_argument("--codec", default=keep, choices=CODECS, help="default blosc-zstd-shuffle")
    parser.add_argument("--shard-size", type=int, default=keep,
                        help=f"trajectories per shard (default {DEFAULT_SHARD_SIZE}, or the multiple of --chunk-size "
                             f"nearest it)")
    parser.add_argument("--chunk-size", type=int, default=keep,
                        help=f"trajectories per chunk (default {DEFAULT_CHUNK_SIZE}, or the largest divisor of "
                             f"--shard-size up to it)")
    parser.add_argument("--batch-size", type=int, default=keep, help="trajectories per solver batch (default 256)")
    parser.add_argument("--num-workers", type=int, default=keep)
    parser.add_argument("--cpus-per-worker", type=int, default=keep)
    parser.add_argument("--gpus-per-worker", type=float, default=keep)
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--out", default=keep, help="store URL: a path or an fsspec URL (s3://..., gs://...)")
    out.add_argument("--cache-root", default=keep, help="cache directory or URL (default $CMT_CACHE_DIR/trajectories)")
    parser.add_argument("--overwrite", action="store_true", default=keep, help="replace a store made from another spec")
    parser.add_argument("--dry-run", action="store_true", default=keep, help="print the plan and write nothing")
    parser.add_argument("--ray-address", default=keep, help="join this Ray cluster (default: RAY_ADDRESS or a local one)")
    parser.add_argument("--max-task-retries", type=int, default=keep,
                        help="restarts of a lost worker (process or node), whose unfinished shards are retried (default 3)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=keep)
    flags = vars(parser.parse_args(argv))
    preset = flags.pop("config")
    if "out" in flags and "cache_root" not in flags:
        flags["cache_root"] = None  # an explicit --out wins over a preset's cache root
    try:
        return load_config(GenerateConfig, preset, parsed_values=flags)
    except MissingKeyError as error:
        parser.error(f"{_option_name(error.key)} is required (on the command line or in the --config preset)")
    except UnknownKeyError as error:
        hint = f" (did you mean {error.suggestion!r}?)" if error.suggestion else ""
        raise GenerateError(f"{preset}: unknown key {error.key!r}{hint}; valid keys: "
                            f"{', '.join(sorted(error.valid_keys))}") from None
