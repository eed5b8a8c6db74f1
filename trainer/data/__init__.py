"""Training data from teacher trajectories: one package for every source a stage trains on.

- `stream`: `TrajectoryStream`, the endless, resumable stream over committed store shards, and `make_stream`, the one
  constructor the stages use (`reader`, `shuffle_buffer`, `transport`: its reading half, buffer and worker transfer).
- `in_memory`: `InMemoryTrajectories`, every sample of small stores loaded up front (mid's `stream.source=memory`).
- `online`: `OnlineTrajectories`, mid-training's `data=online` source, trajectories solved afresh at every step.
- `batch_schema`: the batch keys and per-trajectory sample templates of each mode, shared by all three sources.
- `store_info`: `StoreInfo` and `check_stores`, the one check of the stores a run trains on; `corrupt_shards`: the
  digest check of each shard read and its stop-or-skip policy; `errors`: what they raise.
- `options`: `StreamOptions` (the `stream.*` keys of every stage) and `StreamConfig` (what one stream reads).
"""

from trainer.data.batch_schema import MODES, sample_template, samples_to_batch
from trainer.data.errors import (
    IncompleteStoreError,
    NotEnoughShardsError,
    SampleShapeError,
    StreamError,
    StreamStateError,
    TeacherMismatchError,
    TeacherMismatchWarning,
    UnusablePointsWarning,
)
from trainer.data.options import StreamConfig, StreamOptions
from trainer.data.reader import READ_BYTES
from trainer.data.store_info import StoreInfo, check_stores
from trainer.data.stream import TrajectoryStream, make_stream

__all__ = [
    "MODES",
    "READ_BYTES",
    "IncompleteStoreError",
    "NotEnoughShardsError",
    "SampleShapeError",
    "StoreInfo",
    "StreamConfig",
    "StreamError",
    "StreamOptions",
    "StreamStateError",
    "TeacherMismatchError",
    "TeacherMismatchWarning",
    "TrajectoryStream",
    "UnusablePointsWarning",
    "check_stores",
    "make_stream",
    "sample_template",
    "samples_to_batch",
]
