"""Load a diffusers teacher and expose one denoiser view D(x̃, σ̃) ≈ E[x0 | x̃] in the EDM convention.

A teacher is a diffusers model (``UNet2DModel``, ``DiTTransformer2DModel``, or an in-memory module with the
``UNet2DModel`` call signature ``model(x, timestep[, class_labels=...]).sample``), the scheduler it was
trained with (its noise schedule), and an optional ``AutoencoderKL`` for latent models.

The schedule families understood (``vp``, ``edm``, ``flow``) and the σ̃ ↔ timestep map are
``pipeline/noise_schedule.py``; how the network is called is ``pipeline/network.py``.

Teachers load from every diffusers layout, by path or hub id (``pipeline/teacher_files.py``); weights are
safetensors, or pickled ``.bin`` files read as tensors only and converted once (``pipeline/weights.py``); classes
come from the ``diffusers`` namespace only, never from remote code.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.network import (
    class_embedding_rows,
    model_output_tensor,
    network_forward,
    sample_shape_of,
    takes_hidden_states,
)
from pipeline.noise_schedule import NoiseSchedule, SigmaRangeError, UnsupportedSchedulerError
from pipeline.teacher_files import (
    PickleCheckpointError,
    TeacherLoadError,
    diffusers_class,
    locate_teacher,
    scheduler_config_file,
)
from pipeline.time_convention import vp_alpha_sigma
from pipeline.weights import load_model_dir

# The errors a Teacher raises are named here too, so `from pipeline.teacher import SigmaRangeError` keeps working for
# callers of the teacher; NoiseSchedule is the type of `Teacher.schedule`. Code of this repository imports each name
# from the module that defines it.
__all__ = [
    "ConditioningError",
    "NoiseSchedule",
    "PickleCheckpointError",
    "SigmaRangeError",
    "Teacher",
    "TeacherLoadError",
    "UnsupportedSchedulerError",
    "decode_latents",
    "load_teacher",
]


class ConditioningError(ValueError):
    """Labels or guidance that do not fit the teacher (labels to an unconditional teacher, missing labels, ...)."""


def _needs_cast(module: nn.Module, dtype: torch.dtype) -> bool:
    """True when some floating weight or buffer of `module` is not in `dtype`."""
    return any(t.is_floating_point() and t.dtype != dtype for t in [*module.parameters(), *module.buffers()])


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move a module to `device`, casting floating weights to `dtype` only where they differ."""
    module = module.to(device)
    return module.to(dtype=dtype) if _needs_cast(module, dtype) else module


def _per_sample_float64(value: Any, batch: int) -> np.ndarray:
    """A scalar or per-sample noise level (float, numpy or torch) as a float64 array [B]."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    value = np.asarray(value, dtype=np.float64)
    if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, batch)):
        raise ValueError(f"noise level of shape {value.shape} for {batch} samples: pass a scalar or shape [{batch}]")
    return np.broadcast_to(value.reshape(-1), (batch,)).copy()


def _canonical_config(obj: Any) -> dict[str, Any]:
    """A component's class name and public config (keys starting with '_' dropped: paths, versions)."""
    if obj is None:
        return {}
    config = dict(getattr(obj, "config", {}) or {})
    public = {k: v for k, v in config.items() if not str(k).startswith("_")}
    return {"class": type(obj).__name__, "config": public}


def _hash_state(digest: hashlib._Hash, module: nn.Module | None) -> None:
    """Feed every tensor of a module's state dict (name, dtype, shape, raw bytes) into a sha256."""
    if module is None:
        return
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


