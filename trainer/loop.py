"""The one training loop shared by pre-, mid- and post-training (stages differ by config and loss only).

`train_loop` reads top to bottom, once per optimizer step: log → eval → checkpoint → done? →
accumulate → step → EMA. Accelerate handles devices, processes, mixed precision and gradient
accumulation; diffusers' `EMAModel` keeps the weight average. Resuming is re-running the same
command: the loop restores the newest complete checkpoint under `<output_dir>/checkpoints`
(model, optimizer, LR schedule, EMA, RNG states, data position) and continues with exactly the
batches and random draws the uninterrupted run would have used.

Output directory layout:

    <output_dir>/checkpoints/step_<N>/   accelerate.save_state + checkpoint.json (written last)
    <output_dir>/metrics.jsonl           one JSON line per logged step: step, loss, lr, skipped_steps, train_seconds (cumulative, evals excluded), the loader's log_values, eval scalars
    <output_dir>/logs/                   TensorBoard events
    <output_dir>/export/                 `export(ema_model, dir)` output after the last step
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from trainer.batches import Batch, ResumableBatches
from trainer.config import ConfigError
from trainer.jsonl_tracker import JsonlTracker
from trainer.run_dir import METRICS_FILE, RunDir

CHECKPOINT_MARKER = "checkpoint.json"
_CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
_TEMP_PREFIX = ".tmp-"

LossFn = Callable[[torch.nn.Module, Batch, int], torch.Tensor]
EvaluateFn = Callable[[torch.nn.Module, int], Mapping[str, float]]
ExportFn = Callable[[torch.nn.Module, Path], None]


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Settings of the shared training loop; a step is one optimizer step of `grad_accum_steps` micro-batches.

    `eval_every_steps = 0` evaluates only after the last step; `checkpoint_every_steps = 0` checkpoints only
    at the end. `torch_threads = None` keeps torch's default, except 1 per process for multi-process CPU runs.
    """

    output_dir: str
    total_steps: int
    lr: float
    optimizer: Literal["radam", "adamw"] = "radam"
    lr_schedule: Literal["linear", "constant"] = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema_decay: float = 0.999
    ema_warmup: bool = False
    # Constant decay from step 0: EMAModel otherwise copies the raw weights at its first update and then ramps
    # decay as (1+n)/(10+n), so the average follows the first raw steps; a pretrained init (CMT, teacher) keeps
    # its weights in the average only with this on.
    ema_constant: bool = False
    checkpoint_every_steps: int
    keep_checkpoints: int = 2
    log_every_steps: int
    eval_every_steps: int
    seed: int = 0
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        """Reject settings the loop cannot run with, naming the fix."""
        positive = {"total_steps": self.total_steps, "grad_accum_steps": self.grad_accum_steps,
                    "keep_checkpoints": self.keep_checkpoints, "log_every_steps": self.log_every_steps}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"loop.{name} must be >= 1, got {value}")
        non_negative = {"warmup_steps": self.warmup_steps, "checkpoint_every_steps": self.checkpoint_every_steps,
                        "eval_every_steps": self.eval_every_steps, "weight_decay": self.weight_decay}
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(
                    f"loop.{name} must be >= 0 (0 means 'only at the end' for *_every_steps), got {value}"
                )
        if not self.lr > 0:
            raise ConfigError(f"loop.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"loop.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"loop.grad_clip must be > 0 or none (no clipping), got {self.grad_clip}")
        if self.warmup_steps >= self.total_steps and self.lr_schedule == "linear" and self.warmup_steps > 0:
            raise ConfigError(
                f"loop.warmup_steps ({self.warmup_steps}) must be below loop.total_steps ({self.total_steps})"
            )
        if self.ema_constant and self.ema_warmup:
            raise ConfigError("loop.ema_constant and loop.ema_warmup exclude each other: choose one")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"loop.torch_threads must be >= 1 or none, got {self.torch_threads}")


class ConstantDecayEMA(EMAModel):
    """diffusers' EMAModel with the same decay at every update, the first included (EMAModel returns 0 there)."""

    def get_decay(self, optimization_step: int) -> float:
        """θ_ema ← d·θ_ema + (1 − d)·θ with d = decay from step 0, so a pretrained init stays in the average."""
        return self.decay


