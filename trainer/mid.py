"""Stage 2, Consistency Mid-Training (CMT; Hu et al., arXiv 2509.24526): regress a student onto stored ODE trajectories.

    python trainer/mid.py --config jobs/digits/mid.yaml [key=value ...] [--dry-run]
    accelerate launch trainer/mid.py --config jobs/digits/mid.yaml [key=value ...]

The stores (written once by `pipeline/generate.py`) hold each teacher trajectory's K+1 solver points, point 0 the
prior noise and point K the solver's clean endpoint x̂_{t_0}. `data=online` instead solves fresh trajectories with the
teacher at every step, as the CMT authors train (`trainer/online.py`: batch/K trajectories × all K points, the same
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
fix named (`trainer.corrupt_shards`). `label_dropout` (default 0) drops class labels to the null class once per sample
for classifier-free guidance (`trainer.label_dropout`).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import set_seed

from trainer.config import ConfigError, config_to_dict, load_config, parse_stage_args, save_resolved, stage_help
from trainer.evaluation import EVAL_SEED, StudentEvaluator, evaluate_at_init, parameter_hash
from trainer.label_dropout import LabelDropout
from trainer.loop import InMemoryBatches, LoopConfig, LoopResult, make_accelerator, train_loop
from trainer.methods.cmt import TransferThenCMT, build_distance, cm_loss, cmt_pair_indices, mf_loss
from trainer.online import OnlineOptions, OnlineTrajectories, open_online_source
from trainer.stream_options import StreamOptions
from trainer.student_options import StudentOptions, build_student, plan_transfer

RANKS_DIR = "ranks"
INIT_EVAL_FILE = "init_eval.json"


class MidDataError(ConfigError):
    """Stores that cannot feed this run (incomplete, wrong shape, wrong teacher, too few shards); names the fix."""


@dataclass(frozen=True, kw_only=True)
class MidConfig:
    """Stage-2 settings: teacher, trajectory data (stores or online), objective, student init, evaluation, the loop."""

    loop: LoopConfig
    teacher: str
    data: Literal["stores", "online"] = "stores"  # online: solve fresh trajectories every step (trainer/online.py)
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
        """Reject settings that cannot work, naming the fix."""
        if self.data == "stores" and not self.stores:
            raise ConfigError(
                "stores is empty: list at least one trajectory store (pipeline/generate.py prints it), or train on "
                "freshly solved trajectories with data=online")
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
# Stores: pre-flight checks and the in-memory data path


@dataclass(frozen=True)
class StoreInfo:
    """What the pre-flight check learned about one store."""

    url: str
    num_trajectories: int
    num_points: int
    sample_shape: tuple[int, ...]
    committed_shards: tuple[int, ...]
    num_shards: int
    shard_size: int
    chunk_size: int
    teacher_fingerprint: str
    solver: str
    steps: int
    grid: str

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description for --dry-run."""
        return {
            "url": self.url, "trajectories": self.num_trajectories, "points": self.num_points,
            "sample_shape": list(self.sample_shape), "solver": f"{self.solver} K={self.steps} grid={self.grid}",
            "committed_shards": f"{len(self.committed_shards)}/{self.num_shards}",
        }


