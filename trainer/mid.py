"""Stage 2, Consistency Mid-Training (CMT; Hu et al., arXiv 2509.24526): regress a student onto stored ODE trajectories.

    python trainer/mid.py --config jobs/digits/mid.yaml [key=value ...] [--dry-run]
    accelerate launch trainer/mid.py --config jobs/digits/mid.yaml [key=value ...]

The stores (written once by `pipeline/generate.py`) hold each teacher trajectory's K+1 solver points, point 0 the
prior noise and point K the solver's clean endpoint x̂_{t_0}. `data=online` instead solves fresh trajectories with the
teacher at every step, as the CMT authors train (`trainer/data/online.py`: batch/K trajectories × all K points, the same
solver, grid and seed convention as generation; `online.*` settings). Two objectives, both without stop-gradient, time
weighting or JVP (`trainer/methods/cmt.py`, per-sample maths in `trainer/losses.py`):

- form "cm" (Ψ_{t→0}, EDM view):  L = E_i E_{x_T} d(f_θ(x̂_{t_i}, t_i), x̂_{t_0})        (CMT eq. for the CM form)
- form "mf" (Ψ_{t→s}, flow view): L = E_{i>j} ‖u_θ(x̂_{t_i}, t=t_i, r=t_j) − (x̂_{t_i} − x̂_{t_j})/(t_i − t_j)‖²

The student (`trainer.student.FlowMapStudent`) starts from the teacher's weights (init="teacher") or fresh ones, and
reads the network through `student.parameterization` (`trainer.parameterization`: "auto" keeps the teacher's own
c_skip/c_out unless they are unbounded, as for ε-prediction teachers, and then takes EDM's). A student that re-reads the
teacher's network that way first runs a preconditioning transfer (`student.transfer` auto|on|off, `student.
transfer_steps`, default 200, `trainer.student_options.plan_transfer`): it regresses onto the teacher's denoiser at the
stores' points, ‖(f_θ(x̃, σ̃) − D(x̃, σ̃))/c_out(σ̃)‖², with the run's gradients clipped to `student.transfer_grad_clip`
where `loop.grad_clip` is none (the teacher is kept in memory and runs under no_grad for those steps only).
Writes into `loop.output_dir`: config.yaml, checkpoints/, metrics.jsonl, samples/step_<N>_{1,2}step.png (EMA
1- and 2-step samples, decoded through the teacher's VAE for latent teachers, drawn on every rank; FD-<dataset> of
each is logged as fd_1step / fd_2step), ranks/rank_<r>.json (the store chunks this rank read and the corrupt shards it
skipped, or with data=online the seeds it solved and the teacher's cost, and a sha256 of its final parameters),
init_eval.json (eval_at_init) and export/, a student directory (`FlowMapStudent.from_pretrained`, with the teacher's
VAE for latent teachers), the input of post-training. Re-running resumes; a corrupt store shard stops the run with the
fix named (`trainer.data.corrupt_shards`). `label_dropout` (default 0) drops class labels to the null class once per
sample for classifier-free guidance (`trainer.label_dropout`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed

from trainer.config import ConfigError, config_to_dict, load_config, parse_stage_args, save_resolved, stage_help
from trainer.data.errors import StreamError
from trainer.data.in_memory import InMemoryTrajectories, preload_samples
from trainer.data.online import OnlineOptions, OnlineTrajectories, open_online_source
from trainer.data.options import StreamConfig, StreamOptions
from trainer.data.reader import build_items
from trainer.data.store_info import StoreInfo
from trainer.data.store_info import check_stores as data_check_stores
from trainer.data.stream import TrajectoryStream, make_stream
from trainer.data_keys import resolve_onto
from trainer.evaluation import EVAL_SEED, StudentEvaluator, evaluate_at_init, parameter_hash
from trainer.label_dropout import LabelDropout
from trainer.loop import LoopConfig, LoopResult, make_accelerator, train_loop
from trainer.methods.cmt import TransferThenCMT, build_distance, cm_loss, mf_loss
from trainer.run_dir import RunDir
from trainer.run_lock import training_lock
from trainer.student_options import StudentOptions, build_student, plan_transfer


class MidDataError(ConfigError):
    """Stores that cannot feed this run (incomplete, wrong shape, wrong teacher, too few shards); names the fix."""


@dataclass(frozen=True, kw_only=True)
class MidConfig:
    """Stage-2 settings: teacher, trajectory data (stores or online), objective, student init, evaluation, the loop."""

    loop: LoopConfig
    teacher: str
    # stores | online (solve fresh trajectories every step, trainer/data/online.py); `--data store:<url>[,<url>...]`
    # is the short form of data=stores stores=[...] (trainer/data_keys.py, the same keys as post-training)
    data: str = "stores"
    stores: tuple[str, ...] = ()  # data=stores: the trajectory stores (not read with data=online)
    online: OnlineOptions = field(default_factory=OnlineOptions)  # data=online: the teacher's solver settings
    form: Literal["cm", "mf"] = "cm"
    distance: Literal["squared_l2", "pseudo_huber", "lpips"] = "squared_l2"
    pseudo_huber_c: float | None = None  # None: iCT's 0.00054·√d
    lpips_weights: str | None = None  # local LPIPS-VGG weights file (never downloaded)
    lpips_resize_to: int | None = None  # the authors compare at the images' own resolution; 224 resizes as iCT does
    init: Literal["teacher", "random"] = "teacher"
    student: StudentOptions = field(default_factory=StudentOptions)
    # Class-drop probability for classifier-free guidance, once per sample (trainer.label_dropout); off by default:
    # CMT regresses onto the teacher's conditional trajectories. A UNet teacher without a null class gets one.
    label_dropout: float = 0.0
    batch_per_process: int = 128
    stream: StreamOptions = field(default_factory=StreamOptions)
    num_eval_samples: int = 1000
    num_grid_images: int = 64
    eval_seed: int = EVAL_SEED  # trainer.evaluation: disjoint from every training noise seed
    eval_intermediate: float | None = None  # 2-step intermediate time (σ̃ for cm, τ for mf); None: student default
    eval_at_init: bool = False  # also score the initial student (the teacher's own 1-/2-step) → init_eval.json
    fd_dataset: str | None = "digits"  # FD-<dataset> of the samples; none: no FD
    compute_fd: bool = True

    def __post_init__(self) -> None:
        """Resolve the data keys' short form; reject settings that cannot work, naming the fix."""
        resolve_onto(self, kinds=("stores", "online"), stage="trainer/mid.py")
        if self.data == "online":
            stream_keys = [name for name in ("points_per_trajectory", "pairs_per_trajectory")
                           if getattr(self.stream, name) is not None] + (["source"] if self.stream.source != "stream"
                                                                         else [])
            if stream_keys:
                raise ConfigError(
                    f"stream.{stream_keys[0]} applies to data=stores; data=online trains on all K points of each fresh "
                    "trajectory (form=mf: online.pairs_per_trajectory): drop it")
            if self.form == "cm" and self.online.pairs_per_trajectory is not None:
                raise ConfigError("online.pairs_per_trajectory is for form=mf; form=cm trains on all K points")
        if self.batch_per_process < 1:
            raise ConfigError(f"batch_per_process must be >= 1, got {self.batch_per_process}")
        if self.num_eval_samples < 1 or self.num_grid_images < 1:
            raise ConfigError("num_eval_samples and num_grid_images must be >= 1")
        if self.distance == "lpips" and not self.lpips_weights:
            from trainer.losses import LPIPS_WEIGHTS_HELP

            raise ConfigError(f"distance=lpips needs lpips_weights=<local file>.\n{LPIPS_WEIGHTS_HELP}")
        if self.form == "cm" and self.stream.pairs_per_trajectory is not None:
            raise ConfigError("stream.pairs_per_trajectory is for form=mf; form=cm takes stream.points_per_trajectory")
        if self.form == "mf" and self.stream.points_per_trajectory is not None:
            raise ConfigError("stream.points_per_trajectory is for form=cm; form=mf takes stream.pairs_per_trajectory")
        if self.distance != "pseudo_huber" and self.pseudo_huber_c is not None:
            raise ConfigError("pseudo_huber_c is only used with distance=pseudo_huber; drop it")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")


