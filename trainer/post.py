"""Stage 3, post-training: ECT / ECD (Ψ_{t→0}) and MeanFlow (Ψ_{t→s}) of a FlowMapStudent, after CMT or not.

    accelerate launch trainer/post.py --config jobs/digits/post.yaml --method ect|ecd|meanflow \\
        --init cmt:<dir>|teacher|random --data store:<url>[,<url>...]|dataset:<name> [key=value ...] [--dry-run]
    python trainer/post.py ...                          (one process; same flags)

The ECD step cost (stored teacher step vs live teacher) is measured by `jobs/bench_ecd.py`.

Methods (each in its module: `trainer/methods/ect.py` for ect and ecd, `trainer/methods/meanflow.py`; per-sample losses
from `trainer/losses.py`, time sampling from `trainer/schedules.py`):

- ect (ECT, Geng et al. 2024): ln t ~ N(P_mean, P_std²), r = t·(1 − (1 + k·sigmoid(−b·t))/q); x_t = x0 + t·ε and
  x_r = x0 + r·ε share ε AND the dropout mask; loss d(f_θ(x_t, t), sg(f_θ(x_r, r)))/(t − r), target x0 where r = 0.
  q is fixed (4096 after CMT) or ECT's doubling schedule (q_mode=doubling) for the diffusion-initialised baseline.
- ecd (consistency distillation with ECT's loss): x_r is one teacher PF-ODE step from x_t. From a store the pair is
  two consecutive stored solver points (no teacher forward pass at all); from a dataset the teacher takes the step
  live (`pipeline.ode_step.ode_step`).
- meanflow (MeanFlow, Geng et al. 2025; t, r in τ): u_tgt = v − (t − r)·sg(du/dt), du/dt = v·∂_z u + ∂_t u, by JVP
  (on the unwrapped module, no grad; the differentiable prediction goes through the DDP-wrapped model so gradients are
  all-reduced) or by a central finite difference; adaptive weight 1/(‖e‖² + c)^p. v is ε − x0 (the paper's), or with
  meanflow.velocity=teacher the teacher's PF-ODE velocity at (z, t), one teacher forward per sample and step.

Data (`trainer/data_keys.py`, the same keys as mid-training): data=stores (`--data store:<url>`) streams the trajectory
stores (`trainer.data`): ect / meanflow take the solver's clean endpoints x̂_0 (mode "endpoints"), ecd consecutive
points (mode "ecd"). data=dataset (`--data dataset:<name>`) uses real images (`trainer.image_datasets`).
Init (`trainer/student_init.py`): `cmt:<dir>` (a mid-training export, `FlowMapStudent.from_pretrained`, read with the
parameterisation it records), `teacher` (the diffusion model itself: the teacher's weights AND its own c_skip/c_out, so
f is its x0 prediction and u at r = t its velocity), `random` (the teacher's architecture, fresh weights, read the way
"auto" picks in `trainer.parameterization`).

Writes into `loop.output_dir`: config.yaml, checkpoints/, metrics.jsonl (loss, skipped_steps, fd_1step, fd_2step),
samples/step_<N>_{1,2}step.png, ranks/rank_<r>.json (parameter sha256 of each rank, teacher forward count, corrupt
store shards skipped), init_eval.json (eval_at_init) and export/ (`FlowMapStudent.save_pretrained`; `python -m
trainer.sample` samples it). Re-running the same command resumes from the newest complete checkpoint; a corrupt store
shard stops the run with the fix named, or with stream.on_corrupt_shard=skip is left out
(`trainer.data.corrupt_shards`).
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed

from trainer.batches import InMemoryBatches
from trainer.config import ConfigError, config_to_dict, load_config, parse_stage_args, save_resolved, stage_help
from trainer.data.corrupt_shards import CorruptDataError
from trainer.data.options import StreamOptions
from trainer.data_keys import describe_data, resolve_onto
from trainer.evaluation import EVAL_SEED
from trainer.label_dropout import LabelDropout
from trainer.loop import LoopConfig, LoopResult, make_accelerator, train_loop
from trainer.methods.ect import ECDConfig, ECTConfig, ECTLoss, LiveECDLoss, StoredECDLoss, ect_sigma_range
from trainer.methods.meanflow import MeanFlowConfig, MeanFlowLoss, resolve_derivative, tau_max
from trainer.run_dir import RunDir
from trainer.run_lock import training_lock
from trainer.student_init import CMT_PREFIX, check_student_fits, cmt_export_dir, student_from_init

METHODS = ("ect", "ecd", "meanflow")
BENCHMARK_MOVED = ("--benchmark-ecd moved to jobs/bench_ecd.py: run `python jobs/bench_ecd.py --config PRESET "
                   "[the same flags] --steps N`")


# ------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, kw_only=True)
class PostConfig:
    """Stage-3 settings: method, init, data, the method's options, evaluation and the shared loop."""

    loop: LoopConfig
    method: Literal["ect", "ecd", "meanflow"] = "ect"
    init: str = "teacher"  # "cmt:<dir>" | "teacher" | "random"
    # stores | dataset; `--data store:<url>[,<url>...]` / `--data dataset:<name>` is the short form
    # (trainer/data_keys.py, the same keys as mid-training)
    data: str = "stores"
    stores: tuple[str, ...] = ()  # data=stores: the trajectory stores
    dataset: str | None = None  # data=dataset: digits, mnist, folder:<path> (trainer.image_datasets)
    teacher: str | None = None  # teacher dir: init teacher/random, ECD from a dataset, meanflow.velocity=teacher
    batch_per_process: int = 128
    image_size: int | None = None  # dataset: resize to H = W = image_size
    attention: Literal["sdpa", "flash", "xformers"] = "sdpa"  # flash: force the flash SDPA kernel (no forward AD)
    ect: ECTConfig = field(default_factory=ECTConfig)
    ecd: ECDConfig = field(default_factory=ECDConfig)
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)
    # Class-drop probability for classifier-free guidance, applied once per sample (trainer.label_dropout); none:
    # what the method needs (0.1, the official MeanFlow value, for MeanFlow with guidance; 0 otherwise).
    label_dropout: float | None = None
    stream: StreamOptions = field(default_factory=StreamOptions)
    num_eval_samples: int = 1000
    num_grid_images: int = 64
    eval_seed: int = EVAL_SEED  # trainer.evaluation: disjoint from every training noise seed
    eval_intermediate: float | None = None  # 2-step intermediate time (σ̃ for Ψ_{t→0}, τ for MeanFlow); None: default
    eval_at_init: bool = False  # also score the initial student → init_eval.json
    fd_dataset: str | None = "digits"
    compute_fd: bool = True

    def __post_init__(self) -> None:
        """Resolve the data keys' short form; reject combinations that cannot work, naming the fix."""
        resolve_onto(self, kinds=("stores", "dataset"), stage="trainer/post.py")
        named_export = self.init.startswith(CMT_PREFIX) and self.init[len(CMT_PREFIX) :].strip()
        if not (self.init in ("teacher", "random") or named_export):
            raise ConfigError(
                f"init={self.init!r}: write `cmt:<dir>` (a trainer/mid.py export), `teacher` or `random`"
            )
        if self.init in ("teacher", "random") and not self.teacher:
            raise ConfigError(f"init={self.init} builds the student from the teacher: pass teacher=<teacher dir>")
        if self.method == "ecd" and self.data == "dataset" and not self.teacher:
            raise ConfigError(
                "ECD from a dataset runs the teacher's ODE step live: pass teacher=<teacher dir>, or use "
                "--data store:<url> (the stored consecutive solver points; no teacher needed)"
            )
        if self.meanflow_on_teacher_velocity and not self.teacher:
            raise ConfigError("meanflow.velocity=teacher takes the teacher's velocity every step: pass "
                              "teacher=<teacher dir>, or use meanflow.velocity=conditional (ε − x0, no teacher)")
        if self.meanflow_on_teacher_velocity and self.meanflow.guidance_scale is not None:
            raise ConfigError(
                "meanflow.velocity=teacher with meanflow.guidance_scale: the guided target mixes in the student's own "
                "null-class velocity, which only label dropout trains, and the live teacher runs with the real labels; "
                "drop meanflow.guidance_scale, or use meanflow.velocity=conditional"
            )
        if self.batch_per_process < 1:
            raise ConfigError(f"batch_per_process must be >= 1, got {self.batch_per_process}")
        if self.num_eval_samples < 1 or self.num_grid_images < 1:
            raise ConfigError("num_eval_samples and num_grid_images must be >= 1")
        if self.stream.pairs_per_trajectory is not None or self.stream.source != "stream":
            key = "pairs_per_trajectory" if self.stream.pairs_per_trajectory is not None else "source"
            raise ConfigError(f"stream.{key} is a trainer/mid.py setting; post-training streams its stores' endpoints "
                              "(ect, meanflow) or consecutive points (ecd): drop it")
        if self.stream.points_per_trajectory is not None and self.method != "ecd":
            raise ConfigError(f"stream.points_per_trajectory is for method=ecd; {self.method} reads one endpoint per "
                              "trajectory: drop it")
        if self.method == "meanflow":
            resolve_derivative(self.meanflow.derivative, self.attention)
        if self.label_dropout is not None and not 0 <= self.label_dropout < 1:
            raise ConfigError(f"label_dropout must lie in [0, 1) or be none (the method's default), got "
                              f"{self.label_dropout}")
        if self.live_teacher and self.label_drop_probability > 0:
            what, other = (("ECD from a dataset", "--data store:<url>") if self.method == "ecd"
                           else ("meanflow.velocity=teacher", "meanflow.velocity=conditional"))
            raise ConfigError(
                f"label_dropout with {what}: the live teacher runs with the real labels, so a dropped (null) label "
                f"would get a conditional target; set label_dropout=0, or use {other}"
            )

    @property
    def label_drop_probability(self) -> float:
        """label_dropout, or the method's default: 0.1 for MeanFlow with guidance (official MeanFlow), else 0."""
        if self.label_dropout is not None:
            return self.label_dropout
        return 0.1 if self.method == "meanflow" and self.meanflow.guidance_scale is not None else 0.0

    @property
    def data_flag(self) -> str:
        """The data keys as the user can type them back: `--data store:<urls>` or `--data dataset:<name>`."""
        return describe_data(self)

    @property
    def meanflow_on_teacher_velocity(self) -> bool:
        """MeanFlow whose target takes the teacher's velocity (meanflow.velocity=teacher)."""
        return self.method == "meanflow" and self.meanflow.velocity == "teacher"

    @property
    def live_teacher(self) -> bool:
        """Whether training runs the teacher (ECD from a dataset, MeanFlow with meanflow.velocity=teacher)."""
        return (self.method == "ecd" and self.data == "dataset") or self.meanflow_on_teacher_velocity


