"""The main job (`make demo`): the whole CMT pipeline on the embedded digits default, with a report.

    python jobs/demo.py [--report-dir reports/demo] [--runs-dir runs/digits] [--threads 2]

Stages, each the project's own CLI run as a user would (so every stage resumes / hits its cache on a re-run):

1. stage-1 teacher      trainer/pretrain.py --config jobs/digits/pretrain.yaml     (cached: a finished run only re-exports)
2. trajectories         pipeline/generate.py (4,096 × 9 points, Heun K = 8, log-SNR grid; cached by spec)
3. CMT mid-training     trainer/mid.py --config jobs/digits/mid.yaml, in both forms: CM (Ψ_{t→0}, for ECT) and
                        MF (Ψ_{t→s} with a second time input, for MeanFlow)
4. post-training        trainer/post.py --config jobs/digits/post.yaml: ECT from the CM export, MeanFlow from the MF one,
                        on the digits images (the preset's data)

It ends with a table of FD-digits at 1 and 2 steps (teacher, CMT student, each post-trained student) beside
the real-vs-real floor, and a report directory: resolved configs, metrics.json, PNG sample grids and a PNG plot
of FD against training time (CMT runs charged for generation and mid-training).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jobs.launcher import Stage, StageFailed, generation_summary, run_stage
from trainer.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
# Heun, K = 8 (15 teacher calls per trajectory): its store gave the best 1-step CMT student of the solver ablation, on
# 3 seeds (README "Store ablations", the `solver` preset), at the cost of the authors' 16-step DPM-Solver++(3M).
GENERATION_ARGS = ["--steps", "8", "--solver", "heun", "--grid", "logsnr", "--num-trajectories", "4096"]
TIMINGS_FILE = "stage_seconds.json"


@dataclass(frozen=True)
class DemoConfig:
    """Where the demo writes, how long each training stage runs, and how many threads it uses."""

    report_dir: str = "reports/demo"
    runs_dir: str = "runs/digits"
    threads: int = 2
    mid_steps: int = 1000
    post_steps: int = 400
    eval_every_steps: int = 200


def _stage(title: str, stage: Stage, args: list[str]) -> tuple[float, str]:
    """Run one stage's CLI with its progress shown live; (wall seconds, its standard output)."""
    print(f"\n=== {title}", flush=True)
    started = time.perf_counter()
    try:
        output = run_stage(stage, args)
    except StageFailed as error:
        raise SystemExit(f"demo: stage '{title}' failed: {error}\nre-running `make demo` resumes it") from error
    return time.perf_counter() - started, output


def _final_fd(run_dir: Path) -> dict[str, float]:
    """The last logged fd_1step / fd_2step of a run."""
    evaluated = RunDir(run_dir).read_evaluations()
    return {key: evaluated[-1][key] for key in ("fd_1step", "fd_2step")} if evaluated else {}


def _fd_curve(run_dir: Path, offset_seconds: float) -> list[tuple[float, float, float]]:
    """(charged seconds, FD 1-step, FD 2-step) at the run's start (its init_eval.json) and every evaluation, shifted
    by the cost of the stages before it."""
    start = RunDir(run_dir).read_init_eval()
    return [(offset_seconds, start["fd_1step"], start["fd_2step"])] * (start is not None) + [
        (offset_seconds + record.get("train_seconds", 0.0), record["fd_1step"], record["fd_2step"])
        for record in RunDir(run_dir).read_evaluations()
    ]


