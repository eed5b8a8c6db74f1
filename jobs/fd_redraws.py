"""The FD's own noise: a student export scored on fresh draws of the evaluation noise.

A run's FD curve is measured on one fixed draw (seeds EVAL_SEED + i, `trainer/evaluation.py`), so two runs compared
on it share that draw's luck. Re-draws 1..10 start their seeds at EVAL_SEED + k·REDRAW_SEED_STRIDE and re-draws
k ≥ 11 at EVAL_SEED − (k − 10)·REDRAW_SEED_STRIDE: torch keeps a seed's low 32 bits, so draws above 2³² would wrap
to small seeds, where stores and online training draw their noise. Every draw is far from the runs' own, from the
others and from training's seeds (blocks of at most MAX_DRAW_SAMPLES). The studies (`jobs/study_conditioning.py`,
`jobs/compare_inits.py --redraws`) report a student's FD over seeds × re-draws, so a difference can be judged against
both spreads.

    python -m jobs.fd_redraws --student cm=<run>/export --student ect=<run>/export --draws 20 \\
        [--teacher runs/digits/pretrain/export --teacher-steps 16] [--json table.json]

scores students (and a teacher) on the same draws 0..N-1 and prints, per model, the spread over draws and where the
runs' own draw ranks, and per student the per-draw differences against the first student. Draws that are hard for one
student are hard for all (README "Studies"), so a paired difference is far tighter than one FD's spread.

Samples are drawn with the student's default 2-step intermediate time, as the presets' in-run evaluations are.
Scores are cached beside the export (<run>/fd_redraws.json, written atomically) with the sample count, dataset and
seed layout they were made with; a request for more draws than the cache holds scores only the new ones, and a cache
made with other settings is scored again. Caches written before those were recorded hold 1,000 FD-digits samples per
draw (every study of that time) and, from the first seed layout, only draws 1..10 are kept (draws 11 and up wrapped
past 2³² there).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.paths import write_text

REDRAW_SEED_STRIDE = 100_003  # seeds between the starts of consecutive re-draws
UPWARD_DRAWS = 10  # re-draws 1..10 lie above EVAL_SEED; 10 strides + a block stay below 2³² (EVAL_SEED = 2³² − 2²⁰)
MAX_DRAW_SAMPLES = 2**20 - UPWARD_DRAWS * REDRAW_SEED_STRIDE  # 48,546: draw 10's block still ends below 2³²
SEED_LAYOUT = 2  # 1: every re-draw above EVAL_SEED (draws ≥ 11 wrapped past 2³²); 2: the layout above
CACHE_NAME = "fd_redraws.json"
UNRECORDED = {"num_samples": 1000, "fd_dataset": "digits"}  # what a cache from before these were recorded holds


def redraw_eval_seed(draw: int) -> int:
    """The first evaluation-noise seed of re-draw `draw` (0: the training runs' own draw, EVAL_SEED)."""
    from trainer.evaluation import EVAL_SEED

    if draw <= UPWARD_DRAWS:
        return EVAL_SEED + draw * REDRAW_SEED_STRIDE
    return EVAL_SEED - (draw - UPWARD_DRAWS) * REDRAW_SEED_STRIDE


def draw_seeds(draw: int, num_samples: int) -> list[int]:
    """The noise seeds of draw `draw`; ValueError when the blocks would overlap or pass 2³²."""
    if not 1 <= num_samples <= MAX_DRAW_SAMPLES:
        raise ValueError(f"{num_samples} samples per draw: the re-draws hold 1 to {MAX_DRAW_SAMPLES:,} each")
    first = redraw_eval_seed(draw)
    return list(range(first, first + num_samples))


def _cached(path: Path, num_samples: int, fd_dataset: str) -> dict[str, list[float]]:
    """The scores cached at `path` (draws 1..M) when they were made with these settings, else none."""
    empty: dict[str, list[float]] = {"fd_1step": [], "fd_2step": []}
    if not path.exists():
        return empty
    cached = json.loads(path.read_text())
    made_with = {key: cached.get(key, default) for key, default in UNRECORDED.items()}
    if made_with != {"num_samples": num_samples, "fd_dataset": fd_dataset}:
        return empty
    kept = len(cached["fd_1step"]) if cached.get("seed_layout") == SEED_LAYOUT else UPWARD_DRAWS
    return {"fd_1step": cached["fd_1step"][:kept], "fd_2step": cached["fd_2step"][:kept]}


def fd_on_draw(student: Any, metric: Any, draw: int, num_samples: int) -> dict[str, float]:
    """FD of the student's 1- and 2-step samples on draw `draw` (0: the runs' own evaluation noise)."""
    from trainer.sample import draw_samples

    seeds = draw_seeds(draw, num_samples)
    return {f"fd_{steps}step": float(metric(draw_samples(student, seeds, steps))) for steps in (1, 2)}


def fd_redraws(export_dir: Path, redraws: int, num_samples: int, fd_dataset: str = "digits") -> dict[str, list[float]]:
    """FD-<fd_dataset> of the export's 1- and 2-step samples on re-draws 1..`redraws` of the evaluation noise; draws
    already in the cache are read back, the others scored and added to it."""
    from trainer.metrics import FDMetric
    from trainer.student import FlowMapStudent

    cache = Path(export_dir).parent / CACHE_NAME
    scores = _cached(cache, num_samples, fd_dataset)
    if len(scores["fd_1step"]) < redraws:
        student = FlowMapStudent.from_pretrained(export_dir).eval()
        metric = FDMetric(fd_dataset)
        for draw in range(len(scores["fd_1step"]) + 1, redraws + 1):
            for key, value in fd_on_draw(student, metric, draw, num_samples).items():
                scores[key].append(value)
        write_text(str(cache), json.dumps({**scores, "num_samples": num_samples, "fd_dataset": fd_dataset,
                                           "seed_layout": SEED_LAYOUT}))
    return {key: values[:redraws] for key, values in scores.items()}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value); a diverged run's infinite FD makes both infinite."""
    if not all(math.isfinite(value) for value in values):
        return {"mean": math.inf, "std": math.inf, "n": len(values)}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def pooled_redraws(per_run: Sequence[dict[str, list[float]]]) -> dict[str, Any]:
    """Runs' re-draw scores (one dict per seed) summarised per step count: the pooled mean ± std over seeds × draws,
    the spread over seeds (std of each seed's mean over draws) and over draws (mean of each seed's std over draws)."""
    summary: dict[str, Any] = {}
    for key in ("fd_1step", "fd_2step"):
        scores = [run[key] for run in per_run]
        summary[key] = {  # a spread from one seed or one draw is not measured: None
            **mean_std([value for run in scores for value in run]),
            "seed_means": [statistics.fmean(run) for run in scores],
            "std_over_seeds": mean_std([statistics.fmean(run) for run in scores])["std"] if len(scores) > 1 else None,
            "std_over_draws": (statistics.fmean(mean_std(run)["std"] for run in scores)
                               if min(len(run) for run in scores) > 1 else None),
        }
    return summary


