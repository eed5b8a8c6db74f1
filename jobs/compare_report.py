"""Outputs of `jobs/compare_inits.py`: the markdown table, the FD-vs-compute plot and the settings log (every
setting tried with one output directory, over all invocations, and whether post-training improved on its init).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs.compare_config import INIT_LABELS, METHOD_LABELS, STEP_COUNTS
from jobs.figures import finish_fd_axis, pyplot, save_figure
from jobs.study_runs import RunPlan

MARKDOWN_NAME = "compare_inits.md"
JSON_NAME = "compare_inits.json"


PLOT_NAME = "compare_inits.png"
SETTINGS_LOG = "settings_log.jsonl"


def settings_row(plan: RunPlan, run_: dict[str, Any]) -> dict[str, Any]:
    """One settings-log line: the run's settings, its FD before and after, whether it improved."""
    finals = {f"{s}step": run_["fd"][s][-1] for s in STEP_COUNTS}
    initial = {f"{s}step": run_["init_fd"][s] for s in STEP_COUNTS}
    return {"run": plan.name, "method": plan.method, "init": plan.init, "seed": plan.seed, "steps": plan.total_steps,
            "train_seconds": run_["train_seconds"][-1], "overrides": list(plan.user_overrides),
            "builtin_overrides": list(plan.builtin_overrides), "init_fd": initial, "final_fd": finals,
            "improved": {key: finals[key] < initial[key] for key in finals}}


def worse_entry(cell: dict[str, Any]) -> dict[str, Any]:
    """A cell whose mean final FD is not below its mean initial FD (1- or 2-step), with its settings."""
    return {"method": cell["method"], "init": cell["init"], "overrides": cell["overrides"],
            "builtin_overrides": cell["builtin_overrides"],
            "init_fd": {f"{s}step": cell["init_fd"][s]["mean"] for s in STEP_COUNTS},
            "final_fd": {f"{s}step": cell["final_fd"][s]["mean"] for s in STEP_COUNTS}}