def check_stores(
    cfg: MidConfig, *, sample_shape: Sequence[int], teacher_fingerprint: str | None, world_size: int
) -> list[StoreInfo]:
    """Open every store and check it can feed this run; raises MidDataError with the fix (fingerprint: warning)."""
    from storage_schema import open_store
    from storage_schema.errors import StoreError

    infos = []
    for url in cfg.stores:
        try:
            store = open_store(url)
        except StoreError as error:
            raise MidDataError(f"cannot open trajectory store {url}: {error}") from error
        spec = store.spec
        committed = tuple(store.committed_shards())
        info = StoreInfo(url, spec.num_trajectories, spec.num_points, tuple(spec.sample_shape), committed,
                         spec.num_shards, spec.shard_size, spec.chunk_size, spec.teacher_fingerprint, spec.solver,
                         spec.steps, spec.grid)
        if info.sample_shape != tuple(sample_shape):
            raise MidDataError(
                f"store {url} holds samples of shape {list(info.sample_shape)} but the teacher's samples are "
                f"{list(sample_shape)}: use stores generated from this teacher (pipeline/generate.py --teacher ...)"
            )
        if len(committed) < spec.num_shards and not cfg.stream.allow_incomplete:
            raise MidDataError(
                f"store {url} is incomplete ({len(committed)}/{spec.num_shards} shards committed): finish it by "
                "re-running its pipeline/generate.py command, or pass stream.allow_incomplete=true to train on the "
                "committed shards only"
            )
        if teacher_fingerprint is not None and spec.teacher_fingerprint != teacher_fingerprint:
            message = (
                f"store {url} was generated by teacher {spec.teacher_fingerprint[:12]}…, but the student starts from "
                f"teacher {teacher_fingerprint[:12]}…: its trajectories are not this teacher's ODE"
            )
            if cfg.stream.strict:
                raise MidDataError(f"{message}; use the matching teacher / store, or drop stream.strict=true to only "
                                   "warn")
            warnings.warn(f"{message} (pass stream.strict=true to make this an error)", stacklevel=2)
        infos.append(info)
    num_points = {info.num_points for info in infos}
    if cfg.form == "mf" and len(num_points) > 1:
        raise MidDataError(f"stores with different numbers of points {sorted(num_points)} cannot be mixed here")
    total_chunks = sum(len(info.committed_shards) * math.ceil(info.shard_size / info.chunk_size) for info in infos)
    readers = world_size * (max(1, cfg.stream.num_workers) if cfg.stream.source == "stream" else 1)
    if total_chunks < readers:
        raise MidDataError(
            f"{total_chunks} committed chunk(s) for {readers} readers ({world_size} process(es) × "
            f"{max(1, cfg.stream.num_workers)} stream.num_workers): some reader would get no data. Use fewer "
            "processes or stream.num_workers, more stores, or regenerate with a smaller --chunk-size"
        )
    return infos


def preload_pairs(cfg: MidConfig, infos: Sequence[StoreInfo]) -> dict[str, torch.Tensor]:
    """Every training sample of the stores' committed shards as in-memory tensors, in the loader's batch format.

    cm: x_t [M, *S] (EDM view), sigma [M], x0 [M, *S] over all K non-final points of every trajectory;
    mf: z_t, t, z_r, r over all pairs of points (t > r, flow-matching view). Conversions: pipeline.time_convention.
    """
    from pipeline.time_convention import edm_from_native, fm_from_edm
    from storage_schema import CorruptShardError, open_store
    from trainer.corrupt_shards import corrupt_data_error

    parts: dict[str, list[torch.Tensor]] = {}
    for info in infos:
        store = open_store(info.url)
        traj, labels = [], []
        for shard in info.committed_shards:
            try:
                data = store.read_shard(shard, verify=True)
            except CorruptShardError as error:
                raise corrupt_data_error(info.url, shard, error) from error
            traj.append(np.asarray(data["traj"], dtype=np.float32))
            if data.get("label") is not None:
                labels.append(np.asarray(data["label"], dtype=np.int64))
        points = torch.from_numpy(np.concatenate(traj))  # [N, P, *S] native
        n, p = points.shape[:2]
        sample_shape = points.shape[2:]
        alpha = torch.from_numpy(np.array(store.alpha)).repeat(n)  # [N·P] float64
        sigma = torch.from_numpy(np.array(store.sigma)).repeat(n)  # [N·P] float64
        x_edm, sigma_edm = edm_from_native(points.flatten(0, 1), alpha, sigma)  # [N·P, *S], [N·P]
        label_tensor = torch.from_numpy(np.concatenate(labels)) if labels else None  # [N]
        if cfg.form == "cm":
            x_edm = x_edm.reshape(n, p, *sample_shape)  # [N, P, *S]
            batch = {
                "x_t": x_edm[:, : p - 1].flatten(0, 1),  # [N·K, *S]
                "sigma": sigma_edm.reshape(n, p)[:, : p - 1].flatten().float(),  # [N·K]
                "x0": x_edm[:, p - 1 :].expand(n, p - 1, *sample_shape).flatten(0, 1),  # [N·K, *S]
            }
            repeats = p - 1
        else:
            z, tau = fm_from_edm(x_edm, sigma_edm)  # [N·P, *S], [N·P] float64
            z, tau = z.reshape(n, p, *sample_shape), tau.reshape(n, p)
            first, second = cmt_pair_indices(p)
            batch = {
                "z_t": z[:, first].flatten(0, 1),  # [N·pairs, *S]
                "t": tau[:, first].flatten().float(),  # [N·pairs]
                "z_r": z[:, second].flatten(0, 1),  # [N·pairs, *S]
                "r": tau[:, second].flatten().float(),  # [N·pairs]
            }
            repeats = len(first)
        if label_tensor is not None:
            batch["labels"] = label_tensor.repeat_interleave(repeats)
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


