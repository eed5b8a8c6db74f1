"""The settings of `jobs/compare_inits.py` and the studies built on it: cells, scoped overrides, presets.

`CompareConfig` holds what a comparison runs (teacher, store spec, methods × inits × seeds, step budgets, accounting);
`--set SCOPE:key=value` overrides are parsed and matched to runs here (scopes: all, mid, mid/cm, mid/mf, post, a
method, an init, or method/init).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
METHOD_FORMS = {"ect": "cm", "ecd": "cm", "meanflow": "mf"}  # the mid-training form each method starts from
INITS = ("cmt", "teacher", "random")
BASELINES = ("teacher", "random")
INIT_LABELS = {"cmt": "CMT", "teacher": "diffusion", "random": "random"}
METHOD_LABELS = {"ect": "ECT", "ecd": "ECD", "meanflow": "MeanFlow"}
STEP_COUNTS = (1, 2)
STORE_TOKEN = "store"  # `data=store` in a --set: this comparison's trajectory store
RESERVED_KEYS = {
    "output_dir": "the driver names run directories itself (--out)",
    "method": "use --methods",
    "init": "use --inits",
    "seed": "use --seeds",
    "total_steps": "use --mid-steps / --cmt-post-steps (baseline steps follow from the compute budget)",
}


class CompareError(ValueError):
    """A comparison that cannot run as asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class CompareConfig:
    """Settings of the comparison (defaults: the digits study in README.md "Studies"; three seeds of the three methods,
    seed 0 swept over two batch sizes, were about 3 core-hours on this project's current machine)."""

    out: str = "runs/compare_inits"
    teacher: str = "runs/digits/pretrain/export"
    store: str | None = None  # an existing trajectory store; None: pipeline.generate (a cache hit when it exists)
    num_trajectories: int = 4096  # generation spec (used when store is None)
    # The demo's store (jobs/demo.py): Heun, K = 8, the best 1-step CMT student of the solver ablation on 3 seeds.
    solver: str = "heun"
    solver_steps: int = 8
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
    # The post-training study's budgets (README "Does post-training improve the CMT student?"): 400 ECT / ECD steps,
    # 200 MeanFlow steps (level on 3 seeds at 200; unstable over 600).
    cmt_post_steps: tuple[tuple[str, int], ...] = (("ect", 400), ("ecd", 400), ("meanflow", 200))
    max_baseline_steps: int | None = None  # safety cap on a baseline's step count (the shortfall is reported)
    evals_per_run: int = 5  # FD evaluations along each post-training run (plus the init's)
    # FD evaluations along each mid-training run (the last step's included): the CMT curve starts with them, so the
    # compute fractions find where mid-training alone already reaches a baseline. 0: the end only (an upper bound).
    mid_evals: int = 4
    num_eval_samples: int = 1000
    fd_dataset: str = "digits"
    # Fresh draws of the evaluation noise on which every final export and the mid-trained students are scored again
    # (jobs/fd_redraws.py), so each FD comes with its spread over seeds and over draws; 0: the runs' own draw only.
    redraws: int = 5
    amortise_over: int = 10  # N experiments sharing the store: the amortised figures charge G/N
    threads: int = 1  # torch threads of every stage
    launcher: Literal["subprocess", "inprocess"] = "subprocess"  # one process per run (safe) or this process
    # "SCOPE:key=value" (see the module docstring). None by default: every method trains as jobs/digits/post.yaml
    # says, on real images (ECD with the teacher taking each step live), where the post-training study measured ECT
    # and ECD improving the CMT student on 3 seeds. The ε-prediction era's ect.p_mean=1.0 and ecd:data=store
    # (README's older record) are one --set away.
    overrides: tuple[str, ...] = ()
    only: tuple[str, ...] = ()  # "method/init" cells to run (empty: all); CMT cells of a method always run
    # Candidate batch sizes of every cell (jobs/compare_batch.py); empty: every run at the post preset's batch.
    batch_sizes: tuple[int, ...] = ()

    def post_steps(self, method: str) -> int:
        """Post-training steps of the CMT run of `method`."""
        steps = dict(self.cmt_post_steps)
        if method not in steps:
            raise CompareError(f"cmt_post_steps has no entry for {method}: pass --cmt-post-steps {method}=STEPS")
        return int(steps[method])

    def capped_baseline_steps(self, steps: int) -> int:
        """A baseline's step count under the max_baseline_steps safety cap."""
        return min(steps, self.max_baseline_steps or steps)

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
        if self.redraws < 0:
            raise CompareError(f"redraws={self.redraws}: pass 0 (the runs' own evaluation draw only) or more")
        if self.mid_evals < 0:
            raise CompareError(f"mid_evals={self.mid_evals}: pass 0 (the end of mid-training only) or more")
        if self.max_baseline_steps is not None and self.max_baseline_steps < 1:
            raise CompareError(f"max_baseline_steps={self.max_baseline_steps}: pass >= 1 or leave it unset")
        if self.launcher not in ("subprocess", "inprocess"):
            raise CompareError(f"launcher={self.launcher!r}: choose subprocess or inprocess")
        if not (self.post_data == STORE_TOKEN or self.post_data.startswith(("dataset:", "store:"))):
            raise CompareError(
                f"post_data={self.post_data!r}: write dataset:<name> (real images), store (this comparison's "
                "trajectory store) or store:<url>"
            )
        if any(batch < 1 for batch in self.batch_sizes) or len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise CompareError(f"batch_sizes={self.batch_sizes}: pass distinct sizes >= 1, e.g. --batch-sizes 64 128")
        for text in self.overrides:
            scope, override = parse_scoped_override(text)
            if self.batch_sizes and override_key(override) == "batch_per_process" and not scope.startswith("mid"):
                raise CompareError(f"--batch-sizes and --set {text!r} both choose the post-training batch size: "
                                   "drop one (a mid:batch_per_process is fine)")
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
    mid_evals=2,
    num_eval_samples=200,
    redraws=1,
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
    leaf = override_key(override).rsplit(".", 1)[-1]
    if leaf in RESERVED_KEYS:
        raise CompareError(f"--set {text!r}: {leaf} is set by the driver ({RESERVED_KEYS[leaf]})")
    return scope, override


def override_key(override: str) -> str:
    """The key of a `key=value` override as the trainer reads it (`--loop.batch-size=8` → `loop.batch_size`)."""
    return override.partition("=")[0].strip().lstrip("-").replace("-", "_")


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
