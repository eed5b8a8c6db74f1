"""Stage 3, post-training: ECT / ECD (Ψ_{t→0}) and MeanFlow (Ψ_{t→s}) of a FlowMapStudent, after CMT or not.

    accelerate launch trainer/post.py --config jobs/digits/post.yaml --method ect|ecd|meanflow \
        --init cmt:<dir>|teacher|random --data store:<url>[,<url>...]|dataset:<name> [key=value ...] [--dry-run]
    python trainer/post.py ...                          (one process; same flags)
    python trainer/post.py ... --benchmark-ecd STEPS    (ECD step cost, stored teacher step vs live teacher)

Methods (losses from `trainer/losses.py`, time sampling from `trainer/schedules.py`):

- ect (ECT, Geng et al. 2024): ln t ~ N(P_mean, P_std²), r = t·(1 − (1 + k·sigmoid(−b·t))/q); x_t = x0 + t·ε and
  x_r = x0 + r·ε share ε AND the dropout mask; loss d(f_θ(x_t, t), sg(f_θ(x_r, r)))/(t − r), target x0 where r = 0.
  q is fixed (4096 after CMT) or ECT's doubling schedule (q_mode=doubling) for the diffusion-initialised baseline.
- ecd (consistency distillation with ECT's loss): x_r is one teacher PF-ODE step from x_t. From a store the pair is
  two consecutive stored solver points (no teacher forward pass at all); from a dataset the teacher takes the step
  live (`pipeline.solvers.ode_step`).
- meanflow (MeanFlow, Geng et al. 2025): u_tgt = v − (t − r)·sg(du/dt), du/dt = v·∂_z u + ∂_t u, by JVP (on the
  unwrapped module, no grad; the differentiable prediction goes through the DDP-wrapped model so gradients are
  all-reduced) or by a central finite difference; adaptive weight 1/(‖e‖² + c)^p.

Data: `store:` streams the trajectory stores (`trainer.data`): ect / meanflow take the solver's clean endpoints x̂_0
(mode "endpoints"), ecd consecutive points (mode "ecd"). `dataset:` uses real images (`trainer.datasets`).
Init: `cmt:<dir>` (a mid-training export, `FlowMapStudent.from_pretrained`, read with the parameterisation it
records), `teacher` (the diffusion model itself: the teacher's weights AND its own c_skip/c_out, so f is its x0
prediction and u at r = t its velocity), `random` (the teacher's architecture, fresh weights, read the way "auto" picks
in `trainer.parameterization`).

Writes into `loop.output_dir`: config.yaml, checkpoints/, metrics.jsonl (loss, skipped_steps, fd_1step, fd_2step),
samples/step_<N>_{1,2}step.png, ranks/rank_<r>.json (parameter sha256 of each rank, teacher forward count, corrupt
store shards skipped), init_eval.json (eval_at_init) and export/ (`FlowMapStudent.save_pretrained`; `python -m
trainer.sample` samples it). Re-running the same command resumes from the newest complete checkpoint; a corrupt store
shard stops the run with the fix named, or with stream.on_corrupt_shard=skip is left out
(`trainer.data.corrupt_shards`).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # Run by path, Python puts trainer/ first on sys.path, where datasets.py would shadow the `datasets` package.
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path[:] = [entry for entry in _sys.path if _Path(entry or ".").resolve() != _Path(__file__).resolve().parent]

import json
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel, set_seed
from torch import Tensor

from trainer.config import ConfigError, config_to_dict, load_config, parse_stage_args, save_resolved
from trainer.data.corrupt_shards import CorruptDataError
from trainer.data.options import StreamOptions
from trainer.evaluation import EVAL_SEED
from trainer.label_dropout import LabelDropout
from trainer.loop import InMemoryBatches, LoopConfig, LoopResult, make_accelerator, train_loop
from trainer.meanflow import MeanFlowConfig, MeanFlowLoss, resolve_derivative, tau_max
from trainer.post_steps import (
    attention_context,
    column,
    conditioning_labels,
    hold_if_asked,
    same_dropout,
    step_generator,
    step_seed,
)

METHODS = ("ect", "ecd", "meanflow")
RANKS_DIR = "ranks"
INIT_EVAL_FILE = "init_eval.json"
STORE_PREFIX, DATASET_PREFIX, CMT_PREFIX = "store:", "dataset:", "cmt:"


class InitError(ConfigError):
    """A student init that does not fit the run (wrong architecture, time convention, form); names the fix."""


# ------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, kw_only=True)
class ECTConfig:
    """ECT / ECD time sampling, Δt schedule and loss weighting (ECT's defaults; q fixed at 4096 after CMT)."""

    p_mean: float = -1.1
    p_std: float = 2.0
    k: float = 8.0
    b: float = 1.0
    q_mode: Literal["fixed", "doubling"] = "fixed"
    q_start: float = 4096.0  # "fixed": the q used throughout; "doubling": ECT's start (2)
    double_every_steps: int | None = None  # "doubling": steps per ECT stage (q doubles after each)
    q_max: float | None = None
    weighting: Literal["pseudo_huber", "power"] = "pseudo_huber"
    c: float | None = None  # pseudo_huber: None → iCT's 0.00054·√d; power: None → 1e-3
    p: float = 0.5  # power weighting's exponent
    sigma_min: float = 0.002  # t is clamped to [sigma_min, sigma_max] (sigma_max also to the schedule's largest σ̃)
    sigma_max: float = 80.0

    def __post_init__(self) -> None:
        """Reject schedules the losses would refuse mid-run, naming the fix."""
        if not self.q_start > 0:
            raise ConfigError(f"ect.q_start must be > 0, got {self.q_start}")
        if self.q_mode == "doubling" and (self.double_every_steps is None or self.double_every_steps < 1):
            raise ConfigError("ect.q_mode=doubling needs ect.double_every_steps >= 1 (optimizer steps per ECT stage)")
        if self.p_std < 0 or self.k < 0:
            raise ConfigError("ect.p_std and ect.k must be >= 0")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"need 0 < ect.sigma_min < ect.sigma_max, got {self.sigma_min} and {self.sigma_max}")