# ------------------------------------------------------------------------------------------------------------
# Teacher forwards, attention backend


class ForwardCounter:
    """Counts the samples a module's forward passes see (a forward hook), e.g. teacher evaluations during training."""

    def __init__(self, module: torch.nn.Module | None = None) -> None:
        self.samples = 0
        self.calls = 0
        self._handle = None if module is None else module.register_forward_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        """Forward hook: one call, batch-size samples."""
        self.calls += 1
        self.samples += int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 0

    def remove(self) -> None:
        """Stop counting."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _configure_attention(cfg: PostConfig, student: Any, device: torch.device) -> None:
    """Switch the student's net to xformers when asked (CUDA + the xformers package only)."""
    if cfg.attention != "xformers":
        return
    from pipeline.attention import xformers_available

    if device.type != "cuda" or not xformers_available():
        raise ConfigError(
            "attention=xformers needs a CUDA device and the xformers package (pip install .[cuda]): use attention=sdpa"
        )
    student.net.enable_xformers_memory_efficient_attention()


# ------------------------------------------------------------------------------------------------------------
# Data


def load_images(cfg: PostConfig) -> Any:
    """The real images of data=dataset (`trainer.image_datasets.ImageDataset`), loaded once per run; None for stores."""
    if cfg.data != "dataset":
        return None
    from trainer.image_datasets import load_dataset

    try:
        return load_dataset(cfg.dataset, image_size=cfg.image_size)
    except ValueError as error:
        raise ConfigError(f"{cfg.data_flag}: {error}") from error


