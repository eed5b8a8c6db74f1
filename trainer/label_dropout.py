"""Label dropout for classifier-free guidance, under the stage's control: once per sample, the same in every block.

A stage's `label_dropout` = p replaces each sample's class label by the null class (id num_classes, the unconditional
embedding) with probability p, once per sample, before the loss sees the batch. Both passes of a consistency pair
and every block of the network therefore see the same label; the net's own per-block dropout (diffusers' DiT) is off
(`trainer.student.disable_label_dropout`). The mask is drawn from the global torch RNG, which the training loop
checkpoints, so a resumed run drops the same labels. The batch gains `labels_dropped` [B] bool, which MeanFlow's guided
target reads (a dropped sample keeps the unguided velocity, as in the official MeanFlow code's `cond_drop`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["LabelDropout", "drop_labels"]

DROPPED_KEY = "labels_dropped"


def drop_labels(labels: Tensor, probability: float, null_class: int) -> tuple[Tensor, Tensor]:
    """(labels with a Bernoulli(p) share replaced by `null_class` [B], the drop mask [B] bool), global torch RNG."""
    dropped = (torch.rand(labels.shape, dtype=torch.float64) < probability).to(labels.device)  # [B]
    return torch.where(dropped, torch.full_like(labels, null_class), labels), dropped


@dataclass
class LabelDropout:
    """Wrap a stage's loss (model, batch, step) → [B]: the batch's labels are dropped to the null class first."""

    loss_fn: Any
    probability: float
    null_class: int

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Tensor], step: int) -> Tensor:
        """The wrapped loss on the batch with dropped labels (unconditional batches pass through)."""
        labels = batch.get("labels")
        if labels is None:
            return self.loss_fn(model, batch, step)
        dropped_labels, dropped = drop_labels(labels, self.probability, self.null_class)
        return self.loss_fn(model, {**batch, "labels": dropped_labels, DROPPED_KEY: dropped}, step)
