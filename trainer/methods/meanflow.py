"""MeanFlow post-training (Geng et al. 2025, arXiv 2505.13447) of a FlowMapStudent: config, (t, r) sampler, the
derivative du/dt (JVP or central finite difference), classifier-free guidance folded into the target, and the loss
callable `trainer/post.py` trains with (`MeanFlowLoss`).

    u_tgt = ṽ − (t − r)·sg(du/dt),  du/dt = ṽ·∂_z u + ∂_t u,  loss sg(w)·‖u_θ(z, t, r) − sg(u_tgt)‖²

in the flow-matching view: t and r are τ ∈ [0, 1] (r ≤ t), z = (1 − t)·x0 + t·ε and v = ε − x0 (`velocity:
conditional`, the paper's); u_θ(z, t, r) is `FlowMapStudent.velocity(z, t=t, r=r)`, the average velocity the paper
writes u(z, r, t).

The MeanFlow identity (Geng et al. 2025, Eq. 6) holds for the marginal velocity v(z, t) = E[ε − x0 | z]. The paper's
conditional ε − x0 stands in for it without bias: the target is linear in v (du/dt is too), so only its variance
changes. `velocity: teacher` (distillation) takes the teacher's own PF-ODE velocity, v = (z − D(z))/t with the
teacher's denoiser D at α = 1 − t, σ = t, at one teacher forward per sample and step: the teacher's flow (the one CMT
distilled), equal to the paper's target in expectation where the teacher is exact, without the conditional
velocity's variance Var(x0 | z)/t².

Guidance (class-conditional students) replaces v by the guided field of the official MeanFlow code (`guidance_fn`),
inside the guidance interval t ∈ [t_min, t_max] only:

    ṽ = ω·v + (1 − ω − κ)·u_θ(z, t, t | ∅) + κ·u_θ(z, t, t | c)      (ω = 1, κ = 0 outside the interval)

(κ = 0 is plain CFG on the target, ω·v + (1 − ω)·u(∅); the effective guidance scale is ω/(1 − κ)). Samples whose
label the stage dropped (`trainer.label_dropout`, p = 0.1 by default with guidance) see the null class and keep the
unguided v. u_θ(·, t, t | ·) runs on the unwrapped student under no_grad.

Batch keys read: "x0" [B, *S] (clean samples: a store's solver endpoints x̂_0 in the EDM view, `trainer.data` mode
"endpoints", or dataset images), "labels" [B] for class-conditional students, and "labels_dropped" [B]
(`trainer.label_dropout.DROPPED_KEY`, set by the stage's label dropout) with guidance. The times are drawn here, not
read from the batch.

Precision: under Accelerate's mixed precision (loop.mixed_precision = bf16 / fp16) the prediction u_θ runs in the
autocast dtype, but du/dt is always taken in float32, bypassing autocast: torch's forward-mode AD has no autocast
rule for convolutions ("Input type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the same"), and a
central difference at δ = 1e-4 of bf16 outputs (8 mantissa bits) is rounding noise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.fault_points import POST_STEP, reach
from trainer.config import ConfigError
from trainer.label_dropout import DROPPED_KEY
from trainer.losses import column
from trainer.methods.per_step import (
    attention_context,
    conditioning_labels,
    same_dropout,
    step_generator,
    step_seed,
)

__all__ = [
    "DerivativeBackendError",
    "MeanFlowConfig",
    "MeanFlowLoss",
    "guided_target_velocity",
    "jvp_attention_context",
    "meanflow_prediction_and_derivative",
    "meanflow_times",
    "resolve_derivative",
    "tau_max",
    "teacher_tau_floor",
    "teacher_velocity",
]


class DerivativeBackendError(ConfigError):
    """MeanFlow's JVP requested with an attention backend that has no forward-mode derivative."""