class PreloadedBatches(InMemoryBatches):
    """InMemoryBatches over `preload_pairs`, recording which store shards this rank's data came from (all of them)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], infos: Sequence[StoreInfo], **kwargs: Any) -> None:
        super().__init__(tensors, **kwargs)
        self.shards_read = [[info.url, int(shard)] for info in infos for shard in info.committed_shards]


# ------------------------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class MidResult:
    """A finished mid-training run: the loop's result plus the initial student's scores (eval_at_init)."""

    loop: LoopResult
    init_metrics: dict[str, float]
    rank_report: dict[str, Any]


class ChunkRecordingStream:
    """A TrajectoryStream (include_indices=True) that records which store chunks each epoch's batches came from.

    Readers are dealt runs of whole chunks (a shard may be split between readers), so the chunk is the unit two
    ranks must never share. The index keys (store, index, point, point_r) are stripped before the batch reaches the
    loss; state_dict / load_state_dict are the stream's own, so checkpoints and resume are unchanged.
    """

    INDEX_KEYS = ("store", "index", "point", "point_r")

    def __init__(self, stream: Any, infos: Sequence[StoreInfo]) -> None:
        self.stream = stream
        self.urls = [info.url for info in infos]
        self.chunk_sizes = torch.tensor([info.chunk_size for info in infos])  # [stores]
        self.chunks_by_epoch: dict[int, set[tuple[int, int]]] = {}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The stream's batches without the index keys; the epoch is read before each batch is drawn."""
        batches = iter(self.stream)
        while True:
            epoch = self.stream.epoch
            batch = next(batches)
            store = batch["store"]  # [B]
            chunk = batch["index"] // self.chunk_sizes[store]  # [B]
            seen = self.chunks_by_epoch.setdefault(epoch, set())
            seen.update(zip(store.tolist(), chunk.tolist()))
            yield {key: value for key, value in batch.items() if key not in self.INDEX_KEYS}

    def state_dict(self) -> dict[str, Any]:
        """The stream's position."""
        return self.stream.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the stream."""
        self.stream.load_state_dict(state)

    def log_values(self) -> dict[str, float]:
        """The stream's scalars for every logged step (corrupt shards skipped)."""
        return self.stream.log_values()

    def chunks_read(self) -> dict[str, list[list[Any]]]:
        """{epoch: [[store url, chunk], ...]} of the batches handed out so far (this run, this rank)."""
        return {str(epoch): [[self.urls[store], chunk] for store, chunk in sorted(seen)]
                for epoch, seen in sorted(self.chunks_by_epoch.items())}


