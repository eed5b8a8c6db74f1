"""FD of a teacher's samples at several solver step counts, beside the real-vs-real floor; prints JSON.

    python jobs/eval_teacher.py --teacher runs/digits/pretrain/export --dataset digits --steps 4 8 16

Every row uses the same prior noise (seeds 0..num-1) and the same number of samples, so rows compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.solvers import solve
from pipeline.teacher import load_teacher
from pipeline.png_grid import save_grid
from trainer.metrics import FDMetric, get_classifier, real_vs_real_floor


def teacher_fd(
    teacher_dir: str, dataset: str, steps: Sequence[int], *, num: int, solver: str, grid: str, batch: int,
    grid_dir: Path | None = None,
) -> dict:
    """FD-<dataset> of `num` teacher samples per step count, with the floor and the classifier's accuracy."""
    teacher = load_teacher(teacher_dir)
    metric = FDMetric(dataset)
    _, info = get_classifier(dataset)
    rows = []
    for k in steps:
        started = time.perf_counter()
        with torch.no_grad():
            samples = torch.cat([
                teacher.decode(solve(teacher, list(range(lo, min(lo + batch, num))), steps=k, solver=solver, grid=grid).points[:, -1])
                for lo in range(0, num, batch)
            ])  # [num, C, H, W]
        rows.append({"steps": k, "fd": metric(samples), "seconds": time.perf_counter() - started})
        if grid_dir is not None:
            save_grid(samples[:64].clamp(-1, 1), grid_dir / f"teacher_{solver}_{k}steps.png")
    return {
        "teacher": teacher_dir,
        "metric": metric.name,
        "num_samples": num,
        "solver": solver,
        "grid": grid,
        "rows": rows,
        "real_vs_real_floor": real_vs_real_floor(dataset),
        "classifier_holdout_accuracy": info["accuracy"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--solver", default="dpmpp-3m")
    parser.add_argument("--grid", default="logsnr")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--grid-dir", type=Path, default=None, help="write a PNG grid per step count here")
    args = parser.parse_args(argv)
    result = teacher_fd(args.teacher, args.dataset, args.steps, num=args.num, solver=args.solver, grid=args.grid,
                        batch=args.batch, grid_dir=args.grid_dir)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