@dataclass(frozen=True, kw_only=True)
class MeanFlowConfig:
    """MeanFlow's (t, r) sampler, derivative of u, adaptive weighting and optional CFG folded into the target."""

    p_mean: float = -0.4
    p_std: float = 1.0
    fraction_r_neq_t: float = 0.25
    # auto: jvp where the attention backend allows it, else fd; secant: the slope over a window of ±secant_delta
    derivative: Literal["jvp", "fd", "auto", "secant"] = "auto"
    fd_delta: float = 1e-4  # in τ; UNet time embeddings see τ·T (T = 1000), so δ = 1e-3 is already a 1-timestep jump
    secant_delta: float = 0.05  # derivative=secant: the window's half-width in τ (one-sided at r and at τ_max)
    tau_min: float = 0.005  # t, r are clamped to [tau_min, min(1 − tau_min, the student's sampling τ_max)]
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    guidance_scale: float | None = None  # CFG ω (class-conditional students only); none: no guidance
    guidance_kappa: float = 0.0  # κ, the share of the student's own conditional velocity in ṽ
    guidance_t_min: float = 0.0  # guidance interval [t_min, t_max] in τ; outside it ṽ = v
    guidance_t_max: float = 1.0
    velocity: Literal["conditional", "teacher"] = "conditional"  # v: ε − x0 (the paper's), or the teacher's v(z, t)

    def __post_init__(self) -> None:
        """Reject settings the derivative, the sampler or the guided target cannot run with."""
        if not 0 < self.fd_delta <= self.tau_min / 2:
            raise ConfigError(
                f"meanflow.fd_delta must lie in (0, tau_min/2] = (0, {self.tau_min / 2}] so that t − δ stays > 0, "
                f"got {self.fd_delta}"
            )
        if not 0 < self.secant_delta <= 0.5:
            raise ConfigError(f"meanflow.secant_delta must lie in (0, 0.5] (a half-width in τ), got "
                              f"{self.secant_delta}")
        if not 0 < self.tau_min < 0.5:
            raise ConfigError(f"meanflow.tau_min must lie in (0, 0.5), got {self.tau_min}")
        if self.guidance_scale is None and (self.guidance_kappa != 0 or (self.guidance_t_min, self.guidance_t_max)
                                            != (0.0, 1.0)):
            raise ConfigError(
                "meanflow.guidance_kappa / guidance_t_min / guidance_t_max shape the guided target: set "
                "meanflow.guidance_scale (ω) too, or drop them"
            )
        if not 0 <= self.guidance_t_min < self.guidance_t_max <= 1:
            raise ConfigError(
                f"the guidance interval needs 0 <= meanflow.guidance_t_min < meanflow.guidance_t_max <= 1, got "
                f"[{self.guidance_t_min}, {self.guidance_t_max}]"
            )
        if self.guidance_scale is not None and not (math.isfinite(self.guidance_scale)
                                                    and math.isfinite(self.guidance_kappa)):
            raise ConfigError("meanflow.guidance_scale and meanflow.guidance_kappa must be finite numbers")


def resolve_derivative(requested: str, attention: str) -> Literal["jvp", "fd", "secant"]:
    """MeanFlow's derivative: "jvp" needs attention with forward-mode AD ("sdpa"); "auto" falls back to "fd"; "fd" and
    "secant" (forward passes only) run with any attention."""
    if requested in ("fd", "secant"):
        return requested  # type: ignore[return-value]
    if attention == "sdpa":
        return "jvp"
    if requested == "jvp":
        raise DerivativeBackendError(
            f"meanflow.derivative=jvp needs forward-mode AD through attention, and attention={attention} "
            f"({'the flash SDPA kernel' if attention == 'flash' else 'xformers'}) has none: use attention=sdpa "
            "(the JVP then runs attention on the math kernel), or meanflow.derivative=fd (central finite "
            "difference) / auto (picks fd for this backend)"
        )
    return "fd"


def tau_max(student: Any, mf: MeanFlowConfig) -> float:
    """Largest MeanFlow time: the student's 1-step sampling τ_max, kept below 1 − tau_min."""
    return min(student.mf_tau_max(), 1.0 - mf.tau_min)


def teacher_tau_floor(teacher: Any) -> float:
    """The teacher's lowest level in τ, σ̃_min/(1 + σ̃_min): a VP table ends above MeanFlow's τ_min = 0.005."""
    lowest = teacher.sigma_edm_range[0]  # σ̃
    return lowest / (1.0 + lowest)


