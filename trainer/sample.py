"""Draw 1- or 2-step samples from a trained few-step student into a PNG grid.

    python -m trainer.sample --model DIR --steps 1|2 --num N --out grid.png [--intermediate X] [--seed S]
        [--form cm|mf] [--sigma-max S] [--label K] [--nrow R] [--batch-size B] [--device cpu|cuda] [--save-tensor F]

DIR is a student export (`FlowMapStudent.save_pretrained`: the `export/` of trainer/mid.py or trainer/post.py) or a
run directory holding one under `export/`. Sample i starts from prior noise seeded with seed + i
(`pipeline.solvers.prior_noise`), so the same command draws the same images (the CM form's 2-step re-noise is drawn per
batch of --batch-size, so keep that equal too). `--intermediate` is the 2-step
intermediate time: EDM level σ̃ for the CM form (default 0.821), flow time τ for the MF form (default 0.5).
Class-conditional students draw class (seed + i) mod C, or `--label K` for every sample.
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

STUDENT_FILE = "student.json"


class SampleError(ValueError):
    """A sampling request that cannot run (no student export, bad counts); names the fix."""


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """One sampling job: which export, how many images, how many steps, where the grid goes."""

    model: str
    out: str
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
    save_tensor: str | None = None  # also save the raw samples [N, *S] with torch.save (safetensors-free plain tensor)

    def __post_init__(self) -> None:
        """Reject counts that cannot work."""
        if self.steps not in (1, 2):
            raise SampleError(f"--steps must be 1 or 2, got {self.steps}")
        if self.num < 1 or self.batch_size < 1:
            raise SampleError(f"--num and --batch-size must be >= 1, got {self.num} and {self.batch_size}")


@dataclass(frozen=True)
class SampleResult:
    """Where the grid went, what was drawn and how long it took."""

    grid_path: Path
    num_images: int
    sample_shape: tuple[int, ...]
    seconds: float
    images: torch.Tensor  # [N, *S] in [-1, 1]


def student_dir(path: str | Path) -> Path:
    """The export directory for `path`: itself, or its `export/` when `path` is a training run's directory."""
    path = Path(path).expanduser()
    if (path / STUDENT_FILE).is_file():
        return path
    if (path / "export" / STUDENT_FILE).is_file():
        return path / "export"
    raise SampleError(
        f"{path} holds no student export ({STUDENT_FILE}): pass the export/ directory of a trainer/mid.py or "
        "trainer/post.py run (or that run's directory)"
    )


@torch.no_grad()
def draw_samples(
    student: torch.nn.Module,
    num: int,
    steps: int,
    *,
    seed: int = 0,
    intermediate: float | None = None,
    form: str | None = None,
    sigma_max: float | None = None,
    label: int | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """`num` 1- or 2-step samples [N, *S] in [-1, 1]; sample i's noise from seed + i (2-step re-noise seeded too)."""
    from pipeline.solvers import prior_noise

    seeds = list(range(seed, seed + num))
    chunks = []
    for start in range(0, num, batch_size):
        chunk = seeds[start : start + batch_size]
        noise = prior_noise(chunk, student.sample_shape)  # [b, *S]
        labels = None
        if student.num_classes is not None:
            labels = [label if label is not None else s % student.num_classes for s in chunk]
        elif label is not None:
            raise SampleError("--label was given but the student is unconditional: drop --label")
        generator = torch.Generator().manual_seed(seed + 1_000_003 + start)
        images = student.sample(noise, steps, intermediate=intermediate, sigma_max=sigma_max, labels=labels,
                                form=form, generator=generator)  # [b, *S]
        chunks.append(images.cpu())
    return torch.cat(chunks).clamp(-1, 1)  # [N, *S]


def run(cfg: SampleConfig) -> SampleResult:
    """Load the export, draw the samples, write the grid (and the raw tensor when asked)."""
    from trainer.images import save_grid
    from trainer.student import FlowMapStudent, StudentLoadError

    started = time.perf_counter()
    try:
        student = FlowMapStudent.from_pretrained(student_dir(cfg.model), device=cfg.device).eval()
    except StudentLoadError as error:
        raise SampleError(str(error)) from error
    if cfg.form == "mf" and not student.second_time_input:
        raise SampleError(f"{cfg.model} is a CM-form student (no second time input): drop --form mf or pass --form cm")
    images = draw_samples(student, cfg.num, cfg.steps, seed=cfg.seed, intermediate=cfg.intermediate, form=cfg.form,
                          sigma_max=cfg.sigma_max, label=cfg.label, batch_size=cfg.batch_size)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise SampleError(f"samples of shape {tuple(images.shape[1:])} are not images: use --save-tensor instead")
    path = save_grid(images, cfg.out, nrow=cfg.nrow)
    if cfg.save_tensor:
        Path(cfg.save_tensor).parent.mkdir(parents=True, exist_ok=True)
        torch.save(images, cfg.save_tensor)
    return SampleResult(path, int(images.shape[0]), tuple(images.shape[1:]), time.perf_counter() - started, images)


def parse_args(argv: Sequence[str] | None = None) -> SampleConfig:
    """Command line → SampleConfig."""
    parser = argparse.ArgumentParser(prog="python -m trainer.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="student export dir (or a run dir with export/)")
    parser.add_argument("--out", required=True, help="PNG grid path")
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
    parser.add_argument("--save-tensor", default=None)
    args = parser.parse_args(argv)
    return SampleConfig(model=args.model, out=args.out, steps=args.steps, num=args.num, seed=args.seed,
                        intermediate=args.intermediate, form=args.form, sigma_max=args.sigma_max, label=args.label,
                        nrow=args.nrow, batch_size=args.batch_size, device=args.device, save_tensor=args.save_tensor)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: prints a JSON summary, exit 2 with the fix on bad input."""
    try:
        result = run(parse_args(argv))
    except SampleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"grid": str(result.grid_path), "num_images": result.num_images,
                      "sample_shape": list(result.sample_shape), "seconds": round(result.seconds, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
