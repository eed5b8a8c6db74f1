"""The fixed-column sample buffer a stream reader shuffles through: append a chunk's samples, draw a batch, remove it.

Batches are uniform draws without replacement from what the buffer holds (`trainer.data.reader`); removal moves the
buffer's tail into the holes, so a draw costs O(batch), not O(buffer).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["ShuffleBuffer"]


class ShuffleBuffer:
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