class Teacher:
    """A frozen diffusion / flow-matching teacher with one denoiser view D(x̃, σ̃) in the EDM convention."""

    def __init__(
        self,
        model: nn.Module,
        scheduler: Any,
        *,
        vae: nn.Module | None = None,
        num_classes: int | None = None,
        sample_shape: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        """Wrap a model and the scheduler it was trained with; see :func:`load_teacher` for the usual entry."""
        if not isinstance(model, nn.Module):
            raise TeacherLoadError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if scheduler is None:
            raise TeacherLoadError(
                "no scheduler: pass scheduler=<the diffusers scheduler the teacher was trained with> "
                "(e.g. DDPMScheduler.from_pretrained(dir, subfolder='scheduler'))"
            )
        forward_params = inspect.signature(model.forward).parameters
        text_input = forward_params.get("encoder_hidden_states")
        if text_input is not None and text_input.default is inspect.Parameter.empty:
            raise TeacherLoadError(
                f"{type(model).__name__} needs encoder_hidden_states (text / cross-attention conditioning), which "
                "is not supported: use an unconditional or class-conditional UNet2DModel / DiTTransformer2DModel"
            )
        self.schedule = NoiseSchedule.from_scheduler(scheduler)
        self.scheduler = scheduler
        if self.schedule.family == "flow":
            self.prediction_type = "flow"
        else:
            self.prediction_type = str(scheduler.config.prediction_type)
        continuous = getattr(scheduler.config, "timestep_type", "discrete") == "continuous"
        if continuous and self.prediction_type == "v_prediction":
            raise UnsupportedSchedulerError(
                f"{type(scheduler).__name__} with timestep_type='continuous' and v_prediction calls the model at "
                "c_noise = ¼·ln σ̃ instead of a timestep of its alphas_cumprod table, which is not supported: use a "
                "teacher conditioned on discrete timesteps (timestep_type='discrete')"
            )
        allowed = {"vp": ("epsilon", "v_prediction", "sample"), "edm": ("epsilon", "v_prediction"), "flow": ("flow",)}
        if self.prediction_type not in allowed[self.schedule.family]:
            raise UnsupportedSchedulerError(
                f"prediction_type {self.prediction_type!r} is not supported for a {self.schedule.family} schedule: "
                f"use one of {allowed[self.schedule.family]} in the scheduler config"
            )
        self.device = torch.device(device)
        self.dtype = dtype
        self.model, self.vae = model.eval(), None if vae is None else vae.eval()
        self.forward_samples = 0  # network evaluations, one per sample of every batch (guidance counts both passes)
        self.sample_shape = tuple(int(s) for s in sample_shape) if sample_shape is not None else sample_shape_of(model)
        self._is_dit = takes_hidden_states(model)
        native_classes, table_rows = class_embedding_rows(model)
        if num_classes is not None:
            if native_classes is None:
                raise TeacherLoadError(
                    f"num_classes={num_classes} was given but {type(model).__name__} has no class embedding "
                    "(it is unconditional): drop num_classes"
                )
            if not 0 < int(num_classes) <= table_rows:
                raise TeacherLoadError(
                    f"num_classes={num_classes} does not fit the model's class-embedding table of {table_rows} rows: "
                    f"pass 1..{table_rows}"
                )
            native_classes = int(num_classes)
        self.num_classes = native_classes
        self.null_class = native_classes if native_classes is not None and native_classes < table_rows else None
        if any(_needs_cast(module, dtype) for module in (model, vae) if module is not None):
            _ = self.fingerprint  # hash the weights as stored, before they are cast to the compute dtype
        self.model = _place(model, self.device, dtype)
        self.vae = None if vae is None else _place(vae, self.device, dtype)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical config JSON (model, scheduler, vae, classes) and all weight bytes."""
        config = {
            "model": _canonical_config(self.model),
            "scheduler": _canonical_config(self.scheduler),
            "vae": _canonical_config(self.vae),
            "num_classes": self.num_classes,
            "sample_shape": list(self.sample_shape),
        }
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode())
        _hash_state(digest, self.model)
        _hash_state(digest, self.vae)
        return digest.hexdigest()

    @property
    def sigma_edm_range(self) -> tuple[float, float]:
        """(smallest, largest) EDM noise level σ̃ the teacher's schedule represents."""
        return self.schedule.sigma_edm_min, self.schedule.sigma_edm_max

    def alpha_sigma(self, timesteps: Any) -> tuple[np.ndarray, np.ndarray]:
        """Float64 native (α_t, σ_t) of the teacher's schedule at (possibly fractional) model timesteps."""
        return self.schedule.alpha_sigma(timesteps)

    def _labels(self, labels: Any, guidance_scale: float | None, batch: int) -> torch.Tensor | None:
        """Validate labels / guidance against the teacher's conditioning; return class ids [B] or None."""
        if self.num_classes is None:
            if labels is not None:
                raise ConditioningError("labels were given but the teacher is unconditional: drop labels")
            if guidance_scale is not None:
                raise ConditioningError(
                    "guidance_scale was given but the teacher is unconditional: drop guidance_scale"
                )
            return None
        if labels is None:
            raise ConditioningError(
                f"the teacher is class-conditional ({self.num_classes} classes): pass labels (one class id per sample)"
            )
        if guidance_scale is not None and self.null_class is None:
            raise ConditioningError(
                f"guidance_scale needs a null-class embedding, but all {self.num_classes} class ids of this teacher "
                "are real classes: drop guidance_scale, or load with num_classes=<real classes> if the last id is the "
                "null class"
            )
        labels = torch.as_tensor(labels).to(device=self.device, dtype=torch.long).reshape(-1)  # [B]
        if labels.shape[0] != batch:
            raise ConditioningError(f"{labels.shape[0]} labels for {batch} samples: pass one label per sample")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ConditioningError(f"labels must lie in [0, {self.num_classes}): got {labels.tolist()[:8]}")
        return labels

    def _call_model(self, x_in: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """One batched forward pass; returns the prediction channels (a learned-variance half is dropped)."""
        x_in = x_in.to(self.dtype)
        self.forward_samples += int(x_in.shape[0])
        out = network_forward(self.model, self._is_dit, x_in, timesteps, labels).to(torch.float32)  # [B, C_out, *S]
        channels = x_in.shape[1]
        if out.shape[1] == 2 * channels:
            out = out[:, :channels]  # learned variance (DiT, improved DDPM): keep the mean prediction
        return out

    def _guided_output(
        self, x_in: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None, guidance_scale: float | None
    ) -> torch.Tensor:
        """Model prediction with classifier-free guidance out = u + w·(c − u) (null class = num_classes)."""
        if labels is None or guidance_scale is None or float(guidance_scale) == 1.0:
            return self._call_model(x_in, timesteps, labels)
        null = torch.full_like(labels, self.null_class)  # [B]
        both = self._call_model(
            torch.cat([x_in, x_in]), torch.cat([timesteps, timesteps]), torch.cat([labels, null])
        )  # [2B, C, *spatial]
        cond, uncond = both.chunk(2)
        return uncond + float(guidance_scale) * (cond - uncond)

    @torch.no_grad()
    def denoise_native(
        self,
        x: torch.Tensor,
        alpha: Any,
        sigma: Any,
        labels: Any = None,
        guidance_scale: float | None = None,
        timestep: float | None = None,
    ) -> torch.Tensor:
        """D ≈ E[x0 | x] for a state x = α·x0 + σ·ε in any scaling (α, σ scalars or one per sample) → [B, *S].

        This is the one implementation of the denoiser; :meth:`denoise` is the EDM view (α = 1, σ = σ̃).
        Guidance is applied to the model prediction, which equals guidance on D for every prediction type
        (D is affine in the prediction with the same offset for the conditional and unconditional pass).
        ``timestep`` (vp and flow teachers) calls the network at that model timestep instead of the one mapped from
        σ̃: a diffusers scheduler's own timestep on its own grid, where diffusers pipelines call the model. On a
        zero-terminal-SNR vp schedule α = 0 (pure noise) is allowed for v- and sample-prediction teachers.
        """
        x = torch.as_tensor(x).to(device=self.device, dtype=torch.float32)  # [B, *S]
        batch = x.shape[0]
        labels = self._labels(labels, guidance_scale, batch)
        alpha, sigma = _per_sample_float64(alpha, batch), _per_sample_float64(sigma, batch)  # [B], [B]
        view = (batch,) + (1,) * (x.dim() - 1)

        def column(values: np.ndarray) -> torch.Tensor:
            """Per-sample factor as a float32 tensor broadcastable over [B, *S]."""
            return torch.as_tensor(values, dtype=torch.float32, device=self.device).reshape(view)

        family = self.schedule.family
        if family == "flow":
            if np.any(alpha + sigma <= 0) or np.any(sigma <= 0):
                raise SigmaRangeError("flow-matching teacher: need σ > 0 and α + σ > 0 (0 < τ ≤ 1)")
            tau = sigma / (alpha + sigma)  # [B]
            x_fm = x * column(1.0 / (alpha + sigma))  # [B, *S]
            t = self._model_timesteps(tau * self.schedule.num_train_timesteps, timestep, batch)  # [B]
            velocity = self._guided_output(x_fm, t, labels, guidance_scale)  # [B, *S], v = ε − x0
            return x_fm - column(tau) * velocity
        if np.any(alpha < 0) or np.any(sigma <= 0) or (family == "edm" and np.any(alpha == 0)):
            raise SigmaRangeError(f"need α > 0 and σ > 0 for a {family} teacher, got α={alpha[:4]}, σ={sigma[:4]}")
        if np.any(alpha == 0):
            self._check_pure_noise()
        with np.errstate(divide="ignore"):
            sigma_edm = sigma / alpha  # [B], ∞ where α = 0
        if family == "edm":
            if timestep is not None:
                raise ValueError("timestep= applies to vp and flow teachers; an EDM teacher is called at c_noise(σ̃)")
            template = self.schedule.template
            x_edm = x * column(1.0 / alpha)  # [B, *S]
            sigma_col = column(sigma_edm)
            x_in = template.precondition_inputs(x_edm, sigma_col)  # c_in·x̃
            c_noise = template.precondition_noise(torch.as_tensor(sigma_edm, dtype=torch.float32, device=self.device))
            out = self._guided_output(x_in, c_noise.reshape(batch), labels, guidance_scale)
            return template.precondition_outputs(x_edm, out, sigma_col)  # c_skip·x̃ + c_out·F
        t = self._model_timesteps(self.schedule.timestep_from_sigma_edm(sigma_edm), timestep, batch)  # [B]
        alpha_vp, sigma_vp = vp_alpha_sigma(sigma_edm)  # [B], [B]
        x_vp = x * column(1.0 / np.sqrt(alpha * alpha + sigma * sigma))  # [B, *S]
        out = self._guided_output(x_vp, t, labels, guidance_scale)  # [B, *S]
        if self.prediction_type == "epsilon":
            return (x_vp - column(sigma_vp) * out) * column(1.0 / alpha_vp)
        if self.prediction_type == "v_prediction":
            return column(alpha_vp) * x_vp - column(sigma_vp) * out
        return out

    def _model_timesteps(self, mapped: np.ndarray, timestep: float | None, batch: int) -> torch.Tensor:
        """The network's timestep input [B], float32: `mapped` from σ̃, or the scheduler's own `timestep`."""
        values = mapped if timestep is None else np.full(batch, float(timestep))
        return torch.as_tensor(values, dtype=torch.float32, device=self.device)

    def _check_pure_noise(self) -> None:
        """α = 0 (σ̃ = ∞) needs a zero-terminal-SNR table and a prediction that gives x0 there (not ε: x0 = 0/0)."""
        if not math.isinf(self.schedule.sigma_edm_max):
            raise SigmaRangeError(
                f"α = 0 (pure noise) is outside this teacher's schedule, whose largest level is σ̃ = "
                f"{self.schedule.sigma_edm_max:.6g}: pass states with α > 0"
            )
        if self.prediction_type == "epsilon":
            raise SigmaRangeError(
                "this zero-terminal-SNR teacher predicts ε, which determines nothing about x0 at its last level "
                "(α = 0, pure noise): start below it — timestep_spacing 'leading' or 'linspace' in its scheduler "
                "config, or a karras/logsnr grid — or use a v_prediction teacher (what rescale_betas_zero_snr expects)"
            )

    def denoise(
        self, x_edm: torch.Tensor, sigma_edm: Any, labels: Any = None, guidance_scale: float | None = None
    ) -> torch.Tensor:
        """EDM-view denoiser D(x̃, σ̃) ≈ E[x0 | x̃ = x0 + σ̃·ε] → [B, *S] (σ̃ scalar or one per sample)."""
        return self.denoise_native(x_edm, 1.0, sigma_edm, labels=labels, guidance_scale=guidance_scale)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Clean samples → images nominally in [-1, 1] (not clamped); identity without a VAE (`decode_latents`)."""
        x0 = torch.as_tensor(x0).to(device=self.device, dtype=torch.float32)  # [B, *S]
        return x0 if self.vae is None else decode_latents(self.vae, x0)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """Latents [B, C, h, w] → images [B, 3, H, W] in [-1, 1] nominally (not clamped), float32 on the latents' device.

    ``vae.decode(latents / scaling_factor + shift_factor)`` (shift_factor 0 when unset), as diffusers latent pipelines
    do, in chunks of `batch_size`, in the VAE's own dtype and on its device.
    """
    config = vae.config
    parameter = next(vae.parameters())
    shift = float(getattr(config, "shift_factor", None) or 0.0)
    scaled = latents / float(config.scaling_factor) + shift  # [B, C, h, w]
    images = [
        model_output_tensor(vae.decode(chunk.to(parameter.device, parameter.dtype))).to(latents.device, torch.float32)
        for chunk in scaled.split(batch_size)
    ]  # each [b, 3, H, W]
    return torch.cat(images)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _scheduler_from_config(config_file: Path) -> Any:
    """A diffusers scheduler from its scheduler_config.json (built-in classes only)."""
    from diffusers import SchedulerMixin

    config = json.loads(config_file.read_text())
    return diffusers_class(config.get("_class_name"), SchedulerMixin, "scheduler").from_config(config)


def _resolve_scheduler(scheduler: Any) -> Any:
    """Accept a scheduler instance, a config dict with _class_name, or a directory / scheduler_config.json path."""
    if scheduler is None or (hasattr(scheduler, "config") and hasattr(scheduler, "set_timesteps")):
        return scheduler
    if isinstance(scheduler, dict):
        from diffusers import SchedulerMixin

        return diffusers_class(scheduler.get("_class_name"), SchedulerMixin, "scheduler").from_config(scheduler)
    if isinstance(scheduler, (str, os.PathLike)):
        return _scheduler_from_config(scheduler_config_file(scheduler))
    raise TeacherLoadError(
        "scheduler must be a diffusers scheduler instance, a config dict or a directory, "
        f"got {type(scheduler).__name__}"
    )


def _resolve_vae(vae: Any) -> nn.Module | None:
    """Accept a VAE module or a directory holding one (config.json + weights)."""
    if vae is None or isinstance(vae, nn.Module):
        return vae
    if isinstance(vae, (str, os.PathLike)):
        return load_model_dir(Path(vae), "vae")
    raise TeacherLoadError(f"vae must be an AutoencoderKL module or a directory, got {type(vae).__name__}")


def load_teacher(
    source: str | os.PathLike | nn.Module,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: Any = None,
    vae: Any = None,
    num_classes: int | None = None,
    revision: str | None = None,
) -> Teacher:
    """Load a teacher from any diffusers layout (pipeline, flat repository, model dir) by path or hub id, or in memory.

    ``revision`` picks a branch, tag, commit or ``refs/pr/N`` of a hub id. ``scheduler=`` / ``vae=`` override what
    the source holds (instances, config dicts or directories); a bare model directory or an in-memory module needs
    ``scheduler=``. ``num_classes`` overrides the number of real classes of a class-conditional model (the null
    class used by guidance is id ``num_classes``; it must exist in the embedding table). ``dtype`` is the precision
    the network runs in (the fingerprint always hashes the weights as stored).
    """
    scheduler = _resolve_scheduler(scheduler)
    vae = _resolve_vae(vae)
    if isinstance(source, nn.Module):
        if scheduler is None:
            raise TeacherLoadError("an in-memory model needs scheduler=<the diffusers scheduler it was trained with>")
        model, found_vae = source, None
    elif isinstance(source, (str, os.PathLike)):
        files = locate_teacher(source, revision=revision)
        model = load_model_dir(files.model_dir)
        if scheduler is None and files.scheduler_config is None:
            where = {"flat": "scheduler_config.json at its root", "pipeline": "scheduler/scheduler_config.json"}
            raise TeacherLoadError(
                f"{source}: no scheduler found (looked for {where.get(files.layout, 'scheduler_config.json next to the model')}): "
                "give the scheduler the teacher was trained with separately (--scheduler DIR on the command line, "
                "scheduler= in Python)"
            )
        if scheduler is None:
            scheduler = _scheduler_from_config(files.scheduler_config)
        found_vae = load_model_dir(files.vae_dir, "vae") if vae is None and files.vae_dir is not None else None
    else:
        raise TeacherLoadError(
            f"source must be a directory, a hub id or a torch.nn.Module, got {type(source).__name__}"
        )
    return Teacher(
        model,
        scheduler,
        vae=vae if vae is not None else found_vae,
        num_classes=num_classes,
        device=device,
        dtype=dtype,
    )
