"""The few-step student of CMT: one diffusers network read as a flow map, initialised from the teacher.

Two readings of the same network F (the teacher's architecture, by default the teacher's weights):

- CM form, Ψ_{t→0} in the EDM view (x̃ = x0 + σ̃·ε):  f_θ(x̃, σ̃) = c_skip(σ̃)·x̃ + c_out(σ̃)·F(c_in(σ̃)·x̃, c_noise(σ̃)),
  with the teacher's c_in and c_noise and the c_skip, c_out of the student's parameterisation
  (`trainer.parameterization`): the teacher's own (at init from the teacher f IS the teacher's x0 prediction
  D(x̃, σ̃)) or EDM's bounded one (the default for ε-prediction teachers, whose own c_out = −σ̃ amplifies network
  errors up to 80×). Both have c_skip → 1 and c_out → 0 as σ̃ → 0 (the consistency boundary condition; f(x̃, 0) = x̃
  is enforced exactly).
- MF form, Ψ_{t→r} in the flow-matching view (z = (1 − τ)·x0 + τ·ε, τ ∈ [0, 1]): the average velocity
  u_θ(z, t, r) (MeanFlow's u(z, r, t)), with Ψ_{t→r}(z) = z − (t − r)·u_θ(z, t, r). The instantaneous velocity
  v = ε̂ − x̂0 follows from the same f: v = (z − f)/τ. A second time input carries (t − r) through an embedding added
  to the network's own time embedding (`trainer.second_time`, scaled like the model's timestep input:
  (t − r)·num_train_timesteps) whose last linear layer starts at zero, so at init u(z, t, r) = v(z, t) for every r.
  UNet2DModel (unconditional or class-conditional) and DiTTransformer2DModel nets take it.

Times: `denoise(x̃, σ̃)` takes one EDM level σ̃; `velocity(z, t=, r=)` and `flow_map(z, t=, r=)` take τ, keyword-only,
start time t before end time r (r ≤ t), as every flow-map call in the project does (`trainer/methods/`).

Class labels: ids in [0, num_classes), plus the null class (id num_classes, the unconditional embedding) where the
net's class table has that row (`null_class`; `add_null_class` gives a UNet one). The net's own label dropout is off.
Exports: `trainer.student_export` (format 3; formats 1 and 2 still load).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.network import class_embedding_rows
from pipeline.noise_schedule import NoiseSchedule
from pipeline.teacher import Teacher
from trainer.losses import column
from trainer.parameterization import DEFAULT_SIGMA_DATA, Parameterization, resolve_parameterization
from trainer.second_time import SecondTimeEmbedding, SecondTimeInputError

__all__ = [
    "DEFAULT_CM_INTERMEDIATE_SIGMA",
    "DEFAULT_MF_INTERMEDIATE_TAU",
    "DEFAULT_SIGMA_MAX",
    "STUDENT_TIME_CONVENTION",
    "FlowMapStudent",
    "StudentLoadError",
    "disable_label_dropout",
]

STUDENT_TIME_CONVENTION = "cm: EDM view (x̃ = x0 + σ̃·ε, σ̃ ≥ 0); mf: flow-matching view (z = (1−τ)·x0 + τ·ε, τ ∈ [0,1])"
DEFAULT_SIGMA_MAX = 80.0  # the CMT / EDM prior level, clamped to what the teacher's schedule represents
DEFAULT_CM_INTERMEDIATE_SIGMA = 0.821  # ECT / iCT's 2-step intermediate level σ̃
DEFAULT_MF_INTERMEDIATE_TAU = 0.5  # MeanFlow's 2-step intermediate time τ


class StudentLoadError(ValueError):
    """A directory that is not a (compatible) student export, or a teacher a student cannot be built from."""


def _per_sample_times(value: Any, batch: int, device: torch.device) -> Tensor:
    """A scalar or [B] time (float, numpy, tensor) as a float64 tensor [B] (graph kept for tensors)."""
    if not isinstance(value, Tensor):
        value = torch.as_tensor(np.asarray(value, dtype=np.float64))
    value = value.to(device=device, dtype=torch.float64)
    if value.numel() == 1:
        return value.reshape(1).expand(batch)  # [B]
    if value.numel() != batch:
        raise ValueError(f"time of shape {tuple(value.shape)} for {batch} samples: pass a scalar or shape [{batch}]")
    return value.reshape(batch)  # [B]


def disable_label_dropout(net: nn.Module) -> int:
    """Switch off the per-block label dropout of diffusers' LabelEmbedding (DiT) → how many embeddings were found.

    diffusers' DiT keeps one LabelEmbedding per block, each dropping labels independently in train mode; a student
    drops labels itself, once per sample, so every block sees the same class. The null-class row stays in the table.
    """
    from diffusers.models.embeddings import LabelEmbedding

    embeddings = [module for module in net.modules() if isinstance(module, LabelEmbedding)]
    for embedding in embeddings:
        embedding.dropout_prob = 0.0
    return len(embeddings)


def _scheduler_from_config(config: dict[str, Any]) -> Any:
    """A diffusers scheduler rebuilt from its saved config (the class must come from the diffusers namespace)."""
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise StudentLoadError(
            f"scheduler class {config.get('_class_name')!r} is not a diffusers scheduler: re-export the student"
        )
    return cls.from_config(config)


class FlowMapStudent(nn.Module):
    """The few-step student around one diffusers network (UNet2DModel or DiTTransformer2DModel, the teacher's)."""

    def __init__(
        self,
        net: nn.Module,
        scheduler: Any,
        *,
        prediction_type: str,
        second_time_input: bool = False,
        teacher_fingerprint: str | None = None,
        sample_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        parameterization: Parameterization | None = None,
        latent: bool = False,
    ):
        """Wrap `net` (trained under `scheduler`'s schedule with `prediction_type`); see :meth:`from_teacher`.

        With `second_time_input` a zero-initialised (t − r) embedding (`trainer.second_time`) is attached to the net's
        time embedding. Label dropout inside the net (diffusers' DiT drops labels per block in train mode) is switched
        off: a stage drops labels itself, once per sample (`trainer.label_dropout`). `latent` records that samples
        are latents of the teacher's VAE (decode them with `pipeline.teacher.decode_latents`).
        """
        super().__init__()
        self.net = net
        self.scheduler = scheduler
        self.schedule = NoiseSchedule.from_scheduler(scheduler)
        self.prediction_type = str(prediction_type)
        self.parameterization = parameterization or Parameterization("teacher")
        self.second_time_input = bool(second_time_input)
        self.teacher_fingerprint = teacher_fingerprint
        self.latent = bool(latent)
        config = getattr(net, "config", None)
        if sample_shape is None:
            size = config.sample_size
            spatial = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
            sample_shape = (int(config.in_channels), *spatial)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.num_classes = num_classes
        disable_label_dropout(net)
        if self.second_time_input:
            try:
                self.second_time = SecondTimeEmbedding(net)
            except SecondTimeInputError as error:
                raise StudentLoadError(str(error)) from error

    @property
    def null_class(self) -> int | None:
        """The class id of the unconditional ("null") embedding: num_classes when the class table has that row."""
        if self.num_classes is None:
            return None
        rows = class_embedding_rows(self.net)[1]
        return self.num_classes if rows is not None and rows > self.num_classes else None

    def add_null_class(self) -> int:
        """Give a class-conditional UNet2DModel a null-class row (the mean of the class rows) → the null class id.

        Label dropout and classifier-free guidance need an unconditional embedding; diffusers' DiT has one (its
        LabelEmbedding keeps row num_classes), a UNet trained without label dropout does not.
        """
        if self.null_class is not None:
            return self.null_class
        table = getattr(self.net, "class_embedding", None)
        if self.num_classes is None or not isinstance(table, nn.Embedding):
            raise StudentLoadError(
                f"{type(self.net).__name__} has no class-embedding table to add a null class to: label dropout and "
                "guidance need a class-conditional UNet2DModel or DiTTransformer2DModel"
            )
        widened = nn.Embedding(table.num_embeddings + 1, table.embedding_dim).to(table.weight.device, table.weight.dtype)
        with torch.no_grad():
            widened.weight[: table.num_embeddings] = table.weight
            widened.weight[table.num_embeddings] = table.weight[: self.num_classes].mean(dim=0)
        self.net.class_embedding = widened
        self.net.register_to_config(num_class_embeds=widened.num_embeddings)
        return self.num_classes

    # ------------------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_teacher(
        cls,
        teacher: Teacher,
        *,
        second_time_input: bool = False,
        init: Literal["teacher", "random"] = "teacher",
        seed: int = 0,
        parameterization: str | Parameterization = "auto",
        sigma_data: float = DEFAULT_SIGMA_DATA,
    ) -> FlowMapStudent:
        """A student with the teacher's architecture: the teacher's weights (init="teacher") or fresh ones ("random").

        `parameterization` ("auto" | "teacher" | "edm", or a resolved `Parameterization`) chooses how the network's
        output is read (see `trainer.parameterization`); "auto" keeps the teacher's own reading unless its c_out is
        unbounded (ε-prediction VP teachers), where it takes EDM's with `sigma_data`.

        With `second_time_input` the net gains a (t − r) embedding (`trainer.second_time`) whose last linear layer is
        zero-initialised, so the student's u(z, t, r) starts equal to the teacher's velocity for every r.
        """
        if init not in ("teacher", "random"):
            raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
        if not isinstance(parameterization, Parameterization):
            parameterization = resolve_parameterization(
                str(parameterization), teacher.schedule, teacher.prediction_type, sigma_data=sigma_data
            )
        net = copy.deepcopy(teacher.model)
        torch.manual_seed(seed)
        if init == "random":
            if not hasattr(net, "config") or not hasattr(type(net), "from_config"):
                raise StudentLoadError(
                    f"init='random' needs a diffusers model class to re-initialise, got {type(net).__name__}"
                )
            net = type(net).from_config(net.config)
        net = net.to(teacher.device)
        if any(parameter.dtype != torch.float32 for parameter in net.parameters()):
            net = net.float()  # a student trains in float32 whatever dtype the teacher was loaded in
        student = cls(
            net,
            copy.deepcopy(teacher.scheduler),
            prediction_type=teacher.prediction_type,
            second_time_input=second_time_input,
            teacher_fingerprint=teacher.fingerprint,
            sample_shape=tuple(teacher.sample_shape),
            num_classes=teacher.num_classes,
            parameterization=parameterization,
            latent=teacher.vae is not None,
        )
        return student.to(teacher.device).train()

    # ------------------------------------------------------------------------------------------------------
    # The two readings of the network

    def _call_net(self, x_in: Tensor, timesteps: Tensor, labels: Tensor | None, gap: Tensor | None) -> Tensor:
        """One forward pass of the net; `gap` = (t − r)·T for the second time input → prediction [B, C, *S]."""
        kwargs: dict[str, Any] = {} if labels is None else {"class_labels": labels}
        if self.second_time_input:
            with self.second_time.applied(gap if gap is not None else torch.zeros_like(timesteps)):
                out = self.net(x_in, timesteps, **kwargs)
        else:
            out = self.net(x_in, timesteps, **kwargs)
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out
        if out.shape[1] == 2 * x_in.shape[1]:
            out = out[:, : x_in.shape[1]]  # learned variance: keep the mean prediction
        return out

    def _labels(self, labels: Any, batch: int, device: torch.device) -> Tensor | None:
        """Validate class ids (the classes and the null class) against the student's conditioning → [B] int64 or None."""
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("labels were given but the student is unconditional: drop labels")
            return None
        if labels is None:
            raise ValueError(f"the student is class-conditional ({self.num_classes} classes): pass labels")
        labels = torch.as_tensor(labels).to(device=device, dtype=torch.long).reshape(-1)  # [B]
        if labels.shape[0] != batch:
            raise ValueError(f"{labels.shape[0]} labels for {batch} samples: pass one label per sample")
        top = self.num_classes if self.null_class is None else self.null_class + 1
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= top):
            null = "" if self.null_class is None else f" (or the null class {self.null_class})"
            raise ValueError(
                f"class labels must lie in [0, {self.num_classes}){null}: got {sorted(set(labels.tolist()))[:8]}"
            )
        return labels

    def denoise(self, x_edm: Tensor, sigma_edm: Any, labels: Any = None) -> Tensor:
        """CM form f_θ(x̃, σ̃) = c_skip·x̃ + c_out·F(c_in·x̃, c_noise) in the EDM view (one time, σ̃: Ψ_{σ̃→0}) → [B, *S];
        f(x̃, 0) = x̃ exactly."""
        batch = x_edm.shape[0]
        sigma = _per_sample_times(sigma_edm, batch, x_edm.device)  # [B] float64
        at_boundary = sigma <= 0  # [B]
        safe_sigma = torch.where(at_boundary, torch.ones_like(sigma), sigma)  # [B], keeps c_noise finite
        c_in, c_noise, c_skip, c_out = self.coefficients(safe_sigma)
        out = self._call_net(
            x_edm * column(c_in, x_edm), c_noise.to(torch.float32), self._labels(labels, batch, x_edm.device), None
        )  # [B, C, *S]
        f = column(c_skip, x_edm) * x_edm + column(c_out, x_edm) * out.to(x_edm.dtype)  # [B, *S]
        return torch.where(column(at_boundary, x_edm).bool(), x_edm, f)

    def velocity(self, z: Tensor, *, t: Any, r: Any = None, labels: Any = None) -> Tensor:
        """MF form u_θ(z, t, r) in the flow-matching view: t, r are τ (scalars or [B]), r ≤ t; r = None means r = t,
        the instantaneous velocity ε̂ − x̂0.

        v = (z − f(x̃, σ̃))/τ with σ̃ = τ/(1 − τ), x̃ = z/(1 − τ); written as v = a_z·z + a_F·F(b_in·z, c_noise) with
        float64 coefficients (flow-matching teachers read the teacher's way: v = F(z, τ·T) exactly, also at τ = 1).
        Needs t > 0.
        """
        batch = z.shape[0]
        tau = _per_sample_times(t, batch, z.device)  # [B] float64
        gap = None
        if self.second_time_input:
            r_times = tau if r is None else _per_sample_times(r, batch, z.device)  # [B]
            gap = ((tau - r_times) * self.schedule.num_train_timesteps).to(torch.float32)  # [B], (t − r)·T
        labels = self._labels(labels, batch, z.device)
        if self.schedule.family == "flow" and self.parameterization.name == "teacher":
            timesteps = (tau * self.schedule.num_train_timesteps).to(torch.float32)  # [B]
            return self._call_net(z, timesteps, labels, gap).to(z.dtype)
        sigma = tau / (1.0 - tau)  # [B], σ̃
        c_in, c_noise, c_skip, c_out = self.coefficients(sigma)
        one_minus_tau = 1.0 - tau  # [B]
        b_in = c_in / one_minus_tau  # [B], z → c_in·x̃
        a_z = (1.0 - c_skip / one_minus_tau) / tau  # [B]
        a_f = -c_out / tau  # [B]
        out = self._call_net(z * column(b_in, z), c_noise.to(torch.float32), labels, gap)  # [B, C, *S]
        return column(a_z, z) * z + column(a_f, z) * out.to(z.dtype)  # [B, *S]

    def coefficients(self, sigma_edm: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_in, c_noise, c_skip, c_out), float64 [B], of this student's parameterisation at EDM levels σ̃ [B]."""
        return self.parameterization.coefficients(self.schedule, self.prediction_type, sigma_edm)

    def forward(self, form: Literal["cm", "mf"], *args: Any, **kwargs: Any) -> Tensor:
        """Dispatch through __call__ (so DDP / accelerate wrappers see a forward): "cm" → denoise(x̃, σ̃, labels),
        "mf" → velocity(z, t=τ, r=τ_r, labels=)."""
        if form == "cm":
            return self.denoise(*args, **kwargs)
        if form == "mf":
            return self.velocity(*args, **kwargs)
        raise ValueError(f"form must be 'cm' (denoise) or 'mf' (velocity), got {form!r}")

    def flow_map(self, z: Tensor, *, t: Any, r: Any, labels: Any = None) -> Tensor:
        """Ψ_{t→r}(z) = z − (t − r)·u_θ(z, t, r) in the flow-matching view (t, r in τ, r ≤ t) → [B, *S]."""
        batch = z.shape[0]
        tau, r_times = _per_sample_times(t, batch, z.device), _per_sample_times(r, batch, z.device)
        return z - column(tau - r_times, z) * self.velocity(z, t=tau, r=r_times, labels=labels)

    # ------------------------------------------------------------------------------------------------------
    # Sampling

    def default_sigma_max(self) -> float:
        """The prior level σ̃_max: 80 (the CMT / EDM recipe), clamped to the largest level the schedule represents."""
        return float(min(DEFAULT_SIGMA_MAX, self.schedule.sigma_edm_max))

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        steps: int = 1,
        *,
        intermediate: float | None = None,
        sigma_max: float | None = None,
        labels: Any = None,
        form: Literal["cm", "mf"] | None = None,
        generator: torch.Generator | None = None,
        renoise: Tensor | None = None,
    ) -> Tensor:
        """1- or 2-step samples x0 [B, *S] in the teacher's native clean space (pixel teachers: images in [-1, 1];
        latent teachers: latents, decode them with `pipeline.teacher.decode_latents` and the teacher's VAE).

        `noise` is standard normal [B, *S]. CM form (default without a second time input): x̃_T = ε·√(1+σ̃_max²) (the
        VP marginal the solvers start from), x0 = f(x̃_T, σ̃_max); 2 steps re-noise to σ̃ = `intermediate`
        (default 0.821) with fresh noise (`renoise` [B, *S], else drawn from `generator`) and apply f again. MF form
        (default with a second time input): z_T at τ_max = σ̃_max/(1+σ̃_max) (τ_max = 1 for flow-matching teachers),
        z_0 = z_T − τ_max·u(z_T, t=τ_max, r=0); 2 steps pass through τ = `intermediate` (default 0.5) deterministically.
        """
        if steps not in (1, 2):
            raise ValueError(f"steps must be 1 or 2, got {steps}")
        form = form or ("mf" if self.second_time_input else "cm")
        device = next(self.net.parameters()).device
        noise = torch.as_tensor(noise).to(device=device, dtype=torch.float32)  # [B, *S]
        if tuple(noise.shape[1:]) != self.sample_shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, the student's samples are {self.sample_shape}")
        sigma_max = self.default_sigma_max() if sigma_max is None else float(sigma_max)
        if form == "cm":
            x_edm = noise * math.sqrt(1.0 + sigma_max * sigma_max)  # [B, *S]
            x0 = self.denoise(x_edm, sigma_max, labels)
            if steps == 2:
                sigma_mid = DEFAULT_CM_INTERMEDIATE_SIGMA if intermediate is None else float(intermediate)
                if renoise is None:
                    renoise = torch.randn(noise.shape, generator=generator, dtype=torch.float32)  # [B, *S]
                fresh = torch.as_tensor(renoise).to(device=device, dtype=torch.float32)  # [B, *S]
                x0 = self.denoise(x0 + sigma_mid * fresh, sigma_mid, labels)
            return x0
        tau_max, z = self.mf_prior(noise, sigma_max)
        if steps == 2:
            tau_mid = DEFAULT_MF_INTERMEDIATE_TAU if intermediate is None else float(intermediate)
            z = self.flow_map(z, t=tau_max, r=tau_mid, labels=labels)
            tau_max = tau_mid
        return self.flow_map(z, t=tau_max, r=0.0, labels=labels)

    def mf_tau_max(self, sigma_max: float | None = None) -> float:
        """The MF form's 1-step start τ_max = σ̃_max/(1 + σ̃_max) (σ̃_max: `default_sigma_max` unless given); 1 for
        flow teachers and an infinite σ̃_max."""
        sigma_max = self.default_sigma_max() if sigma_max is None else float(sigma_max)
        if self.schedule.family == "flow" or math.isinf(sigma_max):
            return 1.0
        return sigma_max / (1.0 + sigma_max)

    def mf_prior(self, noise: Tensor, sigma_max: float | None = None) -> tuple[float, Tensor]:
        """The MF form's start (τ_max, z_T [B, *S]) for standard-normal `noise`: τ_max from `mf_tau_max` and
        z_T = x̃_T/(1 + σ̃_max) with x̃_T = ε·√(1 + σ̃_max²) (the VP marginal); z_T = ε for flow teachers."""
        if self.schedule.family == "flow":
            return 1.0, noise
        sigma_max = self.default_sigma_max() if sigma_max is None else float(sigma_max)
        return self.mf_tau_max(sigma_max), noise * (math.sqrt(1.0 + sigma_max * sigma_max) / (1.0 + sigma_max))

    # ------------------------------------------------------------------------------------------------------
    # Export (the format lives in trainer.student_export)

    def metadata(self) -> dict[str, Any]:
        """The contents of student.json."""
        from trainer.student_export import metadata

        return metadata(self)

    def save_pretrained(self, directory: str | os.PathLike, *, vae: nn.Module | None = None) -> Path:
        """Write unet/, scheduler/, the MF form's second_time.safetensors, a latent student's vae/ and student.json."""
        from trainer.student_export import save_student

        return save_student(self, directory, vae=vae)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        second_time_input: bool | None = None,
        device: str | torch.device = "cpu",
    ) -> FlowMapStudent:
        """Load a student export (formats 1–3); `second_time_input` (if given) must match what the export holds."""
        from trainer.student_export import load_student

        return load_student(directory, second_time_input=second_time_input, device=device, cls=cls)
