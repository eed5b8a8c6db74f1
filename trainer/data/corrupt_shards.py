"""Corrupt trajectory data met by the trainer: every committed shard is checked against its digest before use.

A shard's commit record holds the sha256 of its data (`storage_schema`). A reader of the stream
(`trainer.data.reader`) checks each shard the first time it reads it in a run, before any of its samples reaches a
batch: a chunk that fails to decode, or data whose digest no longer matches, stops training with `CorruptDataError`
naming the store, the shard and the `python -m storage_schema validate URL --deep` command. Checkpoints already
written are untouched, so after the shard is regenerated the same training command resumes exactly.

What the check costs: the digest covers the shard's trajectories and endpoints (store schema 2), so the check decodes
both whatever the stream's mode. A shard no larger than one read (`READ_BYTES`, every digits and tiny preset) is read
whole, and that one read both feeds the batches and is hashed, so the check adds the sha256 of the shard plus reading
its seeds (and, in mode "endpoints", decoding its trajectories, which that mode otherwise skips). A larger shard is
decoded once more, in reads of at most `READ_BYTES`, before its batches are made. Every reader with chunks of a shard
checks it (chunk-balanced readers may split a shard).

With `on_corrupt_shard="skip"` (`stream.on_corrupt_shard=skip` in the mid- and post-training configs) the stream
checks every committed shard when it is built, leaves the corrupt ones out of the shard pool on every rank (the
same decision everywhere, so ranks stay in step) and reports them: `skipped` here, `corrupt_shards_skipped` in
metrics.jsonl and in each rank report. A shard that passes that check but fails later still stops training.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from storage_schema import CorruptShardError, ShardNotCommittedError, TrajectoryStore

ON_CORRUPT_SHARD = ("error", "skip")


class CorruptDataError(CorruptShardError):
    """A committed shard failed to decode or to match its digest while training read it; names the fix."""


class CorruptShardWarning(UserWarning):
    """A corrupt shard is left out of training (on_corrupt_shard="skip")."""


def validate_command(url: str) -> str:
    """The shell command that lists every damaged shard of a store."""
    return f"python -m storage_schema validate {url} --deep"


def how_to_regenerate(url: str) -> str:
    """How a user regenerates a store's corrupt shards, in CLI words."""
    return (f"`{validate_command(url)} --uncommit-corrupt`, then re-run the store's generation command (it rewrites "
            "only uncommitted shards, byte-identical)")


def damage(error: CorruptShardError) -> str:
    """What is wrong with a shard, without the store API's advice: a chunk failing to decode, or a digest mismatch."""
    cause = error.__cause__
    if cause is not None:
        return f"a chunk fails to decode: {type(cause).__name__}: {cause}"
    return "its data no longer matches its commit digest"


def corrupt_data_error(url: str, shard: int, error: CorruptShardError) -> CorruptDataError:
    """The error that stops training at a corrupt shard, in the words of the training command's config."""
    return CorruptDataError(
        f"shard {shard} of trajectory store {url} is corrupt ({damage(error)}). Training stopped; the checkpoints "
        f"already written are intact. List every damaged shard with `{validate_command(url)}`; regenerate them with "
        f"{how_to_regenerate(url)}; then re-run this training command to resume. Or set stream.on_corrupt_shard=skip "
        "to train without corrupt shards (checked when the run starts)"
    )


def shard_bytes(store: TrajectoryStore, shard: int) -> int:
    """Decoded size in bytes of one shard's trajectories and endpoints (what `read_shard` decodes)."""
    spec = store.spec
    start, stop = spec.shard_bounds(shard)
    return (stop - start) * (spec.num_points + 1) * math.prod(spec.sample_shape) * np.dtype(spec.dtype).itemsize


def verified_shard(store: TrajectoryStore, shard: int, read_bytes: int) -> dict[str, Any] | None:
    """Check `shard` against its digest; return its traj/endpoint/label when it fits one read (that read is the check).

    Raises CorruptDataError for a shard that cannot be decoded or does not match its digest, and
    ShardNotCommittedError for one whose commit record went away (being repaired).
    """
    try:
        if shard_bytes(store, shard) <= read_bytes:
            data = store.read_shard(shard, verify=True)
            return {"traj": data["traj"], "endpoint": data["endpoint"], "label": data["label"]}
        store.verify_shard(shard, read_bytes=read_bytes)
        return None
    except ShardNotCommittedError as error:
        raise ShardNotCommittedError(
            f"shard {shard} of {store.url} was committed when training started but is not any more (being "
            "repaired?); let the repair finish, then resume the run"
        ) from error
    except CorruptShardError as error:
        raise corrupt_data_error(store.url, shard, error) from error


def find_corrupt_shards(stores: Sequence[TrajectoryStore], committed: Sequence[Sequence[int]],
                        read_bytes: int) -> list[dict[str, Any]]:
    """Check every committed shard of every store; [{url, shard, problem}] of those that fail, each warned about."""
    found = []
    for store, shards in zip(stores, committed):
        for shard in shards:
            try:
                store.verify_shard(shard, read_bytes=read_bytes)
            except CorruptShardError as error:
                found.append({"url": store.url, "shard": int(shard), "problem": damage(error)})
                warnings.warn(
                    f"skipping corrupt shard {shard} of {store.url} (stream.on_corrupt_shard=skip): {damage(error)}. "
                    f"`{validate_command(store.url)}` lists every damaged shard",
                    CorruptShardWarning,
                    stacklevel=3,
                )
    return found
