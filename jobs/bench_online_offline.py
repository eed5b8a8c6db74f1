"""What reuse buys: CMT on trajectories solved online every step (the authors' way) vs a store made once, side by side.

    python jobs/bench_online_offline.py [--quick] [--teacher DIR] [--store URL] [--mid-steps N] [--amortise-over N]
        [--out DIR] [--report-dir DIR] [--set key=value ...] [--launcher subprocess|inprocess]

One invocation trains two CMT students (CM form, `trainer/mid.py --config jobs/digits/mid.yaml`) for the same number of
steps at the same batch size, from the same teacher with the same solver, grid and K:

- offline: `data=stores` on the store of `pipeline/generate.py` (4,096 trajectories, the mid preset's spec; a cache hit
  when it exists, or --store), charged its generation wall time G (measured when made in this invocation, else
  re-timed by re-solving part of it: `jobs/study_store.generation_cost`), once (amortised over 1 run) or G/N
  (reused by N runs, --amortise-over);
- online: `data=online` (`trainer/data/online.py`), batch/K fresh trajectories × all K points per step, whose solving is
  part of every training step.

Charged seconds are the loop's `train_seconds` (optimizer steps, data included: the online run's solves, the offline
run's store reads) plus the generation charge. Reported per pipeline: seconds and teacher network evaluations per
training pair (teacher vs training split), the FD-digits curve against charged seconds, the FD each reaches at the
same charged budget (the smallest final charge of the three), and the charged seconds each offline pipeline needs to
reach the online run's final FD. Outputs in --report-dir (default --out): bench_online_offline.md, .json and .png;
runs and logs in --out. The last line printed is `offline/online cost per pair: <ratio>` (amortised over one run).

`--quick` (256 trajectories, 30 steps, 200 FD samples, stages in this process) takes about a minute on a quiet
2-core machine once the teacher exists; its numbers only show that the benchmark runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jobs.compare_accounting import first_crossing, summarise_cell
from jobs.compare_config import CompareConfig, CompareError, with_absolute_paths
from jobs.figures import finish_fd_axis, pyplot, save_figure
from jobs.study_runs import execute, mid_plan, read_post_run
from jobs.study_store import generation_cost
from trainer.run_dir import RunDir

MARKDOWN_NAME = "bench_online_offline.md"
JSON_NAME = "bench_online_offline.json"
PLOT_NAME = "bench_online_offline.png"
STEP_COUNTS = (1, 2)
STEP_KEYS = tuple(f"{steps}step" for steps in STEP_COUNTS)
RATIO_LINE = "offline/online cost per pair: {ratio:.3f}"


@dataclass(frozen=True)
class BenchConfig:
    """Settings of the benchmark (defaults: the digits default teacher and the mid preset's store spec and steps)."""

    out: str = "runs/bench_online_offline"
    report_dir: str | None = None  # tables and plot (None: out)
    teacher: str = "runs/digits/pretrain/export"
    store: str | None = None  # an existing store (its generation is re-timed); None: pipeline/generate.py
    num_trajectories: int = 4096
    solver: str = "dpmpp-3m"
    solver_steps: int = 16
    grid: str = "logsnr"
    cache_root: str | None = None
    generation_probe_trajectories: int = 256
    mid_preset: str = "jobs/digits/mid.yaml"
    mid_steps: int = 2000
    evals: int = 5  # FD evaluations along each run (plus the initial student's)
    num_eval_samples: int = 1000
    amortise_over: int = 10
    threads: int = 1
    launcher: Literal["subprocess", "inprocess"] = "subprocess"
    overrides: tuple[str, ...] = ()  # trainer/mid.py key=value for both runs

    def compare_config(self) -> CompareConfig:
        """The jobs/compare_inits settings whose store, generation charge and mid-training runs this bench reuses."""
        for text in self.overrides:
            if "=" not in text:
                raise CompareError(f"--set {text!r}: write key=value, e.g. --set loop.lr=1e-3")
        for name in ("mid_steps", "evals", "num_eval_samples", "amortise_over"):
            if getattr(self, name) < 1:
                raise CompareError(f"--{name.replace('_', '-')} {getattr(self, name)}: pass a value >= 1")
        every = max(1, -(-self.mid_steps // self.evals))
        evaluation = ("mid:eval_at_init=true", f"mid:loop.eval_every_steps={every}",
                      f"mid:loop.log_every_steps={every}")
        return CompareConfig(
            out=self.out, teacher=self.teacher, store=self.store, num_trajectories=self.num_trajectories,
            solver=self.solver, solver_steps=self.solver_steps, grid=self.grid, cache_root=self.cache_root,
            generation_probe_trajectories=self.generation_probe_trajectories, mid_preset=self.mid_preset,
            methods=("ect",), mid_steps=self.mid_steps, num_eval_samples=self.num_eval_samples,
            amortise_over=self.amortise_over, threads=self.threads, launcher=self.launcher,
            overrides=(*evaluation, *(f"mid:{text}" for text in self.overrides)),
        )


QUICK = BenchConfig(out="runs/bench_online_offline_quick", num_trajectories=256, generation_probe_trajectories=64,
                    mid_steps=30, evals=2, num_eval_samples=200, launcher="inprocess")


def online_overrides(store_url: str) -> tuple[str, ...]:
    """trainer/mid.py overrides that solve online exactly what the store holds (its solver, K, grid and σ range)."""
    from storage_schema import open_store

    spec = open_store(store_url).spec
    settings = ["mid:data=online", f"mid:online.solver={spec.solver}", f"mid:online.steps={spec.steps}",
                f"mid:online.grid={spec.grid}"]
    settings += [f"mid:online.{name}={value!r}" for name, value in spec.grid_params]
    if spec.num_classes is not None:
        settings += [f"mid:online.labels={spec.label_plan}"]
        if spec.guidance_scale is not None:
            settings += [f"mid:online.guidance={spec.guidance_scale!r}"]
    return tuple(settings)


def training_pairs(run_dir: Path, steps: int) -> int:
    """Training pairs a run consumed: steps × batch_per_process × grad_accum_steps × processes (config + rank files)."""
    import yaml

    config = yaml.safe_load(RunDir(run_dir).config.read_text())
    processes = len(RunDir(run_dir).read_rank_reports()) or 1
    return steps * int(config["batch_per_process"]) * int(config["loop"]["grad_accum_steps"]) * processes


def fd_at(curve: dict[str, Any], x_key: str, budget: float, steps: int) -> float | None:
    """FD of a curve at `budget` charged seconds (linear between evaluations); None before its first point."""
    xs, ys = np.asarray(curve[x_key]), np.asarray(curve[f"fd_{steps}step_mean"])
    if budget < xs[0]:
        return None
    return float(np.interp(budget, xs, ys))


def summarise(runs: dict[str, Any], generation: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    """Per pipeline (online, offline ×1, offline ×N): cost per pair, curves, FD at an equal budget, cost to equal FD."""
    from pipeline.generate import forward_evaluations_per_trajectory
    from storage_schema import open_store

    spec = open_store(generation["url"]).spec
    g_seconds = float(generation["seconds"])
    g_forwards = spec.num_trajectories * forward_evaluations_per_trajectory(spec.solver, spec.steps,
                                                                            spec.guidance_scale)
    n = cfg.amortise_over
    online, offline = runs["online"], runs["offline"]
    pipelines = {
        "online": {"cell": summarise_cell([online["run"]], 0.0, 0.0), "x": "charged_seconds", "pairs":
                   online["pairs"], "teacher_seconds": online["report"]["solve_seconds"],
                   "teacher_forwards": online["report"]["teacher_forward_samples"]},
        "offline (G once)": {"cell": summarise_cell([offline["run"]], g_seconds, g_seconds / n), "x": "charged_seconds",
                             "pairs": offline["pairs"], "teacher_seconds": g_seconds, "teacher_forwards": g_forwards},
        f"offline (G/{n})": {"cell": summarise_cell([offline["run"]], g_seconds, g_seconds / n),
                             "x": "charged_seconds_amortised", "pairs": offline["pairs"],
                             "teacher_seconds": g_seconds / n, "teacher_forwards": g_forwards / n},
    }
    budget = min(entry["cell"]["curve"][entry["x"]][-1] for entry in pipelines.values())
    online_final = {s: pipelines["online"]["cell"]["final_fd"][s]["mean"] for s in STEP_COUNTS}
    online_total = pipelines["online"]["cell"]["curve"]["charged_seconds"][-1]
    rows = []
    for name, entry in pipelines.items():
        curve, pairs = entry["cell"]["curve"], entry["pairs"]
        charged = curve[entry["x"]][-1]
        reach = {s: first_crossing(curve[entry["x"]], curve[f"fd_{s}step_mean"], online_final[s]) for s in STEP_COUNTS}
        rows.append({
            "pipeline": name, "pairs": pairs, "charged_seconds": charged,
            "seconds_per_pair": charged / pairs, "teacher_seconds_per_pair": entry["teacher_seconds"] / pairs,
            "training_seconds_per_pair": (charged - entry["teacher_seconds"]) / pairs,
            "teacher_forwards_per_pair": entry["teacher_forwards"] / pairs,
            "final_fd": {f"{s}step": entry["cell"]["final_fd"][s]["mean"] for s in STEP_COUNTS},
            "fd_at_budget": {f"{s}step": fd_at(curve, entry["x"], budget, s) for s in STEP_COUNTS},
            "seconds_to_online_final_fd": {f"{s}step": reach[s] for s in STEP_COUNTS},
            "cost_to_online_final_fd_over_online": {f"{s}step": None if reach[s] is None else reach[s] / online_total
                                                    for s in STEP_COUNTS},
            "curve": {"charged_seconds": curve[entry["x"]], "steps": curve["steps"],
                      **{f"fd_{s}step": curve[f"fd_{s}step_mean"] for s in STEP_COUNTS}},
        })
    per_pair = {row["pipeline"]: row["seconds_per_pair"] for row in rows}
    return {
        "budget_seconds": budget,
        "pipelines": rows,
        "offline_over_online_cost_per_pair": per_pair["offline (G once)"] / per_pair["online"],
        f"offline_over_online_cost_per_pair_amortised_{n}": per_pair[f"offline (G/{n})"] / per_pair["online"],
        "generation": {"seconds": g_seconds, "source": generation["source"], "teacher_forwards": g_forwards,
                       "num_trajectories": spec.num_trajectories, "solver": f"{spec.solver} K={spec.steps} "
                                                                              f"grid={spec.grid}"},
    }


def _cell(value: float | None, digits: int = 1) -> str:
    """A number, or a dash for none."""
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The benchmark as markdown: cost per pair, FD at the equal budget and the cost of reaching the online FD."""
    summary, n = result["summary"], result["config"]["amortise_over"]
    generation = summary["generation"]
    lines = [
        f"# Online vs offline CMT (FD-digits of {result['config']['num_eval_samples']} samples)",
        "",
        (f"Both students: {result['config']['mid_steps']} CM-form steps of `{result['config']['mid_preset']}`, "
         f"{generation['solver']}. Store: {generation['num_trajectories']} trajectories, generation G = "
         f"{generation['seconds']:.1f} s ({generation['source']}). Charged = train_seconds (data included) + G, "
         f"G once or G/{n}. Equal budget: {summary['budget_seconds']:.1f} charged s."),
        "",
        ("| pipeline | pairs | charged s | s / 1k pairs | teacher s / 1k pairs | training s / 1k pairs "
         "| teacher forwards / pair | final FD 1/2-step | FD at equal budget 1/2-step "
         "| charged s to reach online's final FD 1/2-step (× online) |"),
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for row in summary["pipelines"]:
        reach = " / ".join(
            "not reached" if row["seconds_to_online_final_fd"][key] is None else
            f"{row['seconds_to_online_final_fd'][key]:.1f} ({row['cost_to_online_final_fd_over_online'][key]:.2f}×)"
            for key in STEP_KEYS)
        lines.append(
            f"| {row['pipeline']} | {row['pairs']} | {row['charged_seconds']:.1f} "
            f"| {1000 * row['seconds_per_pair']:.3f} | {1000 * row['teacher_seconds_per_pair']:.3f} "
            f"| {1000 * row['training_seconds_per_pair']:.3f} | {row['teacher_forwards_per_pair']:.3f} "
            f"| {' / '.join(_cell(row['final_fd'][key]) for key in STEP_KEYS)} "
            f"| {' / '.join(_cell(row['fd_at_budget'][key]) for key in STEP_KEYS)} | {reach} |")
    lines += [
        "",
        f"- offline/online cost per pair, G once: **{summary['offline_over_online_cost_per_pair']:.3f}**; G/{n}: "
        f"**{summary[f'offline_over_online_cost_per_pair_amortised_{n}']:.3f}**.",
        "- \"FD at equal budget\" is a dash where generation alone costs more than the budget.",
    ]
    return "\n".join(lines) + "\n"


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """FD-digits (1- and 2-step) against charged seconds for the three pipelines, the equal budget marked."""
    plt = pyplot()

    summary = result["summary"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"online": ("tab:blue", "-"), "offline (G once)": ("tab:red", "-")}
    for axis, steps in zip(axes, STEP_COUNTS):
        for row in summary["pipelines"]:
            color, line = styles.get(row["pipeline"], ("tab:red", "--"))
            axis.plot(row["curve"]["charged_seconds"], row["curve"][f"fd_{steps}step"], marker="o", color=color,
                      linestyle=line, label=row["pipeline"])
        axis.axvline(summary["budget_seconds"], color="gray", linewidth=0.8, label="equal budget")
        finish_fd_axis(axis, xlabel="charged seconds (training incl. data + generation charge)",
                       ylabel=f"FD-digits, {steps}-step")
    save_figure(figure, path)


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Generate (or find) the store, train the offline and online students, write the report; returns the JSON."""
    compare = with_absolute_paths(cfg.compare_config().validate())
    out = Path(compare.out)
    runs_dir, log_dir = out / "runs", out / "logs"
    if not Path(compare.teacher).exists():
        raise CompareError(
            f"teacher {compare.teacher} does not exist: train it with `python trainer/pretrain.py --config "
            "jobs/digits/pretrain.yaml` or pass --teacher <a diffusers pipeline dir>")
    generation = generation_cost(compare, out)
    plans = {
        "offline": mid_plan(compare, "cm", generation["url"], runs_dir),
        "online": mid_plan(dataclasses.replace(compare, overrides=compare.overrides
                                               + online_overrides(generation["url"])), "cm", generation["url"],
                           runs_dir),
    }
    runs = {}
    for name, plan in plans.items():
        run_dir = execute(compare, plan, runs_dir, log_dir)
        report = RunDir(run_dir).read_rank_reports()[0]
        runs[name] = {"name": plan.name, "run": read_post_run(run_dir),
                      "pairs": training_pairs(run_dir, plan.total_steps), "report": report.get("online", {})}
    result = {"config": dataclasses.asdict(cfg), "store": generation["url"],
              "runs": {name: entry["name"] for name, entry in runs.items()},
              "summary": summarise(runs, generation, cfg)}
    report_dir = Path(cfg.report_dir).resolve() if cfg.report_dir else out
    report_dir.mkdir(parents=True, exist_ok=True)
    result["files"] = {"markdown": str(report_dir / MARKDOWN_NAME), "json": str(report_dir / JSON_NAME),
                       "plot": str(report_dir / PLOT_NAME)}
    (report_dir / MARKDOWN_NAME).write_text(markdown_table(result))
    plot_curves(result, report_dir / PLOT_NAME)
    (report_dir / JSON_NAME).write_text(json.dumps(result, indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: python jobs/bench_online_offline.py [--quick] [options]; prints the table and the cost-per-pair ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 trajectories, 30 steps, in-process (~1 min)")
    parser.add_argument("--out", help=f"runs and logs (default {BenchConfig.out}; quick: {QUICK.out})")
    parser.add_argument("--report-dir", help="where the table, JSON and plot go (default: --out)")
    parser.add_argument("--teacher", help=f"teacher pipeline dir (default {BenchConfig.teacher})")
    parser.add_argument("--store", help="use this trajectory store for the offline run (its generation is re-timed)")
    parser.add_argument("--num-trajectories", type=int)
    parser.add_argument("--cache-root", help="trajectory cache root for generation")
    parser.add_argument("--mid-preset")
    parser.add_argument("--mid-steps", type=int)
    parser.add_argument("--evals", type=int)
    parser.add_argument("--num-eval-samples", type=int)
    parser.add_argument("--amortise-over", type=int, help="N runs sharing the store (default 10)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--launcher", choices=["subprocess", "inprocess"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="trainer/mid.py override for both runs; repeatable")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else BenchConfig()
    fields = {name: getattr(args, name) for name in ("out", "report_dir", "teacher", "store", "num_trajectories",
                                                     "cache_root", "mid_preset", "mid_steps", "evals",
                                                     "num_eval_samples", "amortise_over", "threads", "launcher")}
    cfg = dataclasses.replace(base, **{key: value for key, value in fields.items() if value is not None},
                              overrides=base.overrides + tuple(args.overrides))
    try:
        result = run(cfg)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(result))
    print(f"outputs: {', '.join(result['files'].values())}")
    print(RATIO_LINE.format(ratio=result["summary"]["offline_over_online_cost_per_pair"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
