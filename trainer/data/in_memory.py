"""The in-memory source: every sample of the stores' committed shards loaded up front as tensors (small stores).

Mid-training's `stream.source=memory`. The samples are each trajectory's whole template (`trainer.data.batch_schema`:
all K points in mode "cm", all pairs in "mf"; per-trajectory subsets are not drawn), converted by the same
`samples_to_batch` as the stream, so a sample is bitwise the one the stream would make. The stores are checked by
`trainer.data.store_info.check_stores` and every shard against its commit digest as it loads; the batches are drawn
by `trainer.batches.InMemoryBatches` (one permutation per epoch, disjoint rank slices, exact resume).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from storage_schema import CorruptShardError, open_store
from trainer.batches import InMemoryBatches
from trainer.data.batch_schema import batch_from_template, sample_template
from trainer.data.corrupt_shards import corrupt_data_error
from trainer.data.options import StreamConfig
from trainer.data.store_info import StoreInfo, check_stores

__all__ = ["InMemoryTrajectories", "preload_samples"]


def preload_samples(infos: Sequence[StoreInfo], mode: str) -> dict[str, torch.Tensor]:
    """Every sample of the stores' committed shards as tensors in the mode's batch format, trajectory-major and
    template-minor (for "cm": trajectory n's points 0..K-1 in order); a corrupt shard raises CorruptDataError."""
    parts: dict[str, list[torch.Tensor]] = {}
    for info in infos:
        store = open_store(info.url, "r", expected_spec=info.spec)
        template = sample_template(mode, info.alpha, info.sigma)
        per_trajectory = len(template["point_a"])
        for shard in info.committed_shards:
            try:
                data = store.read_shard(shard, verify=True)
            except CorruptShardError as error:
                raise corrupt_data_error(info.url, shard, error) from error
            trajectories = np.asarray(data["traj"])  # [n, K+1, *S] in the storage dtype
            rows = np.repeat(np.arange(len(trajectories)), per_trajectory)  # [n·M]
            items = np.tile(np.arange(per_trajectory), len(trajectories))  # [n·M]
            batch = batch_from_template(mode, template, trajectories, rows, items)
            if data.get("label") is not None:
                batch["labels"] = torch.from_numpy(np.asarray(data["label"], np.int64)[rows])
            for key, value in batch.items():
                parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


class InMemoryTrajectories(InMemoryBatches):
    """InMemoryBatches over `preload_samples`, recording which store shards this rank's data came from (all of them)."""

    def __init__(self, infos: Sequence[StoreInfo], mode: str, **kwargs: Any) -> None:
        """Load every sample of `infos` in `mode`; kwargs are InMemoryBatches' (batch_per_process, seed, rank, ...)."""
        super().__init__(preload_samples(infos, mode), **kwargs)
        self.shards_read = [[info.url, int(shard)] for info in infos for shard in info.committed_shards]

    @classmethod
    def from_config(cls, cfg: StreamConfig, *, rank: int, world_size: int) -> InMemoryTrajectories:
        """Check the stores of `cfg` as the stream would (one reader per process) and load them for `rank`."""
        _, infos = check_stores(
            cfg.urls, expected_sample_shape=cfg.expected_sample_shape, expected_fingerprint=cfg.expected_fingerprint,
            strict=cfg.strict, allow_incomplete=cfg.allow_incomplete, world_size=world_size, num_workers=0,
        )
        return cls(infos, cfg.mode, batch_per_process=cfg.batch_per_process, seed=cfg.seed, rank=rank,
                   world_size=world_size)

    def read_report(self) -> dict[str, Any]:
        """What this rank read, for its rank report: every committed shard ([url, shard]); none is skipped."""
        return {"chunks_read": [list(entry) for entry in self.shards_read], "corrupt_shards_skipped": []}