# ------------------------------------------------------------------------------------------------------------
# Data: the stage's stores and stream.* options, read through trainer.data


def stream_config(cfg: MidConfig, *, sample_shape: Sequence[int], teacher_fingerprint: str | None) -> StreamConfig:
    """The stores of this run as trainer.data reads them: mode = form, the loop's seed, the student's expectations."""
    return StreamConfig.from_options(
        cfg.stream, urls=cfg.stores, mode=cfg.form, batch_per_process=cfg.batch_per_process, seed=cfg.loop.seed,
        expected_sample_shape=sample_shape, expected_fingerprint=teacher_fingerprint, record_chunks=True,
    )


def check_stores(
    cfg: MidConfig, *, sample_shape: Sequence[int], teacher_fingerprint: str | None, world_size: int
) -> tuple[StoreInfo, ...]:
    """trainer.data's store check with this run's stores and stream.* settings (--dry-run); raises MidDataError."""
    workers = cfg.stream.num_workers if cfg.stream.source == "stream" else 0
    try:
        return data_check_stores(
            cfg.stores, expected_sample_shape=sample_shape, expected_fingerprint=teacher_fingerprint,
            strict=cfg.stream.strict, allow_incomplete=cfg.stream.allow_incomplete, world_size=world_size,
            num_workers=workers,
        )[1]
    except StreamError as error:
        raise MidDataError(str(error)) from error