def draw_table(students: dict[str, Path], draws: int, num_samples: int, fd_dataset: str,
               teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every student's FD on draws 0..draws-1 (0: the runs' own; the rest cached re-draws), the teacher's on the same
    draws when given ({"dir", "steps", "solver", "grid"}; one score per draw, key "fd"), and per model: mean ± std
    over the draws, the runs' draw's rank (1 = its best draw), and for every student but the first the per-draw
    differences against the first."""
    from trainer.metrics import FDMetric
    from trainer.student import FlowMapStudent

    metric = FDMetric(fd_dataset)
    per_draw: dict[str, dict[str, list[float]]] = {}
    for name, export in students.items():
        own = fd_on_draw(FlowMapStudent.from_pretrained(export).eval(), metric, 0, num_samples)
        fresh = fd_redraws(export, draws - 1, num_samples, fd_dataset)
        per_draw[name] = {key: [own[key], *fresh[key]] for key in ("fd_1step", "fd_2step")}
    if teacher is not None:
        from jobs.eval_teacher import teacher_fd

        rows = teacher_fd(teacher["dir"], fd_dataset, [teacher["steps"]], num=num_samples, solver=teacher["solver"],
                          grid=teacher["grid"], batch=500, student_draws=draws)["rows"]
        per_draw[f"teacher, {teacher['steps']} steps"] = {"fd": [float(row["fd"]) for row in rows]}
    reference = next(iter(students))
    models = {}
    for name, scores in per_draw.items():
        models[name] = {}
        for key, values in scores.items():
            entry = {"per_draw": values, **mean_std(values), "runs_draw_rank": sorted(values).index(values[0]) + 1}
            if name != reference and key in per_draw[reference]:
                differences = [value - base for value, base in zip(values, per_draw[reference][key])]
                entry[f"minus_{reference}"] = {**mean_std(differences), "worst": max(differences),
                                               "draws_better": sum(difference < 0 for difference in differences)}
            models[name][key] = entry
    return {"draws": draws, "num_samples": num_samples, "fd_dataset": fd_dataset, "reference": reference,
            "models": models}


def draw_markdown(table: dict[str, Any]) -> str:
    """The draw table as markdown: one row per model and step count."""
    reference = table["reference"]
    lines = [f"FD-{table['fd_dataset']} of {table['num_samples']} samples on {table['draws']} draws of the evaluation "
             f"noise (draw 0: the runs' own); differences are per draw, against {reference}.", "",
             f"| model | steps | mean ± std over draws | min / max | runs' draw (rank) | minus {reference}, mean ± std "
             "(worst) | draws better |", "|---|---|---|---|---|---|---:|"]
    for name, scores in table["models"].items():
        for key, entry in scores.items():
            steps = {"fd_1step": "1", "fd_2step": "2"}.get(key, "–")
            paired = entry.get(f"minus_{reference}")
            diff = "–" if paired is None else f"{paired['mean']:+.1f} ± {paired['std']:.1f} ({paired['worst']:+.1f})"
            better = "–" if paired is None else f"{paired['draws_better']} / {table['draws']}"
            lines.append(f"| {name} | {steps} | {entry['mean']:.1f} ± {entry['std']:.1f} | {min(entry['per_draw']):.1f}"
                         f" / {max(entry['per_draw']):.1f} | {entry['per_draw'][0]:.1f} ({entry['runs_draw_rank']}) "
                         f"| {diff} | {better} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: python -m jobs.fd_redraws --student NAME=EXPORT ... --draws N [--teacher DIR]; prints markdown, writes
    --json."""
    import argparse

    from trainer.metrics import FD_DATASETS

    parser = argparse.ArgumentParser(description="students (and a teacher) scored on the same draws of the "
                                                 "evaluation noise, with per-draw paired differences")
    parser.add_argument("--student", action="append", required=True, metavar="NAME=EXPORT",
                        help="a student export; the first is the reference of the paired differences")
    parser.add_argument("--draws", type=int, default=20, help="draws 0..N-1 (0: the runs' own; default 20)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--teacher", help="also score this teacher pipeline dir on the same draws")
    parser.add_argument("--teacher-steps", type=int, default=16)
    parser.add_argument("--teacher-solver", default="dpmpp-3m")
    parser.add_argument("--teacher-grid", default="logsnr")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    students = {}
    for text in args.student:
        name, equals, export = text.partition("=")
        if not equals or not (Path(export) / "student.json").exists():
            parser.error(f"--student {text!r}: write NAME=EXPORT with EXPORT a student export directory "
                         "(the one holding student.json, e.g. <run>/export)")
        students[name] = Path(export)
    if len(students) != len(args.student):
        parser.error("--student: two students share a NAME; give each its own")
    if args.draws < 2:
        parser.error(f"--draws {args.draws}: pass 2 or more (draw 0 is the runs' own, the rest fresh)")
    if not 2 <= args.num_samples <= MAX_DRAW_SAMPLES:
        parser.error(f"--num-samples {args.num_samples}: pass 2 to {MAX_DRAW_SAMPLES:,} (an FD needs 2 samples; "
                     "larger draws would overlap)")
    if args.dataset not in FD_DATASETS:
        parser.error(f"--dataset {args.dataset}: choose from {', '.join(FD_DATASETS)}")
    if args.teacher is not None and not Path(args.teacher).is_dir():
        parser.error(f"--teacher {args.teacher}: not a directory; pass a diffusers pipeline dir (e.g. "
                     "runs/digits/pretrain/export)")
    if args.teacher_steps < 1:
        parser.error(f"--teacher-steps {args.teacher_steps}: pass 1 or more solver steps")
    teacher = None if args.teacher is None else {"dir": args.teacher, "steps": args.teacher_steps,
                                                  "solver": args.teacher_solver, "grid": args.teacher_grid}
    table = draw_table(students, args.draws, args.num_samples, args.dataset, teacher)
    if args.json is not None:
        args.json.write_text(json.dumps(table, indent=2))
    print(draw_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
