"""The picklable reading half of a `TrajectoryStream`: plans each epoch and makes one reader's batches.

One epoch permutes the pool's shards with a generator seeded by (seed, epoch); their chunks in that order are cut into
C contiguous runs (C = world_size × readers per process), and reader c reads run c in whole chunks, several consecutive
chunks of one shard per read (at most READ_BYTES). It expands its chunks into the samples of the mode's per-trajectory
template (`trainer.data.batch_schema`), passes them through a `ShuffleBuffer` and makes whole batches in numpy. Every
draw is a pure function of (seed, epoch, reader), so a resumed reader replays the draws of the batches already used
without reading their data. A reader's first read of a shard in its process checks the shard against its commit digest
(`trainer.data.corrupt_shards`) before any of its samples is used.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from storage_schema import TrajectoryStore, open_store
from trainer.config import ConfigError
from trainer.data.batch_schema import POINT_KEYS, sample_template, samples_to_batch
from trainer.data.corrupt_shards import verified_shard
from trainer.data.errors import StreamError
from trainer.data.options import StreamConfig
from trainer.data.shuffle_buffer import ShuffleBuffer
from trainer.data.store_info import StoreInfo

__all__ = ["READ_BYTES", "EpochPlan", "Items", "Reader", "build_items"]

_ORDER_STREAM = 0  # tags of the independent random streams derived from the seed
_BUFFER_STREAM = 1
READ_BYTES = 32 * 2**20  # largest read (whole chunks of one shard) a reader makes at once


@dataclass(frozen=True)
class Items:
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
class EpochPlan:
    """One epoch's chunk assignment: rows into the pool's chunk table per consumer, and the batches each yields."""

    chunks: tuple[np.ndarray, ...]  # per consumer: rows of `Reader.chunk_table`, in reading order
    samples: np.ndarray  # int64 [C]: samples available to each consumer
    batches_per_consumer: int


def build_items(cfg: StreamConfig, infos: Sequence[StoreInfo]) -> Items:
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
    return Items(store=store, offset=offset, count=counts, drawn=drawn, **merged)



class Reader:
    """The picklable reading half of a stream: plans epochs and makes one consumer's batches."""

    def __init__(self, cfg: StreamConfig, infos: Sequence[StoreInfo], pool: np.ndarray, rank: int, world_size: int):
        """Plan over `pool` (int64 [n, 2]: store position, shard) for `rank` of `world_size`."""
        self.cfg = cfg
        self.infos = tuple(infos)
        self.pool = pool
        self.rank = rank
        self.world_size = world_size
        self.workers = cfg.consumers_per_rank
        self.num_consumers = world_size * self.workers
        self.items = build_items(cfg, self.infos)
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
        self._plans: dict[int, EpochPlan] = {}
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

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """Shard order of `epoch` (a pure function of seed and epoch) dealt round-robin to the consumers."""
        if epoch not in self._plans:
            if len(self._plans) >= 4:
                self._plans.clear()
            self._plans[epoch] = self._plan(epoch)
        return self._plans[epoch]

    def _plan(self, epoch: int) -> EpochPlan:
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
        return EpochPlan(chunks, samples, int(samples.min()) // self.cfg.batch_per_process)

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

    def _new_buffer(self) -> ShuffleBuffer:
        """An empty shuffle buffer with the columns this mode needs."""
        sample = (self.sample_shape, self.storage_dtype)
        integer = ((), np.dtype(np.int64))
        columns = {"item": integer, "index": integer, "chunk": integer}
        columns.update({f"raw_{key}": sample for key in POINT_KEYS[self.cfg.mode]})
        if self.conditional:
            columns["label"] = integer
        return ShuffleBuffer(columns)

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

    def _write_data(self, buffer: ShuffleBuffer, at: np.ndarray, chunk: Mapping[str, Any]) -> None:
        """Copy the points that buffer rows `at` refer to out of a chunk read from the store."""
        items = buffer.column("item")[at]
        rows = buffer.column("index")[at] - chunk["start"]
        points = chunk["points"]  # [n, K+1, *S], or the endpoints [n, *S]
        if self.cfg.mode == "endpoints":
            buffer.column("raw_a")[at] = points[rows]
        else:
            for key in POINT_KEYS[self.cfg.mode]:
                buffer.column(f"raw_{key}")[at] = points[rows, getattr(self.items, f"point_{key}")[items]]
        if self.conditional:
            buffer.column("label")[at] = chunk["label"][rows]

    def _read_unread(self, buffer: ShuffleBuffer, chunks: Sequence[tuple[int, int, int]]) -> None:
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

    def _assemble(self, buffer: ShuffleBuffer, picked: np.ndarray) -> dict[str, torch.Tensor]:
        """Convert the picked buffer rows into one batch of the mode's keys (float64 arithmetic, float32 out)."""
        items = buffer["item"][picked]  # [B]
        mode, table = self.cfg.mode, self.items
        columns = {key: f"raw_{key}" for key in POINT_KEYS[mode]}
        batch = samples_to_batch(
            mode,
            {key: buffer[column][picked] for key, column in columns.items()},
            {key: getattr(table, f"scale_{key}")[items] for key in columns},
            {"a": table.time_a[items], "b": table.time_b[items]},
        )
        if self.conditional:
            batch["labels"] = torch.from_numpy(buffer["label"][picked])
        if self.cfg.include_indices or self.cfg.record_chunks:
            batch["store"] = torch.from_numpy(table.store[items])
            batch["index"] = torch.from_numpy(buffer["index"][picked])
            batch["point"] = torch.from_numpy(table.point_a[items])
            if mode != "endpoints":
                batch["point_r"] = torch.from_numpy(table.point_b[items])
        return batch
