"""Draw 1- or 2-step samples from a trained few-step student into a PNG grid (and, on request, a tensor file).

    python -m trainer.sample --model DIR --steps 1|2 --num N --out grid.png [--save-tensor samples.pt] [--vae VAE]
        [--intermediate X] [--seed S] [--form cm|mf] [--sigma-max S] [--label K] [--nrow R] [--batch-size B]
        [--device cpu|cuda]

DIR is a student export (`FlowMapStudent.save_pretrained`: the `export/` of trainer/mid.py or trainer/post.py) or a
run directory holding one under `export/`. Sample i starts from prior noise seeded with seed + i
(`pipeline.solvers.prior_noise`; the CM form's 2-step re-noise from seed + i + 1,000,003), so the same command draws
the same images whatever --batch-size. `--intermediate` is the 2-step intermediate time: EDM level σ̃ for the CM form
(default 0.821), flow time τ for the MF form (default 0.5). Class-conditional students draw class (seed + i) mod C,
or `--label K` for every sample.

Latent students (a DiT on VAE latents) are decoded through the VAE saved in their export (`vae/`), or the one named by
`--vae` (a VAE directory, or the teacher's pipeline directory holding `vae/`); the PNG shows the decoded images.
`--save-tensor` writes the raw samples [N, *S] in the student's clean space (latents for latent students, never
clamped) with torch.save; without `--out` only the tensor is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from trainer.student_export import STUDENT_FILE, student_export_dir
RENOISE_SEED_OFFSET = 1_000_003  # the CM form's 2-step re-noise of sample i comes from seed + i + this


class SampleError(ValueError):
    """A sampling request that cannot run (no student export, bad counts); names the fix."""


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """One sampling job: which export, how many images, how many steps, where the grid and the tensor go."""

    model: str
    out: str | None = None
    steps: Literal[1, 2] = 1
    num: int = 64
    seed: int = 0
    intermediate: float | None = None
    form: Literal["cm", "mf"] | None = None  # None: the student's own form (mf with a second time input)
    sigma_max: float | None = None
    label: int | None = None
    nrow: int | None = None
    batch_size: int = 256
    device: str = "cpu"
    save_tensor: str | None = None  # also save the raw samples [N, *S] with torch.save
    vae: str | None = None  # latent students: a VAE directory (or a pipeline dir with vae/) when the export has none

    def __post_init__(self) -> None:
        """Reject counts and requests that cannot work."""
        if self.steps not in (1, 2):
            raise SampleError(f"--steps must be 1 or 2, got {self.steps}")
        if self.num < 1 or self.batch_size < 1:
            raise SampleError(f"--num and --batch-size must be >= 1, got {self.num} and {self.batch_size}")
        if self.out is None and self.save_tensor is None:
            raise SampleError("nothing to write: pass --out grid.png (PNG grid) and/or --save-tensor samples.pt")


@dataclass(frozen=True)
class SampleResult:
    """Where the grid and tensor went, what was drawn and how long it took."""

    grid_path: Path | None
    tensor_path: Path | None
    num_images: int
    sample_shape: tuple[int, ...]
    image_shape: tuple[int, ...] | None
    seconds: float
    samples: torch.Tensor  # [N, *S], the student's clean space (latents for latent students)
    images: torch.Tensor | None  # [N, C, H, W] nominally in [-1, 1] (decoded for latent students)


def student_dir(path: str | Path) -> Path:
    """The export directory for `path`: itself, or its `export/` when `path` is a training run's directory."""
    found = student_export_dir(path)
    if found is not None:
        return found
    raise SampleError(
        f"{path} holds no student export ({STUDENT_FILE}): pass the export/ directory of a trainer/mid.py or "
        "trainer/post.py run (or that run's directory)"
    )


