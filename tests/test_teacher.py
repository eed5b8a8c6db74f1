"""Teacher loading (pipeline dirs, model dirs, in-memory, hub ids), fingerprints, the denoiser view, bad input."""

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    ScoreSdeVeScheduler,
    UNet2DModel,
)

from pipeline.oracle import make_oracle_teacher, posterior_mean
from pipeline.solvers import solve
from pipeline.noise_schedule import SigmaRangeError, UnsupportedSchedulerError
from pipeline.teacher import ConditioningError, Teacher, load_teacher
from pipeline.teacher_files import TeacherLoadError

MU, S = 0.3, 0.5


def tiny_unet(num_class_embeds: int | None = None, seed: int = 0) -> UNet2DModel:
    """An 8×8 RGB UNet2DModel with ~40k weights."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )


def tiny_dit(seed: int = 0) -> DiTTransformer2DModel:
    """A class-conditional DiT on 4×4×4 latents with learned sigma (out_channels = 2·in) and 1000 classes."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=4,
        patch_size=2,
        norm_num_groups=4,
        num_embeds_ada_norm=1000,
    ).eval()  # eval: in train mode the label embedding drops class ids at random


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """An AutoencoderKL mapping 8×8 RGB images to 4×4×4 latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
    )


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    """A DDPMPipeline (tiny UNet + DDPMScheduler) saved with save_pretrained."""
    path = tmp_path_factory.mktemp("ddpm")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    """A DiTPipeline (tiny DiT + tiny VAE + DDIMScheduler) saved with save_pretrained."""
    path = tmp_path_factory.mktemp("dit")
    DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The denoiser view


@pytest.mark.parametrize(
    "scheduler",
    [
        DDPMScheduler(prediction_type="epsilon"),
        DDPMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"),
        DDPMScheduler(prediction_type="sample"),
        EDMEulerScheduler(prediction_type="epsilon"),
        EDMEulerScheduler(prediction_type="v_prediction", sigma_data=0.7),
        FlowMatchEulerDiscreteScheduler(),
    ],
    ids=["vp-eps", "vp-v-cosine", "vp-x0", "edm-eps", "edm-v", "flow"],
)
def test_denoise_of_the_oracle_is_the_gaussian_posterior_mean(scheduler):
    """D(x̃, σ̃) of an exact teacher equals μ + s²/(s²+σ̃²)(x̃−μ) for every family and prediction type."""
    teacher = make_oracle_teacher(scheduler, (2, 3, 3), MU, S)
    lo, hi = teacher.sigma_edm_range
    sigma_edm = np.array([max(lo, 0.02) * 1.5, 0.5, 3.0, min(hi, 60.0)])  # [B], one level per sample
    x_edm = MU + torch.from_numpy(np.sqrt(S**2 + sigma_edm**2))[:, None, None, None] * torch.randn(
        4, 2, 3, 3, dtype=torch.float64
    )
    denoised = teacher.denoise(x_edm.float(), sigma_edm)  # [B, 2, 3, 3]
    expected = posterior_mean(x_edm, torch.from_numpy(sigma_edm), MU, S)
    assert denoised.shape == (4, 2, 3, 3) and denoised.dtype == torch.float32
    assert torch.allclose(denoised.double(), expected, rtol=1e-5, atol=1e-5)


def test_vp_timesteps_map_to_the_schedule_exactly():
    """Integer timesteps give α² = ᾱ_t; σ̃ → t → σ̃ round-trips at fractional timesteps."""
    scheduler = DDPMScheduler()
    teacher = make_oracle_teacher(scheduler, (1, 2, 2))
    t = np.array([0, 10, 500, 999])
    alpha, sigma = teacher.alpha_sigma(t)
    alphas_cumprod = scheduler.alphas_cumprod.double().numpy()[t]
    assert np.allclose(alpha**2, alphas_cumprod, rtol=1e-6) and np.allclose(alpha**2 + sigma**2, 1.0)
    assert np.allclose(teacher.schedule.timestep_from_sigma_edm(sigma / alpha), t, atol=1e-9)
    fractional = np.array([0.25, 123.5, 998.75])
    levels = teacher.schedule.sigma_edm_from_timestep(fractional)
    assert np.allclose(teacher.schedule.timestep_from_sigma_edm(levels), fractional, atol=1e-9)
    assert np.all(np.diff(levels) > 0)


def test_flow_and_edm_alpha_sigma_follow_their_conventions():
    """Flow matching: (α, σ) = (1 − t/T, t/T); EDM: α = 1, σ = exp(4·c_noise)."""
    flow = make_oracle_teacher(FlowMatchEulerDiscreteScheduler(), (1, 2, 2))
    alpha, sigma = flow.alpha_sigma(np.array([1000.0, 250.0]))
    assert np.allclose(alpha, [0.0, 0.75]) and np.allclose(sigma, [1.0, 0.25])
    edm = make_oracle_teacher(EDMEulerScheduler(), (1, 2, 2))
    alpha, sigma = edm.alpha_sigma(0.25 * np.log(np.array([0.5, 80.0])))
    assert np.allclose(alpha, 1.0) and np.allclose(sigma, [0.5, 80.0])


def test_denoise_refuses_levels_outside_a_vp_schedule():
    """σ̃ beyond the DDPM table (≈157) is refused with the representable range in the message."""
    teacher = make_oracle_teacher(DDPMScheduler(), (1, 2, 2))
    with pytest.raises(SigmaRangeError, match="choose sigma_max/sigma_min inside"):
        teacher.denoise(torch.zeros(1, 1, 2, 2), 500.0)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_ddpm_pipeline_dir_loads_and_denoises_like_the_unet(ddpm_dir):
    """A saved DDPMPipeline loads as an unconditional ε-teacher whose D is (x − √(1−ᾱ)ε̂)/√ᾱ."""
    teacher = load_teacher(ddpm_dir)
    assert isinstance(teacher.model, UNet2DModel) and isinstance(teacher.scheduler, DDPMScheduler)
    assert teacher.sample_shape == (3, 8, 8) and teacher.num_classes is None and teacher.vae is None
    assert teacher.prediction_type == "epsilon"
    t = 600
    alpha_bar = float(teacher.scheduler.alphas_cumprod[t])
    x_vp = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        eps = teacher.model(x_vp, torch.tensor([t, t])).sample
    expected = (x_vp - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
    denoised = teacher.denoise_native(x_vp, alpha_bar**0.5, (1 - alpha_bar) ** 0.5)
    assert torch.allclose(denoised, expected, rtol=1e-5, atol=1e-5)
    trajectory = solve(teacher, [0, 1], steps=3, solver="ddim", grid="scheduler")
    assert trajectory.points.shape == (2, 4, 3, 8, 8) and torch.isfinite(trajectory.points).all()
    assert torch.equal(teacher.decode(trajectory.points[:, -1]), trajectory.points[:, -1])


def test_dit_pipeline_dir_loads_with_vae_labels_and_guidance(dit_dir):
    """A saved DiTPipeline loads as a 1000-class latent teacher; solve with labels + CFG; decode to images."""
    teacher = load_teacher(dit_dir)
    assert isinstance(teacher.model, DiTTransformer2DModel) and isinstance(teacher.vae, AutoencoderKL)
    assert teacher.sample_shape == (4, 4, 4) and teacher.num_classes == 1000 and teacher.null_class == 1000
    trajectory = solve(
        teacher, [3, 4, 5], steps=4, solver="dpmpp-2m", grid="logsnr", labels=[1, 2, 999], guidance_scale=3.0
    )
    assert trajectory.points.shape == (3, 5, 4, 4, 4) and torch.isfinite(trajectory.points).all()
    assert trajectory.labels.tolist() == [1, 2, 999]
    unguided = solve(teacher, [3, 4, 5], steps=4, solver="dpmpp-2m", grid="logsnr", labels=[1, 2, 999])
    assert not torch.allclose(unguided.points[:, -1], trajectory.points[:, -1])
    images = teacher.decode(trajectory.points[:, -1])
    assert images.shape == (3, 3, 8, 8) and torch.isfinite(images).all()


def test_model_dir_uses_the_sibling_scheduler_or_needs_one(ddpm_dir, tmp_path):
    """<pipeline>/unet finds ../scheduler; a lone model dir needs a scheduler given separately and says so."""
    teacher = load_teacher(ddpm_dir / "unet")
    assert isinstance(teacher.scheduler, DDPMScheduler)
    tiny_unet().save_pretrained(tmp_path / "lone")
    with pytest.raises(TeacherLoadError, match="--scheduler DIR"):
        load_teacher(tmp_path / "lone")
    teacher = load_teacher(tmp_path / "lone", scheduler=DDIMScheduler(prediction_type="v_prediction"))
    assert teacher.prediction_type == "v_prediction"


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint


def test_fingerprint_is_stable_across_save_load_and_sensitive_to_one_weight(ddpm_dir, dit_dir):
    """Same weights → same fingerprint (in memory or from disk); one changed weight → a different one."""
    scheduler = DDPMScheduler.from_pretrained(ddpm_dir, subfolder="scheduler")
    from_disk = load_teacher(ddpm_dir).fingerprint
    in_memory = load_teacher(tiny_unet(), scheduler=DDPMScheduler()).fingerprint
    assert from_disk == in_memory == load_teacher(ddpm_dir).fingerprint
    assert len(from_disk) == 64 and int(from_disk, 16) >= 0
    changed = copy.deepcopy(tiny_unet())
    with torch.no_grad():
        changed.conv_out.weight[0, 0, 0, 0] += 1e-3
    assert load_teacher(changed, scheduler=scheduler).fingerprint != from_disk
    other_schedule = load_teacher(tiny_unet(), scheduler=DDPMScheduler(beta_end=0.03)).fingerprint
    assert other_schedule != from_disk
    dit = load_teacher(dit_dir).fingerprint
    dit_other_vae = load_teacher(dit_dir, vae=tiny_vae(seed=1)).fingerprint
    assert dit != dit_other_vae


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_a_directory_that_is_not_diffusers_is_refused(tmp_path):
    """An arbitrary directory, a missing path, a file and a scheduler-only dir each get a clear error."""
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(TeacherLoadError, match="model_index.json"):
        load_teacher(tmp_path)
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher(tmp_path / "missing")
    with pytest.raises(TeacherLoadError, match="not a directory"):
        load_teacher(tmp_path / "notes.txt")
    DDPMScheduler().save_pretrained(tmp_path / "sched")
    with pytest.raises(TeacherLoadError, match="scheduler directory, not a model"):
        load_teacher(tmp_path / "sched")


def test_remote_code_components_are_refused(tmp_path):
    """A model_index.json naming a non-diffusers library is refused (no trust_remote_code)."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["my_package", "MyUNet"]}))
    with pytest.raises(TeacherLoadError, match="no remote code"):
        load_teacher(tmp_path)


