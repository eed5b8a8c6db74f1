"""Teacher precision for generation: fp32, tf32, bf16 or fp16, checked against the device before any work.

The solver's state and coefficients stay float32/float64 (``pipeline/solvers.py``); the precision is what the
network's forward pass runs in. ``tf32`` keeps float32 weights and lets CUDA matmuls and convolutions use TF32 tensor
cores (Ampere or newer); ``fp32`` turns TF32 off everywhere (PyTorch leaves it on for cuDNN convolutions by default).
The name is part of the store's spec, so stores made at different precisions never share a cache key.
"""

from __future__ import annotations

from pipeline.config_loader import ConfigError
from storage_schema import TEACHER_PRECISIONS as PRECISIONS

_DTYPES = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class PrecisionError(ConfigError):
    """A precision unknown or that the device cannot run; the message names --precision and what to use instead.

    A ConfigError (a ValueError), so the config loader passes `GenerateConfig`'s own name check on unchanged."""


def check_name(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else a PrecisionError listing them."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"--precision {precision}: unknown; choose one of {', '.join(PRECISIONS)}")
    return precision


def compute_dtype(precision: str):
    """The torch dtype the network's weights and inputs take at `precision`."""
    import torch

    return getattr(torch, _DTYPES[check_name(precision)])


def _probe(dtype, device) -> None:
    """Run the operations a UNet or DiT forward uses (convolution, group norm, linear, attention) in `dtype`."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(2, 8, 4, 4, device=device).to(dtype)  # [B, C, H, W]
    y = F.group_norm(F.conv2d(x, torch.randn(8, 8, 3, 3, device=device).to(dtype), padding=1), 4)
    tokens = F.linear(y.flatten(2).transpose(1, 2), torch.randn(8, 8, device=device).to(dtype))  # [B, 16, 8]
    heads = tokens.reshape(2, 16, 2, 4).transpose(1, 2)  # [B, 2, 16, 4]
    out = F.scaled_dot_product_attention(heads, heads, heads)
    if not torch.isfinite(out.float()).all():
        raise RuntimeError("non-finite results on random inputs")


def check_device(precision: str, device) -> None:
    """Refuse a precision `device` cannot run, naming --precision, the device and the fix."""
    import torch

    device = torch.device(device)
    where = "the CPU (--gpus-per-worker 0)" if device.type == "cpu" else f"{device}"
    if precision == "tf32":
        if device.type != "cuda":
            raise PrecisionError(
                f"--precision tf32 is a mode of CUDA tensor cores (Ampere or newer), and the teacher runs on {where}: "
                "use --precision fp32 or bf16, or give workers GPUs"
            )
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise PrecisionError(
                f"--precision tf32 needs compute capability 8.0 or newer; {torch.cuda.get_device_name(device)} has "
                f"{major}.{minor}: use --precision fp32 or fp16"
            )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support: use fp16 or fp32"
        )
    try:
        _probe(compute_dtype(precision), device)
    except RuntimeError as error:
        raise PrecisionError(
            f"--precision {precision} does not run on {where} ({str(error).splitlines()[0]}): use --precision fp32"
        ) from error


def apply(precision: str, device) -> None:
    """Set this process's TF32 switches for `precision` (on for tf32, off otherwise; CUDA only)."""
    import torch

    if torch.device(device).type != "cuda":
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        mode = "tf32" if precision == "tf32" else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
