"""CMT's central claim at small scale: post-training from the CMT student vs from the diffusion model vs from scratch.

    python jobs/compare_inits.py [--quick] [--out DIR] [--teacher DIR] [--store URL] [--seeds 0 1 2]
        [--methods ect meanflow] [--inits cmt teacher random] [--set SCOPE:key=value ...] [--only METHOD/INIT ...]
        [--amortise-over N] [--dry-run]

Runs, for every method (ECT, MeanFlow; ECD on request) and every seed, post-training (`trainer/post.py`) from
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
- Amortised: the store reused by N experiments (--amortise-over) charges G/N per CMT run.
- Equal compute by steps: the CMT post-training runs go first (`cmt_post_steps` per method). A line
  train_seconds = overhead + steps / rate fitted to their evaluation points (all seeds; the overhead is the slower
  first steps) converts each baseline's budget, mean CMT charged total minus the baseline's own pre-cost, into a
  step count. Baseline and CMT steps cost the same (same network, loss and batch), so both get the same
  wall clock; the curves and tables use the seconds each run actually logged, and each cell's `charged_over_cmt`
  reports the achieved ratio to the CMT pipeline's charged total.

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
baseline's final FD, the accounting), settings_log.jsonl, generation.json, runs/ (one directory per stage run)
and logs/ (one log per subprocess).

Every stage runs as its own subprocess (`trainer/mid.py`, `trainer/post.py`; accelerate's state is per process);
`--launcher inprocess` runs them in this process instead (what the smoke test does, to skip interpreter start-up).
`--quick` (1 seed, tens of steps, 200 FD samples, ECT and MeanFlow) takes ~3 min on the shared 2-core machine.
The default preset (ECT, MeanFlow and ECD, 3 seeds: 27 post-training runs, 1 torch thread each) ran as
`--methods ect` / `--methods ecd` / `--methods meanflow` invocations two at a time on the 2-core machine in about
65 min of wall clock (2026-11-22; results and the settings tried are in README.md, "Studies"); one invocation
running them one after another: ~1.5 h (the sum of the three invocations' wall times, an estimate).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METHOD_FORMS = {"ect": "cm", "ecd": "cm", "meanflow": "mf"}  # the mid-training form each method starts from
INITS = ("cmt", "teacher", "random")
BASELINES = ("teacher", "random")
INIT_LABELS = {"cmt": "CMT", "teacher": "diffusion", "random": "random"}
METHOD_LABELS = {"ect": "ECT", "ecd": "ECD", "meanflow": "MeanFlow"}
STEP_COUNTS = (1, 2)
MARKDOWN_NAME = "compare_inits.md"
JSON_NAME = "compare_inits.json"
PLOT_NAME = "compare_inits.png"
SETTINGS_LOG = "settings_log.jsonl"
GENERATION_RECORD = "generation.json"
STORE_TOKEN = "store"  # `data=store` in a --set: this comparison's trajectory store
RESERVED_KEYS = {
    "output_dir": "the driver names run directories itself (--out)",
    "method": "use --methods",
    "init": "use --inits",
    "seed": "use --seeds",
    "total_steps": "use --mid-steps / --cmt-post-steps (baseline steps follow from the compute budget)",
}

__all__ = [
    "QUICK",
    "CompareConfig",
    "CompareError",
    "describe",
    "first_crossing",
    "main",
    "parse_scoped_override",
    "run",
]


class CompareError(ValueError):
    """A comparison that cannot run as asked; the message names the problem and the fix."""


# ------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class CompareConfig:
    """Settings of the comparison (defaults: the digits study in README.md "Studies", ~1.5 h run one after another on
    2 CPU cores with 1 torch thread)."""

    out: str = "runs/compare_inits"
    teacher: str = "runs/digits/pretrain/export"
    store: str | None = None  # an existing trajectory store; None: pipeline.generate (a cache hit when it exists)
    num_trajectories: int = 4096  # generation spec (used when store is None)
    solver: str = "dpmpp-3m"
    solver_steps: int = 16
    grid: str = "logsnr"
    generation_workers: int = 1
    cache_root: str | None = None  # trajectory cache root (None: pipeline.generate's default)
    generation_probe_trajectories: int = 256  # re-solved to time a store made earlier
    mid_preset: str = "jobs/digits/mid.yaml"
    post_preset: str = "jobs/digits/post.yaml"
    post_data: str = "dataset:digits"  # post-training data of every run; "store" = the trajectory store's endpoints
    methods: tuple[str, ...] = ("ect", "meanflow", "ecd")
    inits: tuple[str, ...] = INITS
    seeds: tuple[int, ...] = (0, 1, 2)
    mid_steps: int = 800
    cmt_post_steps: tuple[tuple[str, int], ...] = (("ect", 600), ("ecd", 600), ("meanflow", 150))
    max_baseline_steps: int | None = None  # safety cap on a baseline's step count (the shortfall is reported)
    evals_per_run: int = 5  # FD evaluations along each post-training run (plus the init's)
    num_eval_samples: int = 1000
    fd_dataset: str = "digits"
    amortise_over: int = 10  # N experiments sharing the store: the amortised figures charge G/N
    threads: int = 1  # torch threads of every stage
    launcher: Literal["subprocess", "inprocess"] = "subprocess"  # one process per run (safe) or this process
    # "SCOPE:key=value" (see the module docstring). Defaults: ECT samples t with ln t ~ N(1.0, 2²) instead of
    # ECT's −1.1 (0.3 % of t reach the 1-step sampler's σ̃ = 80 at −1.1; README "Studies"); ECD reads the store.
    overrides: tuple[str, ...] = ("ect:ect.p_mean=1.0", "ecd:data=store")
    only: tuple[str, ...] = ()  # "method/init" cells to run (empty: all); CMT cells of a method always run

    def post_steps(self, method: str) -> int:
        """Post-training steps of the CMT run of `method`."""
        steps = dict(self.cmt_post_steps)
        if method not in steps:
            raise CompareError(f"cmt_post_steps has no entry for {method}: pass --cmt-post-steps {method}=STEPS")
        return int(steps[method])

    def validate(self) -> CompareConfig:
        """Raise CompareError naming the first bad field and its fix; return self."""
        if not self.methods or any(method not in METHOD_FORMS for method in self.methods):
            raise CompareError(f"methods={self.methods}: choose from {', '.join(METHOD_FORMS)}")
        if not self.inits or any(init not in INITS for init in self.inits):
            raise CompareError(f"inits={self.inits}: choose from {', '.join(INITS)}")
        if "cmt" not in self.inits:
            raise CompareError(
                "inits must include cmt: every baseline's budget is the CMT pipeline's compute (generation + "
                "mid-training + CMT post-training); pass --inits cmt teacher random"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CompareError(f"seeds={self.seeds}: pass distinct seeds, e.g. --seeds 0 1 2")
        for name in ("num_trajectories", "solver_steps", "generation_workers", "generation_probe_trajectories",
                     "mid_steps", "evals_per_run", "num_eval_samples", "amortise_over", "threads"):
            if getattr(self, name) < 1:
                raise CompareError(f"{name}={getattr(self, name)}: pass a value >= 1")
        for method in self.methods:
            if self.post_steps(method) < 1:
                raise CompareError(f"cmt_post_steps {method}={self.post_steps(method)}: pass a value >= 1")
        if self.max_baseline_steps is not None and self.max_baseline_steps < 1:
            raise CompareError(f"max_baseline_steps={self.max_baseline_steps}: pass >= 1 or leave it unset")
        if self.launcher not in ("subprocess", "inprocess"):
            raise CompareError(f"launcher={self.launcher!r}: choose subprocess or inprocess")
        if not (self.post_data == STORE_TOKEN or self.post_data.startswith(("dataset:", "store:"))):
            raise CompareError(
                f"post_data={self.post_data!r}: write dataset:<name> (real images), store (this comparison's "
                "trajectory store) or store:<url>"
            )
        for text in self.overrides:
            parse_scoped_override(text)
        for cell in self.only:
            method, _, init = cell.partition("/")
            if method not in self.methods or init not in self.inits:
                raise CompareError(
                    f"only={cell!r}: write METHOD/INIT with a method of {self.methods} and an init of {self.inits}"
                )
        return self


QUICK = CompareConfig(
    out="runs/compare_inits_quick",
    methods=("ect", "meanflow"),
    num_trajectories=256,
    generation_probe_trajectories=64,
    seeds=(0,),
    mid_steps=40,
    cmt_post_steps=(("ect", 20), ("ecd", 20), ("meanflow", 6)),
    max_baseline_steps=400,
    evals_per_run=2,
    num_eval_samples=200,
)


def _absolute(path: str) -> str:
    """A local path made absolute (relative to the working directory, else to the project root); URLs unchanged."""
    if "://" in path:
        return path
    for candidate in (Path(path), REPO / path):
        if candidate.exists():
            return str(candidate.resolve())
    return str(Path(path).resolve())


def with_absolute_paths(cfg: CompareConfig) -> CompareConfig:
    """cfg with its local paths absolute: stage subprocesses run in the project root."""
    return dataclasses.replace(
        cfg, out=str(Path(cfg.out).resolve()), teacher=_absolute(cfg.teacher),
        store=None if cfg.store is None else _absolute(cfg.store),
        cache_root=None if cfg.cache_root is None else _absolute(cfg.cache_root),
        mid_preset=_absolute(cfg.mid_preset), post_preset=_absolute(cfg.post_preset),
    )


# ------------------------------------------------------------------------------------------------------------
# Scoped overrides


SCOPES = ("all", "mid", "mid/cm", "mid/mf", "post", *METHOD_FORMS, *INITS,
          *(f"{method}/{init}" for method in METHOD_FORMS for init in INITS))


def parse_scoped_override(text: str) -> tuple[str, str]:
    """`SCOPE:key=value` → (scope, `key=value`); without a scope the override applies to every post-training run."""
    head, separator, rest = text.partition(":")
    if separator and "=" not in head:
        scope, override = head.strip(), rest.strip()
        if scope not in SCOPES:
            raise CompareError(f"--set {text!r}: unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    else:
        scope, override = "post", text.strip()
    key, equals, _ = override.partition("=")
    if not equals or not key.strip("- "):
        raise CompareError(f"--set {text!r}: write SCOPE:key=value, e.g. ect/cmt:loop.lr=1e-4")
    leaf = key.strip().lstrip("-").replace("-", "_").rsplit(".", 1)[-1]
    if leaf in RESERVED_KEYS:
        raise CompareError(f"--set {text!r}: {leaf} is set by the driver ({RESERVED_KEYS[leaf]})")
    return scope, override


def scope_matches(scope: str, stage: str, *, form: str | None = None, method: str | None = None,
                  init: str | None = None) -> bool:
    """Whether an override of `scope` applies to a mid run of `form` or a post run of (`method`, `init`)."""
    if scope == "all":
        return True
    if stage == "mid":
        return scope == "mid" or scope == f"mid/{form}"
    return scope in ("post", method, init, f"{method}/{init}")


def user_overrides(cfg: CompareConfig, stage: str, **where: str | None) -> list[str]:
    """The --set overrides that apply to one run, in the order given."""
    chosen = []
    for text in cfg.overrides:
        scope, override = parse_scoped_override(text)
        if scope_matches(scope, stage, **where):
            chosen.append(override)
    return chosen


# ------------------------------------------------------------------------------------------------------------
# Launching stages


def _short_hash(payload: Any) -> str:
    """8 hex digits naming a run by its settings."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]


