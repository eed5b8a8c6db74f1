"""`StreamOptions`: how a stage reads trajectory stores (key `stream` of trainer/mid.py and trainer/post.py presets).

One options type for every stage, turned into a `trainer.data.StreamConfig` by the stage (which adds the URLs, the
mode its method reads, the batch size, the seed and the student's expectations). Keys that a stage or mode does not
use are refused by that stage's config, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer.config import ConfigError

__all__ = ["StreamOptions"]


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
        for name in ("points_per_trajectory", "pairs_per_trajectory"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"stream.{name} must be >= 1 or none (all), got {value}")
        if self.shuffle_buffer < 1 or self.num_workers < 0 or self.prefetch_factor < 1:
            raise ConfigError("stream.shuffle_buffer >= 1, stream.num_workers >= 0 and stream.prefetch_factor >= 1")
