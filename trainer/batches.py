"""What the training loop draws batches from: the `ResumableBatches` protocol and `InMemoryBatches`, its in-memory source.

A loader checkpoints its position with the run (`state_dict` / `load_state_dict`), so resuming continues with exactly
the batches the uninterrupted run would have drawn. `InMemoryBatches` serves tensors held in memory (pre-training's
images, post-training's dataset images, preloaded trajectories); `trainer/data/` holds the store-streaming sources.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from accelerate import PartialState

__all__ = ["Batch", "InMemoryBatches", "ResumableBatches"]

Batch = Mapping[str, torch.Tensor]


@runtime_checkable
class ResumableBatches(Protocol):
    """An endless stream of batches whose position is checkpointed with the run.

    `__iter__` continues from the position set by `load_state_dict` and must update its state as it
    yields, so that `state_dict()` taken between two batches names the next batch exactly. Loaders
    shard by (rank, world size) themselves; the loop never passes them to `accelerator.prepare`.
    An optional `log_values() -> dict[str, float]` adds the loader's own scalars to every logged step
    (e.g. `corrupt_shards_skipped`).
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class InMemoryBatches:
    """Batches drawn from in-memory tensors: one permutation per epoch from (seed, epoch), disjoint rank slices.

    Each step consumes `batch_per_process · world_size` samples of the epoch's permutation; rank r takes
    the r-th slice. An epoch ends when fewer than that many samples are left (the remainder is dropped).
    The state (epoch, offset into the permutation) is the same on every rank.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        batch_per_process: int,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """Serve `tensors` (equal first dimension N) in batches of `batch_per_process` for this rank."""
        if not tensors:
            raise ValueError("InMemoryBatches needs at least one tensor, e.g. {'images': images}")
        sizes = {name: tensor.shape[0] for name, tensor in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"all tensors must have the same number of samples, got {sizes}")
        if rank is None or world_size is None:
            if not PartialState._shared_state:
                raise RuntimeError(
                    "InMemoryBatches takes rank and world size from accelerate: build the Accelerator first "
                    "(trainer.loop.make_accelerator(cfg)) or pass rank= and world_size="
                )
            state = PartialState()
            rank = state.process_index if rank is None else rank
            world_size = state.num_processes if world_size is None else world_size
        self.tensors = dict(tensors)
        self.num_samples = next(iter(sizes.values()))
        self.batch_per_process = batch_per_process
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.samples_per_step = batch_per_process * world_size
        if batch_per_process < 1 or self.samples_per_step > self.num_samples:
            raise ValueError(
                f"batch_per_process={batch_per_process} × world_size={world_size} must be between 1 and the "
                f"{self.num_samples} samples available; lower batch_per_process"
            )
        self.epoch = 0
        self.offset = 0

    def permutation(self, epoch: int) -> torch.Tensor:
        """The sample order of `epoch`, a pure function of (seed, epoch)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return torch.from_numpy(order)  # [N]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield this rank's batches forever, starting at the stored (epoch, offset)."""
        order = self.permutation(self.epoch)
        while True:
            if self.offset + self.samples_per_step > self.num_samples:
                self.epoch += 1
                self.offset = 0
                order = self.permutation(self.epoch)
            start = self.offset + self.rank * self.batch_per_process
            indices = order[start : start + self.batch_per_process]  # [B]
            self.offset += self.samples_per_step
            yield {name: tensor[indices] for name, tensor in self.tensors.items()}

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch (identical on every rank)."""
        return {"epoch": self.epoch, "offset": self.offset, "num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position; the data must be the same size as when it was saved."""
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint was taken over {state['num_samples']} samples with seed {state['seed']}, this run has "
                f"{self.num_samples} samples with seed {self.seed}; resume with the same data and seed or use a "
                "new output_dir"
            )
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
