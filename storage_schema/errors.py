"""Typed errors of the trajectory store; every message names the problem and the fix."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by `storage_schema`."""


class InvalidSpecError(StoreError, ValueError):
    """A `GenerationSpec` (or the schedule / attributes given with it) is invalid."""


class NotAStoreError(StoreError):
    """Nothing, or something that is not a complete trajectory store, lies at the URL."""


class SchemaVersionError(StoreError):
    """The store was written with a schema version this code does not read."""


class SpecMismatchError(StoreError):
    """The store's recorded generation spec differs from the one the caller expected."""


class ShardIndexError(StoreError, IndexError):
    """A shard, chunk, trajectory or point index lies outside the store."""


class ShardDataError(StoreError, ValueError):
    """Data handed to `write_shard` has the wrong shape, dtype kind, length or labels."""


class ShardNotCommittedError(StoreError):
    """A read asked for a shard that has no commit record (missing or half-written)."""


class CorruptShardError(StoreError):
    """A shard's stored objects cannot be decoded or do not match the committed digest."""


class ReadOnlyStoreError(StoreError):
    """A write was attempted through a store opened with mode "r"."""


class ShardAlreadyCommittedError(StoreError):
    """A committed shard would be overwritten without `repair=True`."""


class StoreExistsError(StoreError, FileExistsError):
    """`create_store` found a store (or other files) at the URL and will not replace them."""


class ClaimLostError(StoreError):
    """A writer's claim on a shard was taken over by another writer (it looked stale) before the shard was committed."""


class StoreBusyError(StoreError):
    """An operation that needs the store to itself met a live writer's claim."""
