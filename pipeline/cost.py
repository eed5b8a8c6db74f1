"""What a generation job costs: network MACs per forward counted from the teacher's config, GPU-hours with sources.

The per-forward cost is counted, not assumed: the teacher's model class is built from its config.json on the
``meta`` device (no weights, no memory) and one forward of one sample runs under ``torch.utils.flop_counter``
(DiT-XL/2 at 256 px: 118.7 GMACs, the DiT paper's 118.6 Gflops, Table 4). Counts are memoised in the cache by
config. GPU throughput is either a measurement given in the preset (``forward_samples_per_gpu_s``) or derived from
the GPU's datasheet peak at the teacher's precision times a stated utilisation; every number in the plan carries
the source it came from.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.paths import cache_location, read_text, write_text


def count_forward_macs(class_name: str, config: dict[str, Any]) -> int:
    """Multiply-accumulates of one forward of one sample of a diffusers model built from `config` (meta device)."""
    import torch
    from diffusers import ModelMixin
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.network import class_embedding_rows, network_forward, sample_shape_of, takes_hidden_states
    from pipeline.teacher_files import diffusers_class

    cls = diffusers_class(class_name, ModelMixin, "model")
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}).eval()
        x = torch.empty(1, *sample_shape_of(model))  # [1, C, *spatial]
        labels = torch.zeros(1, dtype=torch.long) if class_embedding_rows(model)[0] is not None else None
        timesteps = torch.full((1,), 500.0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network_forward(model, takes_hidden_states(model), x, timesteps, labels)
    return int(counter.get_total_flops()) // 2


def forward_macs(class_name: str, config: dict[str, Any]) -> int:
    """`count_forward_macs`, memoised under <cache root>/forward-macs/ by the config's hash."""
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    key = hashlib.sha256(json.dumps([class_name, public], sort_keys=True).encode()).hexdigest()
    place = cache_location("forward-macs", f"{key}.json")
    known = read_text(place)
    if known is not None:
        return int(json.loads(known)["macs"])
    macs = count_forward_macs(class_name, config)
    write_text(place, json.dumps({"class": class_name, "macs": macs}))
    return macs


def teacher_forward_macs(source: str, revision: str | None = None) -> tuple[int | None, str]:
    """(MACs of one forward of one sample of a teacher's network, where that number comes from); configs only."""
    from pipeline.teacher_files import locate_teacher

    try:
        files = locate_teacher(source, revision=revision, weights=False)
        config = files.model_config()
        macs = forward_macs(config.get("_class_name"), config)
    except Exception as error:  # noqa: BLE001 - a plan without the teacher's config says why its cost is unknown
        return None, f"unknown: the teacher's config is not available here ({str(error).splitlines()[0]})"
    return macs, (f"counted: torch.utils.flop_counter over one forward of {config.get('_class_name')} built from "
                  f"{files.model_dir / 'config.json'} on the meta device")


def gpu_throughput(
    macs: int | None, precision: str, gpu: dict[str, Any] | None, measured: float | None, measured_source: str | None
) -> tuple[float | None, str]:
    """(network evaluations per GPU-second, where that number comes from)."""
    if measured:
        return float(measured), f"measured: {measured_source or 'forward_samples_per_gpu_s as given'}"
    if macs is None:
        return None, "unknown: the per-forward cost could not be counted (see forward_gmacs_source)"
    peak = (gpu or {}).get("peak_tflops", {}).get(precision)
    utilization = (gpu or {}).get("utilization")
    if not peak or not utilization:
        return None, (f"unknown: give the preset a gpu: block with peak_tflops.{precision} and utilization, or a "
                      "measured forward_samples_per_gpu_s")
    rate = float(peak) * 1e12 * float(utilization) / (2.0 * macs)
    return rate, (
        f"derived: {peak} TFLOP/s {precision} peak of {gpu.get('name', 'the GPU')} ({gpu.get('peak_source', 'preset')}) "
        f"× utilisation {utilization} ({gpu.get('utilization_source', 'preset')}) / (2 × {macs / 1e9:.2f} GMACs)"
    )


def _rounded(value: float | None) -> float | None:
    """`value` to 4 significant digits (None stays None): plans state estimates, not measurements."""
    return None if value is None else float(f"{value:.4g}")


def cost_plan(
    forward_samples: int, *, macs: int | None, macs_source: str, precision: str, precision_source: str,
    gpu: dict[str, Any] | None, gpus: float, measured: float | None = None, measured_source: str | None = None,
) -> dict[str, Any]:
    """The cost lines of a dry-run plan, each number next to its source."""
    plan: dict[str, Any] = {
        "teacher_precision": precision,
        "teacher_precision_source": precision_source,
        "forward_gmacs": None if macs is None else round(macs / 1e9, 3),
        "forward_gmacs_source": macs_source,
        "teacher_pflop_total": None if macs is None else _rounded(2 * macs * forward_samples / 1e15),
    }
    if gpus <= 0:
        return plan | {"forward_samples_per_gpu_s": None, "throughput_source": "workers run on CPUs (--gpus-per-worker 0)",
                       "estimated_gpu_hours": None, "estimated_wall_hours": None}
    rate, source = gpu_throughput(macs, precision, gpu, measured, measured_source)
    gpu_hours = forward_samples / rate / 3600 if rate else None
    return plan | {
        "forward_samples_per_gpu_s": _rounded(rate),
        "throughput_source": source,
        "estimated_gpu_hours": _rounded(gpu_hours),
        "estimated_wall_hours": _rounded(None if gpu_hours is None else gpu_hours / gpus),
    }
