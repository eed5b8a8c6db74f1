"""Benchmark: the cost of one ECD optimizer step with the stored teacher step vs the teacher run live.

    python jobs/bench_ecd.py --config jobs/digits/post.yaml --init cmt:<dir>|teacher|random --data store:<url>
        teacher=<teacher dir> [key=value ...] [--steps 10] [--warmup 2]

Takes trainer/post.py's preset, flags and key=value overrides (the method is ECD whatever --method says). Same student
init, batch size, stores and loss on both paths: the stored path streams consecutive solver points (`trainer.data` mode
"ecd", no teacher, `trainer.methods.ect.StoredECDLoss`); the live path streams the same stores' clean endpoints (mode
"endpoints") and takes the step with the teacher (`pipeline.ode_step.ode_step`, `ecd.teacher_step`,
`trainer.methods.ect.LiveECDLoss`). The two paths alternate step by step, so a change in machine load hits both alike.
One process, no checkpoints. Prints one JSON object: median seconds per step (data + loss + backward + update), median
data seconds and teacher forward samples per step of each path, and their ratio.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def benchmark_ecd(cfg: Any, *, steps: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Median seconds per ECD optimizer step (data + loss + backward + update), stored teacher step vs live teacher.

    `cfg` is a `trainer.post.PostConfig` with data=stores (`--data store:<url>`) and teacher=<dir>.
    """
    from pipeline.teacher import load_teacher
    from trainer.config import ConfigError
    from trainer.methods.ect import LiveECDLoss, ect_sigma_range
    from trainer.post import ForwardCounter, build_setup, store_stream

    if cfg.data != "stores" or not cfg.teacher:
        raise ConfigError("jobs/bench_ecd.py compares stored and live ECD steps: pass --data store:<url> and "
                          "teacher=<dir>")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.loop.torch_threads is not None:
        torch.set_num_threads(cfg.loop.torch_threads)
    cfg = dataclasses.replace(cfg, method="ecd")
    teacher = load_teacher(cfg.teacher, device=device)
    counter = ForwardCounter(teacher.model)
    paths: dict[str, dict[str, Any]] = {}
    for path, mode in (("stored", "ecd"), ("live", "endpoints")):
        setup = build_setup(cfg, device, data_sample_shape=None)
        loss_fn = setup.loss_fn if path == "stored" else LiveECDLoss(
            cfg.ect, cfg.ecd, teacher, ect_sigma_range(cfg.ect, setup.student.schedule, teacher), cfg.attention)
        paths[path] = {"student": setup.student, "loss_fn": loss_fn, "seconds": [], "data_seconds": [],
                       "batches": iter(store_stream(cfg, setup.student, rank=0, world_size=1, device=device,
                                                    mode=mode)),
                       "optimizer": torch.optim.RAdam(setup.student.parameters(), lr=cfg.loop.lr), "teacher_samples": 0}
    for step in range(warmup + steps):
        for path in paths.values():
            before = counter.samples
            started = time.perf_counter()
            batch = {name: tensor.to(device) for name, tensor in next(path["batches"]).items()}
            loaded = time.perf_counter()
            path["loss_fn"](path["student"], batch, step).mean().backward()
            path["optimizer"].step()
            path["optimizer"].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                path["seconds"].append(time.perf_counter() - started)
                path["data_seconds"].append(loaded - started)
                path["teacher_samples"] += counter.samples - before
    counter.remove()
    timings: dict[str, Any] = {
        name: {"seconds_per_step": float(np.median(path["seconds"])),
               "data_seconds_per_step": float(np.median(path["data_seconds"])),
               "teacher_forward_samples_per_step": path["teacher_samples"] / steps}
        for name, path in paths.items()
    }
    timings["live_over_stored"] = timings["live"]["seconds_per_step"] / timings["stored"]["seconds_per_step"]
    timings.update(batch_per_process=cfg.batch_per_process, steps=steps, teacher_step=cfg.ecd.teacher_step,
                   device=str(device), threads=torch.get_num_threads())
    return timings


def _count_flag(argv: list[str], flag: str, default: int) -> int:
    """Remove `flag N` from argv and return N (default when absent); a missing or non-numeric N is a usage error."""
    if flag not in argv:
        return default
    index = argv.index(flag)
    if index + 1 >= len(argv) or not argv[index + 1].isdigit():
        raise SystemExit(f"error: {flag} needs a number, e.g. {flag} 10")
    value = int(argv[index + 1])
    del argv[index : index + 2]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `jobs/bench_ecd.py --config PRESET --init I --data store:URL teacher=DIR [key=value ...] [--steps N]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    steps = _count_flag(argv, "--steps", 10)
    warmup = _count_flag(argv, "--warmup", 2)
    from trainer.config import ConfigError, load_config, parse_stage_args
    from trainer.post import PostConfig

    try:
        args = parse_stage_args(argv)
        cfg = load_config(PostConfig, args.config_path, args.overrides)
        print(json.dumps(benchmark_ecd(cfg, steps=steps, warmup=warmup)))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