def append_settings_log(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append runs not yet in the settings log (one JSON line each)."""
    logged = set()
    if path.exists():
        logged = {json.loads(line)["run"] for line in path.read_text().splitlines() if line.strip()}
    with open(path, "a") as stream:
        for row in rows:
            if row["run"] not in logged:
                stream.write(json.dumps(row) + "\n")
                logged.add(row["run"])


def settings_tried(path: Path) -> list[dict[str, Any]]:
    """Every (method, init, settings, steps) in the settings log, over all invocations with this --out: seeds run,
    mean FD before and after post-training, and whether the mean improved (1- and 2-step)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        key = (row["method"], row["init"], tuple(row["builtin_overrides"] + row["overrides"]), row["steps"])
        groups.setdefault(key, []).append(row)
    tried = []
    for (method, init, settings, steps), rows in groups.items():
        initial = {f"{s}step": float(np.mean([row["init_fd"][f"{s}step"] for row in rows])) for s in STEP_COUNTS}
        final = {f"{s}step": float(np.mean([row["final_fd"][f"{s}step"] for row in rows])) for s in STEP_COUNTS}
        tried.append({"method": method, "init": init, "settings": list(settings), "steps": steps,
                      "seeds": sorted(row["seed"] for row in rows), "init_fd": initial, "final_fd": final,
                      "improved": {key: final[key] < initial[key] for key in final}})
    return tried


def json_ready(value: Any) -> Any:
    """Dict keys as strings (step counts become "1step"), tuples as lists, for JSON."""
    if isinstance(value, dict):
        return {(f"{key}step" if isinstance(key, int) else str(key)): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def _fmt(stat: dict[str, Any] | None, digits: int = 1) -> str:
    """`mean ± std` (std `–` with one seed)."""
    if stat is None:
        return "–"
    std = "–" if stat["std"] is None else f"{stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {std}"


def _seconds(value: float) -> str:
    """Seconds with three significant digits below 100 s, whole seconds above."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _fraction_text(fraction: float | None) -> str:
    """A fraction as a percentage, or "not reached"."""
    return "not reached" if fraction is None else f"{100 * fraction:.0f} %"


def batch_sweep_lines(methods: dict[str, Any]) -> list[str]:
    """The batch-size sweep of every cell (--batch-sizes): each candidate's steps and final FD on the selection seed,
    the chosen one in bold; nothing when no cell swept."""
    rows = [(method, init, sweep) for method, row in methods.items()
            for init, sweep in row.get("batch_sweeps", {}).items()]
    if not rows:
        return []
    lines = ["", "## Batch size of each cell (jobs/compare_batch.py)", "",
             ("Each candidate trains the cell's number of samples (steps scale as reference batch / batch) on the "
              "selection seed; the lowest ranked 1-step FD (then 2-step) is the cell's batch size for every seed. "
              "Ranked FD: the mean over the runs' draw and the fresh draws (--redraws; the runs' draw alone for "
              "sweeps recorded without them)."),
             "", "| method | init | selection seed | batch | steps | train s | final FD 1 / 2-step (runs' draw) "
             "| ranked FD 1 / 2-step (draws) |", "|---|---|---:|---:|---:|---:|---|---|"]
    for method, init, sweep in rows:
        for entry in sweep["candidates"]:
            mark = "**" if entry["batch"] == sweep["chosen"] else ""
            ranked = entry.get("ranked_fd", entry["final_fd"])
            lines.append(f"| {METHOD_LABELS[method]} | {INIT_LABELS[init]} | {sweep['selected_on_seed']} "
                         f"| {mark}{entry['batch']}{mark} | {entry['steps']} | {_seconds(entry['train_seconds'])} "
                         f"| {entry['final_fd']['1step']:.1f} / {entry['final_fd']['2step']:.1f} "
                         f"| {ranked['1step']:.1f} / {ranked['2step']:.1f} ({sweep.get('ranked_on_draws', 1)}) |")
    return lines


def redraw_lines(result: dict[str, Any]) -> list[str]:
    """Every cell's final exports, and the mid-trained students, on fresh draws of the evaluation noise (--redraws):
    the pooled mean ± std, the spread over seeds and over draws, each seed's mean; nothing without --redraws."""
    redraws = result.get("redraws")
    if not redraws:
        return []

    def spread(stat: dict[str, Any]) -> str:
        measured = ["–" if stat[key] is None else f"{stat[key]:.1f}" for key in ("std_over_seeds", "std_over_draws")]
        return f"{_fmt(stat)} | {' / '.join(measured)}"

    lines = ["", f"## FD on {redraws['draws']} fresh draws of the evaluation noise (jobs/fd_redraws.py)", "",
             (f"Every seed's final export scored again on {redraws['draws']} other draws of {redraws['num_samples']} "
              "evaluation noises: mean ± std pooled over seeds × draws, then the std of the seeds' means and the mean "
              "std over draws (– where one seed or one draw leaves it unmeasured). The CMT student is the "
              "mid-trained export (one run, shared by every seed). \"below the CMT student\": every seed's mean "
              "over the draws is below the student's."),
             "", ("| method | init | FD 1-step | std seeds / draws | FD 2-step | std seeds / draws "
                  "| seeds' 1-step means | below the CMT student (1/2) |"),
             "|---|---|---:|---|---:|---|---|---|"]
    for form, stat in redraws["cmt_students"].items():
        lines.append(f"| CMT student ({form} form) | mid-training only | {spread(stat['fd_1step'])} "
                     f"| {spread(stat['fd_2step'])} | – | – |")
    for cell in result["cells"]:
        below = "/".join("yes" if cell["redraw_improved"][f"{s}step"] else "NO" for s in STEP_COUNTS)
        means = ", ".join(f"{mean:.1f}" for mean in cell["redraw_fd"]["fd_1step"]["seed_means"])
        lines.append(f"| {METHOD_LABELS[cell['method']]} | {INIT_LABELS[cell['init']]} "
                     f"| {spread(cell['redraw_fd']['fd_1step'])} | {spread(cell['redraw_fd']['fd_2step'])} "
                     f"| {means} | {below} |")
    return lines


def markdown_table(result: dict[str, Any]) -> str:
    """The comparison as markdown: final FD per cell, the fractions, the accounting, cells worse than their init."""
    acct = result["accounting"]
    seeds = result["config"]["seeds"]
    lines = [
        (f"# Post-training from CMT vs diffusion vs random init (FD-{result['config']['fd_dataset']}, "
         f"{len(seeds)} seed(s): {', '.join(map(str, seeds))})"),
        "",
        ("Final FD is mean ± std over seeds. \"CMT student\" is the mid-trained student before post-training (the "
         "CMT row's init). Charged seconds include generation + mid-training for CMT rows."),
        "",
        ("| method | init | charged s | post steps | batch | init FD 1-step | init FD 2-step | final FD 1-step "
         "| final FD 2-step | CMT student 1-step | CMT student 2-step | improved on init (1/2) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for cell in result["cells"]:
        student = cell["cmt_student_fd"]
        improved = "/".join("yes" if cell["improved"][f"{s}step"] else "NO" for s in STEP_COUNTS)
        lines.append(
            f"| {METHOD_LABELS[cell['method']]} | {INIT_LABELS[cell['init']]} "
            f"| {_seconds(cell['charged_seconds']['mean'])} | {cell['post_steps']} | {cell.get('batch_size') or '–'} "
            f"| {_fmt(cell['init_fd']['1step'])} | {_fmt(cell['init_fd']['2step'])} "
            f"| {_fmt(cell['final_fd']['1step'])} | {_fmt(cell['final_fd']['2step'])} "
            f"| {_fmt(student['1step'])} | {_fmt(student['2step'])} | {improved} |"
        )
    lines += redraw_lines(result)
    lines += batch_sweep_lines(acct["methods"])
    n = acct["amortise_over"]
    lines += [
        "",
        "## Compute the CMT pipeline needs to reach each baseline's final FD",
        "",
        ("Fraction = CMT charged seconds at which its mean curve (mid-training's own evaluations, then "
         "post-training's) first reaches the baseline's final mean FD (linear interpolation between evaluations) / "
         f"the baseline's charged seconds. Amortised: generation / {n}. ≤: reached already at the curve's first "
         "evaluation, so an upper bound."
         + ("" if all(mid.get("curve") for mid in acct["mid"].values()) else
            " Mid-training was evaluated only at its end here, so each fraction is an upper bound.")),
        "",
        ("| method | baseline | steps | baseline final FD | baseline s | CMT s to reach | fraction "
         f"| fraction (amortised, N={n}) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["fractions"]:
        bound = "≤ " if row.get("reached_at_first_evaluation") else ""
        reach = "–" if row["cmt_seconds_to_reach"] is None else bound + _seconds(row["cmt_seconds_to_reach"])
        fraction = ("" if row["fraction"] is None else bound) + _fraction_text(row["fraction"])
        lines.append(
            f"| {METHOD_LABELS[row['method']]} | {INIT_LABELS[row['baseline']]} | {row['steps']} "
            f"| {row['baseline_final_fd']:.1f} | {_seconds(row['baseline_charged_seconds'])} | {reach} "
            f"| {fraction} | {('' if row['fraction_amortised'] is None else bound)}"
            f"{_fraction_text(row['fraction_amortised'])} |"
        )
    lines += [
        "",
        "## Compute accounting",
        "",
        f"- Trajectory generation G = {_seconds(acct['generation_seconds'])} s ({acct['generation_source']}).",
        (f"- Post-training data: {acct['post_data']} unless a row's settings say otherwise"
         + (" (baselines are charged G too)." if acct["baselines_charged_for_generation"] else ".")),
        f"- Equal compute by {acct['equal_compute_by']}.",
        f"- Seconds: {acct['train_seconds']}.",
        *(f"- {METHOD_LABELS[method]}: baselines keep the step count fitted on seeds "
          f"{row['baseline_budget_fitted_on_seeds']} (baseline_budgets.json); CMT charged seconds below are the mean "
          "over every seed, and the last column is each baseline's achieved ratio."
          for method, row in acct["methods"].items()
          if row.get("baseline_budget_fitted_on_seeds", result["config"]["seeds"]) != list(result["config"]["seeds"])),
        "",
        ("| method | mid form | mid s | CMT post steps | CMT post s | steps/s | CMT charged s | CMT charged s "
         "(amortised) | baselines charged G | baseline steps | charged ratio baseline/CMT |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for method, row in acct["methods"].items():
        ratios = ", ".join(f"{INIT_LABELS[c['init']]} {c['charged_over_cmt']:.2f}" for c in result["cells"]
                           if c["method"] == method and c["init"] != "cmt")
        capped = " (capped)" if row["capped_by_max_baseline_steps"] else ""
        lines.append(
            f"| {METHOD_LABELS[method]} | {row['form']} | {_seconds(row['mid_seconds'])} | {row['cmt_post_steps']} "
            f"| {_fmt(row['cmt_post_seconds'], 2)} | {row['steps_per_second']:.2f} "
            f"| {_seconds(row['cmt_charged_seconds'])} | {_seconds(row['cmt_charged_seconds_amortised'])} "
            f"| {'yes' if row.get('baselines_charged_for_generation') else 'no'} "
            f"| {row['baseline_steps']}{capped} | {ratios or '–'} |"
        )
    lines += ["", "## Cells where post-training did not improve on its init", ""]
    worse = result["worse_than_init"]
    if not worse:
        lines.append("None: every cell's mean final FD is below its mean initial FD at 1 and 2 steps.")
    for entry in worse:
        settings = ", ".join(entry["builtin_overrides"] + entry["overrides"]) or "preset defaults"
        lines.append(
            f"- {METHOD_LABELS[entry['method']]} from {INIT_LABELS[entry['init']]}: FD 1-step "
            f"{entry['init_fd']['1step']:.1f} → {entry['final_fd']['1step']:.1f}, 2-step "
            f"{entry['init_fd']['2step']:.1f} → {entry['final_fd']['2step']:.1f} (settings: {settings})"
        )
    lines += [
        "",
        f"## Every setting tried with this output directory ({SETTINGS_LOG}, all invocations)",
        "",
        ("| method | init | settings | steps | seeds | FD 1-step init → final | FD 2-step init → final "
         "| improved (1/2) |"),
        "|---|---|---|---:|---|---|---|---|",
    ]
    for entry in result.get("settings_tried", []):
        improved = "/".join("yes" if entry["improved"][f"{s}step"] else "NO" for s in STEP_COUNTS)
        lines.append(
            f"| {METHOD_LABELS[entry['method']]} | {INIT_LABELS[entry['init']]} "
            f"| {', '.join(entry['settings']) or 'preset defaults'} | {entry['steps']} "
            f"| {','.join(map(str, entry['seeds']))} "
            f"| {entry['init_fd']['1step']:.1f} → {entry['final_fd']['1step']:.1f} "
            f"| {entry['init_fd']['2step']:.1f} → {entry['final_fd']['2step']:.1f} | {improved} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """FD vs charged seconds: a row per method, 1- and 2-step columns; mean, ± std band; CMT amortised dashed."""
    plt = pyplot()

    methods = list(dict.fromkeys(cell["method"] for cell in result["cells"]))
    colors = {"cmt": "tab:red", "teacher": "tab:blue", "random": "tab:gray"}
    figure, axes = plt.subplots(len(methods), 2, figsize=(11, 3.8 * len(methods)), squeeze=False)
    for row, method in enumerate(methods):
        for column, steps in enumerate(STEP_COUNTS):
            axis = axes[row][column]
            for cell in (c for c in result["cells"] if c["method"] == method):
                curve = cell["curve"]
                x = np.asarray(curve["charged_seconds"])
                mean = np.asarray(curve[f"fd_{steps}step_mean"])
                std = np.asarray(curve[f"fd_{steps}step_std"])
                label = INIT_LABELS[cell["init"]] + (" (charged G, then mid)" if cell["init"] == "cmt" else "")
                axis.plot(x, mean, marker="o", color=colors[cell["init"]], label=label)
                axis.fill_between(x, np.maximum(mean - std, 1e-3), mean + std, color=colors[cell["init"]], alpha=0.2)
                if cell["init"] == "cmt":
                    axis.plot(curve["charged_seconds_amortised"], mean, linestyle="--", color=colors["cmt"],
                              label=f"CMT (G amortised over {result['accounting']['amortise_over']})")
                    start = curve.get("stage", ["post"]).index("post")  # after mid-training's own evaluations
                    axis.plot(x[start:start + 1], mean[start:start + 1], marker="*", markersize=14, linestyle="none",
                              color="black", label="CMT student before post-training")
            axis.set_title(f"{METHOD_LABELS[method]}: {steps}-step")
            finish_fd_axis(axis, xlabel="charged wall-clock seconds",
                           ylabel=f"FD-{result['config']['fd_dataset']}, {steps}-step")
    save_figure(figure, path)


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, str]:
    """compare_inits.md and .png (the JSON is written by run, after these paths are added)."""
    ready = json_ready(result)
    (out / MARKDOWN_NAME).write_text(markdown_table(ready))
    plot_curves(ready, out / PLOT_NAME)
    return {"markdown": str(out / MARKDOWN_NAME), "json": str(out / JSON_NAME), "plot": str(out / PLOT_NAME),
            "settings_log": str(out / SETTINGS_LOG)}
