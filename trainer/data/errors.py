"""What building, checking or resuming a trajectory stream raises and warns, each naming the fix in the stage keys."""

from __future__ import annotations

__all__ = [
    "IncompleteStoreError",
    "NotEnoughShardsError",
    "SampleShapeError",
    "StreamError",
    "StreamStateError",
    "TeacherMismatchError",
    "TeacherMismatchWarning",
    "UnusablePointsWarning",
]


class StreamError(Exception):
    """Base class of the errors raised when checking stores or building or resuming a `TrajectoryStream`."""


class IncompleteStoreError(StreamError):
    """A store has uncommitted shards and `allow_incomplete` is off, or no committed shard at all."""


class SampleShapeError(StreamError, ValueError):
    """Stores whose sample shapes differ from each other or from the expected (teacher's) shape."""


class TeacherMismatchError(StreamError):
    """A store was made by another teacher than the one the student starts from (strict mode)."""


class TeacherMismatchWarning(UserWarning):
    """A store was made by another teacher than the one the student starts from."""


class UnusablePointsWarning(UserWarning):
    """Some stored points cannot be represented in the student's view (α = 0) and are left out."""


class NotEnoughShardsError(StreamError):
    """More consumers (ranks × workers) than chunks, or too few samples per consumer for one batch."""


class StreamStateError(StreamError, ValueError):
    """A saved stream position that does not fit this stream (other data, seed, world size or workers)."""
