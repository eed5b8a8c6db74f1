"""The ImageNet-256 presets end to end on a depth-reduced class-conditional DiT with a small VAE (4×32×32 latents, 1000
classes, the DiT pipeline layout on disk): generation with guidance (Ray) → mid-training, CM and MF forms, in bf16 →
post-training ECT, ECD and MeanFlow with guidance → sampling to PNG images decoded through the VAE. Then the same
presets by their published hub id, from a hub cache in facebook/DiT-XL-2-256's layout (.bin-only weights on main).

Only sizes are overridden (trajectories, steps of training, batch, evaluation samples), and mid-training clips
gradients: the random DiT's guided trajectories reach |x| ≈ 400 (real sd-vae latents stay within a few units), and
the MF form's first unclipped RAdam steps on them diverge, in float32 as in bf16. Solver, grid, guidance, precision,
losses and MeanFlow's guidance settings are the presets' own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from PIL import Image

from jobs.published_teachers import MODELING_MARKER, populate
from pipeline.generate import parse_args as generate_args
from pipeline.generate import run as generate
from storage_schema import open_store
from trainer.config import load_config
from trainer.mid import MidConfig
from trainer.mid import run as mid_run
from trainer.post import PostConfig
from trainer.post import run as post_run
from trainer.run_dir import RunDir
from trainer.sample import main as sample_main
from trainer.student import FlowMapStudent
from tests.test_published_presets import _generate as generate_from_hub

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "jobs" / "imagenet256"
TINY_TRAINING = ["loop.total_steps=2", "batch_per_process=4", "stream.num_workers=0", "stream.shuffle_buffer=32",
                 "num_eval_samples=4", "num_grid_images=4", "loop.log_every_steps=1", "loop.eval_every_steps=0",
                 "loop.torch_threads=1"]


def depth_reduced_dit() -> DiTTransformer2DModel:
    """DiT-XL/2's layout (patch 2, learned sigma, 1000 classes + null, 4×32×32 latents) at depth 2 and width 32."""
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=32, patch_size=2, norm_num_groups=4, num_embeds_ada_norm=1000)


def small_vae() -> AutoencoderKL:
    """An AutoencoderKL from 64×64 RGB to 4×32×32 latents (sd-vae's scaling factor)."""
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.18215)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """The teacher directory and the store generate.yaml writes from it (16 trajectories, 2 shards)."""
    root = tmp_path_factory.mktemp("imagenet256")
    scheduler = DDIMScheduler(beta_schedule="linear", num_train_timesteps=1000)
    DiTPipeline(transformer=depth_reduced_dit(), vae=small_vae(), scheduler=scheduler).save_pretrained(root / "dit")
    result = generate(generate_args([
        "--config", str(PRESETS / "generate.yaml"), "--teacher", str(root / "dit"), "--num-trajectories", "16",
        "--shard-size", "8", "--chunk-size", "4", "--batch-size", "16", "--num-workers", "1", "--cpus-per-worker", "1",
        "--gpus-per-worker", "0", "--out", str(root / "store.zarr"), "--no-progress",
    ]))
    return {"root": root, "teacher": root / "dit", "store": Path(result.url)}


def mid(chain: dict[str, Path], form: str) -> Path:
    """mid.yaml (bf16, squared L2, eval at init) in `form` with tiny sizes → the run directory."""
    output_dir = chain["root"] / f"mid_{form}"
    if not (output_dir / "export" / "student.json").is_file():
        cfg = load_config(MidConfig, PRESETS / "mid.yaml", [
            f"teacher={chain['teacher']}", f"stores=[{chain['store']}]", f"form={form}",
            f"loop.output_dir={output_dir}", "loop.grad_clip=1.0", *TINY_TRAINING])
        mid_run(cfg)
    return output_dir


def post(chain: dict[str, Path], method: str, form: str) -> Path:
    """post.yaml with `method` from the `form` mid-training export, on the store, tiny sizes → the run directory."""
    output_dir = chain["root"] / f"post_{method}"
    cfg = load_config(PostConfig, PRESETS / "post.yaml", [
        f"method={method}", f"init=cmt:{mid(chain, form)}/export", f"data=store:{chain['store']}",
        f"teacher={chain['teacher']}", f"loop.output_dir={output_dir}", *TINY_TRAINING])
    result = post_run(cfg)
    assert result.loop.final_step == 2 and result.loop.skipped_steps == 0
    return output_dir


def test_generate_preset_writes_guided_latent_trajectories_with_endpoints(chain):
    store = open_store(str(chain["store"]))
    spec = store.spec
    assert spec.sample_shape == (4, 32, 32) and spec.num_classes == 1000 and spec.guidance_scale == 1.5
    assert (spec.solver, spec.steps, spec.grid) == ("dpmpp-2m", 16, "logsnr") and store.is_complete
    data = store.read_shard(1, verify=True)
    assert np.array_equal(store.read_endpoints(8, 16)["endpoint"], data["traj"][:, -1])
    assert np.isfinite(data["traj"]).all() and (0 <= data["label"]).all() and (data["label"] < 1000).all()