def preload_pairs(cfg: MidConfig, infos: Sequence[StoreInfo]) -> dict[str, torch.Tensor]:
    """Every training sample of the stores' committed shards as tensors in the stream's batch format (form = mode)."""
    return preload_samples(infos, cfg.form)


# ------------------------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class MidResult:
    """A finished mid-training run: the loop's result plus the initial student's scores (eval_at_init)."""

    loop: LoopResult
    init_metrics: dict[str, float]
    rank_report: dict[str, Any]


def build_batches(cfg: MidConfig, accelerator: Any, *, sample_shape: Sequence[int],
                  teacher_fingerprint: str) -> TrajectoryStream | InMemoryTrajectories:
    """The run's store batches, checked against the student's teacher: the stream recording the chunks it reads
    (`trainer.data.make_stream`), or every sample in memory (stream.source=memory); store errors as MidDataError."""
    stream_cfg = stream_config(cfg, sample_shape=sample_shape, teacher_fingerprint=teacher_fingerprint)
    try:
        if cfg.stream.source == "memory":
            return InMemoryTrajectories.from_config(stream_cfg, rank=accelerator.process_index,
                                                    world_size=accelerator.num_processes)
        return make_stream(stream_cfg, accelerator)
    except StreamError as error:
        raise MidDataError(str(error)) from error


def data_report(batches: Any) -> dict[str, Any]:
    """What this rank's batch source read: {"chunks_read", "corrupt_shards_skipped"} for stores ({epoch: [[url,
    chunk], ...]} streamed, [[url, shard], ...] in memory), {"online"} for data=online."""
    if isinstance(batches, OnlineTrajectories):
        return {"online": batches.report()}
    return batches.read_report()


def run(cfg: MidConfig) -> MidResult:
    """Mid-train (or resume) the student described by `cfg`; returns the loop result and the initial scores."""
    accelerator = make_accelerator(cfg.loop)  # first: later accelerate state must see the launcher's processes
    with training_lock(cfg.loop.output_dir, hold=accelerator.is_main_process):  # one process per run directory
        return _mid_train(cfg, accelerator)


def _mid_train(cfg: MidConfig, accelerator: Accelerator) -> MidResult:
    """`run` with the run directory held."""
    output_dir = Path(cfg.loop.output_dir)
    if accelerator.is_main_process:
        save_resolved(cfg, output_dir)
    from pipeline.teacher import load_teacher

    teacher = load_teacher(cfg.teacher, device=accelerator.device)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if cfg.data == "online":
        batches = open_online_source(cfg.online, teacher, student_teacher_source=cfg.teacher, mode=cfg.form,
                                     batch_per_process=cfg.batch_per_process, seed=cfg.loop.seed, rank=rank,
                                     world_size=world_size)
    else:  # the stores are checked here, before the student is built
        batches = build_batches(cfg, accelerator, sample_shape=teacher.sample_shape,
                                teacher_fingerprint=teacher.fingerprint)
    set_seed(cfg.loop.seed)  # identical initial weights on every rank and every run
    student = build_student(teacher, cfg.student, second_time_input=cfg.form == "mf", init=cfg.init,
                            seed=cfg.loop.seed)
    transfer = plan_transfer(cfg.student, student, total_steps=cfg.loop.total_steps, loop_grad_clip=cfg.loop.grad_clip)
    vae = teacher.vae
    if transfer.steps == 0:
        del teacher
    evaluate = StudentEvaluator(cfg, RunDir(output_dir).samples, vae=vae)
    init_metrics = evaluate_at_init(cfg.eval_at_init, evaluate, student, accelerator, RunDir(output_dir).init_eval)
    if cfg.form == "cm":
        loss_fn = partial(cm_loss, distance=build_distance(cfg, accelerator.device))
    else:
        loss_fn = mf_loss
    if cfg.label_dropout > 0:
        loss_fn = LabelDropout(loss_fn, cfg.label_dropout, null_class_for_dropout(student))
    if transfer.steps > 0:
        loss_fn = TransferThenCMT(loss_fn, transfer.steps, teacher, student)
    result = train_loop(
        replace(cfg.loop, grad_clip=transfer.grad_clip),
        model=student,
        loss_fn=loss_fn,
        batches=batches,
        accelerator=accelerator,
        evaluate=evaluate,
        export=lambda ema_student, directory: ema_student.save_pretrained(directory, vae=vae),
    )
    report = {
        "rank": rank,
        "world_size": world_size,
        **data_report(batches),
        "parameter_sha256": parameter_hash(student),
        "transfer": transfer.summary(),
        "eval_samples_drawn": evaluate.samples_drawn,
        "final_step": result.final_step,
    }
    RunDir(output_dir).write_rank_report(rank, report)
    return MidResult(loop=result, init_metrics=init_metrics, rank_report=report)