def dataset_batches(cfg: PostConfig, images: Any, *, rank: int, world_size: int) -> InMemoryBatches:
    """Real images as clean samples x0 (+ labels) in InMemoryBatches, this rank's share of every batch."""
    return InMemoryBatches({"x0": images.images, "labels": images.labels}, batch_per_process=cfg.batch_per_process,
                           seed=cfg.loop.seed, rank=rank, world_size=world_size)


def store_stream(cfg: PostConfig, student: Any, *, rank: int, world_size: int, device: Any = None,
                 mode: str | None = None) -> Any:
    """The streaming loader over the stores (`trainer.data.make_stream`, pinned batches with workers on CUDA):
    endpoints (ect, meanflow) or consecutive points (ecd), checked against the student's shape and teacher."""
    from trainer.data.errors import StreamError
    from trainer.data.options import StreamConfig
    from trainer.data.stream import make_stream

    mode = mode or ("ecd" if cfg.method == "ecd" else "endpoints")
    stream_cfg = StreamConfig.from_options(
        cfg.stream, urls=cfg.stores, mode=mode, batch_per_process=cfg.batch_per_process, seed=cfg.loop.seed,
        expected_sample_shape=student.sample_shape, expected_fingerprint=student.teacher_fingerprint,
    )
    try:
        return make_stream(stream_cfg, rank=rank, world_size=world_size, device=device)
    except StreamError as error:
        raise ConfigError(f"{cfg.data_flag}: {error}") from error


