"""FD of a teacher's samples at several solver step counts, beside the real-vs-real floor; prints JSON.

    python jobs/eval_teacher.py --teacher runs/digits/pretrain/export --dataset digits --steps 4 8 16
    python jobs/eval_teacher.py --teacher runs/digits/pretrain/export --steps 16 --student-draws 6

Every row uses the same prior noise (seeds 0..num-1) and the same number of samples, so rows compare. With
--student-draws N the rows are instead scored on the noise the students are scored on: draw 0 is the training runs'
own evaluation draw (trainer.evaluation.EVAL_SEED), draws 1..N-1 the fresh re-draws of
jobs.fd_redraws, so a student's FD and the teacher's can be compared draw by draw.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from jobs.fd_redraws import draw_seeds as evaluation_draw_seeds
from pipeline.solvers import solve
from pipeline.teacher import load_teacher
from pipeline.png_grid import save_grid
from trainer.metrics import FDMetric, get_classifier, real_vs_real_floor


def draw_seeds(draw: int | None, num: int) -> list[int]:
    """Prior-noise seeds: 0..num-1 (draw None), or the students' evaluation draw `draw` (0: the runs' own)."""
    return list(range(num)) if draw is None else evaluation_draw_seeds(draw, num)


def teacher_fd(
    teacher_dir: str, dataset: str, steps: Sequence[int], *, num: int, solver: str, grid: str, batch: int,
    grid_dir: Path | None = None, student_draws: int = 0,
) -> dict:
    """FD-<dataset> of `num` teacher samples per step count (per student draw), with the floor and the classifier's
    accuracy."""
    teacher = load_teacher(teacher_dir)
    metric = FDMetric(dataset)
    _, info = get_classifier(dataset)
    rows = []
    for k in steps:
        for draw in range(student_draws) if student_draws else [None]:
            seeds = draw_seeds(draw, num)
            started = time.perf_counter()
            with torch.no_grad():
                samples = torch.cat([
                    teacher.decode(solve(teacher, seeds[lo:lo + batch], steps=k, solver=solver, grid=grid).points[:, -1])
                    for lo in range(0, num, batch)
                ])  # [num, C, H, W]
            rows.append({"steps": k, **({} if draw is None else {"draw": draw}), "fd": metric(samples),
                         "seconds": time.perf_counter() - started})
            if grid_dir is not None and draw in (None, 0):
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
    parser.add_argument("--student-draws", type=int, default=0, metavar="N",
                        help="score on the students' evaluation draws 0..N-1 instead of seeds 0..num-1")
    args = parser.parse_args(argv)
    if args.student_draws < 0:
        parser.error(f"--student-draws {args.student_draws}: pass 0 (seeds 0..num-1) or a number of draws >= 1")
    result = teacher_fd(args.teacher, args.dataset, args.steps, num=args.num, solver=args.solver, grid=args.grid,
                        batch=args.batch, grid_dir=args.grid_dir, student_draws=args.student_draws)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
