"""Stage 1, pre-training: a diffusers UNet2DModel teacher, in DDPM form or in EDM form.

- ``schedule: ddpm``: a DDPMScheduler VP schedule and the simple DDPM loss with an ε, v or x0 target
  (Ho et al. 2020, eq. 14; v: Salimans & Ho 2022).
- ``schedule: edm``: EDM's preconditioned denoiser D = c_skip·x̃ + c_out·F(c_in·x̃, ¼·ln σ̃) under diffusers'
  EDMEulerScheduler, EDM's log-normal σ̃ sampling (ln σ̃ ~ N(P_mean, P_std²)) and loss weighting λ(σ̃) = 1/c_out²
  (Karras et al. 2022, eqs. 7-8 and Table 1): the family of the CMT authors' CIFAR teachers. Its c_out is bounded by
  σ_data, so students built from it are well-conditioned with the teacher's own reading.

    python trainer/pretrain.py --config jobs/digits/pretrain.yaml [key=value ...] [--dry-run]
    accelerate launch trainer/pretrain.py --config jobs/digits/pretrain.yaml

Writes into `loop.output_dir`: `config.yaml` (the resolved config), `checkpoints/`, `metrics.jsonl`,
`samples/step_<N>.png` (EMA samples drawn with `pipeline.solvers.solve`, at every eval and at the end;
FD-<dataset> of those samples is logged) and `export/`, a diffusers `DDPMPipeline` directory
(safetensors) that `pipeline.teacher.load_teacher` loads. Re-running the same command resumes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from diffusers import DDPMPipeline, DDPMScheduler, EDMEulerScheduler, UNet2DModel

from trainer.batches import InMemoryBatches
from trainer.config import ConfigError, config_to_dict, load_config, parse_stage_args, save_resolved, stage_help
from trainer.image_datasets import ImageDataset, load_dataset
from pipeline.png_grid import save_grid
from trainer.loop import LoopConfig, LoopResult, make_accelerator, train_loop
from trainer.run_dir import RunDir
from trainer.run_lock import training_lock


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Size of the UNet2DModel: one resolution level per entry of block_out_channels (each halves H and W)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention: bool = False
    norm_num_groups: int = 8
    dropout: float = 0.0
    class_conditional: bool = False

    def __post_init__(self) -> None:
        """Reject sizes diffusers would fail on later, with the fix."""
        if not self.block_out_channels:
            raise ConfigError("model.block_out_channels needs at least one entry, e.g. [32, 64]")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ConfigError(
                    f"model.block_out_channels {list(self.block_out_channels)} must all be multiples of "
                    f"model.norm_num_groups={self.norm_num_groups}"
                )
        if self.layers_per_block < 1:
            raise ConfigError(f"model.layers_per_block must be >= 1, got {self.layers_per_block}")


@dataclass(frozen=True, kw_only=True)
class EDMTrainingConfig:
    """EDM form (schedule: edm): σ_data, the σ̃ range of the exported scheduler and the log-normal training σ̃."""

    sigma_data: float = 0.5  # EDM's CIFAR-10 value
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2  # ln σ̃ ~ N(p_mean, p_std²) (EDM Table 1)
    p_std: float = 1.2

    def __post_init__(self) -> None:
        """Reject values EDM's formulas cannot take."""
        if not (self.sigma_data > 0 and 0 < self.sigma_min < self.sigma_max and self.p_std > 0):
            raise ConfigError("edm needs sigma_data > 0, 0 < sigma_min < sigma_max and p_std > 0")


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Stage-1 settings: data, UNet size, DDPM noise schedule, evaluation sampling and the shared loop."""

    loop: LoopConfig
    dataset: str = "digits"
    image_size: int | None = None
    batch_per_process: int = 128
    model: UNetConfig = field(default_factory=UNetConfig)
    schedule: Literal["ddpm", "edm"] = "ddpm"
    num_train_timesteps: int = 1000
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"  # ddpm only
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"  # ddpm only
    edm: EDMTrainingConfig = field(default_factory=EDMTrainingConfig)  # edm only
    sample_steps: int = 16
    sample_solver: str = "dpmpp-3m"
    sample_grid: str = "logsnr"
    num_eval_samples: int = 1000
    num_grid_images: int = 64
    eval_seed: int = 0
    compute_fd: bool = True

    def __post_init__(self) -> None:
        """Reject counts that cannot work, with the fix."""
        if self.batch_per_process < 1:
            raise ConfigError(f"batch_per_process must be >= 1, got {self.batch_per_process}")
        if self.num_eval_samples < 1 or self.num_grid_images < 1:
            raise ConfigError("num_eval_samples and num_grid_images must be >= 1")
        if self.sample_steps < 1:
            raise ConfigError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if self.schedule == "edm" and self.prediction_type != "epsilon":
            raise ConfigError(
                f"prediction_type={self.prediction_type} is a DDPM setting: schedule=edm trains EDM's preconditioned "
                "denoiser (no prediction type to choose); drop prediction_type or use schedule=ddpm"
            )


def build_unet(cfg: PretrainConfig, data: ImageDataset) -> UNet2DModel:
    """The UNet2DModel for `data`'s image shape (attention, if asked for, in the lowest-resolution level)."""
    channels, height, width = data.image_shape
    levels = len(cfg.model.block_out_channels)
    if height != width or height % 2 ** (levels - 1):
        raise ConfigError(
            f"images of {height}×{width} cannot pass {levels} UNet levels (each halves the size); use square "
            f"images whose side is divisible by {2 ** (levels - 1)} (image_size=...) or fewer block_out_channels"
        )
    down_blocks = ["DownBlock2D"] * levels
    up_blocks = ["UpBlock2D"] * levels
    if cfg.model.attention:
        down_blocks[-1], up_blocks[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=height,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=cfg.model.block_out_channels,
        layers_per_block=cfg.model.layers_per_block,
        down_block_types=tuple(down_blocks),
        up_block_types=tuple(up_blocks),
        norm_num_groups=cfg.model.norm_num_groups,
        dropout=cfg.model.dropout,
        num_class_embeds=data.num_classes if cfg.model.class_conditional else None,
    )