def test_unsupported_scheduler_lists_the_supported_ones():
    """A scheduler whose schedule is not x = α·x0 + σ·ε here (score-SDE VE) is refused with the list."""
    with pytest.raises(UnsupportedSchedulerError, match="FlowMatchEulerDiscreteScheduler") as info:
        load_teacher(tiny_unet(), scheduler=ScoreSdeVeScheduler())
    assert "EDMEulerScheduler" in str(info.value) and "scheduler=" in str(info.value)
    with pytest.raises(TeacherLoadError, match="needs scheduler="):
        load_teacher(tiny_unet())


def test_conditioning_errors_name_the_fix():
    """Labels to an unconditional teacher, missing labels, guidance without a null class: ConditioningError."""
    x, level = torch.zeros(2, 3, 8, 8), 1.0
    unconditional = load_teacher(tiny_unet(), scheduler=DDPMScheduler())
    with pytest.raises(ConditioningError, match="unconditional: drop labels"):
        unconditional.denoise(x, level, labels=[0, 1])
    with pytest.raises(ConditioningError, match="unconditional: drop guidance_scale"):
        unconditional.denoise(x, level, guidance_scale=2.0)
    conditional = load_teacher(tiny_unet(num_class_embeds=10), scheduler=DDPMScheduler())
    assert conditional.num_classes == 10 and conditional.null_class is None
    with pytest.raises(ConditioningError, match="pass labels"):
        conditional.denoise(x, level)
    with pytest.raises(ConditioningError, match="num_classes=<real classes>"):
        conditional.denoise(x, level, labels=[0, 1], guidance_scale=2.0)
    with pytest.raises(ConditioningError, match=r"\[0, 10\)"):
        conditional.denoise(x, level, labels=[0, 10])
    with_null = load_teacher(tiny_unet(num_class_embeds=10), scheduler=DDPMScheduler(), num_classes=9)
    assert with_null.null_class == 9
    guided = with_null.denoise(x, level, labels=[0, 1], guidance_scale=2.0)
    assert guided.shape == x.shape and torch.isfinite(guided).all()
    with pytest.raises(TeacherLoadError, match="drop num_classes"):
        load_teacher(tiny_unet(), scheduler=DDPMScheduler(), num_classes=3)


def test_teacher_requires_a_scheduler():
    """Constructing a Teacher directly without a scheduler names the fix."""
    with pytest.raises(TeacherLoadError, match="pass scheduler="):
        Teacher(tiny_unet(), None)
