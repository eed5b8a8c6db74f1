"""Which student parameterisation makes a well-conditioned few-step generator, for which teacher (README "Studies").

    python jobs/study_conditioning.py --teacher eps=runs/digits_eps/export --teacher v=runs/digits_v/export \\
        --teacher edm=runs/digits/pretrain/export [--variants own auto edm-1.0 ...] [--seeds 0 1 2] [--jobs 2]

For every teacher: its digits store (pipeline/generate.py, the demo's spec: 4,096 trajectories, 16 DPM-Solver++(3M)
steps on the log-SNR grid; a cache hit when it exists), then CMT mid-training (trainer/mid.py --config
jobs/digits/mid.yaml) in the CM and MF forms for every student variant and seed, each scored by FD-digits of 1,000
1- and 2-step samples at init, every `--eval-every` steps and at the end. The final EMA exports are scored again on
`--redraws` other draws of the evaluation noise, so the FD's own noise is reported beside the seed-to-seed spread.

Variants (student.* overrides of trainer/mid.py; `trainer.parameterization` explains the readings):
  default             no overrides: the preset's defaults (for an ε-teacher "auto+transfer+clip", else "own")
  own                 the teacher's own c_skip/c_out (for an ε-prediction teacher c_out = −σ̃: ill-conditioned)
  auto                the teacher's own where bounded, EDM's (σ_d = 0.5) for ε-teachers; no transfer
  edm-1.0             EDM's reading with σ_d = 1 (for an ε-teacher: the v-prediction reading of its network)
  auto+transfer       "auto" after `--transfer-steps` steps of preconditioning transfer (counted in the run's
                      steps), unclipped
  edm-1.0+transfer    likewise for σ_d = 1
  auto+transfer+clip  "auto+transfer" with the gradients clipped to 1.0 (the transfer's loss is in the network's
                      output units, up to 1,600 per sample at σ̃ = 80 at init: unclipped at lr 2e-3 it diverges)
  auto+clip           "auto" with loop.grad_clip=1.0, no transfer (the authors clip nothing)
  auto+ema-constant   "auto" with the authors' EMA: a constant 0.999 decay from the teacher's weights
Variants that resolve to the same settings for a teacher are run once (for v and EDM teachers "auto" is "own"),
and transfer variants whose reading is the teacher's own are not run (the transfer would regress onto itself).

Writes <out>/study.json and <out>/study.md (and every run under <out>/runs); re-running skips finished runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.compare_config import CompareConfig
from jobs.fd_redraws import fd_redraws, mean_std
from jobs.study_runs import launch_training, short_hash
from jobs.study_store import make_store
from trainer.run_dir import RunDir

MID_PRESET = "jobs/digits/mid.yaml"
NO_TRANSFER = "student.transfer=off"
TRANSFER = "student.transfer=on"
STEPS = "STEPS"  # student.transfer_steps=<--transfer-steps>
UNCLIPPED = "student.transfer_grad_clip=none"
VARIANTS = {
    "default": (STEPS,),
    "own": ("student.parameterization=teacher",),
    "auto": ("student.parameterization=auto", NO_TRANSFER),
    "edm-1.0": ("student.parameterization=edm", "student.sigma_data=1.0", NO_TRANSFER),
    "auto+transfer": ("student.parameterization=auto", TRANSFER, STEPS, UNCLIPPED),
    "edm-1.0+transfer": ("student.parameterization=edm", "student.sigma_data=1.0", TRANSFER, STEPS, UNCLIPPED),
    "auto+transfer+clip": ("student.parameterization=auto", TRANSFER, STEPS, "student.transfer_grad_clip=1.0"),
    "auto+clip": ("student.parameterization=auto", NO_TRANSFER, "loop.grad_clip=1.0"),
    "auto+ema-constant": ("student.parameterization=auto", NO_TRANSFER, "loop.ema_constant=true"),
}
@dataclass(frozen=True)
class Cell:
    """One mid-training run: teacher, variant, form, seed and its trainer/mid.py overrides."""

    teacher: str
    variant: str
    form: str
    seed: int
    overrides: tuple[str, ...]
    reading: str  # the resolved parameterisation (+ transfer, + other overrides), for deduplication and the table


@functools.lru_cache(maxsize=None)
def _teacher_form(teacher_dir: str) -> tuple[Any, str]:
    """(noise schedule, prediction type) of a teacher, loaded once per directory."""
    from pipeline.teacher import load_teacher

    teacher = load_teacher(teacher_dir)
    return teacher.schedule, teacher.prediction_type


def _resolve(teacher_dir: str, overrides: Sequence[str], args: argparse.Namespace) -> tuple[Any, Any, bool]:
    """(parameterisation, transfer plan, whether the reading differs from the teacher's) of a variant's run, resolved
    from the preset and overrides exactly as trainer/mid.py resolves them (trainer.student_options.plan_transfer)."""
    from trainer.config import load_config
    from trainer.mid import MidConfig
    from trainer.parameterization import resolve_parameterization
    from trainer.student_options import plan_transfer_for

    cfg = load_config(MidConfig, MID_PRESET, [f"teacher={teacher_dir}", f"loop.total_steps={args.mid_steps}",
                                              *overrides])
    schedule, prediction_type = _teacher_form(teacher_dir)
    reading = resolve_parameterization(cfg.student.parameterization, schedule, prediction_type,
                                       sigma_data=cfg.student.sigma_data)
    re_read = not reading.reads_like_teacher(schedule, prediction_type)
    plan = plan_transfer_for(cfg.student, re_read=re_read, total_steps=args.mid_steps,
                             loop_grad_clip=cfg.loop.grad_clip)
    return reading, plan, re_read


def resolved_reading(teacher_dir: str, overrides: Sequence[str], args: argparse.Namespace) -> str:
    """What a variant's overrides resolve to for this teacher, e.g. "edm(σ_d=0.5) + transfer 200, clip 1.0"."""
    reading, plan, _ = _resolve(teacher_dir, overrides, args)
    clip = "none" if plan.grad_clip is None else str(plan.grad_clip)
    others = [text for text in overrides if not text.startswith("student.")]
    return (reading.describe() + (f" + transfer {plan.steps}, clip {clip}" if plan.steps else "")
            + "".join(f", {o}" for o in others))


def _transfer_onto_itself(teacher_dir: str, overrides: Sequence[str], args: argparse.Namespace) -> bool:
    """A variant forcing the transfer on a student that reads the network the teacher's own way: it would regress
    onto itself."""
    return "student.transfer=on" in overrides and not _resolve(teacher_dir, overrides, args)[2]


def plan_cells(args: argparse.Namespace) -> list[Cell]:
    """Every (teacher, variant, form, seed) run, variants deduplicated per teacher by their resolved reading."""
    cells = []
    for name, teacher_dir in args.teacher:
        seen: set[str] = set()
        for variant in args.variants:
            overrides = tuple(f"student.transfer_steps={args.transfer_steps}" if text == STEPS else text
                              for text in VARIANTS[variant])
            reading = resolved_reading(teacher_dir, overrides, args)
            if reading in seen or _transfer_onto_itself(teacher_dir, overrides, args):
                continue
            seen.add(reading)
            for form in args.forms:
                for seed in args.seeds:
                    cells.append(Cell(name, variant, form, seed, overrides, reading))
    return cells


def run_cell(cell: Cell, teacher_dir: str, store_url: str, args: argparse.Namespace, runs_dir: Path) -> Path:
    """Train one cell (unless finished); its run directory."""
    settings = [f"teacher={teacher_dir}", f"stores=[{store_url}]", f"form={cell.form}", f"loop.seed={cell.seed}",
                f"loop.total_steps={args.mid_steps}", f"loop.eval_every_steps={args.eval_every}",
                "loop.checkpoint_every_steps=0", "loop.keep_checkpoints=1", f"loop.torch_threads={args.threads}",
                "eval_at_init=true", f"num_eval_samples={args.num_eval_samples}", *cell.overrides]
    name = f"{cell.teacher}-{cell.variant}-{cell.form}-s{cell.seed}-{short_hash([MID_PRESET, settings])}"
    run_dir = runs_dir / name
    if not RunDir(run_dir).finished(args.mid_steps):
        print(f"[study_conditioning] {name}: {args.mid_steps} steps", flush=True)
        launch_training("mid", MID_PRESET, [*settings, f"loop.output_dir={run_dir}"], runs_dir.parent / "logs" /
                        f"{name}.log", "subprocess")
    return run_dir


def read_cell(run_dir: Path, redraws: int, num_samples: int) -> dict[str, Any]:
    """A finished run's FD at init, along training, at the end, and on re-drawn evaluation noise."""
    run = RunDir(run_dir)
    curve = [{"step": r["step"], "fd_1step": r["fd_1step"], "fd_2step": r["fd_2step"]} for r in run.read_evaluations()]
    return {"init": run.read_init_eval(), "curve": curve, "final": curve[-1],
            "redraws": fd_redraws(run.export, redraws, num_samples)}


def teacher_fd(teacher_dir: str) -> float | None:
    """The teacher's own FD-digits at 16 DPM-Solver++ steps, as logged by trainer/pretrain.py (None if absent)."""
    metrics = RunDir(Path(teacher_dir).parent).read_metrics()
    scored = [record["FD-digits"] for record in metrics if "FD-digits" in record]
    return float(scored[-1]) if scored else None


def summarise(cells: Sequence[Cell], results: dict[Cell, dict[str, Any]], args: argparse.Namespace) -> dict:
    """Per (teacher, variant, form): FD at init, at the first evaluation and at the end, over seeds and re-draws."""
    rows = []
    groups: dict[tuple[str, str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.teacher, cell.variant, cell.form), []).append(cell)
    for (teacher, variant, form), members in groups.items():
        runs = [results[cell] for cell in members]
        row = {"teacher": teacher, "variant": variant, "form": form, "reading": members[0].reading,
               "seeds": [cell.seed for cell in members]}
        for steps in (1, 2):
            key = f"fd_{steps}step"
            row[f"init_{key}"] = runs[0]["init"][key]
            row[f"early_{key}"] = mean_std([run["curve"][0][key] for run in runs])
            row["early_step"] = runs[0]["curve"][0]["step"]
            row[f"final_{key}"] = mean_std([run["final"][key] for run in runs])
            # every seed's export on the re-drawn evaluation noise, pooled: seeds × redraws values
            row[f"redraw_{key}"] = mean_std([value for run in runs for value in run["redraws"][key]])
        rows.append(row)
    return {"mid_steps": args.mid_steps, "transfer_steps": args.transfer_steps, "redraws": args.redraws,
            "num_eval_samples": args.num_eval_samples,
            "teachers": {name: {"dir": path, "fd_16step": teacher_fd(path)} for name, path in args.teacher},
            "rows": rows}


def _fmt(stat: dict[str, float]) -> str:
    """mean ± std (n > 1) or the value."""
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}" if stat["n"] > 1 else f"{stat['mean']:.1f}"


