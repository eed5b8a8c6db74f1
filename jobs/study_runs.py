"""Stage runs of a study: plans (a run's directory name and overrides), launching them once, reading them back.

A run directory is named by a hash of its settings, so a re-run resumes or skips it (`execute`). Runs go through
`jobs/launcher.py`; their directories are read through `trainer/run_dir.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jobs.compare_config import BASELINES, STEP_COUNTS, STORE_TOKEN, CompareConfig, CompareError, user_overrides
from jobs.launcher import StageFailed, run_stage, run_training_in_process
from trainer.run_dir import RunDir

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def short_hash(payload: Any) -> str:
    """8 hex digits naming a run by its settings."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]


def preset_key(preset: str) -> str:
    """A preset as it enters a run's name: its path inside the project, so that another checkout of the same code
    finds the same finished runs; a preset outside the project by its absolute path."""
    path = Path(preset).resolve()
    try:
        return path.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)


def preset_settings(preset: str) -> Any:
    """A preset's settings as they enter a run's name (its parsed YAML: comments do not count), so that a finished run
    trained under a preset's old settings is not taken for one under its new ones; None for a file that does not
    exist (the stage then refuses it)."""
    import yaml

    path = Path(preset)
    return yaml.safe_load(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class RunPlan:
    """One stage run: its directory name, stage, cell and the overrides passed to trainer/<stage>.py."""

    name: str
    stage: Literal["mid", "post"]
    overrides: tuple[str, ...]
    total_steps: int
    method: str | None = None
    init: str | None = None
    seed: int | None = None
    form: str | None = None
    user_overrides: tuple[str, ...] = ()
    builtin_overrides: tuple[str, ...] = ()


def _eval_every(total_steps: int, evals: int) -> int:
    """Steps between FD evaluations so that a run has about `evals` of them (the last step always has one)."""
    return max(1, math.ceil(total_steps / evals))


def mid_plan(cfg: CompareConfig, form: str, store_url: str, runs_dir: Path, seed: int = 0) -> RunPlan:
    """The mid-training run of `form` (cm for ECT/ECD, mf for MeanFlow) on the comparison's store, with training seed
    `seed` (0, the trainer's default, is left out of the settings so that runs named before seeds keep their names)."""
    def settings(eval_every: int) -> list[str]:
        return [f"teacher={cfg.teacher}", f"stores=[{store_url}]", f"form={form}",
                f"loop.total_steps={cfg.mid_steps}", f"loop.torch_threads={cfg.threads}", "eval_at_init=false",
                f"loop.eval_every_steps={eval_every}", "loop.checkpoint_every_steps=0", "loop.keep_checkpoints=1",
                f"num_eval_samples={cfg.num_eval_samples}", "compute_fd=true", f"fd_dataset={cfg.fd_dataset}",
                *([f"loop.seed={seed}"] if seed else [])]

    chosen = user_overrides(cfg, "mid", form=form)
    # Named without its evaluation cadence (hashed as 0, the cadence runs were named with before mid_evals):
    # evaluations leave the training streams alone (tests/test_mid.py), so the cadence does not change the run.
    digest = short_hash([preset_key(cfg.mid_preset), preset_settings(cfg.mid_preset), settings(0), chosen])
    name = f"mid-{form}-{digest}"
    every = _eval_every(cfg.mid_steps, cfg.mid_evals) if cfg.mid_evals else 0
    overrides = (*settings(every), *chosen, f"loop.output_dir={runs_dir / name}")
    return RunPlan(name, "mid", overrides, cfg.mid_steps, form=form, seed=seed, user_overrides=tuple(chosen))


def post_data_argument(cfg: CompareConfig, store_url: str) -> str:
    """The post-training data argument (the token `store` becomes this comparison's store)."""
    return f"store:{store_url}" if cfg.post_data == STORE_TOKEN else cfg.post_data


def builtin_post_overrides(method: str, init: str, total_steps: int) -> list[str]:
    """Per-cell defaults: ECT's doubling Δt schedule and MeanFlow's own settings for baselines, 25 % of pairs with
    r ≠ t and the JVP derivative (the preset's 100 % and secant derivative are for a CMT student); a warming-up EMA for
    random inits (a constant decay from step 0, the preset's choice for pretrained inits, would keep the random weights
    in the average)."""
    settings = []
    if method == "ect" and init in BASELINES:
        settings += ["ect.q_mode=doubling", "ect.q_start=2", f"ect.double_every_steps={max(1, total_steps // 11)}"]
    if method == "meanflow" and init in BASELINES:
        settings += ["meanflow.fraction_r_neq_t=0.25", "meanflow.derivative=auto"]
    if init == "random":
        settings += ["loop.ema_constant=false", "loop.ema_warmup=true"]
    return settings


def post_plan(cfg: CompareConfig, method: str, init: str, seed: int, total_steps: int, *, store_url: str,
              cmt_export: Path | None, runs_dir: Path, batch: int | None = None) -> RunPlan:
    """One post-training run of (method, init, seed) for `total_steps` steps, at batch size `batch` (None: the
    preset's, left out of the settings so that runs named before batch sweeps keep their names)."""
    init_arg = f"cmt:{cmt_export}" if init == "cmt" else init
    every = _eval_every(total_steps, cfg.evals_per_run)
    settings = [f"method={method}", f"init={init_arg}", f"teacher={cfg.teacher}",
                f"data={post_data_argument(cfg, store_url)}",
                f"loop.seed={seed}", f"loop.total_steps={total_steps}", f"loop.eval_every_steps={every}",
                f"loop.log_every_steps={every}", "loop.checkpoint_every_steps=0", "loop.keep_checkpoints=1",
                f"loop.torch_threads={cfg.threads}", "eval_at_init=true", f"num_eval_samples={cfg.num_eval_samples}",
                "compute_fd=true", f"fd_dataset={cfg.fd_dataset}"]
    builtin = [*builtin_post_overrides(method, init, total_steps), *([f"batch_per_process={batch}"] if batch else [])]
    chosen = [f"data=store:{store_url}" if text.replace(" ", "") == f"data={STORE_TOKEN}" else text
              for text in user_overrides(cfg, "post", method=method, init=init)]
    digest = short_hash([preset_key(cfg.post_preset), preset_settings(cfg.post_preset), settings, builtin, chosen])
    name = f"{method}-{init}-s{seed}-{digest}"
    overrides = (*settings, *builtin, *chosen, f"loop.output_dir={runs_dir / name}")
    return RunPlan(name, "post", overrides, total_steps, method=method, init=init, seed=seed,
                   user_overrides=tuple(chosen), builtin_overrides=tuple(builtin))


def reads_store(plan: RunPlan) -> bool:
    """Whether a post-training run reads a trajectory store (its last `data=` setting wins), so it is charged G."""
    data = [text for text in plan.overrides if text.startswith("data=")]
    return bool(data) and data[-1].startswith("data=store:")


def execute(cfg: CompareConfig, plan: RunPlan, runs_dir: Path, log_dir: Path) -> Path:
    """Run a plan unless it already finished; its run directory."""
    run_dir = runs_dir / plan.name
    if not RunDir(run_dir).finished(plan.total_steps):
        preset = cfg.mid_preset if plan.stage == "mid" else cfg.post_preset
        print(f"[compare_inits] {plan.name}: {plan.total_steps} steps", flush=True)
        launch_training(plan.stage, preset, plan.overrides, log_dir / f"{plan.name}.log", cfg.launcher)
    return run_dir


def read_post_run(run_dir: Path) -> dict[str, Any]:
    """A post-training run's FD before training (init_eval.json) and at every evaluation (step, train_seconds)."""
    run = RunDir(run_dir)
    initial = run.read_init_eval()
    if initial is None:
        raise CompareError(f"{run.init_eval} is missing: the run was started without eval_at_init; delete {run_dir}")
    points = run.read_evaluations()
    for record in points:
        if "train_seconds" not in record:
            raise CompareError(f"{run_dir}/metrics.jsonl: evaluation at step {record['step']} has no train_seconds; "
                               "its log and eval steps differ: delete the run directory and re-run")
    points.sort(key=lambda record: record["step"])
    return {
        "init_fd": {steps: float(initial[f"fd_{steps}step"]) for steps in STEP_COUNTS},
        "steps": [int(record["step"]) for record in points],
        "train_seconds": [float(record["train_seconds"]) for record in points],
        "fd": {steps: [float(record[f"fd_{steps}step"]) for record in points] for steps in STEP_COUNTS},
    }


def launch_training(kind: Literal["mid", "post"], preset: str, overrides: Sequence[str], log_path: Path,
                    launcher: str) -> None:
    """Run trainer/<kind>.py with a preset and overrides (jobs/launcher.py: a subprocess logging to `log_path`, or
    this process); a failure is a CompareError that ends with the run's last log lines."""
    try:
        if launcher == "inprocess":
            run_training_in_process(kind, preset, overrides, log_path)
        else:
            run_stage(kind, ["--config", preset, *overrides], log_path=log_path)
    except StageFailed as error:
        raise CompareError(str(error)) from error


def final_train_seconds(run_dir: Path) -> float:
    """Cumulative optimizer-step seconds at a run's last logged step."""
    seconds = RunDir(run_dir).last_train_seconds()
    if seconds is None:
        raise CompareError(f"{RunDir(run_dir).metrics} has no train_seconds: the run did not finish; re-run")
    return seconds
