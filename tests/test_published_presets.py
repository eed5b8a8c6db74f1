"""The real-scale presets run as published: `pipeline/generate.py --config jobs/<preset>/generate.yaml` by hub id.

The teachers are config-identical tiny-width stand-ins of google/ddpm-cifar10-32 (flat) and facebook/DiT-XL-2-256
(.bin-only transformer/ and vae/), in a temporary hub cache laid out as huggingface_hub keeps them; the runs are
offline (HF_HUB_OFFLINE=1) with small overrides (few trajectories and steps, a local --out, one CPU worker).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.published_teachers import MODELING_MARKER, populate
from pipeline.generate import SUMMARY_PREFIX
from storage_schema import open_store
from tests.helpers import HANG_LIMIT_S

REPO = Path(__file__).resolve().parents[1]
TRAJECTORIES, STEPS = 4, 3


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME whose hub cache holds both published repositories (tiny widths, random weights)."""
    home = tmp_path_factory.mktemp("hf-home")
    populate(home, scale="tiny")
    return home


def _generate(preset: str, hf_home: Path, out: Path, *extra: str) -> dict:
    """Run the preset as a user would, offline, with small overrides; return the printed summary."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "generate.py"), "--config", str(REPO / "jobs" / preset / "generate.yaml"),
         "--num-trajectories", str(TRAJECTORIES), "--steps", str(STEPS), "--shard-size", "2", "--chunk-size", "2",
         "--batch-size", "2", "--num-workers", "1", "--cpus-per-worker", "1", "--gpus-per-worker", "0",
         "--out", str(out), "--no-progress", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_LIMIT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith(SUMMARY_PREFIX))
    return json.loads(line.removeprefix(SUMMARY_PREFIX))


@pytest.mark.slow  # one more Ray job; the flat repository's loading by hub id is also in tests/test_teacher_layouts.py
def test_the_cifar10_preset_generates_from_the_flat_published_repository(hf_home, tmp_path):
    out = tmp_path / "cifar10.zarr"
    summary = _generate("cifar10", hf_home, out)
    store = open_store(str(out))
    assert store.is_complete and store.validate(deep=True).ok
    assert store.spec.sample_shape == (3, 32, 32) and store.spec.grid == "cmt-authors" and store.spec.steps == STEPS
    assert summary["teacher_precision"] == store.spec.teacher_precision == "fp32", "CPU workers default to fp32"
    assert summary["trajectories_written"] == TRAJECTORIES
    assert summary["teacher_forward_samples"] == TRAJECTORIES * STEPS
    assert np.isfinite(store.read_points(0, TRAJECTORIES)).all()
    assert not list(hf_home.rglob(MODELING_MARKER)), "the repository's modeling_ddpm.py must never run"


@pytest.mark.slow  # ~24 s; the .bin-only DiT repository loads in test_teacher_layouts.py, the preset generates
# guided latent trajectories in test_imagenet256_presets.py
def test_the_imagenet256_preset_generates_from_the_bin_only_dit_repository_at_bf16(hf_home, tmp_path):
    out = tmp_path / "imagenet256.zarr"
    summary = _generate("imagenet256", hf_home, out, "--precision", "bf16")
    store = open_store(str(out))
    assert store.is_complete and store.validate(deep=True).ok
    assert store.spec.sample_shape == (4, 32, 32) and store.spec.num_classes == 1000
    assert store.spec.guidance_scale == 1.5 and summary["teacher_precision"] == store.spec.teacher_precision == "bf16"
    assert summary["teacher_forward_samples"] == TRAJECTORIES * STEPS * 2, "both passes of guidance are counted"
    labels = store.read_trajectories(0, TRAJECTORIES)["label"]
    assert ((labels >= 0) & (labels < 1000)).all()