def _tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def launch_training(kind: Literal["mid", "post"], preset: str, overrides: Sequence[str], log_path: Path,
                    launcher: str) -> None:
    """Run trainer/<kind>.py with a preset and overrides: as a subprocess (log to `log_path`) or in this process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if launcher == "inprocess":
        from trainer.config import ConfigError, load_config

        if kind == "mid":
            from trainer.mid import MidConfig as Config
            from trainer.mid import run as stage_run
        else:
            from trainer.post import PostConfig as Config
            from trainer.post import run as stage_run
        try:
            stage_run(load_config(Config, preset, list(overrides)))
        except ConfigError as error:
            raise CompareError(f"trainer/{kind}.py refused the settings {list(overrides)}: {error}") from error
        log_path.write_text(f"in-process trainer/{kind}.py --config {preset} {' '.join(overrides)}\n")
        return
    command = [sys.executable, str(REPO / "trainer" / f"{kind}.py"), "--config", preset, *overrides]
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if status != 0:
        raise CompareError(f"trainer/{kind}.py failed (exit {status}); last lines of {log_path}:\n{_tail(log_path)}")


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished(run_dir: Path, total_steps: int) -> bool:
    """A run that reached its last step and exported (re-launching it would only re-export)."""
    records = _metrics(run_dir)
    return (run_dir / "export").is_dir() and any(record.get("step") == total_steps for record in records)


def _final_train_seconds(run_dir: Path) -> float:
    """Cumulative optimizer-step seconds at a run's last logged step."""
    timed = [record for record in _metrics(run_dir) if "train_seconds" in record]
    if not timed:
        raise CompareError(f"{run_dir}/metrics.jsonl has no train_seconds: the run did not finish; re-run")
    return float(max(timed, key=lambda record: record["step"])["train_seconds"])


