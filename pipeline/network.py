"""Calling a diffusers network: UNet2DModel-style or DiT-style forward passes, and what its config tells.

The teacher (`pipeline/teacher.py`), the cost model (`pipeline/cost.py`) and students built on the teacher's network
(`trainer/student.py`) share these, so every caller runs the network the same way.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.teacher_files import TeacherLoadError

__all__ = [
    "class_embedding_rows",
    "model_output_tensor",
    "network_forward",
    "sample_shape_of",
    "takes_hidden_states",
]


def model_output_tensor(output: Any) -> torch.Tensor:
    """The tensor inside a diffusers model output (``.sample``), a tuple, or a bare tensor."""
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def takes_hidden_states(model: nn.Module) -> bool:
    """True for DiT-style models called as model(hidden_states=, timestep=, class_labels=)."""
    params = inspect.signature(model.forward).parameters
    return "class_labels" in params and "hidden_states" in params


def network_forward(
    model: nn.Module, is_dit: bool, x_in: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    """One call of a UNet2DModel-style or DiT-style network → its output tensor [B, C_out, *spatial]."""
    if is_dit:
        return model_output_tensor(model(hidden_states=x_in, timestep=timesteps, class_labels=labels))
    if labels is not None:
        return model_output_tensor(model(x_in, timesteps, class_labels=labels))
    return model_output_tensor(model(x_in, timesteps))


def class_embedding_rows(model: nn.Module) -> tuple[int | None, int | None]:
    """(number of real classes, rows of the class-embedding table) of a model, or (None, None) if unconditional."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            return int(module.num_classes), int(module.embedding_table.num_embeddings)
    class_embed_type = getattr(getattr(model, "config", None), "class_embed_type", None)
    if class_embed_type is not None:
        raise TeacherLoadError(
            f"{type(model).__name__} uses class_embed_type={class_embed_type!r} (continuous class conditioning), "
            "which is not supported: use a model with integer class ids (num_class_embeds) or an unconditional one"
        )
    embedding = getattr(model, "class_embedding", None)
    if isinstance(embedding, nn.Embedding):
        return int(embedding.num_embeddings), int(embedding.num_embeddings)
    return None, None


def sample_shape_of(model: nn.Module) -> tuple[int, ...]:
    """Per-sample input shape [C, *spatial] from a diffusers model config (in_channels, sample_size)."""
    config = getattr(model, "config", None)
    in_channels = getattr(config, "in_channels", None)
    size = getattr(config, "sample_size", None)
    if in_channels is None or size is None:
        raise TeacherLoadError(
            f"{type(model).__name__} has no config with in_channels and sample_size, so the sample shape is "
            "unknown: give the model a diffusers config (ConfigMixin) with both fields"
        )
    spatial = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    return (int(in_channels), *spatial)
