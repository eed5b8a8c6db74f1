"""The evaluation's noise never repeats a noise the student trained on (trainer.evaluation.EVAL_SEED)."""

from __future__ import annotations

import torch

from pipeline.solvers import prior_noise
from trainer.config import load_config
from trainer.evaluation import EVAL_SEED, eval_seeds
from trainer.mid import MidConfig
from trainer.data.online import SEED_STRIDE

SEED_BITS = 32  # torch's CPU generator keeps the low 32 bits of a seed


IMAGENET_TRAIN_IMAGES = 1_281_167  # the largest store a preset plans is below this many trajectories


def _first_unused_training_seed() -> int:
    """Training noise seeds lie below this: a store with generation's default --seed 0 (trajectory i: seed i), and
    data=online with loop.seed 0 ([0, SEED_STRIDE))."""
    return max(IMAGENET_TRAIN_IMAGES, SEED_STRIDE)


def test_default_evaluation_seeds_are_disjoint_from_training_seeds_also_after_torch_truncates_them():
    for preset in ("jobs/digits/mid.yaml", "jobs/cifar10/mid.yaml"):
        cfg = load_config(MidConfig, preset, [])
        seeds = eval_seeds(cfg)
        assert cfg.eval_seed == EVAL_SEED and seeds[-1] < 2**SEED_BITS
        assert min(seed % 2**SEED_BITS for seed in seeds) >= _first_unused_training_seed()


def test_a_seed_above_32_bits_repeats_the_noise_of_its_low_bits():
    """Why EVAL_SEED stays below 2³²: 2³³ would evaluate on the noise of seed 0, the store's first trajectory."""
    shape = (1, 4, 4)
    assert torch.equal(prior_noise([2**33], shape), prior_noise([0], shape))
    assert not torch.equal(prior_noise([EVAL_SEED], shape), prior_noise([0], shape))