# ------------------------------------------------------------------------------------------------------------
# Stage 2 data: the store and what it cost


def _generation_command(cfg: CompareConfig) -> list[str]:
    """pipeline/generate.py for the comparison's store spec."""
    command = [sys.executable, str(REPO / "pipeline" / "generate.py"), "--teacher", cfg.teacher,
               "--num-trajectories", str(cfg.num_trajectories), "--steps", str(cfg.solver_steps),
               "--solver", cfg.solver, "--grid", cfg.grid, "--num-workers", str(cfg.generation_workers),
               "--cpus-per-worker", str(cfg.threads), "--no-progress"]
    return command + (["--cache-root", cfg.cache_root] if cfg.cache_root else [])


def make_store(cfg: CompareConfig, log_dir: Path) -> dict[str, Any]:
    """Generate the store (or find it cached); {url, cache_hit, seconds} with the job's own wall time."""
    if cfg.store is not None:
        return {"url": cfg.store, "cache_hit": True, "seconds": None}
    if cfg.launcher == "inprocess":
        from pipeline.generate import GenerateConfig, GenerateError
        from pipeline.generate import run as generate

        try:
            result = generate(GenerateConfig(
                teacher=cfg.teacher, num_trajectories=cfg.num_trajectories, steps=cfg.solver_steps,
                solver=cfg.solver, grid=cfg.grid, num_workers=cfg.generation_workers, cpus_per_worker=cfg.threads,
                cache_root=cfg.cache_root, progress=False))
        except GenerateError as error:
            raise CompareError(f"trajectory generation failed: {error}") from error
        return {"url": result.url, "cache_hit": result.cache_hit, "seconds": result.seconds}
    from pipeline.generate import SUMMARY_PREFIX

    log_path = log_dir / "generate.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = _generation_command(cfg)
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    log_path.write_text("$ " + " ".join(command) + "\n" + completed.stdout + completed.stderr)
    summaries = [line[len(SUMMARY_PREFIX):] for line in completed.stdout.splitlines()
                 if line.startswith(SUMMARY_PREFIX)]
    if completed.returncode != 0 or not summaries:
        raise CompareError(f"pipeline/generate.py failed (exit {completed.returncode}); see {log_path}:\n"
                           f"{_tail(log_path)}")
    summary = json.loads(summaries[-1])
    return {"url": summary["url"], "cache_hit": bool(summary["cache_hit"]), "seconds": float(summary["seconds"])}