@dataclass
class TrainingProgress:
    """Saved with every checkpoint: steps taken, how many were skipped, training wall time, and the losses and
    gradient norms not yet logged."""

    step: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0
    window_losses: list[float] = field(default_factory=list)
    window_grad_norms: list[float] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """Counters and the unlogged losses as a plain dict."""
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "train_seconds": self.train_seconds,
            "window_losses": list(self.window_losses),
            "window_grad_norms": list(self.window_grad_norms),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counters and the unlogged losses and gradient norms."""
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.train_seconds = float(state.get("train_seconds", 0.0))  # absent in checkpoints of earlier versions
        self.window_losses = list(state["window_losses"])
        self.window_grad_norms = list(state.get("window_grad_norms", []))  # absent in checkpoints of earlier versions


@dataclass(frozen=True)
class LoopResult:
    """What a finished run reports: last step, the step it started (resumed) from, export dir, last metrics."""

    final_step: int
    export_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    start_step: int = 0
    skipped_steps: int = 0

    def summary(self) -> dict[str, Any]:
        """The JSON line a stage CLI prints when it finishes."""
        return {
            "start_step": self.start_step,
            "final_step": self.final_step,
            "skipped_steps": self.skipped_steps,
            "export_dir": str(self.export_dir),
            "metrics": self.metrics,
        }


def make_accelerator(cfg: LoopConfig) -> Accelerator:
    """The Accelerator for `cfg`: project dir, TensorBoard + metrics.jsonl trackers, accumulation, precision.

    Mixed precision the device cannot run is refused (ConfigError naming loop.mixed_precision): bf16 where torch has
    no bf16 for the device, and fp16 on CPU, which Accelerate would otherwise silently run in float32. A stage run
    after another one in the same process (tests, in-process studies) gets its own precision: Accelerate's state
    would otherwise keep the first run's and refuse the change.
    """
    output_dir = Path(cfg.output_dir)
    if AcceleratorState._shared_state.get("_mixed_precision", cfg.mixed_precision) != cfg.mixed_precision:
        AcceleratorState._reset_state()  # the process group (PartialState) stays
    try:
        accelerator = Accelerator(
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
            log_with=["tensorboard", JsonlTracker(RunDir(output_dir).metrics)],
            gradient_accumulation_steps=cfg.grad_accum_steps,
            mixed_precision=cfg.mixed_precision,
        )
    except ValueError as error:
        if "supported device" not in str(error) and "requires" not in str(error):
            raise
        raise ConfigError(
            f"loop.mixed_precision={cfg.mixed_precision} cannot run here ({error}): use loop.mixed_precision=fp16 on a "
            "CUDA device without bf16, or loop.mixed_precision=no"
        ) from error
    if cfg.mixed_precision != "no" and not accelerator.native_amp:
        raise ConfigError(
            f"loop.mixed_precision={cfg.mixed_precision} is not available on {accelerator.device.type} (Accelerate "
            "would train in float32 without saying so): use loop.mixed_precision=bf16 on CPU, fp16 / bf16 on CUDA, "
            "or no"
        )
    return accelerator


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """LR multiplier for optimizer step `step`: linear warm-up, then linear decay to 0 at total_steps (or constant)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    return max(0.0, 1.0 - (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps))


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint (its marker written last), oldest first; temp dirs are ignored."""
    root = RunDir(output_dir).checkpoints
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _CHECKPOINT_PATTERN.match(entry.name)
        if match and (entry / CHECKPOINT_MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def train_loop(
    cfg: LoopConfig,
    *,
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: ResumableBatches,
    accelerator: Accelerator | None = None,
    evaluate: EvaluateFn | None = None,
    export: ExportFn | None = None,
    extra_checkpoint_objects: Sequence[Any] = (),
) -> LoopResult:
    """Train `model` on `loss_fn(model, batch, step) -> per-sample loss [B]` (mean-reduced) for cfg.total_steps.

    A step whose loss or gradient norm is not finite on any rank is skipped on every rank (no optimizer
    step, no EMA update) and counted in `skipped_steps`; it still advances the step counter and the LR
    schedule. `evaluate(ema_model, step) -> scalars` runs every eval_every_steps and after the last step, with the
    global RNG states saved and restored around it: on the main process, or on every rank when the hook has
    `every_rank = True` (it then shares the work and returns the scalars on the main process). `export(ema_model,
    dir)` writes the final EMA model into `<output_dir>/export` (atomically). Objects in `extra_checkpoint_objects` (state_dict /
    load_state_dict) are saved and restored with every checkpoint.
    """
    if not isinstance(batches, ResumableBatches):
        raise TypeError("batches must provide __iter__, state_dict and load_state_dict (see ResumableBatches)")
    accelerator = accelerator if accelerator is not None else make_accelerator(cfg)
    if accelerator.gradient_accumulation_steps != cfg.grad_accum_steps:
        raise ConfigError(
            f"the accelerator accumulates over {accelerator.gradient_accumulation_steps} micro-batches but "
            f"loop.grad_accum_steps is {cfg.grad_accum_steps}; build it with make_accelerator(cfg)"
        )
    _set_torch_threads(cfg, accelerator)
    output_dir = Path(cfg.output_dir)
    set_seed(cfg.seed, device_specific=True)

    optimizer_cls = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.AdamW
    optimizer = optimizer_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    ema_model = copy.deepcopy(model).eval().requires_grad_(False).to(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    trained_model = accelerator.unwrap_model(model)
    ema = (ConstantDecayEMA if cfg.ema_constant else EMAModel)(
        trained_model.parameters(), decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup
    )
    progress = TrainingProgress()
    for stateful in (lr_scheduler, ema, batches, progress, *extra_checkpoint_objects):
        accelerator.register_for_checkpointing(stateful)

    resume_dir = _find_resume_checkpoint(accelerator, output_dir)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
    start_step = progress.step
    if accelerator.is_main_process:
        _discard_stale_outputs(output_dir, start_step)
    accelerator.wait_for_everyone()
    accelerator.init_trackers("tensorboard")

    batch_iterator = iter(batches)
    bar = tqdm(total=cfg.total_steps, initial=start_step, disable=not accelerator.is_main_process, desc="train")
    window_start = time.perf_counter()
    last_lr = optimizer.param_groups[0]["lr"]
    latest: dict[str, float] = {}
    while True:
        step = progress.step
        fresh_step = step > start_step
        record: dict[str, float] = {}
        # log
        if fresh_step and (step % cfg.log_every_steps == 0 or step == cfg.total_steps):
            record.update(
                loss=_finite_mean(progress.window_losses),
                grad_norm=_finite_mean(progress.window_grad_norms),
                lr=last_lr,
                skipped_steps=progress.skipped_steps,
                steps_per_second=len(progress.window_losses) / max(time.perf_counter() - window_start, 1e-9),
                train_seconds=progress.train_seconds,
                **(batches.log_values() if hasattr(batches, "log_values") else {}),
            )
            progress.window_losses, progress.window_grad_norms, window_start = [], [], time.perf_counter()
        # eval
        if evaluate is not None and fresh_step and _due(step, cfg.eval_every_steps, cfg.total_steps):
            ema.copy_to(ema_model.parameters())
            if accelerator.is_main_process or getattr(evaluate, "every_rank", False):
                with _preserved_rng_state():
                    scores = evaluate(ema_model, step)
                if accelerator.is_main_process:
                    record.update(scores)
                    record.setdefault("train_seconds", progress.train_seconds)  # every FD point has its time
            accelerator.wait_for_everyone()
        if record:
            accelerator.log(record, step=step)
            latest.update(record)
        # checkpoint
        if fresh_step and _due(step, cfg.checkpoint_every_steps, cfg.total_steps):
            _save_checkpoint(accelerator, output_dir, step, cfg.keep_checkpoints)
        # done?
        if step >= cfg.total_steps:
            break
        # accumulate
        step_started = time.perf_counter()
        micro_losses = []
        for _ in range(cfg.grad_accum_steps):
            batch = {name: tensor.to(accelerator.device) for name, tensor in next(batch_iterator).items()}
            with accelerator.accumulate(model):
                per_sample_loss = loss_fn(model, batch, step)  # [B]
                loss = per_sample_loss.mean()
                accelerator.backward(loss)
            micro_losses.append(loss.detach().float())
        # step (skipped on every rank when any rank saw a non-finite loss or gradient)
        step_loss = torch.stack(micro_losses).mean()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        finite = torch.isfinite(step_loss) & torch.isfinite(torch.as_tensor(grad_norm, device=step_loss.device))
        gathered = accelerator.gather(torch.stack([step_loss, (~finite).float()]).reshape(1, 2))  # [world, 2]
        skip = bool(gathered[:, 1].max() > 0)
        last_lr = optimizer.param_groups[0]["lr"]
        if skip:
            progress.skipped_steps += 1
            if accelerator.scaler is not None:
                accelerator.scaler.update()  # fp16: close the unscale_ of clip_grad_norm_ and back off the scale
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # EMA
        if not skip:
            ema.step(trained_model.parameters())
        progress.step += 1
        progress.train_seconds += time.perf_counter() - step_started
        progress.window_losses.append(float(gathered[:, 0].mean()))
        progress.window_grad_norms.append(float(grad_norm))  # before clipping; the same on every rank
        bar.update(1)
        bar.set_postfix(loss=f"{progress.window_losses[-1]:.4g}", skipped=progress.skipped_steps)
    bar.close()

    export_dir = None
    if export is not None:
        ema.copy_to(ema_model.parameters())
        export_dir = RunDir(output_dir).export
        if accelerator.is_main_process:
            with _preserved_rng_state():
                _write_directory_atomically(export_dir, lambda temp_dir: export(ema_model, temp_dir))
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return LoopResult(
        final_step=progress.step,
        export_dir=export_dir,
        metrics=latest,
        start_step=start_step,
        skipped_steps=progress.skipped_steps,
    )


def _finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (a skipped step's NaN is left out); NaN when none is finite."""
    finite = [value for value in values if math.isfinite(value)]
    return sum(finite) / len(finite) if finite else float("nan")