def meanflow_times(
    batch: int, mf: MeanFlowConfig, tau_limit: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(t, r) [B] float64 in τ: logit-normal pair (t ≥ r; r = t for 1 − fraction), clamped to [tau_min, tau_limit]."""
    from trainer.schedules import sample_meanflow_times

    t, r = sample_meanflow_times(batch, p_mean=mf.p_mean, p_std=mf.p_std, fraction_r_neq_t=mf.fraction_r_neq_t,
                                 generator=generator, dtype=torch.float64)
    return t.clamp(mf.tau_min, tau_limit), r.clamp(mf.tau_min, tau_limit)


@torch.no_grad()
def teacher_velocity(teacher: Any, z: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
    """The teacher's PF-ODE velocity at z = (1 − t)·x0 + t·ε in the flow-matching view → [B, *S] (t: τ [B]).

    v(z, t) = E[ε − x0 | z] = (z − x̂0)/t with x̂0 = D(z) the teacher's denoiser at α = 1 − t, σ = t
    (from ε = (z − (1 − t)·x0)/t).
    """
    t = t.to(torch.float64)  # [B]
    x0_hat = teacher.denoise_native(z, (1.0 - t).cpu().numpy(), t.cpu().numpy(), labels=labels)  # [B, *S]
    z32 = z.float()  # [B, *S]; t enters as float32, not rounded to a bf16 z
    return ((z32 - x0_hat.to(z.device)) / column(t, z32)).to(z.dtype)  # [B, *S]


def _contiguous_first_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: hand the module a contiguous copy of its first input."""
    return (args[0].contiguous(), *args[1:])


@contextlib.contextmanager
def jvp_attention_context(module: nn.Module | None = None) -> Iterator[None]:
    """Make a model forward-mode-AD safe: math SDPA backend, and contiguous GroupNorm inputs when `module` is given.

    The CPU flash SDPA kernel has no forward-AD formula ("Trying to use forward AD with
    _scaled_dot_product_flash_attention_for_cpu"), so attention runs on the math backend here. With torch
    2.13, group_norm's forward-AD formula also fails ("view size is not compatible with input tensor's size
    and stride") on the non-contiguous tensors diffusers' attention blocks hand to the next GroupNorm;
    passing the (unwrapped) model registers temporary pre-hooks that make those inputs contiguous.
    """
    handles = []
    if module is not None:
        handles = [layer.register_forward_pre_hook(_contiguous_first_input)
                   for layer in module.modules() if isinstance(layer, nn.GroupNorm)]
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def float32_forward(device: torch.device) -> Iterator[None]:
    """Switch autocast off for the block: student methods called directly (not through the Accelerate-wrapped
    forward, which re-enters autocast) then run in the weights' float32."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def meanflow_prediction_and_derivative(
    model: torch.nn.Module,
    z: Tensor,
    *,
    t: Tensor,
    r: Tensor,
    v: Tensor,
    labels: Tensor | None,
    method: Literal["jvp", "fd", "secant"],
    fd_delta: float,
    dropout_seed: int,
    attention: str = "sdpa",
    secant: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """(u_θ(z, t, r) with gradient through `model`, sg(du/dt)), du/dt = v·∂_z u + ∂_t u; one dropout mask for all.

    t, r: τ [B] (flow-matching view), r ≤ t.

    The prediction goes through `model` itself (DDP-wrapped in multi-process runs, so its backward all-reduces the
    gradients; in the mixed-precision dtype). du/dt comes from the UNWRAPPED student's `velocity`, in float32 and
    under no_grad: "jvp" by torch.func.jvp inside `jvp_attention_context` (DDP wrappers break jvp; the prediction
    runs inside the same attention context because the math SDPA kernel consumes the RNG differently from the
    others, and the masks must match), "fd" by the central difference of `trainer.losses.central_difference`,
    "secant" by `trainer.losses.secant_derivative` with `secant` = (half-width δ, τ_max).
    """
    from trainer.losses import central_difference, secant_derivative, total_derivative_jvp

    student = extract_model_from_parallel(model)

    def predict(z_in: Tensor, *, t: Tensor, r: Tensor) -> Tensor:
        """u(z, t, r) through `model`, with this step's dropout mask."""
        with same_dropout(dropout_seed, z.device):
            return model("mf", z_in, t=t, r=r, labels=labels)  # [B, *S]

    def velocity32(z_in: Tensor, *, t: Tensor, r: Tensor) -> Tensor:
        """u(z, t, r) of the unwrapped student in float32, with this step's dropout mask."""
        with same_dropout(dropout_seed, z.device), float32_forward(z.device):
            return student.velocity(z_in.float(), t=t, r=r, labels=labels)  # [B, *S]

    if method == "jvp":
        with jvp_attention_context(student):
            with torch.no_grad():
                _, du_dt = total_derivative_jvp(velocity32, z.float(), t=t, r=r, v=v.float())  # [B, *S]
            u_pred = predict(z, t=t, r=r)  # [B, *S]
        return u_pred, du_dt.to(u_pred.dtype)
    with attention_context(attention):
        u_pred = predict(z, t=t, r=r)  # [B, *S]
        if method == "secant":
            if secant is None:
                raise ValueError("method='secant' needs secant=(half-width, τ_max)")
            du_dt = secant_derivative(velocity32, z.float(), t=t, r=r, v=v.float(), delta=secant[0],
                                      t_max=secant[1])  # [B, *S]
        else:
            du_dt = central_difference(velocity32, z.float(), t=t, r=r, v=v.float(), delta=fd_delta)  # [B, *S]
    return u_pred, du_dt.to(u_pred.dtype)


def guided_target_velocity(
    model: torch.nn.Module,
    z: Tensor,
    *,
    t: Tensor,
    v: Tensor,
    labels: Tensor,
    omega: float,
    kappa: float,
    interval: tuple[float, float],
    null_class: int,
    dropout_seed: int,
) -> Tensor:
    """MeanFlow's guided velocity ṽ = ω·v + (1 − ω − κ)·sg(u_θ(z, t, t | ∅)) + κ·sg(u_θ(z, t, t | c)) where t lies in
    `interval`, v elsewhere → [B, *S] (the official code's `guidance_fn`); t: τ [B]."""
    from trainer.losses import guided_velocity

    student = extract_model_from_parallel(model)
    null = torch.full_like(labels, null_class)  # [B]
    with torch.no_grad(), same_dropout(dropout_seed, z.device):
        if kappa != 0:
            both = student("mf", torch.cat([z, z]), t=torch.cat([t, t]), r=torch.cat([t, t]),
                           labels=torch.cat([null, labels]))
            u_uncond, u_cond = both.chunk(2)  # [B, *S] each
        else:
            u_uncond, u_cond = student("mf", z, t=t, r=t, labels=null), None  # [B, *S]
    inside = (t >= interval[0]) & (t <= interval[1])  # [B]
    omega_t = torch.where(inside, torch.full_like(t, omega), torch.ones_like(t))  # [B]
    kappa_t = torch.where(inside, torch.full_like(t, kappa), torch.zeros_like(t))  # [B]
    return guided_velocity(v, u_uncond.to(v.dtype), omega_t, kappa=kappa_t,
                           u_cond=None if u_cond is None else u_cond.to(v.dtype))


@dataclass
class MeanFlowLoss:
    """MeanFlow on clean samples x0 (batch keys "x0", "labels", "labels_dropped"; t, r in τ): z = (1 − t)·x0 + t·ε,
    v = ε − x0 or the teacher's velocity at (z, t) (`velocity`), loss sg(w)·‖u_θ(z, t, r) − sg(u_tgt)‖²."""

    mf: MeanFlowConfig
    derivative: Literal["jvp", "fd", "secant"]
    tau_max: float
    attention: str = "sdpa"
    null_class: int | None = None
    teacher: Any = None  # velocity: teacher
    t_floor: float = field(init=False, default=0.0)  # velocity: teacher: t ≥ the teacher's lowest level, in τ

    def __post_init__(self) -> None:
        """A teacher velocity needs the teacher, and t inside its schedule (a VP table ends above τ = 0.005)."""
        if self.mf.velocity != "teacher":
            return
        if self.teacher is None:
            raise ConfigError("meanflow.velocity=teacher runs the teacher every step: pass teacher=<teacher dir>")
        self.t_floor = teacher_tau_floor(self.teacher)

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Tensor], step: int) -> Tensor:
        """Per-sample MeanFlow loss [B] of one batch."""
        from trainer.losses import meanflow_loss, meanflow_target

        reach(POST_STEP, step)
        x0 = batch["x0"]  # [B, *S]
        seed = step_seed()
        generator = step_generator(seed, x0.device)
        t, r = meanflow_times(x0.shape[0], self.mf, self.tau_max, generator)  # [B] each, float64
        t = t.clamp(min=self.t_floor)  # [B]; r ≤ t still
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # [B, *S]
        z = (1.0 - column(t, x0)) * x0 + column(t, x0) * noise  # [B, *S]
        labels = conditioning_labels(model, batch)
        if self.mf.velocity == "teacher":
            v = teacher_velocity(self.teacher, z, t, labels)  # [B, *S]
        else:
            v = noise - x0  # [B, *S]
        if self.mf.guidance_scale is not None and labels is not None:
            guided = guided_target_velocity(
                model, z, t=t, v=v, labels=labels, omega=self.mf.guidance_scale, kappa=self.mf.guidance_kappa,
                interval=(self.mf.guidance_t_min, self.mf.guidance_t_max), null_class=self.null_class,
                dropout_seed=seed + 2,
            )  # [B, *S]
            dropped = batch.get(DROPPED_KEY, torch.zeros_like(labels, dtype=torch.bool))  # [B]
            v = torch.where(column(dropped, v).bool(), v, guided)  # [B, *S]
        u_pred, du_dt = meanflow_prediction_and_derivative(
            model, z, t=t, r=r, v=v, labels=labels, method=self.derivative, fd_delta=self.mf.fd_delta,
            dropout_seed=seed + 1, attention=self.attention, secant=(self.mf.secant_delta, self.tau_max),
        )
        u_tgt = meanflow_target(v, du_dt, t=t, r=r)  # [B, *S]
        return meanflow_loss(u_pred.float(), u_tgt.float(), p=self.mf.adaptive_p, c=self.mf.adaptive_c)  # [B]