def time_generation(teacher_dir: str, url: str, num_probe: int, threads: int) -> dict[str, Any]:
    """Seconds to generate the store at `url`, estimated now: re-solve `num_probe` of its trajectories, scale to N."""
    import torch

    from pipeline.generate import labels_for
    from pipeline.solvers import solve
    from pipeline.teacher import load_teacher
    from storage_schema import open_store

    spec = open_store(url).spec
    teacher = load_teacher(teacher_dir)
    if teacher.fingerprint != spec.teacher_fingerprint:
        raise CompareError(
            f"store {url} was made by teacher {spec.teacher_fingerprint[:12]}…, not by --teacher {teacher_dir} "
            f"({teacher.fingerprint[:12]}…): pass the teacher that made it, or drop --store to generate one"
        )
    grid = dict(spec.grid_params)
    count = min(num_probe, spec.num_trajectories)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)

    def solve_range(start: int, stop: int) -> None:
        """Solve trajectories [start, stop) of the store's spec (labels as generation assigns them)."""
        indices = np.arange(start, stop)
        labels = labels_for(indices, spec.label_plan, spec.num_classes, spec.seed_base)
        with torch.no_grad():
            solve(teacher, [int(i) + spec.seed_base for i in indices], steps=spec.steps, solver=spec.solver,
                  grid=spec.grid, sigma_max=grid.get("sigma_max"), sigma_min=grid.get("sigma_min"),
                  labels=None if labels is None else torch.as_tensor(labels), guidance_scale=spec.guidance_scale)

    try:
        solve_range(0, min(2, count))  # warm-up (allocator, kernels), not timed
        started = time.perf_counter()
        for start in range(0, count, 256):
            solve_range(start, min(start + 256, count))
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
    return {"seconds": seconds * spec.num_trajectories / count, "num_trajectories": spec.num_trajectories,
            "source": f"estimated: {count} of {spec.num_trajectories} trajectories re-solved in this invocation "
                      f"({threads} thread(s)), scaled linearly; Ray start-up and writes not included"}


def generation_cost(cfg: CompareConfig, out: Path) -> dict[str, Any]:
    """The store's URL and generation seconds G: measured now, recorded earlier in <out>/generation.json, or probed."""
    made = make_store(cfg, out / "logs")
    record_path = out / GENERATION_RECORD
    records = json.loads(record_path.read_text()) if record_path.exists() else {}
    if not made["cache_hit"]:
        from storage_schema import open_store

        entry = {"seconds": made["seconds"], "num_trajectories": open_store(made["url"]).spec.num_trajectories,
                 "source": "measured: pipeline.generate.run wall time in the invocation that made the store "
                           "(Ray start-up, solving, compression, writes, validation)"}
    elif made["url"] in records:
        entry = records[made["url"]]
    else:
        entry = time_generation(cfg.teacher, made["url"], cfg.generation_probe_trajectories, cfg.threads)
    entry = {**entry, "url": made["url"], "recorded_at": entry.get("recorded_at", time.strftime("%Y-%m-%d %H:%M:%S"))}
    records[made["url"]] = entry
    out.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(records, indent=2))
    return entry


# ------------------------------------------------------------------------------------------------------------
# Run plans


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


def mid_plan(cfg: CompareConfig, form: str, store_url: str, runs_dir: Path) -> RunPlan:
    """The mid-training run of `form` (cm for ECT/ECD, mf for MeanFlow) on the comparison's store."""
    settings = [f"teacher={cfg.teacher}", f"stores=[{store_url}]", f"form={form}",
                f"loop.total_steps={cfg.mid_steps}", f"loop.torch_threads={cfg.threads}", "eval_at_init=false",
                "loop.eval_every_steps=0", "loop.checkpoint_every_steps=0", "loop.keep_checkpoints=1",
                f"num_eval_samples={cfg.num_eval_samples}", "compute_fd=true", f"fd_dataset={cfg.fd_dataset}"]
    chosen = user_overrides(cfg, "mid", form=form)
    name = f"mid-{form}-{_short_hash([cfg.mid_preset, settings, chosen])}"
    overrides = (*settings, *chosen, f"loop.output_dir={runs_dir / name}")
    return RunPlan(name, "mid", overrides, cfg.mid_steps, form=form, user_overrides=tuple(chosen))


def _post_data(cfg: CompareConfig, store_url: str) -> str:
    """The post-training data argument (the token `store` becomes this comparison's store)."""
    return f"store:{store_url}" if cfg.post_data == STORE_TOKEN else cfg.post_data


