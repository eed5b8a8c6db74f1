"""The one check of the trajectory stores a run trains on, and what it learns about each store (`StoreInfo`).

Every source of stored trajectories opens its stores through `check_stores`: the stream (`trainer.data.stream`), the
in-memory source (`trainer.data.in_memory`) and mid-training's dry run. Its errors (`trainer.data.errors`) name the
fix in the keys users type (`stream.allow_incomplete`, `stream.strict`, `stream.num_workers`, generation's flags).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage_schema import GenerationSpec, TrajectoryStore, open_store
from storage_schema.errors import StoreError
from trainer.data.errors import (
    IncompleteStoreError,
    NotEnoughShardsError,
    SampleShapeError,
    StreamError,
    TeacherMismatchError,
    TeacherMismatchWarning,
    UnusablePointsWarning,
)

__all__ = ["StoreInfo", "check_reader_split", "check_stores"]


@dataclass(frozen=True)
class StoreInfo:
    """What a source needs of one store, picklable without an open handle (stream workers reopen it by URL)."""

    url: str
    spec: GenerationSpec
    alpha: np.ndarray  # float64 [K+1]
    sigma: np.ndarray  # float64 [K+1]
    committed_shards: tuple[int, ...]

    @classmethod
    def of(cls, store: TrajectoryStore) -> StoreInfo:
        """The info of an open store: its spec, time grid and the shards committed now."""
        return cls(store.url, store.spec, np.array(store.alpha, np.float64), np.array(store.sigma, np.float64),
                   tuple(store.committed_shards()))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape S of one stored sample."""
        return tuple(self.spec.sample_shape)

    @property
    def num_trajectories(self) -> int:
        """Trajectories the complete store holds."""
        return self.spec.num_trajectories

    @property
    def num_points(self) -> int:
        """Points per trajectory, K + 1."""
        return self.spec.num_points

    def num_chunks(self) -> int:
        """Chunks in the committed shards."""
        return sum(len(self.spec.shard_chunks(shard)) for shard in self.committed_shards)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description for --dry-run."""
        spec = self.spec
        return {
            "url": self.url, "trajectories": spec.num_trajectories, "points": spec.num_points,
            "sample_shape": list(spec.sample_shape), "solver": f"{spec.solver} K={spec.steps} grid={spec.grid}",
            "committed_shards": f"{len(self.committed_shards)}/{spec.num_shards}",
        }


def check_stores(
    urls: Sequence[str],
    *,
    expected_sample_shape: Sequence[int] | None = None,
    expected_fingerprint: str | None = None,
    strict: bool = False,
    allow_incomplete: bool = False,
    world_size: int | None = None,
    num_workers: int = 0,
) -> tuple[list[TrajectoryStore], tuple[StoreInfo, ...]]:
    """Open every store read-only and check that together they can feed a run; return the stores and their infos.

    Checks: the stores open; they share one sample shape, the expected (student's teacher's) one when given, and
    one class conditioning; every shard is committed (or `allow_incomplete` and at least one is); with `world_size`,
    every reader (world_size × max(1, num_workers)) gets a chunk. A store of another teacher than
    `expected_fingerprint` is a warning, an error with `strict`. Points with α = 0 are warned about (sources leave
    them out). Raises the `trainer.data.errors` error that names the fix.
    """
    stores = []
    for url in urls:
        try:
            stores.append(open_store(url, "r"))
        except StoreError as error:
            raise StreamError(f"cannot open trajectory store {url}: {error}") from error
    infos = tuple(StoreInfo.of(store) for store in stores)
    _check_shapes(infos, expected_sample_shape)
    classes = {info.url: info.spec.num_classes for info in infos}
    if len(set(classes.values())) > 1:
        raise StreamError(
            f"the stores disagree on class conditioning (num_classes per store: {classes}); mix only stores "
            "that are all unconditional or all have the same number of classes"
        )
    for info in infos:
        _check_complete(info, allow_incomplete)
    if world_size is not None:
        check_reader_split(sum(info.num_chunks() for info in infos), sum(len(info.committed_shards) for info in infos),
                           world_size=world_size, num_workers=num_workers)
    if expected_fingerprint is not None:
        for info in infos:
            _check_teacher(info, expected_fingerprint, strict)
    _warn_unusable_points(infos)
    return stores, infos


def check_reader_split(total_chunks: int, num_shards: int, *, world_size: int, num_workers: int) -> None:
    """Refuse fewer chunks than readers (world_size × max(1, num_workers)): some reader would get none."""
    per_process = max(1, num_workers)
    readers = world_size * per_process
    if total_chunks >= readers:
        return
    most_workers = total_chunks // world_size
    fix = (f"Set stream.num_workers to {most_workers} or less" if most_workers >= 1
           else f"Run at most {total_chunks} processes")
    raise NotEnoughShardsError(
        f"{total_chunks} committed chunks ({num_shards} shards) cannot be split over {readers} readers ({world_size} "
        f"process(es) × {per_process} per process, stream.num_workers={num_workers}): there must be at least one "
        f"chunk per reader, {readers} chunks for {readers} readers. {fix}, use more stores, or regenerate the stores "
        "with a smaller chunk_size (pipeline/generate.py with a smaller --chunk-size)"
    )


def _check_shapes(infos: Sequence[StoreInfo], expected: Sequence[int] | None) -> None:
    """One sample shape across the stores, and the expected one when given."""
    shapes = {info.url: info.sample_shape for info in infos}
    if len(set(shapes.values())) > 1:
        raise SampleShapeError(
            f"the stores have different sample shapes {shapes}; mix only stores of the same data/resolution"
        )
    if expected is None:
        return
    expected = tuple(int(size) for size in expected)
    for info in infos:
        if info.sample_shape != expected:
            raise SampleShapeError(
                f"store {info.url} holds samples of shape {list(info.sample_shape)} but the teacher's samples are "
                f"{list(expected)} (the student expects {expected}): use stores generated from the student's teacher "
                "(pipeline/generate.py --teacher ...; same resolution and channels)"
            )


def _check_complete(info: StoreInfo, allow_incomplete: bool) -> None:
    """Refuse uncommitted shards unless allow_incomplete, and a store with no committed shard."""
    committed, total = len(info.committed_shards), info.spec.num_shards
    if committed == total:
        return
    if not allow_incomplete:
        missing = sorted(set(range(total)) - set(info.committed_shards))
        raise IncompleteStoreError(
            f"store {info.url} is incomplete ({committed}/{total} shards): only {committed} of {total} shards "
            f"committed (missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}); finish it by re-running its "
            "pipeline/generate.py command (it resumes), or pass stream.allow_incomplete=true to train on the "
            "committed shards only"
        )
    if not committed:
        raise IncompleteStoreError(f"store {info.url} has no committed shard yet; generate some before training on it")


def _check_teacher(info: StoreInfo, expected_fingerprint: str, strict: bool) -> None:
    """A store of another teacher than the student's: a warning, an error with strict."""
    found = info.spec.teacher_fingerprint
    if found == expected_fingerprint:
        return
    message = (
        f"store {info.url} was generated by teacher {found}, but the student starts from teacher "
        f"{expected_fingerprint}: its trajectories are not this teacher's ODE, and the student regresses onto its own "
        "teacher's ODE endpoints"
    )
    if strict:
        raise TeacherMismatchError(f"{message}; use stores made by the student's teacher, or drop stream.strict=true "
                                   "to only warn")
    warnings.warn(f"{message} (pass stream.strict=true to make this an error)", TeacherMismatchWarning, stacklevel=3)


def _warn_unusable_points(infos: Sequence[StoreInfo]) -> None:
    """Warn about points with α = 0 (σ̃ = ∞), which every source leaves out."""
    for info in infos:
        zero = np.flatnonzero(info.alpha <= 0).tolist()
        if zero:
            warnings.warn(
                f"store {info.url}: points {zero} have α = 0 (σ̃ = ∞, pure noise), which the student's EDM "
                "view cannot take; they are left out of every sample",
                UnusablePointsWarning,
                stacklevel=3,
            )
