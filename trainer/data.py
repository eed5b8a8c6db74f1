"""Streaming training batches from one or more trajectory stores (mid- and post-training data).

`TrajectoryStream` is an endless, resumable stream of dict batches (a `trainer.loop.ResumableBatches`)
read chunk by chunk from the committed shards of Zarr trajectory stores (`storage_schema`).

How it is prepared
------------------
Build it with `make_stream(cfg, accelerator)` AFTER the Accelerator (rank and world size come from it) and
hand it to `train_loop(batches=...)` as it is. It is NOT passed to `accelerator.prepare`: Accelerate must not
re-shard or dispatch it, because the stream already splits the data over processes itself, and its position
is checkpointed through `state_dict` / `load_state_dict` (the loop registers it for checkpointing).

Splitting, epochs, shuffling
----------------------------
- The shards of all stores form one pool (stores must share the sample shape; e.g. two teachers or two solvers).
  The pool is fixed when the stream is built (committed shards only) and travels with the checkpoint.
- There are C = world_size × max(1, num_workers) consumers; consumer c = rank·W + worker. Epoch e permutes the
  pool's shards with a generator seeded by (seed, e); the shards' chunks in that order (M chunks in all) are cut into
  C contiguous runs of ⌊M/C⌋ or ⌈M/C⌉ chunks, and consumer c reads run c in whole chunks (chunk-aligned slices of
  `traj` / `endpoint` / `label`, several consecutive chunks of one shard per read, at most READ_BYTES; never one
  sample at a time). Readers get balanced work even with fewer shards than readers, and with M a multiple of C
  (equal chunks) an epoch uses every trajectory once; a shard may be split between readers, a chunk never is, and
  no two ranks read the same chunk. A reader's first read of a shard in the run (its process's lifetime: a resumed
  run checks again) checks the whole shard (traj and endpoint, also in mode "endpoints") against its commit digest
  before any of its samples is used (`trainer.corrupt_shards`: a corrupt shard stops training with the fix named, or
  with `on_corrupt_shard="skip"` is left out of the pool); later epochs read only what their batches need (mode
  "endpoints": the `endpoint` array, 1/(K+1) of the bytes).
- Each consumer expands its chunks into samples (mode below), passes them through a shuffle buffer of
  `shuffle_buffer` samples (batches are uniform draws without replacement from what the buffer holds; it is
  refilled chunk by chunk) and makes whole batches of `batch_per_process` samples in numpy.
- Every consumer yields the same number of batches per epoch, min over consumers of ⌊samples_c / B⌋, so all
  ranks step together; the rest of an epoch is dropped (`describe()` reports how much: at most one chunk and one
  partial batch per reader). Which samples are dropped changes every epoch.
- With num_workers > 0 the batches are made in torch DataLoader worker processes (batch_size=None, whole batches
  per worker, `prefetch_factor` batches each in flight; a batch crosses the process boundary as one buffer, through
  the pipe up to 1 MiB and as shared memory above, unpacked into tensor views); the DataLoader interleaves workers
  round-robin. With num_workers = 0 they are made in the training process, which costs less per batch for small
  samples (no inter-process transfer). Epochs run forever; the training loop decides when to stop.
- Everything (shard order, buffer draws, subset choices) is a pure function of (seed, epoch, consumer), so the
  position is just (epoch, batches already yielded in that epoch). Resuming regenerates the epoch and replays the
  consumed batches' random draws without reading or converting their data, so a resumed run yields bitwise the
  batches the uninterrupted run would have. Resume needs the same seed, data settings, world size and num_workers
  (checked, with a clear error); the number of workers is part of the data order.

Modes and batch keys (float32 tensors, times [B] float32, `labels` [B] int64 when the stores are conditional)
-------------------------------------------------------------------------------------------------------------
Store order: point 0 = prior noise, point K = the solver's clean endpoint (the paper's t_0). Values are exact
rescalings of the stored states by the stored α and σ: `pipeline.time_convention` gives each point's factor
(the conversions are linear in the state), applied in float64 to the stored values, then cast to float32:

- "cm":        x_t [B,*S] (EDM view x̃ of point i), sigma [B] (its σ̃), x0 [B,*S] (endpoint K in the EDM view);
               points i = 0..K-1 (all, or `points_per_trajectory` of them drawn per trajectory).
- "mf":        z_t, t, z_r, r: two points of one trajectory in the flow-matching view (τ = σ̃/(1+σ̃),
               z = x̃/(1+σ̃)), t > r (t is the noisier point; the endpoint may be r, with τ = 0 when σ_K = 0);
               all pairs, or `pairs_per_trajectory` of them drawn per trajectory.
- "endpoints": x0 [B,*S]: the clean endpoints (EDM view), one sample per trajectory, read from the store's
               `endpoint` array (1/(K+1) of the trajectory bytes; storage schema 2).
- "ecd":       x_t, sigma_t, x_r, sigma_r, x0: consecutive solver points (i, i+1) in the EDM view (one teacher
               ODE step), plus the endpoint; all K steps or `points_per_trajectory` of them per trajectory.

Samples whose two points have equal time are dropped, and so are points with α = 0 (σ̃ = ∞, e.g. τ = 1 of a
flow-matching grid), which the EDM-view student cannot take (a warning says so). With `include_indices=True`
batches also carry int64 `store` (position in `urls`), `index` (trajectory index in its store), `point`
(store point of x_t / z_t / x0) and, except in "endpoints", `point_r` (store point of x0 / z_r / x_r).

Memory per reader: the last read (at most READ_BYTES) plus a buffer of about shuffle_buffer + one chunk's
samples, each holding one to three points in the storage dtype (endpoints: 1, cm/mf: 2, ecd: 3).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.time_convention import edm_from_native, fm_from_edm
from storage_schema import GenerationSpec, TrajectoryStore, open_store
from trainer.config import ConfigError
from trainer.corrupt_shards import ON_CORRUPT_SHARD, find_corrupt_shards, how_to_regenerate, verified_shard

__all__ = [
    "MODES",
    "IncompleteStoreError",
    "NotEnoughShardsError",
    "SampleShapeError",
    "StreamConfig",
    "StreamError",
    "StreamStateError",
    "TeacherMismatchError",
    "TeacherMismatchWarning",
    "TrajectoryStream",
    "UnusablePointsWarning",
    "make_stream",
    "sample_template",
    "samples_to_batch",
]

MODES = ("cm", "mf", "endpoints", "ecd")
STATE_FORMAT = "cmt-trajectory-stream/2"  # 2: readers are dealt runs of chunks, not whole shards
_ORDER_STREAM = 0  # tags of the independent random streams derived from the seed
_BUFFER_STREAM = 1
READ_BYTES = 32 * 2**20  # largest read (whole chunks of one shard) a reader makes at once
_ALIGN = 8  # byte alignment of each array inside a packed batch
SHARED_MEMORY_BYTES = 2**20  # larger worker batches travel as shared memory, smaller ones through the pipe


class StreamError(Exception):
    """Base class of the errors raised when building or resuming a `TrajectoryStream`."""


class IncompleteStoreError(StreamError):
    """A store has uncommitted shards and `allow_incomplete` is off."""


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


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """What to stream and how: stores, mode, batch size, sampling per trajectory, shuffling, workers, checks.

    `worker_start_method` picks how DataLoader workers start (None: the platform default; the stores reopen by
    URL in each worker). `expected_sample_shape` / `expected_fingerprint` are the student's (its init teacher's)
    sample shape and teacher fingerprint; a different shape is an error, a different fingerprint a warning (an
    error with strict).
    """

    urls: tuple[str, ...]
    mode: Literal["cm", "mf", "endpoints", "ecd"] = "cm"
    batch_per_process: int = 128
    points_per_trajectory: int | None = None
    pairs_per_trajectory: int | None = None
    shuffle_buffer: int = 8192
    num_workers: int = 1
    prefetch_factor: int = 4
    worker_start_method: Literal["fork", "spawn", "forkserver"] | None = None
    seed: int = 0
    allow_incomplete: bool = False
    on_corrupt_shard: Literal["error", "skip"] = "error"
    expected_sample_shape: tuple[int, ...] | None = None
    expected_fingerprint: str | None = None
    strict: bool = False
    include_indices: bool = False

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
        if self.shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be >= 0 samples, got {self.shuffle_buffer}")
        if self.num_workers < 0:
            raise ConfigError(
                f"num_workers must be >= 0 (0 = read in the training process), got {self.num_workers}"
            )
        if self.prefetch_factor < 1:
            raise ConfigError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
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
            if self.points_per_trajectory < 1:
                raise ConfigError(
                    f"points_per_trajectory must be >= 1 or none (all), got {self.points_per_trajectory}"
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
            if self.pairs_per_trajectory < 1:
                raise ConfigError(
                    f"pairs_per_trajectory must be >= 1 or none (all), got {self.pairs_per_trajectory}"
                )

    @property
    def consumers_per_rank(self) -> int:
        """Readers per process: the DataLoader workers, or the process itself when num_workers = 0."""
        return max(1, self.num_workers)


@dataclass(frozen=True)
class _StoreInfo:
    """What the stream needs of one store, picklable without an open handle (workers reopen by URL)."""

    url: str
    spec: GenerationSpec
    alpha: np.ndarray  # float64 [K+1]
    sigma: np.ndarray  # float64 [K+1]
    committed: tuple[int, ...]


@dataclass(frozen=True)
class _Items:
    """The per-trajectory sample templates of every store, flattened over stores (global item ids).

    Item g of store s takes point `point_a[g]` (and `point_b[g]`, `point_c[g]`) of a trajectory; a view of a
    stored state x is x · scale (the conversions are linear in x), its time `time_a` / `time_b`.
    """

    store: np.ndarray  # int64 [G]
    point_a: np.ndarray  # int64 [G]
    point_b: np.ndarray  # int64 [G]
    point_c: np.ndarray  # int64 [G]
    scale_a: np.ndarray  # float64 [G]
    scale_b: np.ndarray  # float64 [G]
    scale_c: np.ndarray  # float64 [G]
    time_a: np.ndarray  # float64 [G]
    time_b: np.ndarray  # float64 [G]
    offset: np.ndarray  # int64 [num_stores]: first item id of each store
    count: np.ndarray  # int64 [num_stores]: items per trajectory in each store's template
    drawn: np.ndarray  # int64 [num_stores]: items drawn per trajectory (count, or the subset size)


@dataclass(frozen=True)
class _EpochPlan:
    """One epoch's chunk assignment: rows into the pool's chunk table per consumer, and the batches each yields."""

    chunks: tuple[np.ndarray, ...]  # per consumer: rows of `_Reader.chunk_table`, in reading order
    samples: np.ndarray  # int64 [C]: samples available to each consumer
    batches_per_consumer: int


def _views(alpha: np.ndarray, sigma: np.ndarray) -> dict[str, np.ndarray]:
    """Per-point factors of the EDM and flow-matching views: view(x) = x · scale, via pipeline.time_convention.

    The conversions are linear in the state, so applying them to a unit state gives the exact factor.
    """
    unit = np.ones_like(alpha)  # [K+1]
    edm_scale, sigma_edm = edm_from_native(unit, alpha, sigma)  # [K+1], [K+1]: 1/α, σ/α
    fm_scale, tau = fm_from_edm(edm_scale, sigma_edm)  # [K+1], [K+1]: 1/(α(1+σ̃)), σ̃/(1+σ̃)
    return {"edm_scale": edm_scale, "sigma_edm": sigma_edm, "fm_scale": fm_scale, "tau": tau}


def sample_template(mode: str, alpha: np.ndarray, sigma: np.ndarray) -> dict[str, np.ndarray]:
    """The samples one trajectory with points (alpha, sigma) [K+1] gives in `mode`: point indices, scales and times.

    point_a / point_b (/ point_c) [M] are the trajectory points of each sample (see the module docstring for the
    modes); a view of a native state x is x · scale_a (EDM view, or flow-matching view in "mf"), at time time_a.
    Shared by the store stream and the online source (trainer/online.py), so both make the same samples.
    """
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    num_points = len(alpha)
    last = num_points - 1
    usable = alpha > 0  # [K+1]; α = 0 means σ̃ = ∞
    with np.errstate(divide="ignore", invalid="ignore"):
        view = _views(alpha, sigma)
    sigma_edm, tau = view["sigma_edm"], view["tau"]
    if mode == "cm":
        points_a = np.array([i for i in range(last) if usable[i] and sigma_edm[i] != sigma_edm[last]], np.int64)
        points_b = np.full_like(points_a, last)
    elif mode == "ecd":
        points_a = np.array(
            [i for i in range(last) if usable[i] and usable[i + 1] and sigma_edm[i] != sigma_edm[i + 1]], np.int64
        )
        points_b = points_a + 1
    elif mode == "endpoints":
        points_a = np.array([last] if usable[last] else [], np.int64)
        points_b = points_a.copy()
    else:
        pairs = [
            (a, b) if tau[a] > tau[b] else (b, a)
            for a in range(num_points) for b in range(a + 1, num_points)
            if usable[a] and usable[b] and tau[a] != tau[b]
        ]
        pairs_array = np.array(pairs, np.int64).reshape(-1, 2)  # [M, 2]
        points_a, points_b = pairs_array[:, 0], pairs_array[:, 1]
    view_scale, view_time = (view["fm_scale"], tau) if mode == "mf" else (view["edm_scale"], sigma_edm)
    points_c = np.full_like(points_a, last)
    return {
        "point_a": points_a, "point_b": points_b, "point_c": points_c,
        "scale_a": view_scale[points_a], "scale_b": view_scale[points_b], "scale_c": view["edm_scale"][points_c],
        "time_a": view_time[points_a], "time_b": view_time[points_b],
    }


def _build_items(cfg: StreamConfig, infos: Sequence[_StoreInfo]) -> _Items:
    """Templates of all stores, with the number drawn per trajectory; errors when a store yields no sample."""
    templates = [sample_template(cfg.mode, info.alpha, info.sigma) for info in infos]
    counts = np.array([len(template["point_a"]) for template in templates], np.int64)
    subset = cfg.pairs_per_trajectory if cfg.mode == "mf" else cfg.points_per_trajectory
    for info, count in zip(infos, counts):
        if count == 0:
            raise StreamError(
                f"store {info.url} gives no {cfg.mode!r} sample: every candidate point has α = 0 or the same time "
                f"as its partner (σ = {info.sigma.tolist()}, α = {info.alpha.tolist()}); use another store or mode"
            )
        if subset is not None and subset > count:
            name = "pairs_per_trajectory" if cfg.mode == "mf" else "points_per_trajectory"
            raise ConfigError(
                f"{name}={subset} but trajectories of {info.url} offer only {count} {cfg.mode!r} samples each; "
                f"set {name} <= {count} or none (all)"
            )
    drawn = counts if subset is None else np.full_like(counts, subset)
    merged = {name: np.concatenate([template[name] for template in templates]) for name in templates[0]}
    offset = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    store = np.repeat(np.arange(len(infos), dtype=np.int64), counts)
    return _Items(store=store, offset=offset, count=counts, drawn=drawn, **merged)


class _ShuffleBuffer:
    """Fixed-column sample buffer: append a chunk's samples, gather a batch, remove it by moving the tail in."""

    def __init__(self, columns: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        """Empty buffer whose column `name` holds rows of shape/dtype `columns[name]`."""
        self._layout = dict(columns)
        self._arrays = {name: np.empty((0, *shape), dtype) for name, (shape, dtype) in self._layout.items()}
        self.size = 0
        self.has_unread = False  # rows appended while skipping, without their data

    def reserve(self, extra: int) -> int:
        """Make room for `extra` more rows (capacity doubles); return the first free row."""
        needed = self.size + extra
        capacity = len(next(iter(self._arrays.values())))
        if needed > capacity:
            new_capacity = max(needed, 2 * capacity, 256)
            for name, (shape, dtype) in self._layout.items():
                grown = np.empty((new_capacity, *shape), dtype)
                grown[: self.size] = self._arrays[name][: self.size]
                self._arrays[name] = grown
        return self.size

    def __getitem__(self, name: str) -> np.ndarray:
        """The live rows of column `name` (a view)."""
        return self._arrays[name][: self.size]

    def column(self, name: str) -> np.ndarray:
        """The whole backing array of column `name` (to write appended rows into)."""
        return self._arrays[name]

    def remove(self, picked: np.ndarray) -> None:
        """Drop the distinct rows `picked`, filling their places with the unpicked rows of the tail."""
        tail_start = self.size - len(picked)
        holes = picked[picked < tail_start]
        tail_kept = np.ones(len(picked), bool)
        tail_kept[picked[picked >= tail_start] - tail_start] = False
        movers = tail_start + np.flatnonzero(tail_kept)  # same length as holes
        for array in self._arrays.values():
            array[holes] = array[movers]
        self.size = tail_start


class _Reader:
    """The picklable reading half of a stream: plans epochs and makes one consumer's batches."""

    def __init__(self, cfg: StreamConfig, infos: Sequence[_StoreInfo], pool: np.ndarray, rank: int, world_size: int):
        """Plan over `pool` (int64 [n, 2]: store position, shard) for `rank` of `world_size`."""
        self.cfg = cfg
        self.infos = tuple(infos)
        self.pool = pool
        self.rank = rank
        self.world_size = world_size
        self.workers = cfg.consumers_per_rank
        self.num_consumers = world_size * self.workers
        self.items = _build_items(cfg, self.infos)
        self.sample_shape = self.infos[0].spec.sample_shape
        self.conditional = self.infos[0].spec.is_conditional
        self.storage_dtype = np.result_type(*(np.dtype(info.spec.dtype) for info in self.infos))
        rows = [(position, int(store), chunk, *self.infos[store].spec.chunk_bounds(chunk))
                for position, (store, shard) in enumerate(pool.tolist())
                for chunk in self.infos[store].spec.shard_chunks(shard)]
        table = np.array(rows, np.int64).reshape(-1, 5)  # [M, 5]: pool position, store, chunk, start, stop
        self.chunk_table = table[:, :3]  # [M, 3]
        self.chunk_samples = (table[:, 4] - table[:, 3]) * self.items.drawn[table[:, 1]]  # [M]
        self._stores: list[TrajectoryStore] | None = None
        self._plans: dict[int, _EpochPlan] = {}
        self._block: tuple[int, int, int, dict[str, Any]] | None = None  # store, first chunk, stop chunk, data
        self._checked_shards: set[tuple[int, int]] = set()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open store handles or read data (each process reopens the stores by URL)."""
        return {**self.__dict__, "_stores": None, "_block": None, "_checked_shards": set()}

    def stores(self) -> list[TrajectoryStore]:
        """The stores, opened read-only in this process on first use."""
        if self._stores is None:
            self._stores = [open_store(info.url, "r", expected_spec=info.spec) for info in self.infos]
        return self._stores

    def epoch_plan(self, epoch: int) -> _EpochPlan:
        """Shard order of `epoch` (a pure function of seed and epoch) dealt round-robin to the consumers."""
        if epoch not in self._plans:
            if len(self._plans) >= 4:
                self._plans.clear()
            self._plans[epoch] = self._plan(epoch)
        return self._plans[epoch]

    def _plan(self, epoch: int) -> _EpochPlan:
        """Compute `epoch_plan` (uncached): the epoch's shard order, read chunk by chunk, cut into C contiguous runs of
        ⌊M/C⌋ or ⌈M/C⌉ chunks (M chunks in the pool), so readers get balanced work even with fewer shards than
        readers, and each reads whole chunks of at most a few consecutive shards."""
        order = np.random.default_rng([self.cfg.seed, epoch, _ORDER_STREAM]).permutation(len(self.pool))  # [n]
        rank_in_order = np.empty_like(order)
        rank_in_order[order] = np.arange(len(order))
        sequence = np.argsort(rank_in_order[self.chunk_table[:, 0]], kind="stable")  # [M], chunk rows in shard order
        bounds = (np.arange(self.num_consumers + 1) * len(sequence)) // self.num_consumers  # [C+1]
        chunks = tuple(sequence[bounds[c] : bounds[c + 1]] for c in range(self.num_consumers))
        samples = np.array([self.chunk_samples[rows].sum() for rows in chunks], np.int64)  # [C]
        return _EpochPlan(chunks, samples, int(samples.min()) // self.cfg.batch_per_process)

    def batches_per_rank(self, epoch: int) -> int:
        """Batches every rank yields in `epoch` (all its consumers, the same count for every rank)."""
        return self.workers * self.epoch_plan(epoch).batches_per_consumer

    def worker_batches(
        self, start_epoch: int, start_batch: int, physical_worker: int
    ) -> Generator[dict[str, torch.Tensor], None, None]:
        """Endless batches of one reader of this rank, resuming at rank-level position (start_epoch, start_batch).

        The rank's batch g of an epoch belongs to logical worker g mod W. The DataLoader asks its physical
        workers round-robin from worker 0, so physical worker p plays logical worker (p + start_batch) mod W
        and first skips the batches of that logical worker that precede the position.
        """
        logical = (physical_worker + start_batch) % self.workers
        consumer = self.rank * self.workers + logical
        skip = len(range(logical, start_batch, self.workers))
        epoch = start_epoch
        while True:
            yield from self.consumer_epoch(epoch, consumer, skip)
            epoch, skip = epoch + 1, 0

    def _chunk_list(self, epoch: int, consumer: int) -> list[tuple[int, int, int]]:
        """(store position, chunk, stop) triples that consumer reads in `epoch`, in order; `stop` ends the run of
        consecutive chunks of that store the consumer reads from there on (a block read never passes it)."""
        rows = self.chunk_table[self.epoch_plan(epoch).chunks[consumer]]  # [m, 3]
        stores, chunks = rows[:, 1].tolist(), rows[:, 2].tolist()
        stops = [0] * len(chunks)
        for index in reversed(range(len(chunks))):
            follows = index + 1 < len(chunks) and stores[index + 1] == stores[index] and chunks[index + 1] == chunks[index] + 1
            stops[index] = stops[index + 1] if follows else chunks[index] + 1
        return list(zip(stores, chunks, stops))

    def _new_buffer(self) -> _ShuffleBuffer:
        """An empty shuffle buffer with the columns this mode needs."""
        sample = (self.sample_shape, self.storage_dtype)
        integer = ((), np.dtype(np.int64))
        columns = {"item": integer, "index": integer, "chunk": integer, "raw_a": sample}
        if self.cfg.mode != "endpoints":
            columns["raw_b"] = sample
        if self.cfg.mode == "ecd":
            columns["raw_c"] = sample
        if self.conditional:
            columns["label"] = integer
        return _ShuffleBuffer(columns)

    def _draw_items(self, store: int, num_rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(global item ids, row in chunk) of the samples made from `num_rows` trajectories of `store`."""
        count, drawn = int(self.items.count[store]), int(self.items.drawn[store])
        if drawn == count:
            local = np.tile(np.arange(count), num_rows)  # [n·M]
        else:
            local = np.argsort(rng.random((num_rows, count)), axis=1)[:, :drawn].reshape(-1)  # [n·k]
        rows = np.repeat(np.arange(num_rows), drawn)  # [n·k]
        return self.items.offset[store] + local, rows

    def read_chunk(self, store: int, chunk: int, run_stop: int) -> dict[str, Any]:
        """Chunk `chunk` of store `store` as dict(points, label=[n] or None, start), from the block read; points is
        traj [n, K+1, *S], or endpoint [n, *S] in mode "endpoints" (the store's `endpoint` array: 1/(K+1) the bytes).

        A read covers whole chunks of one shard, from `chunk` on, up to READ_BYTES and never past `run_stop` (the end
        of this reader's run of consecutive chunks); the shard is checked against its commit digest before this
        reader's first read of it in the run.
        """
        if self._block is None or self._block[0] != store or not self._block[1] <= chunk < self._block[2]:
            self._block = None
            self._block = self._read_block(store, chunk, run_stop)
        _, first, _, data = self._block
        spec = self.infos[store].spec
        offset = (chunk - first) * spec.chunk_size
        start, stop = spec.chunk_bounds(chunk)
        label = data["label"]
        return {
            "points": data["points"][offset : offset + stop - start],
            "label": None if label is None else label[offset : offset + stop - start],
            "start": start,
        }

    def _read_block(self, store: int, chunk: int, run_stop: int) -> tuple[int, int, int, dict[str, Any]]:
        """Read whole chunks of one shard starting at `chunk` (points and labels only, no per-sample reads).

        This reader's first read of a shard in the run checks it against its digest (once per run, not per epoch:
        re-checking every epoch would decode the whole shard again and cancel what mode "endpoints" saves); a shard
        that fits one read is read whole by that check, and the check's read is the block (its traj or, in mode
        "endpoints", its endpoints).
        """
        opened, spec = self.stores()[store], self.infos[store].spec
        shard = chunk * spec.chunk_size // spec.shard_size
        endpoints = self.cfg.mode == "endpoints"
        points_key = "endpoint" if endpoints else "traj"
        if (store, shard) not in self._checked_shards:
            whole = verified_shard(opened, shard, READ_BYTES)
            self._checked_shards.add((store, shard))
            if whole is not None:
                chunks = spec.shard_chunks(shard)
                return store, chunks.start, chunks.stop, {"points": whole[points_key], "label": whole["label"]}
        points = 1 if endpoints else spec.num_points
        chunk_bytes = spec.chunk_size * points * math.prod(spec.sample_shape) * np.dtype(spec.dtype).itemsize
        stop_chunk = min(spec.shard_chunks(shard).stop, run_stop, chunk + max(1, READ_BYTES // chunk_bytes))
        start, stop = spec.chunk_bounds(chunk)[0], spec.chunk_bounds(stop_chunk - 1)[1]
        # The shard was checked against its digest above; decoding errors here arrive as CorruptShardError.
        if endpoints:
            data = opened.read_endpoints(start, stop, require_committed=False)
        else:
            data = opened.read_trajectories(start, stop, require_committed=False)
        return store, chunk, stop_chunk, {"points": data[points_key], "label": data["label"]}

    def _write_data(self, buffer: _ShuffleBuffer, at: np.ndarray, chunk: Mapping[str, Any]) -> None:
        """Copy the points that buffer rows `at` refer to out of a chunk read from the store."""
        items = buffer.column("item")[at]
        rows = buffer.column("index")[at] - chunk["start"]
        points = chunk["points"]  # [n, K+1, *S], or the endpoints [n, *S]
        if self.cfg.mode == "endpoints":
            buffer.column("raw_a")[at] = points[rows]
        else:
            buffer.column("raw_a")[at] = points[rows, self.items.point_a[items]]
            buffer.column("raw_b")[at] = points[rows, self.items.point_b[items]]
        if self.cfg.mode == "ecd":
            buffer.column("raw_c")[at] = points[rows, self.items.point_c[items]]
        if self.conditional:
            buffer.column("label")[at] = chunk["label"][rows]

    def _read_unread(self, buffer: _ShuffleBuffer, chunks: Sequence[tuple[int, int, int]]) -> None:
        """After skipping: read the chunks of the samples still buffered and fill in their data."""
        sequence = buffer["chunk"]
        for position in np.unique(sequence).tolist():
            buffer_rows = np.flatnonzero(sequence == position)
            self._write_data(buffer, buffer_rows, self.read_chunk(*chunks[position]))
        buffer.has_unread = False

    def consumer_epoch(self, epoch: int, consumer: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one consumer in one epoch; the first `skip` are replayed (random draws only), not made."""
        plan = self.epoch_plan(epoch)
        chunks = self._chunk_list(epoch, consumer)
        rng = np.random.default_rng([self.cfg.seed, epoch, consumer, self.num_consumers, _BUFFER_STREAM])
        buffer = self._new_buffer()
        fill_to = max(self.cfg.shuffle_buffer, self.cfg.batch_per_process)
        next_chunk = 0
        for batch in range(plan.batches_per_consumer):
            live = batch >= skip
            if live and buffer.has_unread:
                self._read_unread(buffer, chunks)
            while buffer.size < fill_to and next_chunk < len(chunks):
                store, chunk, run_stop = chunks[next_chunk]
                start, stop = self.infos[store].spec.chunk_bounds(chunk)
                items, rows = self._draw_items(store, stop - start, rng)
                at = np.arange(buffer.reserve(len(items)), buffer.size + len(items))
                buffer.column("item")[at] = items
                buffer.column("index")[at] = start + rows
                buffer.column("chunk")[at] = next_chunk
                buffer.size += len(items)
                if live:
                    self._write_data(buffer, at, self.read_chunk(store, chunk, run_stop))
                else:
                    buffer.has_unread = True
                next_chunk += 1
            picked = rng.choice(buffer.size, self.cfg.batch_per_process, replace=False)  # [B]
            if live:
                yield self._assemble(buffer, picked)
            buffer.remove(picked)

    def _assemble(self, buffer: _ShuffleBuffer, picked: np.ndarray) -> dict[str, torch.Tensor]:
        """Convert the picked buffer rows into one batch of the mode's keys (float64 arithmetic, float32 out)."""
        items = buffer["item"][picked]  # [B]
        mode, table = self.cfg.mode, self.items
        columns = {"a": "raw_a"} if mode == "endpoints" else {"a": "raw_a", "b": "raw_b"}
        if mode == "ecd":
            columns["c"] = "raw_c"
        batch = samples_to_batch(
            mode,
            {key: buffer[column][picked] for key, column in columns.items()},
            {key: getattr(table, f"scale_{key}")[items] for key in columns},
            {"a": table.time_a[items], "b": table.time_b[items]},
        )
        if self.conditional:
            batch["labels"] = torch.from_numpy(buffer["label"][picked])
        if self.cfg.include_indices:
            batch["store"] = torch.from_numpy(table.store[items])
            batch["index"] = torch.from_numpy(buffer["index"][picked])
            batch["point"] = torch.from_numpy(table.point_a[items])
            if mode != "endpoints":
                batch["point_r"] = torch.from_numpy(table.point_b[items])
        return batch


def samples_to_batch(mode: str, raw: Mapping[str, np.ndarray], scale: Mapping[str, np.ndarray],
                     time: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The mode's batch keys from each sample's native points raw["a"|"b"|"c"] [B, *S], view scales [B] and times [B].

    A view is x · scale computed in float64 from the stored values and cast to float32 (times too), so every source of
    the same points (store stream, online solver) gives bitwise the same batch.
    """

    def state(key: str) -> torch.Tensor:
        """View of the points `key`: [B, *S] float32."""
        values = raw[key].astype(np.float64)  # [B, *S]
        values *= scale[key].reshape((-1,) + (1,) * (values.ndim - 1))
        return torch.from_numpy(values.astype(np.float32))

    def times(key: str) -> torch.Tensor:
        """Per-sample times [B] as float32."""
        return torch.from_numpy(np.asarray(time[key]).astype(np.float32))

    if mode == "cm":
        return {"x_t": state("a"), "sigma": times("a"), "x0": state("b")}
    if mode == "mf":
        return {"z_t": state("a"), "t": times("a"), "z_r": state("b"), "r": times("b")}
    if mode == "endpoints":
        return {"x0": state("a")}
    return {"x_t": state("a"), "sigma_t": times("a"), "x_r": state("b"), "sigma_r": times("b"), "x0": state("c")}


PackedBatch = tuple[Any, list[tuple[str, str, tuple[int, ...], int]]]


def _pack(batch: Mapping[str, torch.Tensor]) -> PackedBatch:
    """Every array of a batch in one uint8 buffer, and how to unpack it.

    Up to SHARED_MEMORY_BYTES the buffer is a numpy array (pickled through the worker's pipe, the cheaper way for
    small batches); above, a torch tensor (sent as one shared-memory segment).
    """
    layout, offset = [], 0
    for name, tensor in batch.items():
        layout.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset))
        offset += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    packed = torch.empty(offset, dtype=torch.uint8)  # [bytes]
    for (_, _, _, start), tensor in zip(layout, batch.values()):
        size = tensor.numel() * tensor.element_size()
        packed[start : start + size] = tensor.reshape(-1).view(torch.uint8)
    return (packed.numpy() if offset <= SHARED_MEMORY_BYTES else packed), layout


def _as_is(item: PackedBatch) -> PackedBatch:
    """DataLoader collate_fn that leaves a worker's packed batch untouched (numpy stays numpy)."""
    return item


def _unpack(packed: Any, layout: Sequence[tuple[str, str, Sequence[int], int]]) -> dict[str, torch.Tensor]:
    """The batch dict of `_pack`, as views into the one received buffer."""
    packed = torch.from_numpy(packed) if isinstance(packed, np.ndarray) else packed  # [bytes]
    batch = {}
    for name, dtype_name, shape, start in layout:
        dtype = getattr(torch, dtype_name)
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        batch[name] = packed[start : start + size].view(dtype).view(tuple(shape))
    return batch


class _WorkerStream(IterableDataset):
    """What each DataLoader worker iterates: its reader's endless batches from the resume position."""

    def __init__(self, reader: _Reader, start_epoch: int, start_batch: int) -> None:
        """Remember the reader and the rank-level position to start from."""
        super().__init__()
        self.reader = reader
        self.start_epoch = start_epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[PackedBatch]:
        """Packed batches of the calling worker (worker 0 when iterated outside a DataLoader worker)."""
        info = get_worker_info()
        for batch in self.reader.worker_batches(self.start_epoch, self.start_batch, 0 if info is None else info.id):
            yield _pack(batch)


class TrajectoryStream:
    """Endless, resumable batches from trajectory stores for one process (see the module docstring)."""

    def __init__(self, cfg: StreamConfig, *, rank: int, world_size: int, pin_memory: bool = False) -> None:
        """Open and check the stores, fix the shard pool and plan the split for `rank` of `world_size`."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        self.stores = [open_store(url, "r") for url in cfg.urls]
        self._check_stores()
        self.infos = tuple(
            _StoreInfo(
                store.url, store.spec, np.array(store.alpha), np.array(store.sigma), tuple(store.committed_shards())
            )
            for store in self.stores
        )
        self._check_incomplete()
        self._warn_unusable_points()
        self.skipped_shards: list[dict[str, Any]] = []
        if cfg.on_corrupt_shard == "skip":
            self._skip_corrupt_shards()
        pool = [(position, shard) for position, info in enumerate(self.infos) for shard in info.committed]
        self._use_pool(np.array(pool, np.int64).reshape(-1, 2))
        self.epoch = 0
        self.batch_in_epoch = 0

    # construction checks -----------------------------------------------------------------------------------
    def _check_stores(self) -> None:
        """Sample shapes, conditioning and teacher fingerprints of the stores against each other and the student."""
        cfg = self.cfg
        shapes = {store.url: store.spec.sample_shape for store in self.stores}
        if len(set(shapes.values())) > 1:
            raise SampleShapeError(
                f"the stores have different sample shapes {shapes}; mix only stores of the same data/resolution"
            )
        shape = next(iter(shapes.values()))
        if cfg.expected_sample_shape is not None and shape != cfg.expected_sample_shape:
            raise SampleShapeError(
                f"the stores hold samples of shape {shape} but the student expects {cfg.expected_sample_shape}; "
                "use stores generated by the student's teacher (same resolution and channels)"
            )
        classes = {store.url: store.spec.num_classes for store in self.stores}
        if len(set(classes.values())) > 1:
            raise StreamError(
                f"the stores disagree on class conditioning (num_classes per store: {classes}); mix only stores "
                "that are all unconditional or all have the same number of classes"
            )
        if cfg.expected_fingerprint is None:
            return
        for store in self.stores:
            found = store.spec.teacher_fingerprint
            if found != cfg.expected_fingerprint:
                message = (
                    f"store {store.url} was generated by teacher {found}, the student starts from teacher "
                    f"{cfg.expected_fingerprint}; CMT regresses onto that teacher's own ODE endpoints, so use stores "
                    "made by the student's teacher"
                )
                if cfg.strict:
                    raise TeacherMismatchError(message + " (or set stream.strict=false to only warn)")
                warnings.warn(message, TeacherMismatchWarning, stacklevel=3)

    def _check_incomplete(self) -> None:
        """Refuse stores with uncommitted shards unless allow_incomplete, and stores with no committed shard."""
        for info in self.infos:
            total = info.spec.num_shards
            if len(info.committed) == total:
                continue
            if not self.cfg.allow_incomplete:
                missing = sorted(set(range(total)) - set(info.committed))
                raise IncompleteStoreError(
                    f"store {info.url} has {len(info.committed)} of {total} shards committed (missing: "
                    f"{missing[:10]}{' ...' if len(missing) > 10 else ''}); finish generating it (re-run the "
                    "generation job, it resumes) or set stream.allow_incomplete=true to train on the committed shards"
                )
            if not info.committed:
                raise IncompleteStoreError(
                    f"store {info.url} has no committed shard yet; generate some before training on it"
                )

    def _skip_corrupt_shards(self) -> None:
        """on_corrupt_shard="skip": check every committed shard now and leave the corrupt ones out of the pool."""
        self.skipped_shards = find_corrupt_shards(self.stores, [info.committed for info in self.infos], READ_BYTES)
        skipped = {(entry["url"], entry["shard"]) for entry in self.skipped_shards}
        self.infos = tuple(
            dataclasses.replace(info, committed=tuple(n for n in info.committed if (info.url, n) not in skipped))
            for info in self.infos
        )
        for info in self.infos:
            if not info.committed:
                raise IncompleteStoreError(
                    f"every committed shard of store {info.url} is corrupt (stream.on_corrupt_shard=skip left none): "
                    f"regenerate them with {how_to_regenerate(info.url)}, or drop the store"
                )

    def log_values(self) -> dict[str, float]:
        """Scalars for every logged step (trainer.loop): the count of corrupt shards left out, when skipping."""
        return {"corrupt_shards_skipped": len(self.skipped_shards)} if self.cfg.on_corrupt_shard == "skip" else {}

    def _warn_unusable_points(self) -> None:
        """Warn about points with α = 0 (σ̃ = ∞), which the stream leaves out."""
        for info in self.infos:
            zero = np.flatnonzero(info.alpha <= 0).tolist()
            if zero:
                warnings.warn(
                    f"store {info.url}: points {zero} have α = 0 (σ̃ = ∞, pure noise), which the student's EDM "
                    "view cannot take; they are left out of every sample",
                    UnusablePointsWarning,
                    stacklevel=3,
                )

    def _use_pool(self, pool: np.ndarray) -> None:
        """Plan over `pool` and check that every consumer gets chunks and at least one batch per epoch."""
        cfg = self.cfg
        consumers = self.world_size * cfg.consumers_per_rank
        reader = _Reader(cfg, self.infos, pool, self.rank, self.world_size)
        total_chunks = len(reader.chunk_table)
        if total_chunks < consumers:
            most_workers = total_chunks // self.world_size
            fix = (
                f"Set num_workers to {most_workers} or less" if most_workers >= 1
                else f"Run at most {total_chunks} processes"
            )
            raise NotEnoughShardsError(
                f"{total_chunks} committed chunks ({len(pool)} shards) cannot be split over {consumers} readers "
                f"(world_size {self.world_size} × {cfg.consumers_per_rank} per process, num_workers={cfg.num_workers}): "
                f"some reader would get none. {fix}, or generate the stores with a smaller chunk_size (more chunks)"
            )
        fewest_chunks = total_chunks // consumers
        worst_case = int(np.sort(reader.chunk_samples)[:fewest_chunks].sum())
        if worst_case < cfg.batch_per_process:
            raise NotEnoughShardsError(
                f"a reader may get only {fewest_chunks} chunk(s) = {worst_case} samples per epoch, fewer than "
                f"batch_per_process={cfg.batch_per_process} ({total_chunks} chunks over {consumers} readers); lower "
                "batch_per_process or num_workers, or use more trajectories"
            )
        self._reader = reader
        self._pool = pool

    # stream -------------------------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape S of one sample (the same in every store)."""
        return self._reader.sample_shape

    @property
    def num_classes(self) -> int | None:
        """Number of classes of conditional stores, None when unconditional."""
        return self.infos[0].spec.num_classes

    @property
    def teacher_fingerprints(self) -> tuple[str, ...]:
        """Teacher fingerprint of each store, in `cfg.urls` order."""
        return tuple(info.spec.teacher_fingerprint for info in self.infos)

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches this (and every) rank yields in `epoch` (default: the current one)."""
        return self._reader.batches_per_rank(self.epoch if epoch is None else epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches forever from the current position, advancing it as each batch is handed out."""
        cfg = self.cfg
        if cfg.num_workers == 0:
            self._reader._stores = self.stores
            source: Generator[dict[str, torch.Tensor], None, None] = self._reader.worker_batches(
                self.epoch, self.batch_in_epoch, 0
            )
        else:
            loader = DataLoader(
                _WorkerStream(self._reader, self.epoch, self.batch_in_epoch),
                batch_size=None,
                num_workers=cfg.num_workers,
                prefetch_factor=cfg.prefetch_factor,
                pin_memory=self.pin_memory,
                collate_fn=_as_is,
                multiprocessing_context=cfg.worker_start_method,
            )
            source = (_unpack(packed, layout) for packed, layout in loader)
        try:
            for batch in source:
                self.batch_in_epoch += 1
                if self.batch_in_epoch == self.batches_per_epoch():
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                yield batch
        finally:
            source.close()

    # checkpointing ------------------------------------------------------------------------------------------
    def _signature(self) -> dict[str, Any]:
        """Everything besides the position that decides the batch sequence."""
        cfg = self.cfg
        return {
            "stores": [info.spec.cache_key() for info in self.infos],
            "mode": cfg.mode,
            "batch_per_process": cfg.batch_per_process,
            "points_per_trajectory": cfg.points_per_trajectory,
            "pairs_per_trajectory": cfg.pairs_per_trajectory,
            "shuffle_buffer": cfg.shuffle_buffer,
            "seed": cfg.seed,
            "world_size": self.world_size,
            "num_workers": cfg.num_workers,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch (the same on every rank), the data settings and the shard pool."""
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "signature": self._signature(),
            "pool": self._pool.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position over the saved shard pool; other data settings are refused."""
        if state.get("format") != STATE_FORMAT:
            raise StreamStateError(
                f"not a trajectory stream position (format {state.get('format')!r}, expected {STATE_FORMAT!r}); "
                "resume with the same data pipeline or use a new output_dir"
            )
        saved, current = state["signature"], self._signature()
        differences = [f"{name}: checkpoint {saved.get(name)!r}, now {value!r}" for name, value in current.items()
                       if saved.get(name) != value]
        if differences:
            raise StreamStateError(
                "the checkpoint's data stream was made with other settings (" + "; ".join(differences) + "); resume "
                "with the same data settings, number of processes and num_workers, or use a new output_dir"
            )
        pool = np.array(state["pool"], np.int64).reshape(-1, 2)
        if not np.array_equal(pool, self._pool):
            skipped = {(entry["url"], entry["shard"]): entry["problem"] for entry in self.skipped_shards}
            for store, shard in pool.tolist():
                problem = skipped.get((self.infos[store].url, shard))
                if problem is not None:
                    raise StreamStateError(
                        f"the checkpoint trained on shard {shard} of {self.infos[store].url}, which is corrupt now "
                        f"({problem}): regenerate it with {how_to_regenerate(self.infos[store].url)} and resume, or "
                        "start a new run (new output_dir)"
                    )
                if shard not in self.infos[store].committed:
                    raise StreamStateError(
                        f"the checkpoint trained on shard {shard} of {self.infos[store].url}, which is no longer "
                        "committed; restore or regenerate that shard, or start a new run (new output_dir)"
                    )
            self._use_pool(pool)
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])

    # dry runs -----------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Stores, split and epoch sizes for dry runs: chunks, shards and samples per rank, batches per epoch, drop."""
        reader, cfg = self._reader, self.cfg
        plan = reader.epoch_plan(self.epoch)
        workers = cfg.consumers_per_rank
        ranks = range(self.world_size)
        per_rank_rows = [np.concatenate(plan.chunks[rank * workers : (rank + 1) * workers]) for rank in ranks]
        samples_per_epoch = int(reader.chunk_samples.sum())
        used = self.world_size * reader.batches_per_rank(self.epoch) * cfg.batch_per_process
        return {
            "mode": cfg.mode,
            "stores": [
                {
                    "url": info.url,
                    "key": info.spec.cache_key(),
                    "teacher_fingerprint": info.spec.teacher_fingerprint,
                    "solver": info.spec.solver,
                    "steps": info.spec.steps,
                    "shards_committed": len(info.committed),
                    "shards_total": info.spec.num_shards,
                    "samples_per_trajectory": int(reader.items.drawn[position]),
                    "in_pool": int(np.sum(self._pool[:, 0] == position)),
                }
                for position, info in enumerate(self.infos)
            ],
            "sample_shape": list(self.sample_shape),
            "num_classes": self.num_classes,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_workers": cfg.num_workers,
            "readers": reader.num_consumers,
            "batch_per_process": cfg.batch_per_process,
            "shards_in_pool": len(self._pool),
            "chunks_in_pool": len(reader.chunk_table),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "chunks_per_rank": [len(rows) for rows in per_rank_rows],
            "shards_per_rank": [len(np.unique(reader.chunk_table[rows, 0])) for rows in per_rank_rows],
            "samples_per_rank": [int(reader.chunk_samples[rows].sum()) for rows in per_rank_rows],
            "batches_per_epoch_per_rank": reader.batches_per_rank(self.epoch),
            "samples_per_epoch": samples_per_epoch,
            "samples_used_per_epoch": used,
            "samples_dropped_per_epoch": samples_per_epoch - used,
            "corrupt_shards_skipped": list(self.skipped_shards),
        }


def make_stream(
    cfg: StreamConfig,
    accelerator: Any,
    *,
    expected_sample_shape: Sequence[int] | None = None,
    expected_fingerprint: str | None = None,
) -> TrajectoryStream:
    """The stream for this process, rank and world size taken from `accelerator` (not passed to prepare).

    `expected_sample_shape` / `expected_fingerprint` (e.g. the student's teacher's) override the config's checks.
    """
    overrides: dict[str, Any] = {}
    if expected_sample_shape is not None:
        overrides["expected_sample_shape"] = tuple(expected_sample_shape)
    if expected_fingerprint is not None:
        overrides["expected_fingerprint"] = expected_fingerprint
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    pin_memory = cfg.num_workers > 0 and accelerator.device.type == "cuda"
    return TrajectoryStream(
        cfg, rank=accelerator.process_index, world_size=accelerator.num_processes, pin_memory=pin_memory
    )