# ------------------------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class PostResult:
    """A finished post-training run: the loop's result, initial scores, this rank's report."""

    loop: LoopResult
    init_metrics: dict[str, float]
    rank_report: dict[str, Any]


@dataclass
class PostSetup:
    """Everything `run`, `describe` and jobs/bench_ecd.py build before training."""

    student: Any
    teacher: Any
    loss_fn: Any
    derivative: str | None
    vae: Any  # the teacher's VAE of a latent student (evaluation decodes through it; the export carries it)


def _null_class(cfg: PostConfig, student: Any) -> int | None:
    """The null class id label dropout and MeanFlow's guidance need (added to a UNet that lacks one); None if unused.

    Guidance or label dropout on an unconditional student is refused, naming the key to drop.
    """
    from trainer.student import StudentLoadError

    guided = cfg.method == "meanflow" and cfg.meanflow.guidance_scale is not None
    if not guided and cfg.label_drop_probability == 0:
        return None
    if student.num_classes is None:
        key = "meanflow.guidance_scale" if guided else "label_dropout"
        raise ConfigError(f"{key} needs a class-conditional student; this one is unconditional: drop {key}")
    try:
        return student.add_null_class()
    except StudentLoadError as error:
        raise ConfigError(f"label_dropout / meanflow.guidance_scale: {error}") from error


