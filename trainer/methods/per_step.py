"""Per-step glue shared by the training methods (`trainer.methods.ect`, `.meanflow`, `.cmt`): per-step randomness,
identical dropout masks, the attention kernel and labels (the tests' fault points are `pipeline.fault_points`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

__all__ = [
    "attention_context",
    "conditioning_labels",
    "same_dropout",
    "step_generator",
    "step_seed",
]


def step_seed() -> int:
    """One seed per training step from the global torch RNG (checkpointed by the loop, so resume replays it)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def step_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded for this step's times and noise."""
    return torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def same_dropout(seed: int, device: torch.device) -> Iterator[None]:
    """Run a forward with the RNG seeded to `seed` and restored afterwards: equal seeds give equal dropout masks."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def attention_context(backend: str) -> contextlib.AbstractContextManager:
    """The SDPA kernel choice for student forwards: "flash" forces the flash kernel; others leave torch's choice."""
    if backend == "flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


def conditioning_labels(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> Tensor | None:
    """The batch's labels for a class-conditional student, None for an unconditional one."""
    student = extract_model_from_parallel(model)
    return batch.get("labels") if getattr(student, "num_classes", None) is not None else None