def builtin_post_overrides(method: str, init: str, total_steps: int) -> list[str]:
    """Per-cell defaults: ECT's doubling Δt schedule for baselines; a warming-up EMA for random inits (a constant
    decay from step 0, the preset's choice for pretrained inits, would keep the random weights in the average)."""
    settings = []
    if method == "ect" and init in BASELINES:
        settings += ["ect.q_mode=doubling", "ect.q_start=2", f"ect.double_every_steps={max(1, total_steps // 11)}"]
    if init == "random":
        settings += ["loop.ema_constant=false", "loop.ema_warmup=true"]
    return settings


def post_plan(cfg: CompareConfig, method: str, init: str, seed: int, total_steps: int, *, store_url: str,
              cmt_export: Path | None, runs_dir: Path) -> RunPlan:
    """One post-training run of (method, init, seed) for `total_steps` steps."""
    init_arg = f"cmt:{cmt_export}" if init == "cmt" else init
    every = _eval_every(total_steps, cfg.evals_per_run)
    settings = [f"method={method}", f"init={init_arg}", f"teacher={cfg.teacher}", f"data={_post_data(cfg, store_url)}",
                f"loop.seed={seed}", f"loop.total_steps={total_steps}", f"loop.eval_every_steps={every}",
                f"loop.log_every_steps={every}", "loop.checkpoint_every_steps=0", "loop.keep_checkpoints=1",
                f"loop.torch_threads={cfg.threads}", "eval_at_init=true", f"num_eval_samples={cfg.num_eval_samples}",
                "compute_fd=true", f"fd_dataset={cfg.fd_dataset}"]
    builtin = builtin_post_overrides(method, init, total_steps)
    chosen = [f"data=store:{store_url}" if text.replace(" ", "") == f"data={STORE_TOKEN}" else text
              for text in user_overrides(cfg, "post", method=method, init=init)]
    name = f"{method}-{init}-s{seed}-{_short_hash([cfg.post_preset, settings, builtin, chosen])}"
    overrides = (*settings, *builtin, *chosen, f"loop.output_dir={runs_dir / name}")
    return RunPlan(name, "post", overrides, total_steps, method=method, init=init, seed=seed,
                   user_overrides=tuple(chosen), builtin_overrides=tuple(builtin))


def execute(cfg: CompareConfig, plan: RunPlan, runs_dir: Path, log_dir: Path) -> Path:
    """Run a plan unless it already finished; its run directory."""
    run_dir = runs_dir / plan.name
    if not _finished(run_dir, plan.total_steps):
        preset = cfg.mid_preset if plan.stage == "mid" else cfg.post_preset
        print(f"[compare_inits] {plan.name}: {plan.total_steps} steps", flush=True)
        launch_training(plan.stage, preset, plan.overrides, log_dir / f"{plan.name}.log", cfg.launcher)
    return run_dir


# ------------------------------------------------------------------------------------------------------------
# Reading runs and summarising


def read_post_run(run_dir: Path) -> dict[str, Any]:
    """A post-training run's FD before training (init_eval.json) and at every evaluation (step, train_seconds)."""
    init_path = run_dir / "init_eval.json"
    if not init_path.exists():
        raise CompareError(f"{init_path} is missing: the run was started without eval_at_init; delete {run_dir}")
    initial = json.loads(init_path.read_text())
    points = [record for record in _metrics(run_dir) if "fd_1step" in record]
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


def first_crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """Smallest x at which the piecewise-linear curve (xs, ys) reaches ys <= target; None if it never does."""
    if ys[0] <= target:
        return float(xs[0])
    for index in range(1, len(xs)):
        if ys[index] <= target:
            x0, y0, x1, y1 = xs[index - 1], ys[index - 1], xs[index], ys[index]
            return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))
    return None


def _mean_std(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None with one value)."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else None,
            "n": int(array.size)}


def summarise_cell(runs: Sequence[dict[str, Any]], pre_seconds: float, pre_seconds_amortised: float) -> dict[str, Any]:
    """Curves (charged seconds, FD; mean ± std over seeds, init point first) and final scores of one cell."""
    length = min(len(run["steps"]) for run in runs)
    x = np.array([[0.0, *run["train_seconds"][:length]] for run in runs])  # [seeds, 1 + evals]
    curve: dict[str, Any] = {
        "steps": [0, *runs[0]["steps"][:length]],
        "charged_seconds": (pre_seconds + x.mean(axis=0)).tolist(),
        "charged_seconds_amortised": (pre_seconds_amortised + x.mean(axis=0)).tolist(),
    }
    finals, initial = {}, {}
    for steps in STEP_COUNTS:
        y = np.array([[run["init_fd"][steps], *run["fd"][steps][:length]] for run in runs])  # [seeds, 1 + evals]
        curve[f"fd_{steps}step_mean"] = y.mean(axis=0).tolist()
        curve[f"fd_{steps}step_std"] = (y.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(y.shape[1])).tolist()
        finals[steps] = _mean_std(y[:, -1])
        initial[steps] = _mean_std(y[:, 0])
    charged = pre_seconds + x[:, -1]
    return {"curve": curve, "final_fd": finals, "init_fd": initial, "charged_seconds": _mean_std(charged),
            "charged_seconds_amortised": _mean_std(pre_seconds_amortised + x[:, -1]),
            "post_train_seconds": _mean_std(x[:, -1]), "post_steps": int(runs[0]["steps"][length - 1])}


# ------------------------------------------------------------------------------------------------------------
# The comparison


