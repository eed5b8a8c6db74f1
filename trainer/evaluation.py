"""Evaluation during mid- and post-training: the EMA student's 1- and 2-step samples, spread over every rank, decoded
through the teacher's VAE for latent students, scored with FD-<dataset> on the decoded images, and tiled into grids.

Sample i (i < num_eval_samples) starts from prior noise seeded with eval_seed + i and has class i mod C
(`trainer.sample.draw_samples`); rank k of W draws the contiguous share [k·⌈N/W⌉, (k+1)·⌈N/W⌉) of the indices, so
every rank does 1/W of the network evaluations and the samples do not depend on the number of ranks. Each rank
computes the FD classifier's features of its own images; the features (not the images) and the images of the grid
are gathered on the main process, which scores and writes `samples/step_<step>_{1,2}step.png`. Latents are never
clamped: the VAE decodes them as they are (`pipeline.teacher.decode_latents`), and only the decoded images are
clipped to [-1, 1] where they become pixels (grids, the FD classifier's input).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch import nn

__all__ = ["EVAL_SEED", "StudentEvaluator", "decode_samples", "eval_seeds", "evaluate_at_init", "parameter_hash",
           "rank_share"]

# The default eval_seed of mid- and post-training: 2³² − 2²⁰, away from the noise seeds training sees (a store's
# trajectory i starts from seed + i, generation's default seed is 0; data=online with loop.seed s draws from
# [s·2²⁶, (s+1)·2²⁶), so only s = 63 reaches it). Torch's CPU generator keeps the low 32 bits of a seed, so a seed
# of 2³² or more would repeat one below it; 2²⁰ evaluation samples fit below 2³². With eval_seed 0 the evaluation
# re-used the first 1,000 trajectories' noises and scored the student on the starting points it was trained to map:
# on digits that halved the measured 1-step FD (12.0 on those noises vs 26.1 ± 4.8 on fresh ones).
EVAL_SEED = 2**32 - 2**20


def eval_seeds(cfg: Any) -> list[int]:
    """The evaluation's noise seeds eval_seed + i, i < num_eval_samples."""
    return list(range(cfg.eval_seed, cfg.eval_seed + cfg.num_eval_samples))


def rank_share(items: list[Any], rank: int, world_size: int) -> tuple[int, list[Any]]:
    """(offset, items) of rank `rank`'s contiguous share: ⌈len/W⌉ items each, the last rank the rest (maybe none)."""
    per_rank = math.ceil(len(items) / world_size)
    start = min(rank * per_rank, len(items))
    return start, items[start : start + per_rank]


def decode_samples(samples: torch.Tensor, vae: nn.Module | None) -> torch.Tensor:
    """A student's samples in its clean space [N, *S] → images: VAE-decoded latents, or the samples themselves."""
    from pipeline.teacher import decode_latents

    return samples if vae is None else decode_latents(vae, samples)


def _is_image_batch(images: torch.Tensor) -> bool:
    """[N, 1 or 3, H, W]: something a PNG grid and an image classifier can take."""
    return images.dim() == 4 and images.shape[1] in (1, 3)


@dataclass
class StudentEvaluator:
    """Eval hook run on every rank (`every_rank`): 1- and 2-step samples → grids and fd_1step / fd_2step on rank 0.

    `cfg` is the stage config (num_eval_samples, num_grid_images, eval_seed, eval_intermediate, fd_dataset,
    compute_fd); `vae` the teacher's VAE for latent students (None for pixel students).
    """

    cfg: Any
    samples_dir: Path
    vae: nn.Module | None = None
    batch_size: int = 500
    every_rank: bool = field(default=True, init=False)
    samples_drawn: int = field(default=0, init=False)  # by this rank, over every call (its share of the work)
    _metric: Any = None

    def __call__(self, ema_student: torch.nn.Module, step: int | str) -> dict[str, float]:
        """Sample this rank's share, gather features and grid images; the scores on the main process, {} elsewhere."""
        from trainer.sample import draw_samples

        state = PartialState()
        offset, seeds = rank_share(eval_seeds(self.cfg), state.process_index, state.num_processes)
        scores: dict[str, float] = {}
        was_training = ema_student.training
        ema_student.eval()
        for steps in (1, 2):
            samples = draw_samples(ema_student, seeds, steps, intermediate=self.cfg.eval_intermediate,
                                   batch_size=self.batch_size)  # [n, *S]
            self.samples_drawn += len(seeds)
            images = decode_samples(samples, self.vae) if len(seeds) else samples  # [n, C, H, W]
            grid_part = images[: max(0, self.cfg.num_grid_images - offset)]
            features = self._features(images) if self._fd_enabled() and len(seeds) else None
            grid_parts, feature_parts = gather_object([grid_part]), gather_object([features])
            if not state.is_main_process:
                continue
            grid = torch.cat([part for part in grid_parts if len(part)])  # [num_grid, C, H, W]
            if _is_image_batch(grid):
                from pipeline.png_grid import save_grid

                save_grid(grid, self.samples_dir / f"step_{step}_{steps}step.png")
            if self._fd_enabled():
                scores[f"fd_{steps}step"] = self._metric.score_features(
                    np.concatenate([part for part in feature_parts if part is not None]))
        ema_student.train(was_training)
        return scores

    def _features(self, images: torch.Tensor) -> np.ndarray:
        """The FD classifier's features [n, D] of this rank's images (the classifier is loaded on first use)."""
        if self._metric is None:
            from trainer.metrics import FDMetric

            self._metric = FDMetric(self.cfg.fd_dataset)
        return self._metric.features(images)

    def _fd_enabled(self) -> bool:
        """FD is computed when asked for and the dataset has a feature classifier."""
        from trainer.metrics import FD_DATASETS

        return self.cfg.compute_fd and self.cfg.fd_dataset is not None and self.cfg.fd_dataset in FD_DATASETS


def evaluate_at_init(enabled: bool, evaluate: StudentEvaluator, student: torch.nn.Module, accelerator: Any,
                     path: Path) -> dict[str, float]:
    """Score the initial student on every rank → `path` (init_eval.json) once; a resumed run that has it skips this."""
    import json

    from accelerate.utils import broadcast_object_list

    needed = [bool(enabled) and not path.exists()]
    if accelerator.num_processes > 1:
        broadcast_object_list(needed, from_process=0)
    if not needed[0]:
        return {}
    metrics = evaluate(student, "init")
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    return metrics


def parameter_hash(module: torch.nn.Module) -> str:
    """sha256 of every tensor of a module's state dict (name, dtype, shape, bytes): equal iff the weights are equal.
    The stages' rank reports carry it, so tests and users can check that ranks ended with identical parameters."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