def build_setup(cfg: PostConfig, device: torch.device, *, data_sample_shape: Sequence[int] | None) -> PostSetup:
    """Load the teacher if one is named, build and check the student against it, and pick the method's loss.

    The teacher is kept only where training runs it (ECD from a dataset, meanflow.velocity=teacher); every other run
    drops it before training.
    """
    from pipeline.teacher import load_teacher

    teacher = load_teacher(cfg.teacher, device=device) if cfg.teacher else None  # init source and compatibility check
    set_seed(cfg.loop.seed)  # identical initial weights on every rank and every run
    student = student_from_init(cfg.init, method=cfg.method, teacher=teacher, seed=cfg.loop.seed, device=device)
    source = f"--init {cfg.init}" + (f" ({cmt_export_dir(cfg.init)})" if cfg.init.startswith(CMT_PREFIX) else "")
    check_student_fits(student, method=cfg.method, sample_shape=data_sample_shape, teacher=teacher, source=source)
    _configure_attention(cfg, student, device)
    null_class = _null_class(cfg, student)
    derivative = None
    if cfg.method == "ect":
        loss_fn = ECTLoss(cfg.ect, ect_sigma_range(cfg.ect, student.schedule), cfg.attention)
    elif cfg.method == "ecd" and cfg.data == "stores":
        loss_fn = StoredECDLoss(cfg.ect, cfg.attention)
    elif cfg.method == "ecd":
        loss_fn = LiveECDLoss(cfg.ect, cfg.ecd, teacher, ect_sigma_range(cfg.ect, student.schedule, teacher),
                              cfg.attention)
    else:
        derivative = resolve_derivative(cfg.meanflow.derivative, cfg.attention)
        if derivative == "fd" and cfg.meanflow.derivative == "auto":
            warnings.warn(f"attention={cfg.attention} has no forward-mode AD: MeanFlow uses the finite difference",
                          stacklevel=2)
        loss_fn = MeanFlowLoss(cfg.meanflow, derivative, tau_max(student, cfg.meanflow), cfg.attention, null_class,
                               teacher if cfg.meanflow_on_teacher_velocity else None)
    if cfg.label_drop_probability > 0:
        loss_fn = LabelDropout(loss_fn, cfg.label_drop_probability, null_class)
    vae = _latent_decoder(cfg, student, teacher, device)
    if not cfg.live_teacher:
        teacher = None  # nothing below calls it: ECT, stored ECD and MeanFlow on ε − x0 never run the teacher
    return PostSetup(student, teacher, loss_fn, derivative, vae)


def _latent_decoder(cfg: PostConfig, student: Any, teacher: Any, device: torch.device) -> Any:
    """The VAE of a latent student: the teacher's, else the one in the --init cmt export; None for pixel students."""
    from trainer.student_export import load_vae

    if teacher is not None and teacher.vae is not None:
        return teacher.vae
    vae = load_vae(cmt_export_dir(cfg.init), device) if cfg.init.startswith(CMT_PREFIX) else None
    if vae is None and student.latent:
        warnings.warn(
            f"--init {cfg.init} is a latent student but no VAE was found (neither teacher=<dir> nor a vae/ in the "
            "export): evaluation cannot decode its samples into images and the export carries no VAE; pass "
            "teacher=<the teacher pipeline directory>",
            stacklevel=3,
        )
    return vae


def run(cfg: PostConfig) -> PostResult:
    """Post-train (or resume) the student described by `cfg`; returns the loop result, initial scores, rank report."""
    accelerator = make_accelerator(cfg.loop)  # first: later accelerate state must see the launcher's processes
    with training_lock(cfg.loop.output_dir, hold=accelerator.is_main_process):  # one process per run directory
        return _post_train(cfg, accelerator)