def build_scheduler(cfg: PretrainConfig) -> DDPMScheduler | EDMEulerScheduler:
    """The noise schedule the model is trained under (and exported with): DDPM's VP or EDM's (EDM preconditioning)."""
    if cfg.schedule == "edm":
        return EDMEulerScheduler(
            sigma_min=cfg.edm.sigma_min, sigma_max=cfg.edm.sigma_max, sigma_data=cfg.edm.sigma_data,
            num_train_timesteps=cfg.num_train_timesteps, prediction_type="epsilon",  # diffusers' name for EDM's c_out
        )
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )


def ddpm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int, *, scheduler: DDPMScheduler,
    class_conditional: bool,
) -> torch.Tensor:
    """Per-sample simple DDPM loss ‖target − f_θ(x_t, t)‖² (Ho et al. 2020, eq. 14).

    x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε with t ~ U{0..T−1}; target ε (or v, or x_0, per the scheduler's prediction_type).
    """
    x0 = batch["images"]  # [B, C, H, W]
    noise = torch.randn_like(x0)  # [B, C, H, W]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)  # [B]
    x_t = scheduler.add_noise(x0, noise, timesteps)  # [B, C, H, W]
    class_labels = batch["labels"] if class_conditional else None
    prediction = model(x_t, timesteps, class_labels=class_labels).sample  # [B, C, H, W]
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)  # [B, C, H, W]
    else:
        target = x0
    return (prediction - target).pow(2).flatten(1).mean(dim=1)  # [B]


def edm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int, *, scheduler: EDMEulerScheduler,
    edm: EDMTrainingConfig, class_conditional: bool,
) -> torch.Tensor:
    """Per-sample EDM loss λ(σ̃)·‖D_θ(x0 + σ̃ε, σ̃) − x0‖²/d with λ = 1/c_out² (Karras et al. 2022, eq. 8 + Table 1).

    Written in the network's output space as ‖F_θ(c_in·x̃, c_noise) − (x0 − c_skip·x̃)/c_out‖²/d, which is the same
    number; ln σ̃ ~ N(P_mean, P_std²); c_in, c_noise, c_skip, c_out are the exported scheduler's own.
    """
    from pipeline.noise_schedule import NoiseSchedule, edm_preconditioning

    x0 = batch["images"]  # [B, C, H, W]
    ln_sigma = torch.randn(x0.shape[0], device=x0.device, dtype=torch.float64) * edm.p_std + edm.p_mean  # [B]
    sigma = ln_sigma.exp()  # [B]
    noise = torch.randn_like(x0)  # [B, C, H, W]
    c_in, c_noise, c_skip, c_out = edm_preconditioning(NoiseSchedule.from_scheduler(scheduler), "epsilon", sigma)
    column = lambda values: values.to(x0.dtype).reshape(-1, 1, 1, 1)  # noqa: E731  [B] → [B, 1, 1, 1]
    x_noisy = x0 + column(sigma) * noise  # [B, C, H, W], x̃ = x0 + σ̃·ε
    class_labels = batch["labels"] if class_conditional else None
    prediction = model(column(c_in) * x_noisy, c_noise.to(x0.dtype), class_labels=class_labels).sample  # [B, C, H, W]
    target = (x0 - column(c_skip) * x_noisy) / column(c_out)  # [B, C, H, W]
    return (prediction - target).pow(2).flatten(1).mean(dim=1)  # [B]