@dataclass(frozen=True, kw_only=True)
class ECDConfig:
    """ECD with a live teacher (`--data dataset:`): the ODE step method and the teacher's guidance."""

    teacher_step: Literal["euler", "heun"] = "heun"
    guidance_scale: float | None = None


@dataclass(frozen=True, kw_only=True)
class PostConfig:
    """Stage-3 settings: method, init, data, the method's options, evaluation and the shared loop."""

    loop: LoopConfig
    method: Literal["ect", "ecd", "meanflow"] = "ect"
    init: str = "teacher"  # "cmt:<dir>" | "teacher" | "random"
    data: str = "store:runs/digits/store.zarr"  # "store:<url>[,<url>...]" | "dataset:<name>"
    teacher: str | None = None  # teacher dir: needed by init teacher/random and by ECD from a dataset
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
        """Reject combinations that cannot work, naming the fix."""
        data_kind = self.data.split(":", 1)[0] + ":" if ":" in self.data else ""
        if data_kind not in (STORE_PREFIX, DATASET_PREFIX) or not self.data.split(":", 1)[1].strip():
            raise ConfigError(
                f"data={self.data!r}: write `store:<url>[,<url>...]` (trajectory stores of pipeline/generate.py) or "
                "`dataset:<name>` (digits, mnist, folder:<path>)"
            )
        if not (self.init in ("teacher", "random") or (self.init.startswith(CMT_PREFIX) and self.init[4:].strip())):
            raise ConfigError(
                f"init={self.init!r}: write `cmt:<dir>` (a trainer/mid.py export), `teacher` or `random`"
            )
        if self.init in ("teacher", "random") and not self.teacher:
            raise ConfigError(f"init={self.init} builds the student from the teacher: pass teacher=<teacher dir>")
        if self.method == "ecd" and data_kind == DATASET_PREFIX and not self.teacher:
            raise ConfigError(
                "ECD from a dataset runs the teacher's ODE step live: pass teacher=<teacher dir>, or use "
                "--data store:<url> (the stored consecutive solver points; no teacher needed)"
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
            raise ConfigError(
                "label_dropout with ECD from a dataset: the live teacher takes its ODE step with the real labels, so "
                "a dropped (null) label would get a conditional target; drop label_dropout, or use --data store:<url>"
            )

    @property
    def label_drop_probability(self) -> float:
        """label_dropout, or the method's default: 0.1 for MeanFlow with guidance (official MeanFlow), else 0."""
        if self.label_dropout is not None:
            return self.label_dropout
        return 0.1 if self.method == "meanflow" and self.meanflow.guidance_scale is not None else 0.0

    @property
    def data_kind(self) -> Literal["store", "dataset"]:
        """Where the batches come from."""
        return "store" if self.data.startswith(STORE_PREFIX) else "dataset"

    @property
    def store_urls(self) -> tuple[str, ...]:
        """The trajectory store URLs of `data=store:...`."""
        return tuple(url.strip() for url in self.data[len(STORE_PREFIX) :].split(",") if url.strip())

    @property
    def dataset_name(self) -> str:
        """The dataset name of `data=dataset:...`."""
        return self.data[len(DATASET_PREFIX) :].strip()

    @property
    def live_teacher(self) -> bool:
        """Whether training runs the teacher (ECD from a dataset); everything else never calls it."""
        return self.method == "ecd" and self.data_kind == "dataset"


# ------------------------------------------------------------------------------------------------------------
# ECT / ECD


def paired_denoise(
    model: torch.nn.Module, x_t: Tensor, t: Tensor, x_r: Tensor, r: Tensor, labels: Tensor | None, *, dropout_seed: int
) -> tuple[Tensor, Tensor]:
    """(f_θ(x_t, t) with gradient through `model`, sg(f_θ(x_r, r)) without): both forwards with ONE dropout mask.

    The target pass runs on the unwrapped module under no_grad; the prediction pass through `model` (DDP-wrapped
    in multi-process runs, so its backward all-reduces the gradients).
    """
    with same_dropout(dropout_seed, x_t.device):
        f_t = model("cm", x_t, t, labels)  # [B, *S]
    with torch.no_grad(), same_dropout(dropout_seed, x_t.device):
        f_r = extract_model_from_parallel(model)("cm", x_r, r, labels)  # [B, *S]
    return f_t, f_r


def consistency_pair_loss(
    model: torch.nn.Module,
    x_t: Tensor,
    t: Tensor,
    x_r: Tensor,
    r: Tensor,
    labels: Tensor | None,
    *,
    ect: ECTConfig,
    dropout_seed: int,
) -> Tensor:
    """ECT's per-sample loss d(f_θ(x_t, t), sg(f_θ(x_r, r)))/(t − r), target x_r itself where r = 0 (f(x, 0) = x) → [B].

    For ECT x_r = x0 + r·ε, so the r = 0 target is the clean sample; for ECD x_r is the teacher's ODE step.
    """
    from trainer.losses import ect_loss, ect_target

    f_t, f_r = paired_denoise(model, x_t, t, x_r, r, labels, dropout_seed=dropout_seed)
    target = ect_target(f_r, x_r, r)  # [B, *S]
    return ect_loss(f_t, target, t, r, weighting=ect.weighting, c=ect.c, p=ect.p)  # [B]


def ect_times(
    batch: int, step: int, ect: ECTConfig, sigma_range: tuple[float, float], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(t, r) [B] float64 of ECT: ln t ~ N(P_mean, P_std²) clamped to the range, r = ect_r_from_t(t, q(step))."""
    from trainer.schedules import clamp_sigma, ect_q_schedule, ect_r_from_t, sample_ect_times

    t = sample_ect_times(batch, p_mean=ect.p_mean, p_std=ect.p_std, generator=generator)  # [B] float64
    t = clamp_sigma(t, sigma_min=sigma_range[0], sigma_max=sigma_range[1])
    q = ect_q_schedule(step, mode=ect.q_mode, q_start=ect.q_start, double_every_steps=ect.double_every_steps,
                       q_max=ect.q_max)
    return t, ect_r_from_t(t, q, k=ect.k, b=ect.b)


def noised_ect_pair(
    x0: Tensor, step: int, ect: ECTConfig, sigma_range: tuple[float, float]
) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
    """This step's seed, ECT times (t, r) [B], x_t = x0 + t·ε [B, *S] and ε, all drawn from the step's own seed."""
    seed = step_seed()
    generator = step_generator(seed, x0.device)
    t, r = ect_times(x0.shape[0], step, ect, sigma_range, generator)  # [B] each
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # [B, *S]
    return seed, t, r, x0 + column(t, x0) * noise, noise


@dataclass
class ECTLoss:
    """ECT on clean samples x0 (store endpoints or dataset images): x_t, x_r share ε and the dropout mask."""

    ect: ECTConfig
    sigma_range: tuple[float, float]
    attention: str = "sdpa"

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Tensor], step: int) -> Tensor:
        """Per-sample ECT loss [B] of one batch."""
        hold_if_asked(step)
        seed, t, r, x_t, noise = noised_ect_pair(batch["x0"], step, self.ect, self.sigma_range)
        x_r = batch["x0"] + column(r, noise) * noise  # [B, *S], the same ε as x_t
        with attention_context(self.attention):
            return consistency_pair_loss(model, x_t, t, x_r, r, conditioning_labels(model, batch), ect=self.ect,
                                         dropout_seed=seed + 1)


@dataclass
class StoredECDLoss:
    """ECD from a store: (x_t, x_r) are consecutive stored solver points, so no teacher runs during training."""

    ect: ECTConfig
    attention: str = "sdpa"

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Tensor], step: int) -> Tensor:
        """Per-sample ECD loss [B] on the stored one-step pairs (x_t at σ̃_t, x_r at σ̃_r < σ̃_t)."""
        hold_if_asked(step)
        t = batch["sigma_t"].to(torch.float64)  # [B]
        r = batch["sigma_r"].to(torch.float64)  # [B]
        with attention_context(self.attention):
            return consistency_pair_loss(model, batch["x_t"], t, batch["x_r"], r, conditioning_labels(model, batch),
                                         ect=self.ect, dropout_seed=step_seed())


@dataclass
class LiveECDLoss:
    """ECD from clean data with the teacher live: x_r = one teacher ODE step from x_t (`pipeline.solvers.ode_step`)."""

    ect: ECTConfig
    ecd: ECDConfig
    teacher: Any
    sigma_range: tuple[float, float]
    attention: str = "sdpa"

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Tensor], step: int) -> Tensor:
        """Per-sample ECD loss [B]: t, r as in ECT, x_r from the teacher's step from (x_t, t) to r."""
        from pipeline.solvers import ode_step

        hold_if_asked(step)
        x0 = batch["x0"]  # [B, *S]
        seed, t, r, x_t, _ = noised_ect_pair(x0, step, self.ect, self.sigma_range)
        labels = conditioning_labels(model, batch)
        x_r = ode_step(self.teacher, x_t, t, r, method=self.ecd.teacher_step, labels=labels,
                       guidance_scale=self.ecd.guidance_scale).to(x0.device)  # [B, *S]
        with attention_context(self.attention):
            return consistency_pair_loss(model, x_t, t, x_r, r, labels, ect=self.ect, dropout_seed=seed + 1)


# ------------------------------------------------------------------------------------------------------------
# Student init and its checks


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


def _cmt_dir(init: str) -> Path:
    """The student export named by `cmt:<dir>` (a mid-training run dir is accepted for its export/)."""
    directory = Path(init[len(CMT_PREFIX) :].strip()).expanduser()
    if not (directory / "student.json").is_file() and (directory / "export" / "student.json").is_file():
        return directory / "export"
    return directory


def check_student_fits(
    student: Any, *, method: str, sample_shape: Sequence[int] | None, teacher: Any = None, source: str = "the student"
) -> None:
    """Refuse a student whose architecture / time convention differs from the teacher's or the data's, or one without
    the second time input MeanFlow needs; raises InitError naming the fix."""
    if sample_shape is not None and tuple(student.sample_shape) != tuple(sample_shape):
        raise InitError(
            f"{source} is built for samples of shape {list(student.sample_shape)} but the data holds "
            f"{list(sample_shape)}: another architecture. Post-train the export made from this data's teacher "
            "(trainer/mid.py on its stores), or pick the matching --data"
        )
    if method == "meanflow" and not student.second_time_input:
        raise InitError(
            f"MeanFlow needs a student with a second time input (u_θ(z, r, t)); {source} has none (a CM-form export). "
            "Mid-train with form=mf (trainer/mid.py form=mf), use --init teacher / random (built with the second "
            "time input), or post-train this export with --method ect / ecd"
        )
    if teacher is None:
        return
    # a student may carry a null-class row its teacher lacks (trainer.student.FlowMapStudent.add_null_class)
    ignored = {"num_class_embeds"} if student.num_classes == teacher.num_classes else set()
    student_config = {k: v for k, v in dict(student.net.config).items() if not k.startswith("_") and k not in ignored}
    teacher_config = {k: v for k, v in dict(teacher.model.config).items() if not k.startswith("_") and k not in ignored}
    differing = sorted(key for key in student_config.keys() | teacher_config.keys()
                       if _config_value(student_config.get(key)) != _config_value(teacher_config.get(key)))
    if type(student.net).__name__ != type(teacher.model).__name__ or differing:
        details = ", ".join(f"{key}: {student_config.get(key)!r} vs {teacher_config.get(key)!r}"
                            for key in differing[:4])
        raise InitError(
            f"{source} has another architecture than the teacher {teacher.model.__class__.__name__} "
            f"({type(student.net).__name__}; {details or 'class differs'}): pass the export mid-trained from this "
            "teacher, or set teacher=<the teacher it was made from>"
        )
    same_schedule = (
        student.schedule.family == teacher.schedule.family
        and student.schedule.num_train_timesteps == teacher.schedule.num_train_timesteps
        and (student.schedule.log_sigma_table is None) == (teacher.schedule.log_sigma_table is None)
        and (student.schedule.log_sigma_table is None
             or np.allclose(student.schedule.log_sigma_table, teacher.schedule.log_sigma_table, rtol=0, atol=1e-9))
    )
    if not same_schedule or student.prediction_type != teacher.prediction_type:
        raise InitError(
            f"{source} uses another time convention than the teacher (schedule {student.schedule.family}, "
            f"T={student.schedule.num_train_timesteps}, prediction {student.prediction_type} vs "
            f"{teacher.schedule.family}, T={teacher.schedule.num_train_timesteps}, prediction "
            f"{teacher.prediction_type}): its σ̃ ↦ timestep map would be wrong. Pass the export mid-trained from "
            "this teacher, or set teacher=<the teacher it was made from>"
        )


def _config_value(value: Any) -> Any:
    """Config values compared as JSON-like data (tuples and lists alike)."""
    return list(value) if isinstance(value, (tuple, list)) else value


def build_student(cfg: PostConfig, teacher: Any, device: torch.device) -> Any:
    """The FlowMapStudent of `cfg.init` (cmt export, teacher weights or random), MF-capable for MeanFlow."""
    from trainer.student import FlowMapStudent, StudentLoadError

    if cfg.init.startswith(CMT_PREFIX):
        directory = _cmt_dir(cfg.init)
        try:
            student = FlowMapStudent.from_pretrained(directory, device=device)
        except StudentLoadError as error:
            raise InitError(f"--init {cfg.init}: {error}") from error
        return student.train()
    # init=teacher is the diffusion model itself (its own c_skip/c_out: the student IS its denoiser); a random init
    # takes the well-conditioned reading "auto" picks (trainer.parameterization)
    try:
        student = FlowMapStudent.from_teacher(teacher, second_time_input=cfg.method == "meanflow", init=cfg.init,
                                              seed=cfg.loop.seed,
                                              parameterization="teacher" if cfg.init == "teacher" else "auto")
    except StudentLoadError as error:
        raise InitError(f"--init {cfg.init} --method {cfg.method}: {error}") from error
    return student.to(device).train()


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


def dataset_batches(cfg: PostConfig, *, rank: int, world_size: int) -> tuple[InMemoryBatches, tuple[int, ...]]:
    """Real images as clean samples x0 (+ labels) in InMemoryBatches, and their sample shape."""
    from trainer.datasets import load_dataset

    try:
        data = load_dataset(cfg.dataset_name, image_size=cfg.image_size)
    except ValueError as error:
        raise ConfigError(f"data={cfg.data}: {error}") from error
    batches = InMemoryBatches({"x0": data.images, "labels": data.labels}, batch_per_process=cfg.batch_per_process,
                              seed=cfg.loop.seed, rank=rank, world_size=world_size)
    return batches, tuple(data.image_shape)


def store_stream(cfg: PostConfig, student: Any, *, rank: int, world_size: int, device: Any = None,
                 mode: str | None = None) -> Any:
    """The streaming loader over the stores (`trainer.data.make_stream`, pinned batches with workers on CUDA):
    endpoints (ect, meanflow) or consecutive points (ecd), checked against the student's shape and teacher."""
    from trainer.data.errors import StreamError
    from trainer.data.options import StreamConfig
    from trainer.data.stream import make_stream

    mode = mode or ("ecd" if cfg.method == "ecd" else "endpoints")
    stream_cfg = StreamConfig.from_options(
        cfg.stream, urls=cfg.store_urls, mode=mode, batch_per_process=cfg.batch_per_process, seed=cfg.loop.seed,
        expected_sample_shape=student.sample_shape, expected_fingerprint=student.teacher_fingerprint,
    )
    try:
        return make_stream(stream_cfg, rank=rank, world_size=world_size, device=device)
    except StreamError as error:
        raise ConfigError(f"data={cfg.data}: {error}") from error


# ------------------------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class PostResult:
    """A finished post-training run: the loop's result, initial scores, this rank's report."""

    loop: LoopResult
    init_metrics: dict[str, float]
    rank_report: dict[str, Any]


@dataclass
class _Setup:
    """Everything `run` and the benchmark build before training."""

    student: Any
    teacher: Any
    loss_fn: Any
    derivative: str | None
    vae: Any  # the teacher's VAE of a latent student (evaluation decodes through it; the export carries it)


def _sigma_range(ect: ECTConfig, schedule: Any, teacher: Any = None) -> tuple[float, float]:
    """t range of ECT / ECD: [sigma_min, sigma_max] within the schedule's top level (and the teacher's bottom one)."""
    low = ect.sigma_min if teacher is None else max(ect.sigma_min, teacher.sigma_edm_range[0])
    high = min(ect.sigma_max, schedule.sigma_edm_max)
    if teacher is not None:
        high = min(high, teacher.sigma_edm_range[1])
    if not low < high:
        raise ConfigError(f"ECT time range [{low}, {high}] is empty for this schedule: adjust ect.sigma_min/sigma_max")
    return low, high


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


def _setup(cfg: PostConfig, device: torch.device, *, data_sample_shape: Sequence[int] | None) -> _Setup:
    """Load the teacher if one is named, build and check the student against it, and pick the method's loss.

    The teacher is kept only for ECD from a dataset; every other method drops it before training.
    """
    from pipeline.teacher import load_teacher

    teacher = load_teacher(cfg.teacher, device=device) if cfg.teacher else None  # init source and compatibility check
    set_seed(cfg.loop.seed)  # identical initial weights on every rank and every run
    student = build_student(cfg, teacher, device)
    source = f"--init {cfg.init}" + (f" ({_cmt_dir(cfg.init)})" if cfg.init.startswith(CMT_PREFIX) else "")
    check_student_fits(student, method=cfg.method, sample_shape=data_sample_shape, teacher=teacher, source=source)
    _configure_attention(cfg, student, device)
    null_class = _null_class(cfg, student)
    derivative = None
    if cfg.method == "ect":
        loss_fn = ECTLoss(cfg.ect, _sigma_range(cfg.ect, student.schedule), cfg.attention)
    elif cfg.method == "ecd" and cfg.data_kind == "store":
        loss_fn = StoredECDLoss(cfg.ect, cfg.attention)
    elif cfg.method == "ecd":
        loss_fn = LiveECDLoss(cfg.ect, cfg.ecd, teacher, _sigma_range(cfg.ect, student.schedule, teacher),
                              cfg.attention)
    else:
        derivative = resolve_derivative(cfg.meanflow.derivative, cfg.attention)
        if derivative == "fd" and cfg.meanflow.derivative == "auto":
            warnings.warn(f"attention={cfg.attention} has no forward-mode AD: MeanFlow uses the finite difference",
                          stacklevel=2)
        loss_fn = MeanFlowLoss(cfg.meanflow, derivative, tau_max(student, cfg.meanflow), cfg.attention, null_class)
    if cfg.label_drop_probability > 0:
        loss_fn = LabelDropout(loss_fn, cfg.label_drop_probability, null_class)
    vae = _latent_decoder(cfg, student, teacher, device)
    if not cfg.live_teacher:
        teacher = None  # nothing below calls it: ECT, MeanFlow and stored ECD never run the teacher
    return _Setup(student, teacher, loss_fn, derivative, vae)


def _latent_decoder(cfg: PostConfig, student: Any, teacher: Any, device: torch.device) -> Any:
    """The VAE of a latent student: the teacher's, else the one in the --init cmt export; None for pixel students."""
    from trainer.student_export import load_vae

    if teacher is not None and teacher.vae is not None:
        return teacher.vae
    vae = load_vae(_cmt_dir(cfg.init), device) if cfg.init.startswith(CMT_PREFIX) else None
    if vae is None and student.latent:
        warnings.warn(
            f"--init {cfg.init} is a latent student but no VAE was found (neither teacher=<dir> nor a vae/ in the "
            "export): evaluation cannot decode its samples into images and the export carries no VAE; pass "
            "teacher=<the teacher pipeline directory>",
            stacklevel=3,
        )
    return vae


def _data_sample_shape(cfg: PostConfig) -> tuple[int, ...] | None:
    """The sample shape of the dataset (stores are checked by the stream against the student)."""
    if cfg.data_kind != "dataset":
        return None
    from trainer.datasets import load_dataset

    try:
        return tuple(load_dataset(cfg.dataset_name, image_size=cfg.image_size).image_shape)
    except ValueError as error:
        raise ConfigError(f"data={cfg.data}: {error}") from error


def run(cfg: PostConfig) -> PostResult:
    """Post-train (or resume) the student described by `cfg`; returns the loop result, initial scores, rank report."""
    from trainer.evaluation import StudentEvaluator, evaluate_at_init, parameter_hash

    accelerator = make_accelerator(cfg.loop)  # first: later accelerate state must see the launcher's processes
    output_dir = Path(cfg.loop.output_dir)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    setup = _setup(cfg, accelerator.device, data_sample_shape=_data_sample_shape(cfg))  # refuses bad inits first
    if accelerator.is_main_process:
        save_resolved(cfg, output_dir)
    if cfg.data_kind == "store":
        batches = store_stream(cfg, setup.student, rank=rank, world_size=world_size, device=accelerator.device)
    else:
        batches, _ = dataset_batches(cfg, rank=rank, world_size=world_size)
    evaluate = StudentEvaluator(cfg, output_dir / "samples", vae=setup.vae)
    init_metrics = evaluate_at_init(cfg.eval_at_init, evaluate, setup.student, accelerator, output_dir / INIT_EVAL_FILE)
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
    (output_dir / RANKS_DIR).mkdir(parents=True, exist_ok=True)
    (output_dir / RANKS_DIR / f"rank_{rank}.json").write_text(json.dumps(report, indent=2))
    return PostResult(loop=result, init_metrics=init_metrics, rank_report=report)


def describe(cfg: PostConfig) -> dict[str, Any]:
    """What a run of `cfg` would do, for --dry-run: resolved config, data, student, derivative; writes nothing."""
    device = torch.device("cpu")
    state = PartialState()
    setup = _setup(cfg, device, data_sample_shape=_data_sample_shape(cfg))
    if cfg.data_kind == "store":
        data = store_stream(cfg, setup.student, rank=state.process_index, world_size=state.num_processes).describe()
    else:
        batches, shape = dataset_batches(cfg, rank=state.process_index, world_size=state.num_processes)
        data = {"dataset": cfg.dataset_name, "num_images": batches.num_samples, "image_shape": list(shape)}
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


# ------------------------------------------------------------------------------------------------------------
# ECD cost: stored teacher step vs live teacher step


def benchmark_ecd(cfg: PostConfig, *, steps: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Median seconds per ECD optimizer step (data + loss + backward + update), stored teacher step vs live teacher.

    Same student init, batch size, stores and loss: the stored path streams consecutive solver points (mode "ecd",
    no teacher); the live path streams the same stores' clean endpoints (mode "endpoints") and takes the step with
    the teacher (`ode_step`, `ecd.teacher_step`). The two paths alternate step by step, so a change in machine load
    hits both alike. Needs data=store:... and teacher=<dir>. One process, no checkpoints.
    """
    import dataclasses

    from pipeline.teacher import load_teacher

    if cfg.data_kind != "store" or not cfg.teacher:
        raise ConfigError("--benchmark-ecd compares stored and live ECD steps: pass data=store:<url> and teacher=<dir>")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.loop.torch_threads is not None:
        torch.set_num_threads(cfg.loop.torch_threads)
    cfg = dataclasses.replace(cfg, method="ecd")
    teacher = load_teacher(cfg.teacher, device=device)
    counter = ForwardCounter(teacher.model)
    paths: dict[str, dict[str, Any]] = {}
    for path, mode in (("stored", "ecd"), ("live", "endpoints")):
        setup = _setup(cfg, device, data_sample_shape=None)
        loss_fn = setup.loss_fn if path == "stored" else LiveECDLoss(
            cfg.ect, cfg.ecd, teacher, _sigma_range(cfg.ect, setup.student.schedule, teacher), cfg.attention)
        paths[path] = {"student": setup.student, "loss_fn": loss_fn, "seconds": [], "data_seconds": [],
                       "batches": iter(store_stream(cfg, setup.student, rank=0, world_size=1, device=device,
                                                    mode=mode)),
                       "optimizer": torch.optim.RAdam(setup.student.parameters(), lr=cfg.loop.lr), "teacher_samples": 0}
    for step in range(warmup + steps):
        for path in paths.values():
            before = counter.samples
            started = time.perf_counter()
            batch = {name: tensor.to(device) for name, tensor in next(path["batches"]).items()}
            loaded = time.perf_counter()
            path["loss_fn"](path["student"], batch, step).mean().backward()
            path["optimizer"].step()
            path["optimizer"].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                path["seconds"].append(time.perf_counter() - started)
                path["data_seconds"].append(loaded - started)
                path["teacher_samples"] += counter.samples - before
    counter.remove()
    timings: dict[str, Any] = {
        name: {"seconds_per_step": float(np.median(path["seconds"])),
               "data_seconds_per_step": float(np.median(path["data_seconds"])),
               "teacher_forward_samples_per_step": path["teacher_samples"] / steps}
        for name, path in paths.items()
    }
    timings["live_over_stored"] = timings["live"]["seconds_per_step"] / timings["stored"]["seconds_per_step"]
    timings.update(batch_per_process=cfg.batch_per_process, steps=steps, teacher_step=cfg.ecd.teacher_step,
                   device=str(device), threads=torch.get_num_threads())
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `trainer/post.py --config PRESET --method M --init I --data D [key=value ...] [--dry-run]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    benchmark_steps = None
    if "--benchmark-ecd" in argv:
        index = argv.index("--benchmark-ecd")
        if index + 1 >= len(argv) or not argv[index + 1].isdigit():
            print("error: --benchmark-ecd needs a number of steps, e.g. --benchmark-ecd 10", file=sys.stderr)
            return 2
        benchmark_steps = int(argv[index + 1])
        del argv[index : index + 2]
    try:
        args = parse_stage_args(argv)
        cfg = load_config(PostConfig, args.config_path, args.overrides)
        if benchmark_steps is not None:
            print(json.dumps(benchmark_ecd(cfg, steps=benchmark_steps)))
            return 0
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
