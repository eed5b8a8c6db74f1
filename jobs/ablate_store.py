"""Ablations that only cached trajectories make cheap: how the store behind CMT changes the student's FD.

    python jobs/ablate_store.py --preset trajectories|solver-steps|solver [--quick] [--generate] [--teacher DIR]
        [--values ...] [--seeds 0 1 2] [--post-method ect|ecd|meanflow|none] [--out DIR] [--report-dir DIR]
        [--set SCOPE:key=value ...]

Presets (every cell: CMT mid-training, CM form, `jobs/digits/mid.yaml`, then one post-training method from the CMT
student; FD-digits of both):

- `trajectories`: the number of distinct trajectories N (512, 2k, 8k, 32k; DPM-Solver++(3M), K = 16, log-SNR grid) at
  equal training steps, plus the online run (`data=online`: fresh trajectories at every step, none reused) as the
  reference; the table names the smallest store within 10 % of the online run's FD. The online student's
  post-training reads the largest store where the method reads a store (ECD).
- `solver-steps`: the number of solver steps K (4, 8, 16, 32; N = 4,096) at equal training compute (the same steps and
  batch: a training pair costs the same whatever K; generation costs K forwards per trajectory, reported beside).
- `solver`: the solver (Euler, which in the EDM view is DDIM's update; Heun; DPM-Solver++ 2M and 3M; N = 4,096) at
  equal teacher forwards per trajectory (16: K = 16, Heun K = 8 with 2K − 1 = 15). A solver the teacher cannot run
  (pipeline.solvers says which) is reported as such and skipped.

Every store is the cache entry of `pipeline/generate.py` for its spec (teacher, N, solver, K, grid, seed 0). A store
that does not exist is refused, naming it and the generate command that makes it, unless --generate (then it is made,
as `jobs/study_store.make_store` makes stores). Runs reuse `jobs/study_runs.py`'s plans and launcher: a finished
run is skipped on a re-run, so presets sharing a cell (N = 4,096, K = 16, DPM-Solver++(3M)) train it once.

`--seeds` trains every cell (and the online reference) once per training seed (`loop.seed` of the CMT and the
post-training run; the store and the evaluation noise stay the same): the table shows each FD as the mean ± sample
standard deviation over the seeds, the JSON keeps every seed's FD, and the plot draws the spread as error bars. Seed 0
is the run a single-seed ablation made, so adding seeds reuses it.

Outputs in --report-dir (default --out): ablate_<preset>.md, .json and .png (FD against the ablated quantity, 1- and
2-step, CMT student and after post-training; the online reference as dashed lines). `--quick` shrinks any preset to
tiny stores and tens of steps (a smoke run; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jobs.bench_online_offline import online_overrides, training_pairs
from jobs.compare_config import (
    METHOD_FORMS,
    METHOD_LABELS,
    CompareConfig,
    CompareError,
    parse_scoped_override,
    with_absolute_paths,
)
from jobs.figures import finish_fd_axis, pyplot, save_figure
from jobs.study_runs import execute, mid_plan, post_plan, read_post_run
from jobs.study_store import generation_command, make_store
from trainer.run_dir import RunDir

PRESETS = ("trajectories", "solver-steps", "solver")
AXIS_LABELS = {"trajectories": "distinct trajectories N", "solver-steps": "solver steps K",
               "solver": "solver (equal teacher forwards per trajectory)"}
STEP_KEYS = ("1step", "2step")
WITHIN = 0.10  # "within 10 % of the online run's FD"


class AblationError(CompareError):
    """An ablation that cannot run as asked (missing stores, bad values); the message names the fix."""


@dataclass(frozen=True)
class StoreCell:
    """One ablation cell: the store spec CMT trains on (label = the ablated value as the table shows it)."""

    label: str
    value: float | str  # the plotted x value
    num_trajectories: int
    solver: str
    steps: int
    grid: str


@dataclass(frozen=True)
class AblationConfig:
    """Settings of an ablation (defaults: the digits default teacher and presets; runs go to `out`)."""

    preset: str = "trajectories"
    out: str = "runs/ablate_store"
    report_dir: str | None = None
    teacher: str = "runs/digits/pretrain/export"
    cache_root: str | None = None
    num_trajectories: tuple[int, ...] = (512, 2048, 8192, 32768)  # preset trajectories
    solver_steps: tuple[int, ...] = (4, 8, 16, 32)  # preset solver-steps
    solvers: tuple[str, ...] = ("euler", "heun", "dpmpp-2m", "dpmpp-3m")  # preset solver
    teacher_forwards: int = 16  # preset solver: network evaluations per trajectory
    base_trajectories: int = 4096  # N of the solver-steps and solver presets
    base_solver: str = "dpmpp-3m"
    base_steps: int = 16
    grid: str = "logsnr"
    online_reference: bool = True  # preset trajectories: the online run at equal steps
    mid_preset: str = "jobs/digits/mid.yaml"
    post_preset: str = "jobs/digits/post.yaml"
    mid_steps: int = 2000
    post_method: Literal["ect", "ecd", "meanflow", "none"] = "ect"
    post_steps: int = 400
    post_data: str = "dataset:digits"
    num_eval_samples: int = 1000
    seeds: tuple[int, ...] = (0,)  # training seeds per cell (loop.seed of the CMT and post-training runs)
    threads: int = 1
    launcher: Literal["subprocess", "inprocess"] = "subprocess"
    generate_missing: bool = False
    # None: post-training runs as jobs/digits/post.yaml says (ECT and ECD on real images, 400 steps at batch 128), the
    # setting under which the post-training study measured both improving the CMT student on 3 seeds (README "Studies").
    overrides: tuple[str, ...] = ()

    def cells(self) -> list[StoreCell]:
        """The preset's store cells, in table order."""
        if self.preset == "trajectories":
            return [StoreCell(f"{n:,}", n, n, self.base_solver, self.base_steps, self.grid)
                    for n in self.num_trajectories]
        if self.preset == "solver-steps":
            return [StoreCell(f"K={k}", k, self.base_trajectories, self.base_solver, k, self.grid)
                    for k in self.solver_steps]
        cells = []
        for solver in self.solvers:
            steps = (self.teacher_forwards + 1) // 2 if solver == "heun" else self.teacher_forwards
            name = "euler (= DDIM)" if solver == "euler" else solver
            cells.append(StoreCell(f"{name} K={steps}", solver, self.base_trajectories, solver, steps, self.grid))
        return cells

    def compare_config(self) -> CompareConfig:
        """The jobs/compare_inits settings whose store helpers, plans and launcher every cell reuses."""
        if self.preset not in PRESETS:
            raise AblationError(f"--preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.post_method not in (*METHOD_FORMS, "none"):
            raise AblationError(f"--post-method {self.post_method!r}: choose {', '.join(METHOD_FORMS)} or none")
        if self.post_method == "meanflow":
            raise AblationError("--post-method meanflow needs an MF-form student; these ablations train the CM form: "
                                "use ect or ecd")
        for name in ("mid_steps", "post_steps", "num_eval_samples", "threads"):
            if getattr(self, name) < 1:
                raise AblationError(f"--{name.replace('_', '-')} {getattr(self, name)}: pass a value >= 1")
        bad = [value for value in (*self.num_trajectories, *self.solver_steps) if value < 1]
        if bad or self.teacher_forwards < 1 or self.base_trajectories < 1:
            raise AblationError(f"--values {bad}: trajectory and step counts must be >= 1")
        if not self.cells():
            raise AblationError(f"--values is empty for preset {self.preset}: pass at least one value")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise AblationError(f"--seeds {' '.join(map(str, self.seeds))}: pass distinct whole numbers >= 0, "
                                "e.g. --seeds 0 1 2")
        return CompareConfig(
            out=self.out, teacher=self.teacher, num_trajectories=self.base_trajectories, solver=self.base_solver,
            solver_steps=self.base_steps, grid=self.grid, cache_root=self.cache_root, mid_preset=self.mid_preset,
            post_preset=self.post_preset, post_data=self.post_data,
            methods=("ect",) if self.post_method == "none" else (self.post_method,), seeds=(0,),
            mid_steps=self.mid_steps, cmt_post_steps=((self.post_method, self.post_steps),) if self.post_method !=
            "none" else (("ect", 1),), num_eval_samples=self.num_eval_samples, threads=self.threads,
            launcher=self.launcher, overrides=self.overrides).validate()


QUICK = {"out": "runs/ablate_store_quick", "num_trajectories": (64, 256), "solver_steps": (2, 4),
         "solvers": ("euler", "heun", "dpmpp-3m"), "teacher_forwards": 4, "base_trajectories": 128,
         "mid_steps": 20, "post_steps": 10, "num_eval_samples": 200, "launcher": "inprocess"}


# ------------------------------------------------------------------------------------------------------------
# Stores


def cell_config(compare: CompareConfig, cell: StoreCell) -> CompareConfig:
    """The comparison settings of one cell: its store spec."""
    return dataclasses.replace(compare, num_trajectories=cell.num_trajectories, solver=cell.solver,
                               solver_steps=cell.steps, grid=cell.grid)


def generate_command(compare: CompareConfig) -> str:
    """The `python pipeline/generate.py ...` command that makes a cell's store (compare_inits' own command)."""
    return shlex.join(["python", "pipeline/generate.py", *generation_command(compare)])


def locate_store(compare: CompareConfig) -> dict[str, Any]:
    """Where the cache keeps a cell's store and whether it is complete (pipeline/generate.py's dry-run plan)."""
    from pipeline.generate import GenerateConfig
    from pipeline.generate import run as generate

    plan = generate(GenerateConfig(
        teacher=compare.teacher, num_trajectories=compare.num_trajectories, steps=compare.solver_steps,
        solver=compare.solver, grid=compare.grid, num_workers=compare.generation_workers,
        cpus_per_worker=compare.threads, cache_root=compare.cache_root, dry_run=True, progress=False)).summary["plan"]
    return {"url": plan["url"], "complete": plan["store_state"] == "complete", "state": plan["store_state"]}


def runnable(teacher: Any, cell: StoreCell) -> str | None:
    """None when the teacher can run the cell's solver and grid, else pipeline.solvers' reason."""
    from pipeline.solvers import SolverError, time_grid

    try:
        time_grid(teacher, cell.steps, cell.solver, cell.grid)
    except SolverError as error:
        return str(error)
    return None


def resolve_stores(cfg: AblationConfig, compare: CompareConfig, cells: Sequence[StoreCell]) -> dict[str, Any]:
    """{cell label: store url or the reason the teacher cannot run it}; refuses missing stores unless --generate."""
    from pipeline.teacher import load_teacher

    teacher = load_teacher(compare.teacher)
    found, missing = {}, []
    for cell in cells:
        reason = runnable(teacher, cell)
        if reason is not None:
            found[cell.label] = {"skipped": reason}
            continue
        location = locate_store(cell_config(compare, cell))
        found[cell.label] = location
        if not location["complete"]:
            missing.append((cell, location))
    if missing and not cfg.generate_missing:
        lines = [f"  {cell.label}: {location['url']} ({location['state']})\n"
                 f"    {generate_command(cell_config(compare, cell))}" for cell, location in missing]
        raise AblationError(
            f"preset {cfg.preset} names {len(missing)} store(s) that do not exist (or are incomplete) in the cache:\n"
            + "\n".join(lines) + "\nmake them with these commands (or pass --generate to make them now)")
    for cell, _ in missing:
        print(f"[ablate_store] generating the store of {cell.label}", flush=True)
        found[cell.label] = {"url": make_store(cell_config(compare, cell), Path(compare.out) / "logs")["url"],
                             "complete": True}
    return found


# ------------------------------------------------------------------------------------------------------------
# Runs


def final_fd(run_dir: Path) -> dict[str, float]:
    """The FD of a mid-training run's last evaluation (the exported EMA student)."""
    scored = RunDir(run_dir).read_evaluations()
    if not scored:
        raise AblationError(f"{run_dir} has no FD evaluation: delete it and re-run")
    return {key: float(scored[-1][f"fd_{key}"]) for key in STEP_KEYS}


def train_cell(compare: CompareConfig, cfg: AblationConfig, store_url: str, label: str,
               seed: int = 0) -> dict[str, Any]:
    """CMT on one store (or online: compare's overrides say so), then the post-training method, both with training
    seed `seed`; their final FD."""
    runs_dir, log_dir = Path(compare.out) / "runs", Path(compare.out) / "logs"
    mid = mid_plan(compare, "cm", store_url, runs_dir, seed)
    print(f"[ablate_store] {label}, seed {seed}", flush=True)
    mid_dir = execute(compare, mid, runs_dir, log_dir)
    result = {"label": label, "mid_run": mid.name, "cmt_fd": final_fd(mid_dir),
              "pairs": training_pairs(mid_dir, mid.total_steps)}
    online = [report.get("online") for report in RunDir(mid_dir).read_rank_reports()]
    if all(online):
        result.update(trajectories_solved=sum(rank["batches_made"] * rank["trajectories_per_batch"] for rank in online),
                      teacher_forwards=sum(rank["teacher_forward_samples"] for rank in online))
    if cfg.post_method != "none":
        post = post_plan(compare, cfg.post_method, "cmt", seed, cfg.post_steps, store_url=store_url,
                         cmt_export=mid_dir / "export", runs_dir=runs_dir)
        scores = read_post_run(execute(compare, post, runs_dir, log_dir))
        result.update(post_run=post.name, post_fd={f"{s}step": scores["fd"][s][-1] for s in (1, 2)})
    return result


def train_seeds(compare: CompareConfig, cfg: AblationConfig, store_url: str, label: str) -> dict[str, Any]:
    """One cell over every seed: the first seed's row with each FD replaced by its mean over the seeds, "<key>_std"
    its sample standard deviation (0 for one seed), and "seeds" the per-seed rows."""
    runs = [{"seed": seed, **train_cell(compare, cfg, store_url, label, seed)} for seed in cfg.seeds]
    row = {key: value for key, value in runs[0].items() if key not in ("seed", "mid_run", "post_run")}
    for key in ("cmt_fd", "post_fd"):
        if key in runs[0]:
            values = {steps: [run[key][steps] for run in runs] for steps in STEP_KEYS}
            row[key] = {steps: statistics.fmean(v) for steps, v in values.items()}
            row[f"{key}_std"] = {steps: statistics.stdev(v) if len(v) > 1 else 0.0 for steps, v in values.items()}
    row["mid_run"] = runs[0]["mid_run"]
    if "post_run" in runs[0]:
        row["post_run"] = runs[0]["post_run"]
    row["seeds"] = runs
    return row


def smallest_within(rows: Sequence[dict[str, Any]], reference: dict[str, Any], key: str) -> dict[str, str | None]:
    """Per step count, the first row (smallest store) whose `key` FD is within 10 % of the reference's."""
    rows = sorted(rows, key=lambda row: row["num_trajectories"])
    found: dict[str, str | None] = {}
    for steps in STEP_KEYS:
        target = reference[key][steps] * (1 + WITHIN)
        found[steps] = next((row["label"] for row in rows if key in row and row[key][steps] <= target), None)
    return found


def run(cfg: AblationConfig) -> dict[str, Any]:
    """Run (or resume) the preset's cells; write the table, JSON and plot; return the JSON."""
    compare = with_absolute_paths(cfg.compare_config())
    if not Path(compare.teacher).exists():
        raise AblationError(
            f"teacher {compare.teacher} does not exist: train it with `python trainer/pretrain.py --config "
            "jobs/digits/pretrain.yaml` or pass --teacher <a diffusers pipeline dir>")
    cells = cfg.cells()
    stores = resolve_stores(cfg, compare, cells)
    rows = []
    for cell in cells:
        store = stores[cell.label]
        if "skipped" in store:
            rows.append({"label": cell.label, "value": cell.value, "skipped": store["skipped"]})
            continue
        row = train_seeds(cell_config(compare, cell), cfg, store["url"], cell.label)
        forwards = _generation_forwards(cell)
        rows.append({**row, "value": cell.value, "store": store["url"], "num_trajectories": cell.num_trajectories,
                     "solver": cell.solver, "steps": cell.steps, "generation_teacher_forwards": forwards})
    result: dict[str, Any] = {"config": dataclasses.asdict(cfg), "preset": cfg.preset, "rows": rows}
    trained = [row for row in rows if "cmt_fd" in row]
    if cfg.preset == "trajectories" and cfg.online_reference and trained:
        largest = max(trained, key=lambda row: row["num_trajectories"])
        online_compare = dataclasses.replace(cell_config(compare, cells[0]),
                                             overrides=compare.overrides + online_overrides(largest["store"]))
        online = train_seeds(online_compare, cfg, largest["store"], "online (fresh every step)")
        result["online"] = online
        result["smallest_within_10pct_of_online"] = {
            key: smallest_within(trained, online, key) for key in ("cmt_fd", "post_fd") if key in online}
    report_dir = Path(cfg.report_dir).resolve() if cfg.report_dir else Path(compare.out)
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = f"ablate_{cfg.preset}"
    result["files"] = {"markdown": str(report_dir / f"{stem}.md"), "json": str(report_dir / f"{stem}.json"),
                       "plot": str(report_dir / f"{stem}.png")}
    Path(result["files"]["markdown"]).write_text(markdown_table(result))
    plot(result, Path(result["files"]["plot"]))
    Path(result["files"]["json"]).write_text(json.dumps(result, indent=2))
    return result


def _generation_forwards(cell: StoreCell) -> int:
    """Teacher network evaluations generation spends on the cell's store."""
    from pipeline.generate import forward_evaluations_per_trajectory

    return cell.num_trajectories * forward_evaluations_per_trajectory(cell.solver, cell.steps, None)


# ------------------------------------------------------------------------------------------------------------
# Outputs


def _pair(entry: dict[str, Any], key: str) -> str:
    """`1-step / 2-step` FD of entry[key] (with ± the spread over seeds when there are several), or a dash."""
    scores, spread = entry.get(key), entry.get(f"{key}_std")
    if scores is None:
        return "–"
    several = len(entry.get("seeds", ())) > 1
    return " / ".join(f"{scores[steps]:.1f}" + (f" ± {spread[steps]:.1f}" if several else "") for steps in STEP_KEYS)


def _seeds_sentence(seeds: Sequence[int]) -> str:
    """How many training seeds each FD stands for."""
    if len(seeds) == 1:
        return f"One training seed ({seeds[0]}); FD on the runs' one evaluation draw."
    return (f"Each FD: mean ± sample standard deviation over {len(seeds)} training seeds ({', '.join(map(str, seeds))}),"
            " on the runs' one evaluation draw; every seed's FD is in the JSON.")


def markdown_table(result: dict[str, Any]) -> str:
    """The ablation as markdown, with the online reference and the smallest store near it (trajectories preset)."""
    cfg = result["config"]
    post = METHOD_LABELS.get(cfg["post_method"])
    lines = [
        f"# Store ablation: {AXIS_LABELS[result['preset']]} (FD-digits of {cfg['num_eval_samples']} samples)",
        "",
        (f"CMT: {cfg['mid_steps']} CM-form steps of `{cfg['mid_preset']}` on each store (equal training steps and "
         f"batch)" + ("." if post is None else f"; then {post}, {cfg['post_steps']} steps of "
                      f"`{cfg['post_preset']}` (settings: {', '.join(cfg['overrides']) or 'preset'}).")),
        "",
        _seeds_sentence(cfg.get("seeds", [0])),
        "",
        (f"| {AXIS_LABELS[result['preset']]} | trajectories × points | generation teacher forwards | pairs trained "
         f"| CMT FD 1 / 2-step |" + ("" if post is None else f" after {post} FD 1 / 2-step |")),
        "|---|---:|---:|---:|---|" + ("" if post is None else "---|"),
    ]

    def post_cell(entry: dict[str, Any], text: str | None = None) -> str:
        """The post-training column's cell, or nothing when the ablation ran no post-training."""
        return "" if post is None else f" {text if text is not None else _pair(entry, 'post_fd')} |"

    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['label']} | – | – | – | not runnable for this teacher: {row['skipped']} |"
                         + post_cell(row, "–"))
            continue
        lines.append(
            f"| {row['label']} | {row['num_trajectories']:,} × {row['steps'] + 1} "
            f"| {row['generation_teacher_forwards']:,} | {row['pairs']:,} | {_pair(row, 'cmt_fd')} |" + post_cell(row))
    if "online" in result:
        online = result["online"]
        points = result["rows"][0]["steps"] + 1 if result["rows"] else "K+1"
        lines.append(f"| online (fresh trajectories every step) | {online['trajectories_solved']:,} × {points} "
                     f"| {online['teacher_forwards']:,} (during training) | {online['pairs']:,} "
                     f"| {_pair(online, 'cmt_fd')} |" + post_cell(online))
        lines += ["", "Smallest store within 10 % of the online run's FD:"]
        for key, name in (("cmt_fd", "CMT student"), ("post_fd", f"after {post}")):
            found = result["smallest_within_10pct_of_online"].get(key)
            if found:
                lines.append(f"- {name}: 1-step {found['1step'] or 'none'}, 2-step {found['2step'] or 'none'}.")
        stored = [row["cmt_fd"] for row in result["rows"] if "skipped" not in row and row.get("cmt_fd")]
        for steps in ("1step", "2step"):
            if stored and all(fd[steps] < online["cmt_fd"][steps] for fd in stored):
                lines.append(f"- At {steps.replace('step', '-step')}, every store's CMT student beats the online run.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """FD against the ablated quantity (1- and 2-step panels): CMT student and after post-training; online dashed."""
    plt = pyplot()

    rows = [row for row in result["rows"] if "cmt_fd" in row]
    categorical = result["preset"] == "solver"
    post = METHOD_LABELS.get(result["config"]["post_method"])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, steps in zip(axes, STEP_KEYS):
        x = list(range(len(rows))) if categorical else [row["value"] for row in rows]
        for key, color, name in (("cmt_fd", "tab:red", "CMT student"),
                                 ("post_fd", "tab:blue", f"after {post}")):
            if rows and key in rows[0]:
                spread = [row.get(f"{key}_std", {}).get(steps, 0.0) for row in rows]
                axis.errorbar(x, [row[key][steps] for row in rows], yerr=spread, marker="o", color=color, capsize=3,
                              label=name)
                if key in result.get("online", {}):
                    axis.axhline(result["online"][key][steps], color=color, linestyle="--", label=f"{name}, online")
        if categorical:
            axis.set_xticks(x, [row["label"] for row in rows], rotation=15)
        else:
            axis.set_xscale("log", base=2)
        finish_fd_axis(axis, xlabel=AXIS_LABELS[result["preset"]], ylabel=f"FD-digits, {steps.replace('step', '-step')}")
    save_figure(figure, path)


# ------------------------------------------------------------------------------------------------------------
# CLI


def parse_values(preset: str, values: Sequence[str]) -> dict[str, tuple]:
    """--values for a preset: trajectory counts, step counts or solver names."""
    if preset == "solver":
        return {"solvers": tuple(values)}
    try:
        numbers = tuple(int(value.replace(",", "").replace("k", "000")) for value in values)
    except ValueError as error:
        raise AblationError(f"--values {' '.join(values)}: preset {preset} takes whole numbers, e.g. 512 2k") from error
    return {"num_trajectories" if preset == "trajectories" else "solver_steps": numbers}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: python jobs/ablate_store.py --preset NAME [--quick] [options]; prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=PRESETS)
    parser.add_argument("--quick", action="store_true", help="tiny stores and tens of steps (a smoke run)")
    parser.add_argument("--values", nargs="+", help="the ablated values (N, K or solver names) instead of the preset's")
    parser.add_argument("--generate", action="store_true", help="make missing stores instead of refusing")
    parser.add_argument("--out", help=f"runs and logs (default {AblationConfig.out})")
    parser.add_argument("--report-dir", help="where the table, JSON and plot go (default: --out; docs/ for README)")
    parser.add_argument("--teacher", help=f"teacher pipeline dir (default {AblationConfig.teacher})")
    parser.add_argument("--cache-root", help="trajectory cache root")
    parser.add_argument("--mid-steps", type=int)
    parser.add_argument("--post-method", choices=[*METHOD_FORMS, "none"])
    parser.add_argument("--post-steps", type=int)
    parser.add_argument("--num-eval-samples", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds per cell (default 0); the table shows "
                        "mean ± std over them")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--launcher", choices=["subprocess", "inprocess"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SCOPE:KEY=VALUE",
                        help="trainer override for a scope (mid, post, ect, ...; see jobs/compare_inits.py)")
    args = parser.parse_args(argv)
    try:
        base = dataclasses.replace(AblationConfig(), **QUICK) if args.quick else AblationConfig()
        fields = {name: getattr(args, name) for name in ("out", "report_dir", "teacher", "cache_root", "mid_steps",
                                                         "post_method", "post_steps", "num_eval_samples", "threads",
                                                         "launcher")}
        fields = {key: value for key, value in fields.items() if value is not None}
        if args.seeds is not None:
            fields["seeds"] = tuple(args.seeds)
        if args.values:
            fields.update(parse_values(args.preset, args.values))
        for text in args.overrides:
            parse_scoped_override(text)
        cfg = dataclasses.replace(base, preset=args.preset, generate_missing=args.generate,
                                  overrides=base.overrides + tuple(args.overrides), **fields)
        result = run(cfg)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(Path(result["files"]["markdown"]).read_text())
    print(f"outputs: {', '.join(result['files'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