@dataclass(frozen=True)
class Charges:
    """Seconds charged before a run's own post-training: CMT runs (G + mid) and baselines (G if they read the store)."""

    generation: float
    amortise_over: int
    baselines_read_store: bool

    def before_post(self, init: str, mid_seconds: float, *, amortised: bool = False) -> float:
        """Pre-cost of a run of `init` whose CMT pipeline mid-trained for `mid_seconds`."""
        generation = self.generation / self.amortise_over if amortised else self.generation
        if init == "cmt":
            return generation + mid_seconds
        return generation if self.baselines_read_store else 0.0


def run_mid_stages(cfg: CompareConfig, store_url: str, runs_dir: Path, log_dir: Path) -> dict[str, dict[str, Any]]:
    """Mid-train once per form the methods need (cm: ECT/ECD, mf: MeanFlow); {form: run, export, seconds, ...}."""
    mid: dict[str, dict[str, Any]] = {}
    for form in sorted({METHOD_FORMS[method] for method in cfg.methods}):
        plan = mid_plan(cfg, form, store_url, runs_dir)
        run_dir = execute(cfg, plan, runs_dir, log_dir)
        final = [record for record in _metrics(run_dir) if "fd_1step" in record]
        mid[form] = {"run": plan.name, "export": str(run_dir / "export"), "steps": cfg.mid_steps,
                     "seconds": _final_train_seconds(run_dir), "overrides": list(plan.user_overrides),
                     "fd_at_end": ({f"{steps}step": final[-1][f"fd_{steps}step"] for steps in STEP_COUNTS}
                                   if final else None)}
    return mid


