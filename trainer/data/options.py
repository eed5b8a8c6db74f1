"""How a run reads trajectory stores: `StreamOptions` (key `stream` of the stage presets) and `StreamConfig`.

`StreamOptions` is the one settings type of every stage (trainer/mid.py and trainer/post.py): subsets per trajectory,
shuffling, reader workers, the in-memory source, and what to do with imperfect stores. Keys that a stage or mode does
not use are refused by that stage's config, naming the key. `StreamConfig.from_options` adds what the stage decides
(the URLs, the mode its method reads, the batch size, the seed and the student's expectations) to make the
`trainer.data.stream.TrajectoryStream` settings; its defaults are the options' defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from trainer.config import ConfigError
from trainer.data.batch_schema import MODES
from trainer.data.corrupt_shards import ON_CORRUPT_SHARD

__all__ = ["StreamConfig", "StreamOptions"]


def check_reading_ranges(settings: StreamOptions | StreamConfig, *, prefix: str) -> None:
    """The range checks the stage options and the stream config share, naming the key as the user wrote it."""
    for name in ("points_per_trajectory", "pairs_per_trajectory"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise ConfigError(f"{prefix}{name} must be >= 1 or none (all), got {value}")
    if settings.shuffle_buffer < 0:
        raise ConfigError(f"{prefix}shuffle_buffer must be >= 0 samples (0: no shuffle buffer), got "
                          f"{settings.shuffle_buffer}")
    if settings.num_workers < 0:
        raise ConfigError(f"{prefix}num_workers must be >= 0 (0 = read in the training process), got "
                          f"{settings.num_workers}")
    if settings.prefetch_factor < 1:
        raise ConfigError(f"{prefix}prefetch_factor must be >= 1, got {settings.prefetch_factor}")


@dataclass(frozen=True, kw_only=True)
class StreamOptions:
    """Subsets per trajectory, shuffling, reader workers, the in-memory source, and what to do with imperfect stores."""

    points_per_trajectory: int | None = None  # mid CM / post ECD: random subset of the K points per trajectory
    pairs_per_trajectory: int | None = None  # mid MF: random subset of the pairs i > j per trajectory (None: all)
    shuffle_buffer: int = 4096
    num_workers: int = 0
    prefetch_factor: int = 2
    source: Literal["stream", "memory"] = "stream"  # mid: "memory" reads every store up front into tensors (small)
    allow_incomplete: bool = False  # train on the committed shards of an unfinished store
    strict: bool = False  # a store made by another teacher than the student's is an error, not a warning
    on_corrupt_shard: Literal["error", "skip"] = "error"  # skip: leave out shards failing their digest (corrupt_shards)

    def __post_init__(self) -> None:
        """Reject counts that cannot work, naming the key."""
        if self.on_corrupt_shard == "skip" and self.source == "memory":
            raise ConfigError("stream.on_corrupt_shard=skip applies to stream.source=stream (memory checks every "
                              "shard's digest as it loads and stops at a corrupt one): drop one of the two")
        check_reading_ranges(self, prefix="stream.")


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """What to stream and how: stores, mode, batch size, sampling per trajectory, shuffling, workers, checks.

    `worker_start_method` picks how DataLoader workers start (None: the platform default; the stores reopen by
    URL in each worker). `expected_sample_shape` / `expected_fingerprint` are the student's (its init teacher's)
    sample shape and teacher fingerprint; a different shape is an error, a different fingerprint a warning (an
    error with strict). `include_indices` adds the batch_schema.INDEX_KEYS to every batch.
    """

    urls: tuple[str, ...]
    mode: Literal["cm", "mf", "endpoints", "ecd"] = "cm"
    batch_per_process: int = 128
    points_per_trajectory: int | None = None
    pairs_per_trajectory: int | None = None
    shuffle_buffer: int = StreamOptions.shuffle_buffer
    num_workers: int = StreamOptions.num_workers
    prefetch_factor: int = StreamOptions.prefetch_factor
    worker_start_method: Literal["fork", "spawn", "forkserver"] | None = None
    seed: int = 0
    allow_incomplete: bool = False
    on_corrupt_shard: Literal["error", "skip"] = "error"
    expected_sample_shape: tuple[int, ...] | None = None
    expected_fingerprint: str | None = None
    strict: bool = False
    include_indices: bool = False
    record_chunks: bool = False  # remember which store chunks the batches came from (`TrajectoryStream.read_report`)

    def __post_init__(self) -> None:
        """Normalise the URL list and reject settings the stream cannot run with, naming the fix."""
        urls = (self.urls,) if isinstance(self.urls, str) else tuple(str(url) for url in self.urls)
        if not urls:
            raise ConfigError("urls needs at least one trajectory store URL or path")
        object.__setattr__(self, "urls", urls)
        if self.expected_sample_shape is not None:
            object.__setattr__(self, "expected_sample_shape", tuple(int(size) for size in self.expected_sample_shape))
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.batch_per_process < 1:
            raise ConfigError(f"batch_per_process must be >= 1, got {self.batch_per_process}")
        check_reading_ranges(self, prefix="")
        if self.worker_start_method not in (None, "fork", "spawn", "forkserver"):
            raise ConfigError(
                f"worker_start_method must be fork, spawn, forkserver or none (the platform default), got "
                f"{self.worker_start_method!r}"
            )
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.points_per_trajectory is not None:
            if self.mode not in ("cm", "ecd"):
                raise ConfigError(
                    f"points_per_trajectory applies to modes 'cm' and 'ecd', not {self.mode!r}; "
                    "set it to none" + (" and use pairs_per_trajectory" if self.mode == "mf" else "")
                )
        if self.on_corrupt_shard not in ON_CORRUPT_SHARD:
            raise ConfigError(
                f"on_corrupt_shard must be 'error' (stop at a corrupt shard) or 'skip' (leave corrupt shards out, "
                f"checked when the stream starts), got {self.on_corrupt_shard!r}"
            )
        if self.pairs_per_trajectory is not None:
            if self.mode != "mf":
                raise ConfigError(
                    f"pairs_per_trajectory applies to mode 'mf' only, not {self.mode!r}; set it to none"
                )

    @property
    def consumers_per_rank(self) -> int:
        """Readers per process: the DataLoader workers, or the process itself when num_workers = 0."""
        return max(1, self.num_workers)

    @classmethod
    def from_options(
        cls,
        options: StreamOptions,
        *,
        urls: Sequence[str],
        mode: Literal["cm", "mf", "endpoints", "ecd"],
        batch_per_process: int,
        seed: int,
        expected_sample_shape: Sequence[int] | None = None,
        expected_fingerprint: str | None = None,
        record_chunks: bool = False,
    ) -> StreamConfig:
        """A stage's stream: its `stream.*` options plus what the stage decides (stores, mode, batch, seed, student).

        The per-trajectory subset that applies to `mode` is taken (points for cm / ecd, pairs for mf); the stage's
        config has refused the one that does not apply.
        """
        return cls(
            urls=tuple(urls),
            mode=mode,
            batch_per_process=batch_per_process,
            points_per_trajectory=options.points_per_trajectory if mode in ("cm", "ecd") else None,
            pairs_per_trajectory=options.pairs_per_trajectory if mode == "mf" else None,
            shuffle_buffer=options.shuffle_buffer,
            num_workers=options.num_workers,
            prefetch_factor=options.prefetch_factor,
            seed=seed,
            allow_incomplete=options.allow_incomplete,
            on_corrupt_shard=options.on_corrupt_shard,
            expected_sample_shape=None if expected_sample_shape is None else tuple(expected_sample_shape),
            expected_fingerprint=expected_fingerprint,
            strict=options.strict,
            record_chunks=record_chunks,
        )