@torch.no_grad()
def draw_samples(
    student: torch.nn.Module,
    seeds: Sequence[int],
    steps: int,
    *,
    intermediate: float | None = None,
    form: str | None = None,
    sigma_max: float | None = None,
    label: int | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """1- or 2-step samples [N, *S] in the student's clean space (not clamped), sample i from noise seed seeds[i].

    Class-conditional students draw class seeds[i] mod C (or `label`); the CM form's 2-step re-noise of sample i comes
    from seed seeds[i] + RENOISE_SEED_OFFSET, so no sample depends on the batching or on the other seeds.
    """
    from pipeline.solvers import prior_noise

    if label is not None:
        if student.num_classes is None:
            raise SampleError("--label was given but the student is unconditional: drop --label")
        if not 0 <= label < student.num_classes:
            raise SampleError(f"--label {label} is not a class of this student: pass 0..{student.num_classes - 1}")
    seeds = [int(seed) for seed in seeds]
    chunks = [torch.empty(0, *student.sample_shape)]
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        noise = prior_noise(chunk, student.sample_shape)  # [b, *S]
        renoise = prior_noise([seed + RENOISE_SEED_OFFSET for seed in chunk], student.sample_shape)  # [b, *S]
        labels = None
        if student.num_classes is not None:
            labels = [label if label is not None else seed % student.num_classes for seed in chunk]
        samples = student.sample(noise, steps, intermediate=intermediate, sigma_max=sigma_max, labels=labels,
                                 form=form, renoise=renoise)  # [b, *S]
        chunks.append(samples.float().cpu())
    return torch.cat(chunks)  # [N, *S]


def resolve_vae(cfg: SampleConfig, directory: Path, student: torch.nn.Module) -> torch.nn.Module | None:
    """The VAE a latent student's samples are decoded with: --vae, else the export's vae/; None for pixel students."""
    from pipeline.teacher import TeacherLoadError
    from pipeline.weights import load_model_dir
    from trainer.student_export import load_vae

    if cfg.vae is not None:
        path = Path(cfg.vae).expanduser()
        path = path / "vae" if (path / "vae" / "config.json").is_file() else path
        try:
            return load_model_dir(path, "vae").to(cfg.device).eval()
        except TeacherLoadError as error:
            raise SampleError(f"--vae {cfg.vae}: {error}") from error
    if not student.latent:
        return None
    vae = load_vae(directory, cfg.device)
    if vae is None and cfg.out is not None:
        raise SampleError(
            f"{directory} is a latent student (its samples {list(student.sample_shape)} are latents of its teacher's "
            "VAE) and the export holds no vae/: pass --vae <the teacher's VAE directory, or the teacher pipeline "
            "directory holding vae/> to write images, or only --save-tensor for the raw latents"
        )
    return vae


def run(cfg: SampleConfig) -> SampleResult:
    """Load the export, draw the samples, decode latents, write the grid and/or the raw tensor."""
    from trainer.evaluation import decode_samples
    from pipeline.png_grid import save_grid
    from trainer.student import FlowMapStudent, StudentLoadError

    started = time.perf_counter()
    directory = student_dir(cfg.model)
    try:
        student = FlowMapStudent.from_pretrained(directory, device=cfg.device).eval()
    except StudentLoadError as error:
        raise SampleError(str(error)) from error
    if cfg.form == "mf" and not student.second_time_input:
        raise SampleError(f"{cfg.model} is a CM-form student (no second time input): drop --form mf or pass --form cm")
    vae = resolve_vae(cfg, directory, student)
    samples = draw_samples(student, range(cfg.seed, cfg.seed + cfg.num), cfg.steps, intermediate=cfg.intermediate,
                           form=cfg.form, sigma_max=cfg.sigma_max, label=cfg.label,
                           batch_size=cfg.batch_size)  # [N, *S]
    images, grid_path, tensor_path = None, None, None
    if cfg.out is not None:
        images = decode_samples(samples, vae)  # [N, C, H, W]
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise SampleError(
                f"samples of shape {tuple(images.shape[1:])} are not images and {cfg.model} records no VAE to decode "
                "them: drop --out and pass --save-tensor samples.pt, or pass --vae <the teacher's VAE directory>"
            )
        grid_path = save_grid(images, cfg.out, nrow=cfg.nrow)
    if cfg.save_tensor:
        tensor_path = Path(cfg.save_tensor)
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(samples, tensor_path)
    return SampleResult(grid_path, tensor_path, int(samples.shape[0]), tuple(samples.shape[1:]),
                        None if images is None else tuple(images.shape[1:]), time.perf_counter() - started,
                        samples, images)


def parse_args(argv: Sequence[str] | None = None) -> SampleConfig:
    """Command line → SampleConfig."""
    parser = argparse.ArgumentParser(prog="python -m trainer.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="student export dir (or a run dir with export/)")
    parser.add_argument("--out", default=None, help="PNG grid path (decoded images for latent students)")
    parser.add_argument("--steps", type=int, default=1, choices=(1, 2))
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--intermediate", type=float, default=None, help="2-step time: σ̃ (cm) or τ (mf)")
    parser.add_argument("--form", choices=("cm", "mf"), default=None)
    parser.add_argument("--sigma-max", type=float, default=None)
    parser.add_argument("--label", type=int, default=None)
    parser.add_argument("--nrow", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save-tensor", default=None, help="also write the raw samples [N, *S] (torch.save)")
    parser.add_argument("--vae", default=None, help="latent students: VAE dir (or teacher pipeline dir with vae/)")
    args = parser.parse_args(argv)
    return SampleConfig(model=args.model, out=args.out, steps=args.steps, num=args.num, seed=args.seed,
                        intermediate=args.intermediate, form=args.form, sigma_max=args.sigma_max, label=args.label,
                        nrow=args.nrow, batch_size=args.batch_size, device=args.device, save_tensor=args.save_tensor,
                        vae=args.vae)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: prints a JSON summary, exit 2 with the fix on bad input."""
    try:
        result = run(parse_args(argv))
    except SampleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"grid": None if result.grid_path is None else str(result.grid_path),
                      "tensor": None if result.tensor_path is None else str(result.tensor_path),
                      "num_images": result.num_images, "sample_shape": list(result.sample_shape),
                      "image_shape": None if result.image_shape is None else list(result.image_shape),
                      "seconds": round(result.seconds, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
