"""Streaming training batches from one or more trajectory stores (mid- and post-training data).

`TrajectoryStream` is an endless, resumable stream of dict batches (a `trainer.batches.ResumableBatches`)
read chunk by chunk from the committed shards of Zarr trajectory stores (`storage_schema`).

How it is prepared
------------------
Build it with `make_stream(cfg, accelerator)`, the one constructor every stage uses, AFTER the Accelerator (rank,
world size and device come from it) and hand it to `train_loop(batches=...)` as it is. It is NOT passed to
`accelerator.prepare`: Accelerate must not re-shard or dispatch it, because the stream already splits the data over
processes itself, and its position is checkpointed through `state_dict` / `load_state_dict` (the loop registers it
for checkpointing). On a CUDA device with num_workers > 0 the DataLoader pins the batches (pin_memory), so their copy
to the GPU can overlap compute.
The stores are checked once, as the stream is built (`trainer.data.store_info.check_stores`).

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
  before any of its samples is used (`trainer.data.corrupt_shards`: a corrupt shard stops training with the fix named,
  or with `on_corrupt_shard="skip"` is left out of the pool); later epochs read only what their batches need (mode
  "endpoints": the `endpoint` array, 1/(K+1) of the bytes).
- Each consumer expands its chunks into samples (the mode's templates, `trainer.data.batch_schema`), passes them
  through a shuffle buffer of `shuffle_buffer` samples (batches are uniform draws without replacement from what the
  buffer holds; it is refilled chunk by chunk) and makes whole batches of `batch_per_process` samples in numpy.
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

Batches have the keys of `trainer.data.batch_schema` for the mode. With `record_chunks` the stream remembers which
store chunks each epoch's batches came from (`read_report`: a rank report's `chunks_read`); the chunk is the unit two
ranks never share.

Memory per reader: the last read (at most READ_BYTES) plus a buffer of about shuffle_buffer + one chunk's
samples, each holding one to three points in the storage dtype (endpoints: 1, cm/mf: 2, ecd: 3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer.data.batch_schema import INDEX_KEYS
from trainer.data.corrupt_shards import find_corrupt_shards, how_to_regenerate
from trainer.data.errors import IncompleteStoreError, NotEnoughShardsError, StreamStateError
from trainer.data.options import StreamConfig
from trainer.data.reader import READ_BYTES, Reader
from trainer.data.store_info import check_reader_split, check_stores
from trainer.data.transport import WorkerStream, as_is, unpack

__all__ = ["STATE_FORMAT", "TrajectoryStream", "make_stream"]

STATE_FORMAT = "cmt-trajectory-stream/2"  # 2: readers are dealt runs of chunks, not whole shards


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
        self.stores, self.infos = check_stores(
            cfg.urls, expected_sample_shape=cfg.expected_sample_shape, expected_fingerprint=cfg.expected_fingerprint,
            strict=cfg.strict, allow_incomplete=cfg.allow_incomplete,
        )
        self.skipped_shards: list[dict[str, Any]] = []
        if cfg.on_corrupt_shard == "skip":
            self._skip_corrupt_shards()
        pool = [(position, shard) for position, info in enumerate(self.infos) for shard in info.committed_shards]
        self._use_pool(np.array(pool, np.int64).reshape(-1, 2))
        self.epoch = 0
        self.batch_in_epoch = 0
        self._chunk_sizes = torch.tensor([info.spec.chunk_size for info in self.infos])  # [stores]
        self.chunks_by_epoch: dict[int, set[tuple[int, int]]] = {}  # record_chunks: (store, chunk) read per epoch

    # construction -------------------------------------------------------------------------------------------
    def _skip_corrupt_shards(self) -> None:
        """on_corrupt_shard="skip": check every committed shard now and leave the corrupt ones out of the pool."""
        committed = [info.committed_shards for info in self.infos]
        self.skipped_shards = find_corrupt_shards(self.stores, committed, READ_BYTES)
        skipped = {(entry["url"], entry["shard"]) for entry in self.skipped_shards}
        self.infos = tuple(
            dataclasses.replace(
                info, committed_shards=tuple(n for n in info.committed_shards if (info.url, n) not in skipped)
            )
            for info in self.infos
        )
        for info in self.infos:
            if not info.committed_shards:
                raise IncompleteStoreError(
                    f"every committed shard of store {info.url} is corrupt (stream.on_corrupt_shard=skip left none): "
                    f"regenerate them with {how_to_regenerate(info.url)}, or drop the store"
                )

    def log_values(self) -> dict[str, float]:
        """Scalars for every logged step (trainer.loop): the count of corrupt shards left out, when skipping."""
        return {"corrupt_shards_skipped": len(self.skipped_shards)} if self.cfg.on_corrupt_shard == "skip" else {}

    def _use_pool(self, pool: np.ndarray) -> None:
        """Plan over `pool` and check that every consumer gets chunks and at least one batch per epoch."""
        cfg = self.cfg
        consumers = self.world_size * cfg.consumers_per_rank
        reader = Reader(cfg, self.infos, pool, self.rank, self.world_size)
        total_chunks = len(reader.chunk_table)
        check_reader_split(total_chunks, len(pool), world_size=self.world_size, num_workers=cfg.num_workers)
        fewest_chunks = total_chunks // consumers
        worst_case = int(np.sort(reader.chunk_samples)[:fewest_chunks].sum())
        if worst_case < cfg.batch_per_process:
            raise NotEnoughShardsError(
                f"a reader may get only {fewest_chunks} chunk(s) = {worst_case} samples per epoch, fewer than "
                f"batch_per_process={cfg.batch_per_process} ({total_chunks} chunks over {consumers} readers); lower "
                "batch_per_process or stream.num_workers, or use more trajectories"
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
                WorkerStream(self._reader, self.epoch, self.batch_in_epoch),
                batch_size=None,
                num_workers=cfg.num_workers,
                prefetch_factor=cfg.prefetch_factor,
                pin_memory=self.pin_memory,
                collate_fn=as_is,
                multiprocessing_context=cfg.worker_start_method,
            )
            source = (unpack(packed, layout) for packed, layout in loader)
        try:
            for batch in source:
                if cfg.record_chunks:
                    batch = self._record_chunks(batch)
                self.batch_in_epoch += 1
                if self.batch_in_epoch == self.batches_per_epoch():
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                yield batch
        finally:
            source.close()

    def _record_chunks(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Remember the (store, chunk) of every sample under the current epoch; drop the index keys unless asked for."""
        store = batch["store"]  # [B]
        chunk = batch["index"] // self._chunk_sizes[store]  # [B]
        self.chunks_by_epoch.setdefault(self.epoch, set()).update(zip(store.tolist(), chunk.tolist()))
        if self.cfg.include_indices:
            return batch
        return {key: value for key, value in batch.items() if key not in INDEX_KEYS}

    def chunks_read(self) -> dict[str, list[list[Any]]]:
        """record_chunks: {epoch: [[store url, chunk], ...]} of the batches handed out so far (this run, this rank)."""
        return {str(epoch): [[self.infos[store].url, chunk] for store, chunk in sorted(seen)]
                for epoch, seen in sorted(self.chunks_by_epoch.items())}

    def read_report(self) -> dict[str, Any]:
        """This rank's report of what it read: chunks per epoch (record_chunks) and the corrupt shards left out."""
        return {"chunks_read": self.chunks_read(), "corrupt_shards_skipped": list(self.skipped_shards)}

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
                if shard not in self.infos[store].committed_shards:
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
                    "shards_committed": len(info.committed_shards),
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
    accelerator: Any = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    device: torch.device | str | None = None,
    expected_sample_shape: Sequence[int] | None = None,
    expected_fingerprint: str | None = None,
) -> TrajectoryStream:
    """The stream for this process, the one constructor every stage uses (the stream is not passed to prepare).

    Rank, world size and device come from `accelerator` (the run's Accelerator, or accelerate's PartialState in a dry
    run), or are given as rank / world_size / device (default CPU). With DataLoader workers on a CUDA device the
    batches are pinned (pin_memory). `expected_sample_shape` / `expected_fingerprint` (e.g. the student's teacher's)
    override the config's checks.
    """
    if accelerator is not None:
        rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if rank is None or world_size is None:
        raise ValueError("make_stream needs the accelerator, or rank= and world_size=")
    overrides: dict[str, Any] = {}
    if expected_sample_shape is not None:
        overrides["expected_sample_shape"] = tuple(expected_sample_shape)
    if expected_fingerprint is not None:
        overrides["expected_fingerprint"] = expected_fingerprint
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    pin_memory = cfg.num_workers > 0 and torch.device(device or "cpu").type == "cuda"
    return TrajectoryStream(cfg, rank=rank, world_size=world_size, pin_memory=pin_memory)