@pytest.mark.parametrize("form", ["cm", "mf"])
def test_mid_preset_trains_both_forms_in_bf16_and_exports_a_latent_student_with_its_vae(chain, form):
    run_dir = mid(chain, form)
    config = (run_dir / "config.yaml").read_text()
    assert "mixed_precision: bf16" in config
    losses = [record["loss"] for record in RunDir(run_dir).read_metrics() if "loss" in record]
    assert losses and all(np.isfinite(losses))
    student = FlowMapStudent.from_pretrained(run_dir / "export")
    assert student.latent and student.second_time_input == (form == "mf") and student.null_class == 1000
    assert (run_dir / "export" / "vae" / "config.json").is_file()
    grid = Image.open(run_dir / "samples" / "step_init_1step.png")  # decoded 64×64 RGB images, 2×2
    assert grid.mode == "RGB" and grid.size == (2 * 65 + 1, 2 * 65 + 1)
    assert json.loads((run_dir / "init_eval.json").read_text()) == {}  # no FD for ImageNet (fd_dataset: none)


def test_post_preset_runs_ect_ecd_and_meanflow_with_guidance(chain):
    for method, form in (("ect", "cm"), ("ecd", "cm"), ("meanflow", "mf")):
        run_dir = post(chain, method, form)
        exported = FlowMapStudent.from_pretrained(run_dir / "export")
        assert exported.latent and (run_dir / "export" / "vae" / "config.json").is_file()
        resolved = (run_dir / "config.yaml").read_text()
        if method == "meanflow":
            assert "guidance_kappa: 0.92" in resolved and "guidance_t_max: 0.75" in resolved
            report = json.loads((run_dir / "ranks" / "rank_0.json").read_text())
            assert report["derivative"] == "jvp"
        assert (run_dir / "samples" / "step_2_2step.png").is_file()


def test_latent_students_sample_to_png_and_without_a_vae_the_error_names_it(chain, tmp_path, capsys):
    export = post(chain, "meanflow", "mf") / "export"
    assert sample_main(["--model", str(export), "--steps", "2", "--num", "4", "--out", str(tmp_path / "grid.png"),
                        "--save-tensor", str(tmp_path / "latents.pt")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sample_shape"] == [4, 32, 32] and summary["image_shape"] == [3, 64, 64]
    assert Image.open(tmp_path / "grid.png").size == (2 * 65 + 1, 2 * 65 + 1)
    assert torch.load(tmp_path / "latents.pt", weights_only=True).shape == (4, 4, 32, 32)
    bare = tmp_path / "bare"
    shutil.copytree(export, bare, ignore=shutil.ignore_patterns("vae"))
    assert sample_main(["--model", str(bare), "--out", str(tmp_path / "none.png")]) == 2
    error = capsys.readouterr().err
    assert "latent student" in error and "no vae/" in error and "--vae" in error
    assert not (tmp_path / "none.png").exists()
    assert sample_main(["--model", str(bare), "--out", str(tmp_path / "vae.png"), "--vae", str(chain["teacher"])]) == 0
    assert sample_main(["--model", str(export), "--out", str(tmp_path / "x.png"), "--label", "1000"]) == 2
    assert "--label 1000 is not a class of this student: pass 0..999" in capsys.readouterr().err


@pytest.mark.slow  # a Ray generation job, then two tiny stages and sampling on the hub-layout DiT: 20 s beside one job
def test_the_presets_run_end_to_end_from_the_bin_only_hub_repository_by_its_hub_id(tmp_path, monkeypatch, capsys):
    """generate.yaml, mid.yaml and post.yaml as published (teacher: facebook/DiT-XL-2-256), offline from a hub cache in
    the repository's layout (.bin-only transformer/ and vae/ on main): MF mid-training, MeanFlow with guidance, PNG."""
    home = tmp_path / "hf-home"
    hub_cache = populate(home, scale="tiny")
    store = tmp_path / "store.zarr"
    generate_from_hub("imagenet256", home, store)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mid_dir, post_dir = tmp_path / "mid_mf", tmp_path / "post_meanflow"
    mid_run(load_config(MidConfig, PRESETS / "mid.yaml", [
        f"stores=[{store}]", "form=mf", f"loop.output_dir={mid_dir}", "loop.grad_clip=1.0", *TINY_TRAINING]))
    result = post_run(load_config(PostConfig, PRESETS / "post.yaml", [
        "method=meanflow", f"init=cmt:{mid_dir}/export", f"data=store:{store}", f"loop.output_dir={post_dir}",
        *TINY_TRAINING]))
    assert result.loop.final_step == 2 and result.loop.skipped_steps == 0
    resolved = (post_dir / "config.yaml").read_text()
    assert "teacher: facebook/DiT-XL-2-256" in resolved and "guidance_kappa: 0.92" in resolved
    exported = FlowMapStudent.from_pretrained(post_dir / "export")
    assert exported.latent and exported.second_time_input and exported.null_class == 1000
    assert sample_main(["--model", str(post_dir / "export"), "--steps", "1", "--num", "4", "--label", "207",
                        "--out", str(tmp_path / "grid.png")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sample_shape"] == [4, 32, 32] and summary["image_shape"] == [3, 256, 256]
    grid = Image.open(tmp_path / "grid.png")
    assert grid.mode == "RGB" and grid.size == (2 * 257 + 1, 2 * 257 + 1)
    assert not list(home.rglob(MODELING_MARKER)), "no code from the repository runs"
