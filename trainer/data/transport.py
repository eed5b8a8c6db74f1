"""How a batch made in a DataLoader worker process reaches the training process: one packed buffer per batch.

Every array of a batch is packed into one uint8 buffer with a layout; up to SHARED_MEMORY_BYTES it travels through
the worker's pipe as a numpy array, above as one torch shared-memory segment, and is unpacked into tensor views.
`WorkerStream` is what each DataLoader worker iterates: its reader's endless batches from the resume position.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["SHARED_MEMORY_BYTES", "PackedBatch", "WorkerStream", "as_is", "unpack"]

_ALIGN = 8  # byte alignment of each array inside a packed batch
SHARED_MEMORY_BYTES = 2**20  # larger worker batches travel as shared memory, smaller ones through the pipe

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


def as_is(item: PackedBatch) -> PackedBatch:
    """DataLoader collate_fn that leaves a worker's packed batch untouched (numpy stays numpy)."""
    return item


def unpack(packed: Any, layout: Sequence[tuple[str, str, Sequence[int], int]]) -> dict[str, torch.Tensor]:
    """The batch dict of `_pack`, as views into the one received buffer."""
    packed = torch.from_numpy(packed) if isinstance(packed, np.ndarray) else packed  # [bytes]
    batch = {}
    for name, dtype_name, shape, start in layout:
        dtype = getattr(torch, dtype_name)
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        batch[name] = packed[start : start + size].view(dtype).view(tuple(shape))
    return batch


class WorkerStream(IterableDataset):
    """What each DataLoader worker iterates: its reader's endless batches from the resume position."""

    def __init__(self, reader: Any, start_epoch: int, start_batch: int) -> None:
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
