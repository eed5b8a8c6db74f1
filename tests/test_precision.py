"""Teacher precision for generation: recorded in the spec, checked against the device, close to fp32 at its rounding."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler

from pipeline.generate import GenerateConfig, run
from pipeline.precision import PrecisionError, check_device
from pipeline.teacher import load_teacher
from tests.helpers import assert_close, tiny_unet
from tests.test_teacher import tiny_dit


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A saved DDPMPipeline with the tiny 1×8×8 UNet."""
    path = tmp_path_factory.mktemp("precision") / "teacher"
    DDPMPipeline(unet=tiny_unet(attention=True), scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def _plan(teacher_dir, **overrides) -> dict:
    """The dry-run plan of a small job."""
    fields = dict(teacher=str(teacher_dir), num_trajectories=8, steps=4, shard_size=8, chunk_size=8, dry_run=True,
                  progress=False)
    return run(GenerateConfig(**{**fields, **overrides})).summary["plan"]


def test_the_precision_is_part_of_the_spec_and_defaults_to_fp32_on_cpu_workers(teacher_dir, tmp_path):
    cpu = _plan(teacher_dir, cache_root=str(tmp_path), gpu_precision="bf16")
    assert cpu["teacher_precision"] == "fp32" and "CPU workers" in cpu["teacher_precision_source"]
    gpu = _plan(teacher_dir, cache_root=str(tmp_path), gpu_precision="bf16", gpus_per_worker=1)
    assert gpu["teacher_precision"] == "bf16" and "gpu_precision" in gpu["teacher_precision_source"]
    explicit = _plan(teacher_dir, cache_root=str(tmp_path), precision="fp16")
    assert explicit["teacher_precision"] == "fp16" and explicit["teacher_precision_source"].startswith("--precision")
    keys = {plan["cache_key"] for plan in (cpu, gpu, explicit)}
    assert len(keys) == 3, "stores made at different precisions never share a cache key"
    assert list(tmp_path.iterdir()) == [], "a dry run writes nothing"


def test_tf32_on_cpu_workers_is_refused_before_any_work(teacher_dir, tmp_path):
    out = tmp_path / "store.zarr"
    with pytest.raises(PrecisionError, match=r"--precision tf32 .*CPU \(--gpus-per-worker 0\).*fp32 or bf16"):
        run(GenerateConfig(teacher=str(teacher_dir), num_trajectories=8, steps=2, shard_size=8, chunk_size=8,
                           precision="tf32", out=str(out), progress=False))
    assert not out.exists()
    with pytest.raises(PrecisionError, match="unknown; choose one of fp32, tf32, bf16, fp16"):
        _plan(teacher_dir, precision="fp8")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", ["unet", "dit"])
def test_a_low_precision_teacher_keeps_its_fingerprint_and_denoises_within_its_rounding(make, dtype):
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    check_device(precision, "cpu")
    model, scheduler = (tiny_unet(attention=True), DDPMScheduler()) if make == "unet" else (tiny_dit(), DDIMScheduler())
    reference = load_teacher(model, scheduler=scheduler)
    fingerprint = reference.fingerprint
    model_copy = tiny_unet(attention=True) if make == "unet" else tiny_dit()
    low = load_teacher(model_copy, scheduler=scheduler, dtype=dtype)
    assert low.fingerprint == fingerprint, "the fingerprint hashes the weights as stored, whatever the precision"
    assert next(low.model.parameters()).dtype == dtype
    labels = None if reference.num_classes is None else [1, 2, 3]
    x = torch.randn(3, *reference.sample_shape, generator=torch.Generator().manual_seed(0))  # [B, *S]
    for sigma in (0.1, 1.0, 10.0):
        noisy = x * (1 + sigma**2) ** 0.5
        expected = reference.denoise(noisy, sigma, labels=labels)
        actual = low.denoise(noisy, sigma, labels=labels)
        assert actual.dtype == torch.float32 and torch.isfinite(actual).all()
        assert_close(actual.to(dtype), expected.to(dtype), ulps=4, what=f"{precision} at σ̃={sigma}")
