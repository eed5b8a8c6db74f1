"""Attention backend selection: xformers on CUDA when installed, PyTorch SDPA otherwise.

diffusers' default processor (``AttnProcessor2_0``) calls ``F.scaled_dot_product_attention``, which on CUDA picks
PyTorch's fused kernels by itself (flash attention for fp16/bf16, memory-efficient attention otherwise); on CPU it
runs the fused CPU kernel. xformers replaces it only where it is installed (extra ``cuda``).
"""

from __future__ import annotations

import importlib.util

import torch


def xformers_available() -> bool:
    """True when the optional `xformers` package (extra `cuda`) is importable."""
    return importlib.util.find_spec("xformers") is not None


def configure_attention(model: torch.nn.Module, device: torch.device | str) -> str:
    """Switch a diffusers model to xformers attention on CUDA when available; return the backend name used."""
    if torch.device(device).type == "cuda" and xformers_available():
        enable = getattr(model, "enable_xformers_memory_efficient_attention", None)
        if enable is not None:
            enable()
            return "xformers"
    return "sdpa"
