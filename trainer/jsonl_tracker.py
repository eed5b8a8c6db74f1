"""`JsonlTracker`: the accelerate tracker that appends every logged step to the run's `metrics.jsonl`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate.tracking import GeneralTracker

__all__ = ["JsonlTracker"]


class JsonlTracker(GeneralTracker):
    """Accelerate tracker appending one JSON object per `log` call to `metrics.jsonl` (main process only)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike) -> None:
        """Track into the JSON-lines file at `path` (opened for appending by `start`)."""
        super().__init__()
        self.path = Path(path)
        self._stream = None

    @property
    def tracker(self):
        """The open file."""
        return self._stream

    def start(self) -> None:
        """Open the file for appending."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)

    def store_init_configuration(self, values: dict) -> None:
        """The resolved config lives in config.yaml next to this file; nothing to write here."""

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        """Append `{"step": step, **values}` as one line and flush it."""
        record = {"step": step}
        for key, value in values.items():
            record[key] = value.item() if isinstance(value, torch.Tensor) else value
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()

    def finish(self) -> None:
        """Close the file."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