def _post_train(cfg: PostConfig, accelerator: Accelerator) -> PostResult:
    """`run` with the run directory held."""
    from trainer.evaluation import StudentEvaluator, evaluate_at_init, parameter_hash

    output_dir = Path(cfg.loop.output_dir)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    images = load_images(cfg)
    shape = None if images is None else tuple(images.image_shape)
    setup = build_setup(cfg, accelerator.device, data_sample_shape=shape)  # refuses bad inits first
    if accelerator.is_main_process:
        save_resolved(cfg, output_dir)
    if cfg.data == "stores":
        batches = store_stream(cfg, setup.student, rank=rank, world_size=world_size, device=accelerator.device)
    else:
        batches = dataset_batches(cfg, images, rank=rank, world_size=world_size)
    evaluate = StudentEvaluator(cfg, RunDir(output_dir).samples, vae=setup.vae)
    init_metrics = evaluate_at_init(cfg.eval_at_init, evaluate, setup.student, accelerator, RunDir(output_dir).init_eval)
    teacher_calls = ForwardCounter(setup.teacher.model if setup.teacher is not None else None)
    result = train_loop(
        cfg.loop,
        model=setup.student,
        loss_fn=setup.loss_fn,
        batches=batches,
        accelerator=accelerator,
        evaluate=evaluate,
        export=lambda ema_student, directory: ema_student.save_pretrained(directory, vae=setup.vae),
    )
    report = {
        "rank": rank,
        "world_size": world_size,
        "method": cfg.method,
        "derivative": setup.derivative,
        "teacher_in_training": setup.teacher is not None,
        "teacher_forward_samples": teacher_calls.samples,
        "parameter_sha256": parameter_hash(setup.student),
        "eval_samples_drawn": evaluate.samples_drawn,
        "final_step": result.final_step,
        "skipped_steps": result.skipped_steps,
        "corrupt_shards_skipped": getattr(batches, "skipped_shards", []),
    }
    RunDir(output_dir).write_rank_report(rank, report)
    return PostResult(loop=result, init_metrics=init_metrics, rank_report=report)


def describe(cfg: PostConfig) -> dict[str, Any]:
    """What a run of `cfg` would do, for --dry-run: resolved config, data, student, derivative; writes nothing."""
    device = torch.device("cpu")
    state = PartialState()
    images = load_images(cfg)
    setup = build_setup(cfg, device, data_sample_shape=None if images is None else tuple(images.image_shape))
    if cfg.data == "stores":
        data = store_stream(cfg, setup.student, rank=state.process_index, world_size=state.num_processes).describe()
    else:
        batches = dataset_batches(cfg, images, rank=state.process_index, world_size=state.num_processes)
        data = {"dataset": cfg.dataset, "num_images": batches.num_samples, "image_shape": list(images.image_shape)}
    return {
        "config": config_to_dict(cfg),
        "processes": state.num_processes,
        "data": data,
        "loss": type(setup.loss_fn).__name__,
        "derivative": setup.derivative,
        "teacher_runs_during_training": cfg.live_teacher,
        "student": {"init": cfg.init, "second_time_input": setup.student.second_time_input,
                    "parameters": sum(p.numel() for p in setup.student.parameters()),
                    "teacher_fingerprint": setup.student.teacher_fingerprint, "latent": setup.student.latent},
        "label_dropout": cfg.label_drop_probability,
        "output_dir": cfg.loop.output_dir,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `trainer/post.py --config PRESET --method M --init I --data D [key=value ...] [--dry-run]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--benchmark-ecd" in argv:
        print(f"error: {BENCHMARK_MOVED}", file=sys.stderr)
        return 2
    try:
        args = parse_stage_args(argv)
        if args.help:
            print(stage_help(PostConfig, __doc__))
            return 0
        cfg = load_config(PostConfig, args.config_path, args.overrides)
        if args.dry_run:
            print(json.dumps(describe(cfg), indent=2))
            return 0
        result = run(cfg)
    except (ConfigError, CorruptDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not PartialState().is_main_process:
        return 0
    summary = {
        **result.loop.summary(),
        "init_metrics": result.init_metrics,
        "derivative": result.rank_report["derivative"],
        "teacher_forward_samples": result.rank_report["teacher_forward_samples"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