def build_batches(cfg: MidConfig, infos: Sequence[StoreInfo], *, rank: int, world_size: int,
                  sample_shape: Sequence[int]) -> Any:
    """The run's batch source: a chunk-recording trainer.data.TrajectoryStream, or PreloadedBatches (source=memory).

    The store checks (shape, completeness, teacher fingerprint, shards per reader) ran in `check_stores` already,
    with this config's key names; the stream repeats the shape check only.
    """
    if cfg.stream.source == "memory":
        return PreloadedBatches(preload_pairs(cfg, infos), infos, batch_per_process=cfg.batch_per_process,
                                seed=cfg.loop.seed, rank=rank, world_size=world_size)
    from trainer.data import StreamConfig, StreamError, TrajectoryStream

    stream_cfg = StreamConfig(
        urls=tuple(cfg.stores),
        mode=cfg.form,
        batch_per_process=cfg.batch_per_process,
        points_per_trajectory=cfg.stream.points_per_trajectory,
        pairs_per_trajectory=cfg.stream.pairs_per_trajectory,
        shuffle_buffer=cfg.stream.shuffle_buffer,
        num_workers=cfg.stream.num_workers,
        prefetch_factor=cfg.stream.prefetch_factor,
        seed=cfg.loop.seed,
        allow_incomplete=cfg.stream.allow_incomplete,
        on_corrupt_shard=cfg.stream.on_corrupt_shard,
        expected_sample_shape=tuple(sample_shape),
        include_indices=True,
    )
    try:
        stream = TrajectoryStream(stream_cfg, rank=rank, world_size=world_size)
    except StreamError as error:
        raise MidDataError(str(error)) from error
    return ChunkRecordingStream(stream, infos)


def data_report(batches: Any) -> dict[str, Any]:
    """What this rank's batch source read: {"chunks_read", "corrupt_shards_skipped"} for stores, {"online"} for
    data=online."""
    if isinstance(batches, OnlineTrajectories):
        return {"online": batches.report()}
    skipped = batches.stream.skipped_shards if isinstance(batches, ChunkRecordingStream) else []
    return {"chunks_read": chunks_read(batches), "corrupt_shards_skipped": skipped}


def chunks_read(batches: Any) -> Any:
    """What this rank's batch source read: {epoch: [[url, chunk], ...]} (stream) or [[url, shard], ...] (memory)."""
    if isinstance(batches, ChunkRecordingStream):
        return batches.chunks_read()
    return [list(entry) for entry in batches.shards_read]


def run(cfg: MidConfig) -> MidResult:
    """Mid-train (or resume) the student described by `cfg`; returns the loop result and the initial scores."""
    accelerator = make_accelerator(cfg.loop)  # first: later accelerate state must see the launcher's processes
    output_dir = Path(cfg.loop.output_dir)
    if accelerator.is_main_process:
        save_resolved(cfg, output_dir)
    from pipeline.teacher import load_teacher

    teacher = load_teacher(cfg.teacher, device=accelerator.device)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    online = None
    if cfg.data == "online":
        infos, online = [], open_online_source(cfg.online, teacher, student_teacher_source=cfg.teacher, mode=cfg.form,
                                               batch_per_process=cfg.batch_per_process, seed=cfg.loop.seed, rank=rank,
                                               world_size=world_size)
    else:
        infos = check_stores(cfg, sample_shape=teacher.sample_shape, teacher_fingerprint=teacher.fingerprint,
                             world_size=world_size)
    set_seed(cfg.loop.seed)  # identical initial weights on every rank and every run
    student = build_student(teacher, cfg.student, second_time_input=cfg.form == "mf", init=cfg.init,
                            seed=cfg.loop.seed)
    transfer = plan_transfer(cfg.student, student, total_steps=cfg.loop.total_steps, loop_grad_clip=cfg.loop.grad_clip)
    vae = teacher.vae
    if transfer.steps == 0:
        del teacher
    evaluate = StudentEvaluator(cfg, output_dir / "samples", vae=vae)
    init_metrics = evaluate_at_init(cfg.eval_at_init, evaluate, student, accelerator, output_dir / INIT_EVAL_FILE)
    batches = online if online is not None else build_batches(cfg, infos, rank=rank, world_size=world_size,
                                                              sample_shape=student.sample_shape)
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
    (output_dir / RANKS_DIR).mkdir(parents=True, exist_ok=True)
    (output_dir / RANKS_DIR / f"rank_{rank}.json").write_text(json.dumps(report, indent=2))
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
        per_trajectory = []
        for info in infos:
            k = info.num_points - 1
            if cfg.form == "cm":
                per_trajectory.append(min(k, cfg.stream.points_per_trajectory or k))
            else:
                pairs = k * (k + 1) // 2
                per_trajectory.append(min(pairs, cfg.stream.pairs_per_trajectory or pairs))
        samples = sum(count * info.num_trajectories for count, info in zip(per_trajectory, infos))
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
    from trainer.corrupt_shards import CorruptDataError
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