@dataclass
class SampleEvaluator:
    """Eval hook: EMA samples with the shared PF-ODE solver → PNG grid and FD-<dataset>."""

    cfg: PretrainConfig
    scheduler: DDPMScheduler | EDMEulerScheduler
    num_classes: int
    samples_dir: Path
    _metric: object = None

    def __call__(self, ema_model: torch.nn.Module, step: int) -> dict[str, float]:
        """Draw cfg.num_eval_samples images, save the first num_grid_images as samples/step_<step>.png, score FD."""
        images = sample_images(
            ema_model, self.scheduler, self.cfg, num_samples=self.cfg.num_eval_samples, num_classes=self.num_classes
        )  # [N, C, H, W]
        save_grid(images[: self.cfg.num_grid_images], self.samples_dir / f"step_{step}.png")
        if not self.cfg.compute_fd:
            return {}
        from trainer.metrics import FD_DATASETS, FDMetric

        if self.cfg.dataset not in FD_DATASETS:
            return {}
        if self._metric is None:
            self._metric = FDMetric(self.cfg.dataset)
        return {self._metric.name: float(self._metric(images.cpu()))}


@torch.no_grad()
def sample_images(
    model: torch.nn.Module, scheduler: DDPMScheduler | EDMEulerScheduler, cfg: PretrainConfig, *, num_samples: int,
    num_classes: int,
) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] from `cfg.sample_steps` steps of `cfg.sample_solver` (seeds eval_seed + i)."""
    from pipeline.solvers import solve
    from pipeline.teacher import load_teacher

    teacher = load_teacher(model, scheduler=scheduler, device=next(model.parameters()).device)
    seeds = list(range(cfg.eval_seed, cfg.eval_seed + num_samples))
    labels = [seed % num_classes for seed in seeds] if cfg.model.class_conditional else None
    trajectory = solve(
        teacher, seeds, steps=cfg.sample_steps, solver=cfg.sample_solver, grid=cfg.sample_grid, labels=labels
    )
    return teacher.decode(trajectory.points[:, -1]).clamp(-1, 1)  # [N, C, H, W]


def export_pipeline(
    ema_model: torch.nn.Module, directory: Path, *, scheduler: DDPMScheduler | EDMEulerScheduler
) -> None:
    """Save the EMA UNet with its scheduler as a diffusers DDPMPipeline directory (safetensors) into `directory`."""
    DDPMPipeline(unet=ema_model, scheduler=scheduler).save_pretrained(directory, safe_serialization=True)


def run(cfg: PretrainConfig) -> LoopResult:
    """Train (or resume) the stage-1 teacher described by `cfg`; returns the loop's result (export dir, metrics)."""
    accelerator = make_accelerator(cfg.loop)
    with training_lock(cfg.loop.output_dir, hold=accelerator.is_main_process):  # one process per run directory
        return _pretrain(cfg, accelerator)


def _pretrain(cfg: PretrainConfig, accelerator: Accelerator) -> LoopResult:
    """`run` with the run directory held."""
    output_dir = Path(cfg.loop.output_dir)
    if accelerator.is_main_process:
        save_resolved(cfg, output_dir)
    data = load_dataset(cfg.dataset, image_size=cfg.image_size)
    set_seed(cfg.loop.seed)  # identical initial weights on every rank and every run
    model = build_unet(cfg, data)
    scheduler = build_scheduler(cfg)
    batches = InMemoryBatches(
        {"images": data.images, "labels": data.labels}, batch_per_process=cfg.batch_per_process, seed=cfg.loop.seed
    )
    evaluate = SampleEvaluator(cfg, scheduler, data.num_classes, RunDir(output_dir).samples)
    if cfg.schedule == "edm":
        loss_fn = partial(edm_loss, scheduler=scheduler, edm=cfg.edm, class_conditional=cfg.model.class_conditional)
    else:
        loss_fn = partial(ddpm_loss, scheduler=scheduler, class_conditional=cfg.model.class_conditional)
    return train_loop(
        cfg.loop,
        model=model,
        loss_fn=loss_fn,
        batches=batches,
        accelerator=accelerator,
        evaluate=evaluate,
        export=partial(export_pipeline, scheduler=scheduler),
    )


def describe(cfg: PretrainConfig) -> dict:
    """What a run of `cfg` would do, for --dry-run: the resolved config, data shape and model size."""
    data = load_dataset(cfg.dataset, image_size=cfg.image_size)
    model = build_unet(cfg, data)
    return {
        "config": config_to_dict(cfg),
        "dataset": {"name": data.name, "num_images": len(data), "image_shape": list(data.image_shape)},
        "model_parameters": sum(parameter.numel() for parameter in model.parameters()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `python trainer/pretrain.py --config PRESET [key=value ...] [--dry-run]`."""
    try:
        args = parse_stage_args(sys.argv[1:] if argv is None else argv)
        if args.help:
            print(stage_help(PretrainConfig, __doc__))
            return 0
        cfg = load_config(PretrainConfig, args.config_path, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(describe(cfg), indent=2))
        return 0
    try:
        result = run(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not PartialState().is_main_process:
        return 0
    print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