def null_class_for_dropout(student: Any) -> int:
    """The null class label dropout drops to (a UNet without one gets one); refused for unconditional students."""
    from trainer.student import StudentLoadError

    if student.num_classes is None:
        raise ConfigError("label_dropout needs a class-conditional teacher; this one is unconditional: drop "
                          "label_dropout")
    try:
        return student.add_null_class()
    except StudentLoadError as error:
        raise ConfigError(f"label_dropout: {error}") from error


def describe(cfg: MidConfig) -> dict[str, Any]:
    """What a run of `cfg` would do, for --dry-run: resolved config, data (stores or online), student size."""
    from pipeline.teacher import load_teacher

    teacher = load_teacher(cfg.teacher)
    world_size = PartialState().num_processes
    student = build_student(teacher, cfg.student, second_time_input=cfg.form == "mf", init=cfg.init, seed=cfg.loop.seed)
    plan: dict[str, Any] = {"config": config_to_dict(cfg), "processes": world_size}
    if cfg.data == "online":
        source = open_online_source(cfg.online, teacher, student_teacher_source=cfg.teacher, mode=cfg.form,
                                    batch_per_process=cfg.batch_per_process, seed=cfg.loop.seed, rank=0,
                                    world_size=world_size)
        plan["online"] = {
            "teacher_fingerprint": source.teacher.fingerprint,
            "solver": f"{cfg.online.solver} K={cfg.online.steps} grid={cfg.online.grid}",
            "trajectories_per_step": source.trajectories_per_batch * world_size * cfg.loop.grad_accum_steps,
            "samples_per_trajectory": source.samples_per_trajectory,
            "teacher_forward_samples_per_step": (source.trajectories_per_batch * source.forwards_per_trajectory
                                                 * world_size * cfg.loop.grad_accum_steps),
            "seed_base": source.seed_base,
        }
    else:
        infos = check_stores(cfg, sample_shape=teacher.sample_shape, teacher_fingerprint=teacher.fingerprint,
                             world_size=world_size)
        stream_cfg = stream_config(cfg, sample_shape=teacher.sample_shape, teacher_fingerprint=teacher.fingerprint)
        drawn = build_items(stream_cfg, infos).drawn  # the samples a reader draws per trajectory of each store
        samples = int(sum(int(count) * info.num_trajectories for count, info in zip(drawn, infos)))
        plan.update({"stores": [info.summary() for info in infos], "training_samples_per_epoch": samples,
                     "steps_per_epoch": samples // (cfg.batch_per_process * world_size)})
    plan["student"] = {"form": cfg.form, "init": cfg.init, "second_time_input": student.second_time_input,
                       "parameterization": student.parameterization.describe(),
                       **plan_transfer(cfg.student, student, total_steps=cfg.loop.total_steps,
                                       loop_grad_clip=cfg.loop.grad_clip).summary(),
                       "parameters": sum(p.numel() for p in student.parameters()),
                       "teacher_fingerprint": student.teacher_fingerprint}
    plan["output_dir"] = cfg.loop.output_dir
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `python trainer/mid.py --config PRESET [key=value ...] [--dry-run]`."""
    from pipeline.teacher import TeacherLoadError
    from trainer.data.corrupt_shards import CorruptDataError
    from trainer.student import StudentLoadError

    try:
        args = parse_stage_args(sys.argv[1:] if argv is None else argv)
        if args.help:
            print(stage_help(MidConfig, __doc__))
            return 0
        cfg = load_config(MidConfig, args.config_path, args.overrides)
        if args.dry_run:
            print(json.dumps(describe(cfg), indent=2))
            return 0
        result = run(cfg)
    except (ConfigError, TeacherLoadError, StudentLoadError, CorruptDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not PartialState().is_main_process:
        return 0
    print(json.dumps({**result.loop.summary(), "init_metrics": result.init_metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