def _due(step: int, every: int, total_steps: int) -> bool:
    """Whether a periodic action (every `every` steps, 0 = never) or the final one falls on `step`."""
    return step == total_steps or (every > 0 and step % every == 0)


def _set_torch_threads(cfg: LoopConfig, accelerator: Accelerator) -> None:
    """Apply cfg.torch_threads; default to 1 thread per process when several CPU processes share the machine."""
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    elif accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        torch.set_num_threads(1)


@contextlib.contextmanager
def _preserved_rng_state():
    """Run a block (evaluation, export) without disturbing the training RNG streams."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def _find_resume_checkpoint(accelerator: Accelerator, output_dir: Path) -> Path | None:
    """The newest complete checkpoint, chosen on the main process and shared with every rank."""
    choice = [None]
    if accelerator.is_main_process:
        checkpoints = complete_checkpoints(output_dir)
        choice = [str(checkpoints[-1][1]) if checkpoints else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    return Path(choice[0]) if choice[0] is not None else None


def _discard_stale_outputs(output_dir: Path, start_step: int) -> None:
    """Drop what an interrupted run left past its last checkpoint: temp dirs and metrics lines after start_step."""
    checkpoint_root = RunDir(output_dir).checkpoints
    if checkpoint_root.is_dir():
        for entry in checkpoint_root.iterdir():
            if entry.name.startswith(_TEMP_PREFIX) or (
                _CHECKPOINT_PATTERN.match(entry.name) and not (entry / CHECKPOINT_MARKER).is_file()
            ):
                shutil.rmtree(entry, ignore_errors=True)
    for entry in output_dir.glob(f"{_TEMP_PREFIX}*") if output_dir.is_dir() else []:
        shutil.rmtree(entry, ignore_errors=True)
    metrics_path = RunDir(output_dir).metrics
    if metrics_path.exists():
        lines = [line for line in metrics_path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= start_step]
        temp_path = metrics_path.with_name(f"{_TEMP_PREFIX}{METRICS_FILE}")
        temp_path.write_text("".join(f"{line}\n" for line in kept))
        os.replace(temp_path, metrics_path)


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> None:
    """save_state into a temp dir, mark it complete, rename it to step_<N>; keep the newest `keep` checkpoints."""
    root = RunDir(output_dir).checkpoints
    temp_dir = root / f"{_TEMP_PREFIX}step_{step}"
    final_dir = root / f"step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temp_dir, ignore_errors=True)
        temp_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp_dir))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = {"step": step, "world_size": accelerator.num_processes, "saved_at": time.time()}
        with open(temp_dir / CHECKPOINT_MARKER, "w") as stream:
            json.dump(marker, stream)
            stream.flush()
            os.fsync(stream.fileno())
        shutil.rmtree(final_dir, ignore_errors=True)
        os.rename(temp_dir, final_dir)
        _fsync_directory(root)
        for _, old_dir in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old_dir)
    accelerator.wait_for_everyone()


def _write_directory_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temp dir, then swap it in place of `target` (the old one is removed only afterwards)."""
    temp_dir = target.with_name(f"{_TEMP_PREFIX}{target.name}")
    retired_dir = target.with_name(f"{_TEMP_PREFIX}{target.name}-old")
    shutil.rmtree(temp_dir, ignore_errors=True)
    shutil.rmtree(retired_dir, ignore_errors=True)
    temp_dir.mkdir(parents=True)
    write(temp_dir)
    if target.exists():
        os.rename(target, retired_dir)
    os.rename(temp_dir, target)
    _fsync_directory(target.parent)
    shutil.rmtree(retired_dir, ignore_errors=True)


def _fsync_directory(directory: Path) -> None:
    """Flush a directory entry change (a rename) to disk."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