def markdown(summary: dict) -> str:
    """The study's table: one row per (teacher, variant, form)."""
    lines = [f"FD-digits of {summary['num_eval_samples']:,} samples after {summary['mid_steps']} CMT steps (mean ± "
             f"std over seeds; re-draw: every seed's export on {summary['redraws']} other draws of the evaluation "
             "noise, pooled).",
             "",
             "| teacher (16-step FD) | student reading | form | init 1/2-step | "
             "early 1/2-step | final 1-step | final 2-step | re-draw 1-step | re-draw 2-step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        fd16 = summary["teachers"][row["teacher"]]["fd_16step"]
        teacher = f"{row['teacher']} ({fd16:.1f})" if fd16 is not None else row["teacher"]
        lines.append(
            f"| {teacher} | {row['variant']}: {row['reading']} | {row['form']} | "
            f"{row['init_fd_1step']:.1f} / {row['init_fd_2step']:.1f} | "
            f"{_fmt(row['early_fd_1step'])} / {_fmt(row['early_fd_2step'])} (step {row['early_step']}) | "
            f"{_fmt(row['final_fd_1step'])} | {_fmt(row['final_fd_2step'])} | "
            f"{_fmt(row['redraw_fd_1step'])} | {_fmt(row['redraw_fd_2step'])} |")
    return "\n".join(lines) + "\n"


def _named_path(text: str) -> tuple[str, str]:
    """NAME=DIR → (NAME, absolute DIR)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=DIR, e.g. eps=runs/digits_eps/export")
    return name, str(Path(path).resolve())


def main(argv: Sequence[str] | None = None) -> int:
    """CLI; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=_named_path, action="append", required=True, help="NAME=DIR, repeatable")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--forms", nargs="+", default=["cm", "mf"], choices=["cm", "mf"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--mid-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--transfer-steps", type=int, default=200)
    parser.add_argument("--redraws", type=int, default=5)
    parser.add_argument("--num-eval-samples", type=int, default=1000)
    parser.add_argument("--num-trajectories", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", default="runs/study_conditioning")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    runs_dir = out / "runs"
    stores = {}
    for name, teacher_dir in args.teacher:
        spec = CompareConfig(teacher=teacher_dir, threads=args.threads, num_trajectories=args.num_trajectories,
                             solver="dpmpp-3m", solver_steps=16)  # this study's store (the docstring), not the demo's
        stores[name] = make_store(spec, out / "logs" / name)["url"]
    cells = plan_cells(args)
    teachers = dict(args.teacher)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        run_dirs = dict(zip(cells, pool.map(
            lambda cell: run_cell(cell, teachers[cell.teacher], stores[cell.teacher], args, runs_dir), cells)))
    results = {cell: read_cell(run_dirs[cell], args.redraws, args.num_eval_samples) for cell in cells}
    summary = summarise(cells, results, args)
    (out / "study.json").write_text(json.dumps(summary, indent=2))
    (out / "study.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