def _plot(curves: dict[str, list[tuple[float, float, float]]], path: Path) -> None:
    """FD-digits (1-step solid, 2-step dashed) against charged training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (name, points), colour in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        if not points:
            continue
        seconds, fd1, fd2 = zip(*points)
        axis.plot(seconds, fd1, "-o", color=colour, label=f"{name} 1-step")
        axis.plot(seconds, fd2, "--s", color=colour, label=f"{name} 2-step")
    axis.set_xlabel("charged compute (s): generation + mid-training + post-training")
    axis.set_ylabel("FD-digits (lower is better)")
    axis.set_yscale("log")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _table(rows: list[tuple[str, float | None, float | None]], floor: float) -> str:
    """Markdown table of FD at 1 and 2 steps."""
    def cell(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    lines = ["| model | FD-digits 1-step | FD-digits 2-step |", "|---|---|---|"]
    lines += [f"| {name} | {cell(one)} | {cell(two)} |" for name, one, two in rows]
    lines.append(f"| real vs real (two halves of the data) | {floor:.1f} | {floor:.1f} |")
    return "\n".join(lines)


def run(cfg: DemoConfig) -> dict:
    """Run (or resume) every stage and write the report; returns the metrics that went into metrics.json."""
    runs, report = REPO / cfg.runs_dir, REPO / cfg.report_dir
    report.mkdir(parents=True, exist_ok=True)
    timings_path = report / TIMINGS_FILE
    stage_seconds = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    threads = f"loop.torch_threads={cfg.threads}"
    started = time.perf_counter()

    teacher_dir = runs / "pretrain"
    seconds, _ = _stage("1/7 stage-1 teacher (cached after the first run)", "pretrain", [
        "--config", "jobs/digits/pretrain.yaml", f"loop.output_dir={teacher_dir}", threads,
    ])
    stage_seconds.setdefault("pretrain", seconds)
    teacher = RunDir(teacher_dir).export

    seconds, output = _stage("2/7 trajectories (Ray; cached by spec)", "generate", [
        "--teacher", str(teacher), *GENERATION_ARGS, "--num-workers", "1", "--cpus-per-worker", str(cfg.threads),
    ])
    summary = generation_summary(output)
    store = summary["url"]
    if not summary["cache_hit"] or "generate" not in stage_seconds:  # a cache hit keeps the original run's cost
        stage_seconds["generate"] = summary["seconds"]

    mid_dirs = {form: runs / f"mid_{form}" for form in ("cm", "mf")}
    for form, mid_dir in mid_dirs.items():
        _stage(f"{3 if form == 'cm' else 4}/7 CMT mid-training, {form.upper()} form", "mid", [
            "--config", "jobs/digits/mid.yaml", f"teacher={teacher}", f"stores=[{store}]",
            f"form={form}", f"loop.output_dir={mid_dir}", f"loop.total_steps={cfg.mid_steps}",
            f"loop.eval_every_steps={cfg.eval_every_steps}", threads,
        ])
    post_dirs = {}
    for index, (method, form) in enumerate((("ect", "cm"), ("meanflow", "mf"))):
        post_dirs[method] = runs / f"post_{method}"
        _stage(f"{5 + index}/7 {method} post-training from the CMT ({form.upper()}) export", "post", [
            "--config", "jobs/digits/post.yaml", "--method", method, "--init", f"cmt:{RunDir(mid_dirs[form]).export}",
            f"teacher={teacher}", f"loop.output_dir={post_dirs[method]}", f"loop.total_steps={cfg.post_steps}",
            f"loop.eval_every_steps={cfg.eval_every_steps}", threads,
        ])
    timings_path.write_text(json.dumps(stage_seconds, indent=2))

    from trainer.metrics import real_vs_real_floor

    floor = real_vs_real_floor("digits")
    teacher_init = RunDir(mid_dirs["cm"]).read_init_eval()
    cmt = {form: _final_fd(directory) for form, directory in mid_dirs.items()}
    post = {method: _final_fd(directory) for method, directory in post_dirs.items()}
    teacher_16 = [r for r in RunDir(teacher_dir).read_metrics() if any(k.startswith("FD-") for k in r)]
    teacher_16_fd = next((v for k, v in teacher_16[-1].items() if k.startswith("FD-")), None) if teacher_16 else None
    rows = [
        ("teacher, 1-/2-step (its x0 prediction; the student at init)", teacher_init["fd_1step"], teacher_init["fd_2step"]),
        ("teacher, 16 DPM-Solver++ steps (reference)", teacher_16_fd, None),
        ("CMT student, CM form (mid-training)", cmt["cm"].get("fd_1step"), cmt["cm"].get("fd_2step")),
        ("ECT after CMT (CM form)", post["ect"].get("fd_1step"), post["ect"].get("fd_2step")),
        ("CMT student, MF form (mid-training)", cmt["mf"].get("fd_1step"), cmt["mf"].get("fd_2step")),
        ("MeanFlow after CMT (MF form)", post["meanflow"].get("fd_1step"), post["meanflow"].get("fd_2step")),
    ]
    table = _table(rows, floor)

    def train_seconds(run_dir: Path) -> float:
        return RunDir(run_dir).last_train_seconds() or 0.0

    curves = {f"CMT {form.upper()}": _fd_curve(d, stage_seconds["generate"]) for form, d in mid_dirs.items()}
    curves["ECT after CMT"] = _fd_curve(post_dirs["ect"], stage_seconds["generate"] + train_seconds(mid_dirs["cm"]))
    curves["MeanFlow after CMT"] = _fd_curve(
        post_dirs["meanflow"], stage_seconds["generate"] + train_seconds(mid_dirs["mf"])
    )
    _plot(curves, report / "fd_vs_training_time.png")

    stages = [("pretrain", teacher_dir), *[(f"mid_{f}", d) for f, d in mid_dirs.items()], *[(f"post_{m}", d) for m, d in post_dirs.items()]]
    for name, directory in stages:
        shutil.copyfile(RunDir(directory).config, report / f"config_{name}.yaml")
        grids = sorted(RunDir(directory).samples.glob("*.png"), key=lambda p: p.stat().st_mtime)
        for grid in grids[-2:]:
            shutil.copyfile(grid, report / f"samples_{name}_{grid.name}")
    metrics = {
        "table": [{"model": name, "fd_1step": one, "fd_2step": two} for name, one, two in rows],
        "real_vs_real_floor": floor,
        "store": store,
        "generation_summary": summary,
        "stage_seconds": stage_seconds,
        "curves": curves,
        "demo_wall_seconds_this_run": time.perf_counter() - started,
    }
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (report / "table.md").write_text(table + "\n")
    print(f"\n{table}\n\nreport: {report} (metrics.json, table.md, fd_vs_training_time.png, sample grids, configs)")
    print(f"demo wall time this run: {metrics['demo_wall_seconds_this_run'] / 60:.1f} min")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = DemoConfig()
    parser.add_argument("--report-dir", default=defaults.report_dir)
    parser.add_argument("--runs-dir", default=defaults.runs_dir)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--mid-steps", type=int, default=defaults.mid_steps)
    parser.add_argument("--post-steps", type=int, default=defaults.post_steps)
    parser.add_argument("--eval-every-steps", type=int, default=defaults.eval_every_steps)
    args = parser.parse_args(argv)
    run(DemoConfig(**vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
