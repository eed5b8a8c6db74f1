"""Teachers as they are published: flat and pipeline layouts by hub id (offline, hub cache, revisions) or path.

The hub cache is built by jobs/published_teachers.py in the exact layout huggingface_hub keeps for the two published
repositories (tiny widths, the published keys and classes): google/ddpm-cifar10-32 is flat with .bin and safetensors
weights at the root; facebook/DiT-XL-2-256 has .bin-only transformer/ and vae/ on main and safetensors on refs/pr/1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from safetensors.torch import load_file

from jobs.published_teachers import DDPM_COMMIT, DDPM_REPO, DIT_COMMIT, DIT_REPO, MODELING_MARKER, populate
from pipeline.paths import cache_location
from pipeline.teacher import TeacherLoadError, load_teacher
from pipeline.teacher_files import locate_teacher


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A hub cache holding both published repositories (tiny widths, random weights)."""
    return populate(tmp_path_factory.mktemp("hf-home"), scale="tiny")


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> Path:
    """huggingface_hub pointed at the test hub cache with HF_HUB_OFFLINE on."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def snapshot(hub_cache: Path, repo: str, commit: str) -> Path:
    """The snapshot folder of `repo` at `commit` in the hub cache."""
    return hub_cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit


def test_the_flat_cifar10_repository_loads_by_hub_id_from_its_safetensors_and_never_runs_its_code(offline_hub):
    teacher = load_teacher(DDPM_REPO)
    files = locate_teacher(DDPM_REPO)
    root = snapshot(offline_hub, DDPM_REPO, DDPM_COMMIT)
    assert files.layout == "flat" and files.model_dir == root and files.scheduler_config == root / "scheduler_config.json"
    assert isinstance(teacher.model, UNet2DModel) and isinstance(teacher.scheduler, DDPMScheduler)
    assert teacher.sample_shape == (3, 32, 32) and teacher.num_classes is None and teacher.vae is None
    published = load_file(root / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(teacher.model.state_dict()[name], tensor) for name, tensor in published.items())
    assert not list(offline_hub.parent.rglob(MODELING_MARKER)), "modeling_ddpm.py must never run"


def test_the_dit_repository_loads_its_bin_weights_and_its_safetensors_revision_to_the_same_fingerprint(offline_hub):
    main = load_teacher(DIT_REPO)
    assert isinstance(main.model, DiTTransformer2DModel) and isinstance(main.vae, AutoencoderKL)
    assert isinstance(main.scheduler, DDIMScheduler)
    assert main.sample_shape == (4, 32, 32) and main.num_classes == 1000 and main.null_class == 1000
    assert locate_teacher(DIT_REPO).model_dir == snapshot(offline_hub, DIT_REPO, DIT_COMMIT) / "transformer"
    pull_request = load_teacher(DIT_REPO, revision="refs/pr/1")
    assert main.fingerprint == pull_request.fingerprint, "the same tensors as .bin or safetensors: one fingerprint"
    state, published = main.model.state_dict(), pull_request.model.state_dict()
    assert state.keys() == published.keys() and all(torch.equal(state[k], published[k]) for k in state)


def test_bin_weights_are_converted_once_into_the_cache(offline_hub):
    load_teacher(DIT_REPO)
    converted = sorted(Path(cache_location("converted-weights")).rglob("*.safetensors"))
    assert len(converted) >= 2, "the transformer's and the VAE's .bin became safetensors in the cache"
    stamps = {path: path.stat().st_mtime_ns for path in converted}
    load_teacher(DIT_REPO)
    assert {path: path.stat().st_mtime_ns for path in converted} == stamps, "a second load reads the conversion"


def test_a_bare_model_directory_takes_its_scheduler_separately(offline_hub, tmp_path):
    root = snapshot(offline_hub, DIT_REPO, DIT_COMMIT)
    shutil.copytree(root / "transformer", tmp_path / "transformer-alone")
    with pytest.raises(TeacherLoadError, match="--scheduler DIR"):
        load_teacher(tmp_path / "transformer-alone")
    teacher = load_teacher(tmp_path / "transformer-alone", scheduler=root / "scheduler")
    assert isinstance(teacher.scheduler, DDIMScheduler) and teacher.vae is None and teacher.num_classes == 1000
    published = load_teacher(DIT_REPO).model.state_dict()
    assert all(torch.equal(tensor, published[name]) for name, tensor in teacher.model.state_dict().items())


def test_a_flat_repository_without_a_scheduler_config_asks_for_one(offline_hub, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(snapshot(offline_hub, DDPM_REPO, DDPM_COMMIT), flat)
    (flat / "scheduler_config.json").unlink()
    with pytest.raises(TeacherLoadError, match=r"scheduler_config.json at its root.*--scheduler DIR"):
        load_teacher(flat)
    DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    assert isinstance(load_teacher(flat, scheduler=tmp_path / "scheduler").scheduler, DDPMScheduler)


def test_a_hub_id_missing_from_the_offline_cache_names_the_id_and_the_cache(offline_hub):
    with pytest.raises(TeacherLoadError, match="HF_HUB_OFFLINE") as info:
        load_teacher("cmt-tests/not-cached-anywhere")
    assert "cmt-tests/not-cached-anywhere" in str(info.value) and str(offline_hub) in str(info.value)
    assert "hf download cmt-tests/not-cached-anywhere" in str(info.value)


def test_a_revision_that_does_not_exist_is_named_with_the_cached_ones(offline_hub, tmp_path):
    with pytest.raises(TeacherLoadError, match="--revision v9") as info:
        load_teacher(DIT_REPO, revision="v9")
    assert "main" in str(info.value) and "refs/pr/1" in str(info.value) and str(offline_hub) in str(info.value)
    with pytest.raises(TeacherLoadError, match="--revision v9 applies to hub ids"):
        load_teacher(snapshot(offline_hub, DDPM_REPO, DDPM_COMMIT), revision="v9")
