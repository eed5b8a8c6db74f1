"""Exact teacher for Gaussian data x0 ~ N(μ, s²·I): closed-form posterior mean and PF-ODE flow map.

In the EDM view x̃ = x0 + σ̃·ε (design.md, "Testing with an exact oracle"):

- posterior mean (a perfect diffusion model):  E[x0 | x̃] = μ + s²/(s² + σ̃²)·(x̃ − μ)
- PF-ODE flow map:                              Ψ_{σ̃→σ̃'}(x̃) = μ + √((s² + σ̃'²)/(s² + σ̃²))·(x̃ − μ)

For a native state x = α·x0 + σ·ε the posterior mean is E[x0 | x] = μ + s²·α·(x − α·μ)/(s²·α² + σ²), which
stays finite at α = 0 (pure noise in flow matching). :class:`GaussianOracleModel` turns this into the exact
ε / v / x0 / velocity prediction of the scheduler it is built with, so :func:`make_oracle_teacher` is a
perfect diffusers-style teacher for solver-order tests and the gradient-bias study.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from pipeline.noise_schedule import NoiseSchedule
from pipeline.teacher import Teacher
from pipeline.time_convention import per_sample, vp_alpha_sigma

__all__ = ["GaussianOracleModel", "flow_map", "make_oracle_teacher", "posterior_mean", "posterior_mean_native"]


def posterior_mean(x_edm: Any, sigma_edm: Any, mu: Any, s: float) -> Any:
    """E[x0 | x̃] = μ + s²/(s² + σ̃²)·(x̃ − μ) for x0 ~ N(μ, s²I) (numpy or torch; σ̃ scalar or per sample)."""
    sigma = per_sample(sigma_edm, x_edm)
    return mu + s * s / (s * s + sigma * sigma) * (x_edm - mu)


def posterior_mean_native(x: Any, alpha: Any, sigma: Any, mu: Any, s: float) -> Any:
    """E[x0 | x] for a native state x = α·x0 + σ·ε: μ + s²·α·(x − α·μ)/(s²·α² + σ²) (finite at α = 0)."""
    a, b = per_sample(alpha, x), per_sample(sigma, x)
    return mu + s * s * a * (x - a * mu) / (s * s * a * a + b * b)


def flow_map(x_edm: Any, sigma_from: Any, sigma_to: Any, mu: Any, s: float) -> Any:
    """PF-ODE flow map Ψ_{σ̃→σ̃'}(x̃) = μ + √((s² + σ̃'²)/(s² + σ̃²))·(x̃ − μ) in the EDM view."""
    sf, st = per_sample(sigma_from, x_edm), per_sample(sigma_to, x_edm)
    return mu + ((s * s + st * st) / (s * s + sf * sf)) ** 0.5 * (x_edm - mu)


class GaussianOracleModel(ModelMixin, ConfigMixin):
    """A diffusers-style model (UNet2DModel call signature) that outputs the exact prediction for Gaussian data.

    It inverts the scheduler's own timestep convention (the same :class:`NoiseSchedule` the teacher uses), so
    ``Teacher.denoise`` of an oracle teacher equals :func:`posterior_mean` to float32 rounding.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int,
        sample_size: Sequence[int],
        mu: float | list = 0.0,
        s: float = 1.0,
    ):
        """Data x0 ~ N(mu, s²I) with per-sample shape [in_channels, *sample_size]; mu scalar or that shape."""
        super().__init__()
        shape = (int(in_channels), *(int(d) for d in sample_size))
        mu_array = np.broadcast_to(np.asarray(mu, dtype=np.float64), shape).copy()  # [*S]
        self.register_buffer(
            "mean", torch.as_tensor(mu_array, dtype=torch.float32), persistent=True
        )  # fingerprinted; follows .to()
        self.mu_float64 = torch.as_tensor(mu_array)  # [*S], kept in float64 whatever the module dtype
        self.schedule: NoiseSchedule | None = None
        self.prediction_type: str | None = None

    def attach_schedule(self, scheduler: Any) -> GaussianOracleModel:
        """Bind the scheduler whose timestep convention and prediction type the outputs follow."""
        self.schedule = NoiseSchedule.from_scheduler(scheduler)
        self.prediction_type = "flow" if self.schedule.family == "flow" else str(scheduler.config.prediction_type)
        return self

    def forward(
        self, sample: torch.Tensor, timestep: Any, class_labels: Any = None, return_dict: bool = True
    ) -> UNet2DOutput | tuple:
        """Exact ε / v / x0 (VP), EDM F (EDM preconditioning) or velocity ε − x0 (flow) at the given timesteps."""
        if self.schedule is None:
            raise RuntimeError("GaussianOracleModel: call attach_schedule(scheduler) first (make_oracle_teacher does)")
        batch = sample.shape[0]
        t = np.broadcast_to(np.asarray(torch.as_tensor(timestep).detach().cpu(), np.float64).reshape(-1), (batch,))
        x = sample.detach().to(torch.float64)  # [B, *S]
        mu, s = self.mu_float64.to(x.device), float(self.config.s)
        family = self.schedule.family
        if family == "edm":
            template = self.schedule.template
            sigma_edm = torch.as_tensor(np.exp(4.0 * t), device=x.device).reshape((batch,) + (1,) * (x.dim() - 1))
            c_in = template.precondition_inputs(torch.ones_like(sigma_edm), sigma_edm)  # [B, 1, ...]
            x_edm = x / c_in  # [B, *S]
            denoised = posterior_mean(x_edm, sigma_edm.reshape(-1), mu, s)
            c_skip_x = template.precondition_outputs(x_edm, torch.zeros_like(x_edm), sigma_edm)
            c_out = template.precondition_outputs(torch.zeros_like(sigma_edm), torch.ones_like(sigma_edm), sigma_edm)
            out = (denoised - c_skip_x) / c_out
        else:
            if family == "flow":
                tau = t / self.schedule.num_train_timesteps
                alpha, sigma = 1.0 - tau, tau
            else:
                alpha, sigma = vp_alpha_sigma(self.schedule.sigma_edm_from_timestep(t))
            alpha_t = torch.as_tensor(alpha, device=x.device)  # [B]
            sigma_t = torch.as_tensor(sigma, device=x.device)  # [B]
            denoised = posterior_mean_native(x, alpha_t, sigma_t, mu, s)  # [B, *S]
            eps = (x - per_sample(alpha_t, x) * denoised) / per_sample(sigma_t, x)  # [B, *S]
            if self.prediction_type == "epsilon":
                out = eps
            elif self.prediction_type == "v_prediction":
                out = per_sample(alpha_t, x) * eps - per_sample(sigma_t, x) * denoised
            elif self.prediction_type == "sample":
                out = denoised
            else:
                out = eps - denoised  # flow velocity
        out = out.to(sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def make_oracle_teacher(
    scheduler: Any, sample_shape: Sequence[int], mu: Any = 0.0, s: float = 1.0, *, device: str = "cpu"
) -> Teacher:
    """A :class:`Teacher` whose denoiser is exact for x0 ~ N(mu, s²I) under the given scheduler's schedule."""
    shape = tuple(int(d) for d in sample_shape)
    mu_config = np.asarray(mu, dtype=np.float64).tolist()
    model = GaussianOracleModel(in_channels=shape[0], sample_size=list(shape[1:]), mu=mu_config, s=float(s))
    model.attach_schedule(scheduler)
    return Teacher(model, scheduler, sample_shape=shape, device=device, dtype=torch.float32)
