"""CMT's central claim at small scale: post-training from the CMT student vs from the diffusion model vs from scratch.

    python jobs/compare_inits.py [--quick] [--out DIR] [--teacher DIR] [--store URL] [--seeds 0 1 2]
        [--methods ect meanflow] [--inits cmt teacher random] [--set SCOPE:key=value ...] [--only METHOD/INIT ...]
        [--amortise-over N] [--mid-evals N] [--batch-sizes B ...] [--redraws N] [--dry-run]

Runs, for every method (ECT, ECD, MeanFlow) and every seed, post-training (`trainer/post.py`) from
three initialisations: `cmt` (the mid-training export of `trainer/mid.py`: CM form for ECT/ECD, MF form for
MeanFlow), `teacher` (the diffusion model: its x0 prediction for ECT, its flow-matching velocity for MeanFlow) and
`random` (the teacher's architecture, fresh weights). Stages are reused: the trajectory store
(`pipeline/generate.py`, a cache hit when it exists), the mid-training runs and finished post-training runs
(run directories are named by a hash of their settings, so a re-run resumes or skips them).

Compute accounting (wall-clock seconds on this machine):

- Every run is charged for every stage whose output it consumes. A CMT run: trajectory generation G + mid-training
  M (its form) + its own post-training. A baseline: its post-training only (plus G when `post_data` is the store).
  Generation is the wall time of `pipeline.generate.run` when the store is made in this invocation; on a cache hit
  (or with --store) it is estimated by re-solving `generation_probe_trajectories` trajectories of the store's spec
  with the same teacher, now, and scaling to the store's size. The figure is kept in <out>/generation.json and
  reused by later invocations. Training seconds are the loop's `train_seconds` (trainer/loop.py: optimizer steps
  only; evaluations, checkpoints and process start-up excluded), for mid- and post-training alike.
- The CMT curve starts with mid-training's own FD evaluations (--mid-evals along the run), at G + the mid run's
  train_seconds, then continues with post-training's; so a fraction finds where mid-training alone already reaches
  a baseline. Mid runs are named without their evaluation cadence (evaluations do not change what is trained), so
  a mid run made with another cadence is reused, with the curve it has.
- Amortised: the store reused by N experiments (--amortise-over) charges G/N per CMT run.
- Equal compute by steps: the CMT post-training runs go first (`cmt_post_steps` per method). A line
  train_seconds = overhead + steps / rate fitted to their evaluation points (every seed of the invocation that
  fits it; the overhead is the slower first steps) converts each baseline's budget, mean CMT charged total minus
  the baseline's own pre-cost, into a step count (at the CMT runs' batch size; with --batch-sizes converted at equal
  training samples to each baseline's, below). Baseline and CMT steps cost the same (same network, loss and
  batch), so both get the same wall clock; the curves and tables use the seconds each run actually logged, and each
  cell's `charged_over_cmt` reports the achieved ratio to the CMT pipeline's charged total. The fit is made once
  per method, by the first invocation that runs it, and kept in <out>/baseline_budgets.json
  (`jobs/compare_budget.py`): seeds added later (`--seeds 1 2` after `--seeds 0`) train only their own runs, and
  baselines of every seed train for the same step count.

Batch sizes (--batch-sizes B ...; `jobs/compare_batch.py`): every cell, CMT included, first trains one run per
candidate on the first seed at the cell's number of training samples (steps × batch held fixed), and the candidate
with the best final FD (the mean over the runs' draw and the --redraws fresh ones, all candidates on the same draws)
becomes the cell's batch size for every seed; the sweep is kept in <out>/batch_choices.json.
The baselines' budget, fitted in steps at the CMT cell's batch size, is converted at equal samples to each baseline's.

The FD's own noise (--redraws N, default 5): every final export and each mid-trained student is scored again on N
fresh draws of the evaluation noise (`jobs/fd_redraws.py`, cached per run), and the report gives each cell's FD over
seeds × draws with the spread over seeds and over draws, and whether every seed's mean beats the CMT student's.

Per-run settings. Built in: ECT from `teacher`/`random` uses ECT's doubling Δt schedule (q = 2 → 4096 over the
run; after CMT q stays fixed at 4096); `random` inits use EMA warm-up (pretrained inits keep it off).
`--set SCOPE:key=value` overrides any `trainer/post.py` / `trainer/mid.py` key for a scope: all, mid, mid/cm,
mid/mf, post (the default without a scope), a method (ect, ecd, meanflow), an init (cmt, teacher, random) or
both (ect/cmt). `data=store` means this comparison's store. Later --set wins. Every finished run is appended to
<out>/settings_log.jsonl with its settings, its initial and final FD and whether post-training improved on the
init, so settings under which ECT or MeanFlow makes a good init worse, and ones under which it improves, are on
record (probe one cell with `--only ect/cmt --seeds 0 --set ect/cmt:loop.lr=1e-4`).

Outputs in --out: compare_inits.png (FD-digits vs charged seconds, 1- and 2-step, mean ± std over seeds; CMT
dashed when amortised), compare_inits.md and compare_inits.json (final FD mean ± std, the CMT student's FD before
post-training beside every row, the fraction of each baseline's compute that the CMT pipeline needs to reach the
baseline's final FD, the accounting), settings_log.jsonl, generation.json, baseline_budgets.json, batch_choices.json
(with --batch-sizes), runs/ (one directory per stage run) and logs/ (one log per subprocess). Invocations in parallel
on one --out (seeds or methods split over cores) share generation.json, baseline_budgets.json and batch_choices.json
safely (`jobs/study_records.py`).

Every stage runs as its own subprocess (`trainer/mid.py`, `trainer/post.py`; accelerate's state is per process);
`--launcher inprocess` runs them in this process instead (what the smoke test does, to skip interpreter start-up).
`--quick` (1 seed, tens of steps, 200 FD samples, ECT and MeanFlow) takes ~3 min on the shared 2-core machine.
The study's cost on the 2-core machine, 1 torch thread per run (2026-11-30, README.md, "Studies"): seed 0 with
`--batch-sizes 128 256`, one invocation per method side by side, took 45 min of wall clock for all three (the two mid
runs first, ~3 min each); seeds 1 and 2, one invocation each side by side, took 45 min; the re-draws ~10 min.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs.compare_accounting import (
    Charges,
    compute_fractions,
    mean_std,
    step_time_fit,
    summarise_cell,
    with_mid_curve,
)
from jobs.compare_batch import BATCH_RECORD, batch_key, best_batch, chosen_batch, preset_batch, run_batch, scaled_steps
from jobs.compare_budget import BUDGET_RECORD, baseline_budget, budget_key
from jobs.compare_config import (
    INITS,
    METHOD_FORMS,
    QUICK,
    STEP_COUNTS,
    CompareConfig,
    CompareError,
    with_absolute_paths,
)
from jobs.compare_report import (
    JSON_NAME,
    SETTINGS_LOG,
    append_settings_log,
    json_ready,
    settings_row,
    settings_tried,
    worse_entry,
    write_outputs,
)
from jobs.fd_redraws import fd_redraws, pooled_redraws
from jobs.study_runs import (
    RunPlan,
    execute,
    final_train_seconds,
    mid_plan,
    post_data_argument,
    post_plan,
    read_post_run,
    reads_store,
)
from jobs.study_store import generation_command, generation_cost
from pipeline.paths import write_text
from trainer.run_dir import RunDir

def run_mid_stages(cfg: CompareConfig, store_url: str, runs_dir: Path, log_dir: Path) -> dict[str, dict[str, Any]]:
    """Mid-train once per form the methods need (cm: ECT/ECD, mf: MeanFlow); {form: run, export, seconds, ...}."""
    mid: dict[str, dict[str, Any]] = {}
    fd_keys = [f"fd_{steps}step" for steps in STEP_COUNTS]
    for form in sorted({METHOD_FORMS[method] for method in cfg.methods}):
        plan = mid_plan(cfg, form, store_url, runs_dir)
        run_dir = execute(cfg, plan, runs_dir, log_dir)
        final = RunDir(run_dir).read_evaluations()
        mid[form] = {"run": plan.name, "export": str(RunDir(run_dir).export), "steps": cfg.mid_steps,
                     "seconds": final_train_seconds(run_dir), "overrides": list(plan.user_overrides),
                     "fd_at_end": ({f"{steps}step": final[-1][f"fd_{steps}step"] for steps in STEP_COUNTS}
                                   if final else None),
                     "curve": [{key: record[key] for key in ("step", "train_seconds", *fd_keys)}
                               for record in final if record["step"] < cfg.mid_steps]}  # the loop times every FD
    return mid


def cell_plan(cfg: CompareConfig, method: str, init: str, seed: int, reference: tuple[int | None, int],
              batch: int | None, *, store_url: str, cmt_export: Path | None, runs_dir: Path) -> RunPlan:
    """The post-training run of (method, init, seed) at `batch` (None: the preset's, no sweep): the reference
    (batch, steps) converted at equal training samples, a baseline's steps capped by max_baseline_steps at the
    reference batch first, so that every candidate of a cell trains on as many samples. A batch equal to the preset's
    is named as a run without --batch-sizes is, so finished runs of the default study are reused."""
    reference_batch, steps = reference
    if init != "cmt":
        steps = cfg.capped_baseline_steps(steps)
    if batch is not None and reference_batch is not None:
        steps = scaled_steps(steps, reference_batch, batch)
    named_batch = None if batch == run_batch((), cfg.post_preset) else batch
    return post_plan(cfg, method, init, seed, steps, store_url=store_url, cmt_export=cmt_export, runs_dir=runs_dir,
                     batch=named_batch)


def sweep_batch(cfg: CompareConfig, method: str, init: str, reference: tuple[int | None, int], *, store_url: str,
                cmt_export: Path | None, runs_dir: Path,
                log_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The cell's batch size (jobs/compare_batch.py): one run per candidate on the selection seed, each at the
    reference (batch, steps)'s number of training samples; ({"chosen": None}, []) without --batch-sizes. Also the
    settings-log rows of the candidates trained by this call (none when the sweep was recorded before)."""
    if not cfg.batch_sizes:
        return {"chosen": None}, []
    reference_batch, reference_steps = reference
    rows: list[dict[str, Any]] = []

    def plan_at(batch: int, seed: int) -> RunPlan:
        return cell_plan(cfg, method, init, seed, reference, batch, store_url=store_url, cmt_export=cmt_export,
                         runs_dir=runs_dir)

    def sweep() -> dict[str, Any]:
        seed = cfg.seeds[0]
        candidates = []
        for batch in cfg.batch_sizes:
            plan = plan_at(batch, seed)
            run_ = read_post_run(execute(cfg, plan, runs_dir, log_dir))
            rows.append(settings_row(plan, run_))
            final_fd = {f"{s}step": run_["fd"][s][-1] for s in STEP_COUNTS}
            entry = {"batch": batch, "steps": plan.total_steps, "run": plan.name,
                     "train_seconds": run_["train_seconds"][-1], "final_fd": final_fd}
            if cfg.redraws:  # ranked on the runs' draw and the fresh ones: one draw's luck can decide a near-tie
                fresh = fd_redraws(RunDir(runs_dir / plan.name).export, cfg.redraws, cfg.num_eval_samples,
                                   cfg.fd_dataset)
                entry["ranked_fd"] = {key: float(np.mean([value, *fresh[f"fd_{key}"]])) for key, value in
                                      final_fd.items()}
            candidates.append(entry)
        finals = {entry["batch"]: {s: entry.get("ranked_fd", entry["final_fd"])[f"{s}step"] for s in STEP_COUNTS}
                  for entry in candidates}
        return {"chosen": best_batch(finals), "selected_on_seed": seed, "reference_batch": reference_batch,
                "reference_steps": reference_steps, "ranked_on_draws": 1 + cfg.redraws, "candidates": candidates}

    key = batch_key(method, init, [plan_at(batch, 0).name for batch in cfg.batch_sizes])
    recorded = chosen_batch(Path(cfg.out), key, sweep)
    if recorded.get("ranked_on_draws", 1) != 1 + cfg.redraws:
        print(f"[compare_inits] {method}/{init}: keeps batch {recorded['chosen']}, ranked on "
              f"{recorded.get('ranked_on_draws', 1)} draw(s) when it was recorded, not on 1 + --redraws "
              f"{cfg.redraws} ({BATCH_RECORD}; delete its entry to sweep again)", flush=True)
    return recorded, rows


def compare_method(cfg: CompareConfig, method: str, mid: dict[str, Any], charges: Charges, *, store_url: str,
                   runs_dir: Path, log_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """The CMT runs of `method`, then its baselines at equal compute; (cells, accounting, settings-log rows). With
    --batch-sizes each cell first picks its batch size, and the baselines' step budget is converted at equal training
    samples to theirs."""
    cmt_reference = (preset_batch(cfg.post_preset) if cfg.batch_sizes else None, cfg.post_steps(method))
    export = Path(mid["export"])
    where = {"store_url": store_url, "runs_dir": runs_dir}
    sweeps, sweep_rows = {}, []
    sweeps["cmt"], rows = sweep_batch(cfg, method, "cmt", cmt_reference, cmt_export=export, log_dir=log_dir, **where)
    sweep_rows += rows
    cmt_batch = sweeps["cmt"]["chosen"]
    cmt_plans = [cell_plan(cfg, method, "cmt", seed, cmt_reference, cmt_batch, cmt_export=export, **where)
                 for seed in cfg.seeds]
    cmt_runs = [read_post_run(execute(cfg, plan, runs_dir, log_dir)) for plan in cmt_plans]
    baseline_probe = post_plan(cfg, method, "teacher", cfg.seeds[0], 1, store_url=store_url, cmt_export=None,
                               runs_dir=runs_dir)
    charges = dataclasses.replace(charges, baselines_read_store=reads_store(baseline_probe))  # e.g. ecd:data=store
    cmt_seconds = [run_["train_seconds"][-1] for run_ in cmt_runs]
    cmt_total = charges.before_post("cmt", mid["seconds"]) + float(np.mean(cmt_seconds))
    steps = cmt_plans[0].total_steps
    seed0_name = cell_plan(cfg, method, "cmt", 0, cmt_reference, cmt_batch, cmt_export=export, **where).name

    def fit_budget() -> dict[str, Any]:
        rate, startup = step_time_fit(cmt_runs)
        budget = cmt_total - charges.before_post("teacher", mid["seconds"])
        return {"baseline_budget_seconds": budget, "steps_per_second": rate, "startup_seconds": startup,
                "baseline_steps_for_equal_compute": max(1, round((budget - startup) * rate)),
                "fitted_on_seeds": list(cfg.seeds)}

    fit = baseline_budget(Path(cfg.out), budget_key(method, seed0_name, charges.generation,
                                                    charges.baselines_read_store), fit_budget)
    if fit["fitted_on_seeds"] != list(cfg.seeds):
        print(f"[compare_inits] {method}: baselines keep the {fit['baseline_steps_for_equal_compute']} steps fitted "
              f"on seeds {fit['fitted_on_seeds']} ({BUDGET_RECORD}; delete it to fit again)", flush=True)
    equal_steps = fit["baseline_steps_for_equal_compute"]  # at the CMT runs' batch size
    baseline_steps = cfg.capped_baseline_steps(equal_steps)
    accounting = {
        "form": METHOD_FORMS[method], "mid_seconds": mid["seconds"], "cmt_post_steps": steps,
        "baselines_charged_for_generation": charges.baselines_read_store,
        "cmt_post_seconds": mean_std(cmt_seconds), "steps_per_second": fit["steps_per_second"],
        "startup_seconds": fit["startup_seconds"], "cmt_charged_seconds": cmt_total,
        "cmt_charged_seconds_amortised": (charges.before_post("cmt", mid["seconds"], amortised=True)
                                          + float(np.mean(cmt_seconds))),
        "baseline_budget_seconds": fit["baseline_budget_seconds"], "baseline_budget_fitted_on_seeds":
            fit["fitted_on_seeds"], "baseline_steps": baseline_steps,
        "baseline_steps_for_equal_compute": equal_steps, "capped_by_max_baseline_steps": baseline_steps < equal_steps,
    }
    wanted = set(cfg.only) or {f"{method}/{init}" for init in cfg.inits}
    cell_runs = {"cmt": (cmt_runs, cmt_plans)}  # always summarised: every baseline is compared with it
    for init in cfg.inits:
        if init != "cmt" and f"{method}/{init}" in wanted:
            sweeps[init], rows = sweep_batch(cfg, method, init, (cmt_batch, equal_steps), cmt_export=None,
                                             log_dir=log_dir, **where)
            sweep_rows += rows
            plans = [cell_plan(cfg, method, init, seed, (cmt_batch, equal_steps), sweeps[init]["chosen"],
                               cmt_export=None, **where) for seed in cfg.seeds]
            cell_runs[init] = ([read_post_run(execute(cfg, plan, runs_dir, log_dir)) for plan in plans], plans)
    accounting["batch_sweeps"] = {init: sweep for init, sweep in sweeps.items() if sweep["chosen"] is not None}
    cells, settings_rows = [], sweep_rows
    for init, (runs, plans) in cell_runs.items():
        summary = summarise_cell(runs, charges.before_post(init, mid["seconds"]),
                                 charges.before_post(init, mid["seconds"], amortised=True))
        cells.append({"method": method, "init": init, "seeds": list(cfg.seeds), "runs": [plan.name for plan in plans],
                      "batch_size": run_batch(plans[0].overrides, cfg.post_preset),
                      "overrides": list(plans[0].user_overrides),
                      "builtin_overrides": list(plans[0].builtin_overrides), **summary})
        settings_rows += [settings_row(plan, run_) for run_, plan in zip(runs, plans)]
    cells[0] = with_mid_curve(cells[0], mid["curve"], charges.generation_charged(),  # cell_runs puts cmt first
                              charges.generation_charged(amortised=True))
    for cell in cells:
        cell["cmt_student_fd"] = cells[0]["init_fd"]  # the mid-trained student, before post-training
        cell["improved"] = {f"{s}step": cell["final_fd"][s]["mean"] < cell["init_fd"][s]["mean"] for s in STEP_COUNTS}
        cell["charged_over_cmt"] = cell["charged_seconds"]["mean"] / cmt_total
    return cells, accounting, settings_rows


def score_redraws(cfg: CompareConfig, cells: list[dict[str, Any]], mid: dict[str, dict[str, Any]],
                  runs_dir: Path) -> dict[str, Any]:
    """Every cell's final exports and the mid-trained students scored on cfg.redraws fresh draws of the evaluation
    noise (jobs/fd_redraws.py, cached per run). Each cell gains `redraw_fd` (seeds × draws) and `redraw_improved`:
    whether every seed's mean over the draws is below the mid-trained student's mean over the same draws."""
    def score(export: Path) -> dict[str, list[float]]:
        print(f"[compare_inits] FD on {cfg.redraws} fresh evaluation draws: {export.parent.name}", flush=True)
        return fd_redraws(export, cfg.redraws, cfg.num_eval_samples, cfg.fd_dataset)

    students = {form: pooled_redraws([score(Path(stage["export"]))]) for form, stage in mid.items()}
    for cell in cells:
        exports = [RunDir(runs_dir / name).export for name in cell["runs"]]
        cell["redraw_fd"] = pooled_redraws([score(export) for export in exports])
        student = students[METHOD_FORMS[cell["method"]]]
        cell["redraw_improved"] = {f"{s}step": all(mean < student[f"fd_{s}step"]["mean"]
                                                   for mean in cell["redraw_fd"][f"fd_{s}step"]["seed_means"])
                                   for s in STEP_COUNTS}
    return {"draws": cfg.redraws, "num_samples": cfg.num_eval_samples, "cmt_students": students}


def run(cfg: CompareConfig) -> dict[str, Any]:
    """Run (or resume) the comparison; write the table, JSON, plot and settings log into cfg.out; return the JSON."""
    cfg = with_absolute_paths(cfg.validate())
    started = time.perf_counter()
    out = Path(cfg.out)
    runs_dir, log_dir = out / "runs", out / "logs"
    if not Path(cfg.teacher).exists():
        raise CompareError(
            f"teacher {cfg.teacher} does not exist: train it with `python trainer/pretrain.py --config "
            "jobs/digits/pretrain.yaml` or pass --teacher <a diffusers pipeline dir>"
        )
    generation = generation_cost(cfg, out)
    store_url = generation["url"]
    charges = Charges(float(generation["seconds"]), cfg.amortise_over,
                      baselines_read_store=post_data_argument(cfg, store_url).startswith("store:"))
    mid = run_mid_stages(cfg, store_url, runs_dir, log_dir)
    cells: list[dict[str, Any]] = []
    accounting: dict[str, Any] = {}
    settings_rows: list[dict[str, Any]] = []
    for method in cfg.methods:
        method_cells, accounting[method], rows = compare_method(
            cfg, method, mid[METHOD_FORMS[method]], charges, store_url=store_url, runs_dir=runs_dir, log_dir=log_dir)
        cells += method_cells
        settings_rows += rows
    result = {
        "config": dataclasses.asdict(cfg),
        "store": store_url,
        "accounting": {
            "generation_seconds": charges.generation, "generation_source": generation["source"],
            "amortise_over": cfg.amortise_over, "post_data": post_data_argument(cfg, store_url),
            "baselines_charged_for_generation": charges.baselines_read_store, "mid": mid, "methods": accounting,
            "equal_compute_by": "steps: each baseline's wall-clock budget (mean CMT charged seconds minus the "
                                "baseline's own pre-cost) converted with train_seconds = overhead + steps / rate, "
                                "fitted to the same method's CMT post-training runs by the invocation that first "
                                f"ran the method ({BUDGET_RECORD}: seeds added later keep that step count)"
                                + ("; then to each baseline's batch size at equal training samples"
                                   if cfg.batch_sizes else ""),
            "train_seconds": "trainer/loop.py train_seconds: optimizer steps only (evaluations, checkpoints and "
                             "process start-up excluded), for mid- and post-training alike",
        },
        "cells": cells,
        "fractions": compute_fractions(cells, cfg.amortise_over),
        "worse_than_init": [worse_entry(cell) for cell in cells if not all(cell["improved"].values())],
    }
    if cfg.redraws:
        result["redraws"] = score_redraws(cfg, cells, mid, runs_dir)
    result["wall_seconds"] = time.perf_counter() - started
    append_settings_log(out / SETTINGS_LOG, settings_rows)
    result["settings_tried"] = settings_tried(out / SETTINGS_LOG)
    result["files"] = write_outputs(result, out)
    write_text(str(out / JSON_NAME), json.dumps(json_ready(result), indent=2))
    return json_ready(result)


def describe(cfg: CompareConfig) -> dict[str, Any]:
    """What a run of cfg would do: the generation command, mid runs and post-training runs; trains nothing."""
    cfg = with_absolute_paths(cfg.validate())
    runs_dir = Path(cfg.out) / "runs"
    store_url = cfg.store or "<store of the generation command>"
    plans: list[dict[str, Any]] = []
    mids = {form: mid_plan(cfg, form, store_url, runs_dir) for form in sorted({METHOD_FORMS[m] for m in cfg.methods})}
    for plan in mids.values():
        plans.append({"run": plan.name, "command": ["trainer/mid.py", "--config", cfg.mid_preset, *plan.overrides]})
    for method in cfg.methods:
        export = RunDir(runs_dir / mids[METHOD_FORMS[method]].name).export
        for init in cfg.inits:
            steps = cfg.post_steps(method) if init == "cmt" else 0
            for seed in cfg.seeds:
                plan = post_plan(cfg, method, init, seed, max(steps, 1), store_url=store_url, cmt_export=export,
                                 runs_dir=runs_dir)
                decided = "<from the compute budget>" if init != "cmt" else None
                if cfg.batch_sizes:  # steps and batch come from the cell's sweep
                    decided = "<from the batch sweep>"
                overrides = [text if decided is None or "total_steps" not in text else
                             f"loop.total_steps={decided}" for text in plan.overrides]
                plans.append({"run": plan.name if decided is None else f"{method}-{init}-s{seed}-{decided}",
                              "command": ["trainer/post.py", "--config", cfg.post_preset, *overrides,
                                          *([f"batch_per_process={decided}"] if cfg.batch_sizes else [])]})
    sweep = ({"batch_sweep": f"each cell first trains one run per batch size {list(cfg.batch_sizes)} on seed "
                             f"{cfg.seeds[0]} at equal training samples; the runs above then train at the one with the "
                             "best final FD on the runs' draw and the --redraws fresh ones (jobs/compare_batch.py)"}
             if cfg.batch_sizes else {})
    return {"config": dataclasses.asdict(cfg),
            "generation": None if cfg.store else ["pipeline/generate.py", *generation_command(cfg)],
            "runs": plans, **sweep}


def _step_pairs(values: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """`ect=600 meanflow=150` → (("ect", 600), ("meanflow", 150))."""
    pairs = []
    for text in values:
        method, equals, steps = text.partition("=")
        if not equals or not steps.strip().isdigit():
            raise CompareError(f"--cmt-post-steps {text!r}: write METHOD=STEPS, e.g. ect=600 meanflow=150")
        pairs.append((method.strip(), int(steps)))
    return tuple(pairs)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: python jobs/compare_inits.py [--quick] [options]; prints the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny step counts, 1 seed (a few minutes)")
    parser.add_argument("--out", help=f"output directory (default {CompareConfig.out}; quick: {QUICK.out})")
    parser.add_argument("--teacher", help=f"teacher pipeline dir (default {CompareConfig.teacher})")
    parser.add_argument("--store", help="use this trajectory store (its generation cost is re-timed now)")
    parser.add_argument("--num-trajectories", type=int)
    parser.add_argument("--cache-root", help="trajectory cache root for generation")
    parser.add_argument("--methods", nargs="+", choices=list(METHOD_FORMS))
    parser.add_argument("--inits", nargs="+", choices=list(INITS))
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--mid-steps", type=int)
    parser.add_argument("--cmt-post-steps", nargs="+", metavar="METHOD=STEPS")
    parser.add_argument("--max-baseline-steps", type=int)
    parser.add_argument("--evals-per-run", type=int)
    parser.add_argument("--mid-evals", type=int,
                        help="FD evaluations along each mid-training run (default 4; 0: at its end only)")
    parser.add_argument("--num-eval-samples", type=int)
    parser.add_argument("--redraws", type=int,
                        help="score every final export and the mid-trained students on N fresh draws of the evaluation "
                             "noise, for the FD's spread over seeds and draws (default 5; quick 1; 0: off)")
    parser.add_argument("--post-data", help="dataset:<name> (default dataset:digits) or store (the store's endpoints)")
    parser.add_argument("--mid-preset")
    parser.add_argument("--post-preset")
    parser.add_argument("--amortise-over", type=int, help="N experiments sharing the store (default 10)")
    parser.add_argument("--threads", type=int, help="torch threads of every stage (default 1)")
    parser.add_argument("--launcher", choices=["subprocess", "inprocess"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SCOPE:KEY=VALUE",
                        help="override a trainer key for a scope (all, mid, mid/cm, mid/mf, post, ect, meanflow, "
                             "cmt, teacher, random, ect/cmt, ...); repeatable")
    parser.add_argument("--only", action="append", default=[], metavar="METHOD/INIT",
                        help="run only these cells (CMT cells of the method always run); repeatable")
    parser.add_argument("--batch-sizes", nargs="+", type=int, metavar="B",
                        help="candidate batch sizes: every cell trains at the one with the best final FD (the runs' "
                             "draw and the --redraws fresh ones) on its first seed, at equal training samples "
                             "(jobs/compare_batch.py); default: the post preset's")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else CompareConfig()
    fields = {
        "out": args.out, "teacher": args.teacher, "store": args.store, "num_trajectories": args.num_trajectories,
        "cache_root": args.cache_root, "methods": tuple(args.methods) if args.methods else None,
        "inits": tuple(args.inits) if args.inits else None, "seeds": tuple(args.seeds) if args.seeds else None,
        "mid_steps": args.mid_steps, "max_baseline_steps": args.max_baseline_steps,
        "evals_per_run": args.evals_per_run, "mid_evals": args.mid_evals, "num_eval_samples": args.num_eval_samples,
        "redraws": args.redraws,
        "post_data": args.post_data,
        "mid_preset": args.mid_preset, "post_preset": args.post_preset, "amortise_over": args.amortise_over,
        "threads": args.threads, "launcher": args.launcher,
        "batch_sizes": tuple(args.batch_sizes) if args.batch_sizes else None,
    }
    try:
        if args.cmt_post_steps:
            steps = {**dict(base.cmt_post_steps), **dict(_step_pairs(args.cmt_post_steps))}
            fields["cmt_post_steps"] = tuple(steps.items())
        cfg = dataclasses.replace(base, **{key: value for key, value in fields.items() if value is not None},
                                  overrides=base.overrides + tuple(args.overrides), only=tuple(args.only))
        if args.dry_run:
            print(json.dumps(describe(cfg), indent=2))
            return 0
        result = run(cfg)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(Path(result["files"]["markdown"]).read_text())
    print(f"outputs: {', '.join(result['files'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