def step_time_fit(runs: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(steps/s, first-steps overhead in s) of train_seconds = overhead + steps / rate, least squares over every
    evaluation point of `runs`; with a single step count, rate = steps / seconds and no overhead."""
    steps = np.concatenate([run_["steps"] for run_ in runs]).astype(np.float64)
    seconds = np.concatenate([run_["train_seconds"] for run_ in runs])
    if len(np.unique(steps)) >= 2:
        slope, intercept = np.polyfit(steps, seconds, 1)
        if slope > 0:
            return float(1.0 / slope), float(max(intercept, 0.0))
    last = [(run_["steps"][-1], run_["train_seconds"][-1]) for run_ in runs]
    return sum(s for s, _ in last) / sum(t for _, t in last), 0.0


def reads_store(plan: RunPlan) -> bool:
    """Whether a post-training run reads a trajectory store (its last `data=` setting wins), so it is charged G."""
    data = [text for text in plan.overrides if text.startswith("data=")]
    return bool(data) and data[-1].startswith("data=store:")


def compare_method(cfg: CompareConfig, method: str, mid: dict[str, Any], charges: Charges, *, store_url: str,
                   runs_dir: Path, log_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """The CMT runs of `method`, then its baselines at equal compute; (cells, accounting, settings-log rows)."""
    steps = cfg.post_steps(method)
    cmt_plans = [post_plan(cfg, method, "cmt", seed, steps, store_url=store_url, cmt_export=Path(mid["export"]),
                           runs_dir=runs_dir) for seed in cfg.seeds]
    cmt_runs = [read_post_run(execute(cfg, plan, runs_dir, log_dir)) for plan in cmt_plans]
    baseline_probe = post_plan(cfg, method, "teacher", cfg.seeds[0], 1, store_url=store_url, cmt_export=None,
                               runs_dir=runs_dir)
    charges = dataclasses.replace(charges, baselines_read_store=reads_store(baseline_probe))  # e.g. ecd:data=store
    cmt_seconds = [run_["train_seconds"][-1] for run_ in cmt_runs]
    rate, startup = step_time_fit(cmt_runs)
    cmt_total = charges.before_post("cmt", mid["seconds"]) + float(np.mean(cmt_seconds))
    budget = cmt_total - charges.before_post("teacher", mid["seconds"])
    equal_steps = max(1, round((budget - startup) * rate))
    baseline_steps = min(equal_steps, cfg.max_baseline_steps or equal_steps)
    accounting = {
        "form": METHOD_FORMS[method], "mid_seconds": mid["seconds"], "cmt_post_steps": steps,
        "baselines_charged_for_generation": charges.baselines_read_store,
        "cmt_post_seconds": _mean_std(cmt_seconds), "steps_per_second": rate, "startup_seconds": startup,
        "cmt_charged_seconds": cmt_total,
        "cmt_charged_seconds_amortised": (charges.before_post("cmt", mid["seconds"], amortised=True)
                                          + float(np.mean(cmt_seconds))),
        "baseline_budget_seconds": budget, "baseline_steps": baseline_steps,
        "baseline_steps_for_equal_compute": equal_steps, "capped_by_max_baseline_steps": baseline_steps < equal_steps,
    }
    wanted = set(cfg.only) or {f"{method}/{init}" for init in cfg.inits}
    cell_runs = {"cmt": (cmt_runs, cmt_plans)}  # always summarised: every baseline is compared with it
    for init in cfg.inits:
        if init != "cmt" and f"{method}/{init}" in wanted:
            plans = [post_plan(cfg, method, init, seed, baseline_steps, store_url=store_url, cmt_export=None,
                               runs_dir=runs_dir) for seed in cfg.seeds]
            cell_runs[init] = ([read_post_run(execute(cfg, plan, runs_dir, log_dir)) for plan in plans], plans)
    cells, settings_rows = [], []
    for init, (runs, plans) in cell_runs.items():
        summary = summarise_cell(runs, charges.before_post(init, mid["seconds"]),
                                 charges.before_post(init, mid["seconds"], amortised=True))
        cells.append({"method": method, "init": init, "seeds": list(cfg.seeds), "runs": [plan.name for plan in plans],
                      "overrides": list(plans[0].user_overrides),
                      "builtin_overrides": list(plans[0].builtin_overrides), **summary})
        settings_rows += [_settings_row(plan, run_) for run_, plan in zip(runs, plans)]
    for cell in cells:
        cell["cmt_student_fd"] = cells[0]["init_fd"]  # the mid-trained student, before post-training
        cell["improved"] = {f"{s}step": cell["final_fd"][s]["mean"] < cell["init_fd"][s]["mean"] for s in STEP_COUNTS}
        cell["charged_over_cmt"] = cell["charged_seconds"]["mean"] / cmt_total
    return cells, accounting, settings_rows


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
                      baselines_read_store=_post_data(cfg, store_url).startswith("store:"))
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
            "amortise_over": cfg.amortise_over, "post_data": _post_data(cfg, store_url),
            "baselines_charged_for_generation": charges.baselines_read_store, "mid": mid, "methods": accounting,
            "equal_compute_by": "steps: each baseline's wall-clock budget (mean CMT charged seconds minus the "
                                "baseline's own pre-cost) converted with train_seconds = overhead + steps / rate, "
                                "fitted to the same method's CMT post-training runs in this invocation",
            "train_seconds": "trainer/loop.py train_seconds: optimizer steps only (evaluations, checkpoints and "
                             "process start-up excluded), for mid- and post-training alike",
        },
        "cells": cells,
        "fractions": compute_fractions(cells, cfg.amortise_over),
        "worse_than_init": [_worse_entry(cell) for cell in cells if not all(cell["improved"].values())],
        "wall_seconds": time.perf_counter() - started,
    }
    append_settings_log(out / SETTINGS_LOG, settings_rows)
    result["settings_tried"] = settings_tried(out / SETTINGS_LOG)
    result["files"] = write_outputs(result, out)
    (out / JSON_NAME).write_text(json.dumps(_json_ready(result), indent=2))
    return _json_ready(result)


def _settings_row(plan: RunPlan, run_: dict[str, Any]) -> dict[str, Any]:
    """One settings-log line: the run's settings, its FD before and after, whether it improved."""
    finals = {f"{s}step": run_["fd"][s][-1] for s in STEP_COUNTS}
    initial = {f"{s}step": run_["init_fd"][s] for s in STEP_COUNTS}
    return {"run": plan.name, "method": plan.method, "init": plan.init, "seed": plan.seed, "steps": plan.total_steps,
            "train_seconds": run_["train_seconds"][-1], "overrides": list(plan.user_overrides),
            "builtin_overrides": list(plan.builtin_overrides), "init_fd": initial, "final_fd": finals,
            "improved": {key: finals[key] < initial[key] for key in finals}}


def _worse_entry(cell: dict[str, Any]) -> dict[str, Any]:
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


def compute_fractions(cells: Sequence[dict[str, Any]], amortise_over: int) -> list[dict[str, Any]]:
    """For each baseline cell and step count: the share of its compute the CMT pipeline needs to reach its final FD."""
    rows = []
    for cmt in (cell for cell in cells if cell["init"] == "cmt"):
        for baseline in (c for c in cells if c["method"] == cmt["method"] and c["init"] != "cmt"):
            for steps in STEP_COUNTS:
                target = baseline["final_fd"][steps]["mean"]
                curve = cmt["curve"]
                reach = first_crossing(curve["charged_seconds"], curve[f"fd_{steps}step_mean"], target)
                reach_amortised = first_crossing(curve["charged_seconds_amortised"], curve[f"fd_{steps}step_mean"],
                                                 target)
                baseline_seconds = baseline["charged_seconds"]["mean"]
                baseline_amortised = baseline["charged_seconds_amortised"]["mean"]
                rows.append({
                    "method": cmt["method"], "baseline": baseline["init"], "steps": steps,
                    "baseline_final_fd": target, "baseline_charged_seconds": baseline_seconds,
                    "cmt_seconds_to_reach": reach, "fraction": None if reach is None else reach / baseline_seconds,
                    "cmt_seconds_to_reach_amortised": reach_amortised,
                    "fraction_amortised": None if reach_amortised is None else reach_amortised / baseline_amortised,
                    "amortise_over": amortise_over,
                })
    return rows


def _json_ready(value: Any) -> Any:
    """Dict keys as strings (step counts become "1step"), tuples as lists, for JSON."""
    if isinstance(value, dict):
        return {(f"{key}step" if isinstance(key, int) else str(key)): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


# ------------------------------------------------------------------------------------------------------------
# Outputs


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
        ("| method | init | charged s | post steps | init FD 1-step | init FD 2-step | final FD 1-step "
         "| final FD 2-step | CMT student 1-step | CMT student 2-step | improved on init (1/2) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for cell in result["cells"]:
        student = cell["cmt_student_fd"]
        improved = "/".join("yes" if cell["improved"][f"{s}step"] else "NO" for s in STEP_COUNTS)
        lines.append(
            f"| {METHOD_LABELS[cell['method']]} | {INIT_LABELS[cell['init']]} "
            f"| {_seconds(cell['charged_seconds']['mean'])} | {cell['post_steps']} "
            f"| {_fmt(cell['init_fd']['1step'])} | {_fmt(cell['init_fd']['2step'])} "
            f"| {_fmt(cell['final_fd']['1step'])} | {_fmt(cell['final_fd']['2step'])} "
            f"| {_fmt(student['1step'])} | {_fmt(student['2step'])} | {improved} |"
        )
    n = acct["amortise_over"]
    lines += [
        "",
        "## Compute the CMT pipeline needs to reach each baseline's final FD",
        "",
        ("Fraction = CMT charged seconds at which its mean curve first reaches the baseline's final mean FD (linear "
         f"interpolation between evaluations) / the baseline's charged seconds. Amortised: generation / {n}."),
        "",
        ("| method | baseline | steps | baseline final FD | baseline s | CMT s to reach | fraction "
         f"| fraction (amortised, N={n}) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["fractions"]:
        reach = "–" if row["cmt_seconds_to_reach"] is None else _seconds(row["cmt_seconds_to_reach"])
        lines.append(
            f"| {METHOD_LABELS[row['method']]} | {INIT_LABELS[row['baseline']]} | {row['steps']} "
            f"| {row['baseline_final_fd']:.1f} | {_seconds(row['baseline_charged_seconds'])} | {reach} "
            f"| {_fraction_text(row['fraction'])} | {_fraction_text(row['fraction_amortised'])} |"
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
                label = INIT_LABELS[cell["init"]] + (" (charged G + mid)" if cell["init"] == "cmt" else "")
                axis.plot(x, mean, marker="o", color=colors[cell["init"]], label=label)
                axis.fill_between(x, np.maximum(mean - std, 1e-3), mean + std, color=colors[cell["init"]], alpha=0.2)
                if cell["init"] == "cmt":
                    axis.plot(curve["charged_seconds_amortised"], mean, linestyle="--", color=colors["cmt"],
                              label=f"CMT (G amortised over {result['accounting']['amortise_over']})")
                    axis.plot(x[:1], mean[:1], marker="*", markersize=14, linestyle="none", color="black",
                              label="CMT student before post-training")
            axis.set_yscale("log")
            axis.set_xlabel("charged wall-clock seconds")
            axis.set_ylabel(f"FD-{result['config']['fd_dataset']}, {steps}-step")
            axis.set_title(f"{METHOD_LABELS[method]}: {steps}-step")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, str]:
    """compare_inits.md and .png (the JSON is written by run, after these paths are added)."""
    ready = _json_ready(result)
    (out / MARKDOWN_NAME).write_text(markdown_table(ready))
    plot_curves(ready, out / PLOT_NAME)
    return {"markdown": str(out / MARKDOWN_NAME), "json": str(out / JSON_NAME), "plot": str(out / PLOT_NAME),
            "settings_log": str(out / SETTINGS_LOG)}


# ------------------------------------------------------------------------------------------------------------
# Dry run and CLI


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
        export = runs_dir / mids[METHOD_FORMS[method]].name / "export"
        for init in cfg.inits:
            steps = cfg.post_steps(method) if init == "cmt" else 0
            for seed in cfg.seeds:
                plan = post_plan(cfg, method, init, seed, max(steps, 1), store_url=store_url, cmt_export=export,
                                 runs_dir=runs_dir)
                overrides = [text if init == "cmt" or "total_steps" not in text else
                             "loop.total_steps=<from the compute budget>" for text in plan.overrides]
                plans.append({"run": plan.name if init == "cmt" else f"{method}-{init}-s{seed}-<budget>",
                              "command": ["trainer/post.py", "--config", cfg.post_preset, *overrides]})
    return {"config": dataclasses.asdict(cfg),
            "generation": None if cfg.store else ["pipeline/generate.py", *_generation_command(cfg)[2:]],
            "runs": plans}


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
    parser.add_argument("--num-eval-samples", type=int)
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
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else CompareConfig()
    fields = {
        "out": args.out, "teacher": args.teacher, "store": args.store, "num_trajectories": args.num_trajectories,
        "cache_root": args.cache_root, "methods": tuple(args.methods) if args.methods else None,
        "inits": tuple(args.inits) if args.inits else None, "seeds": tuple(args.seeds) if args.seeds else None,
        "mid_steps": args.mid_steps, "max_baseline_steps": args.max_baseline_steps,
        "evals_per_run": args.evals_per_run, "num_eval_samples": args.num_eval_samples, "post_data": args.post_data,
        "mid_preset": args.mid_preset, "post_preset": args.post_preset, "amortise_over": args.amortise_over,
        "threads": args.threads, "launcher": args.launcher,
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
