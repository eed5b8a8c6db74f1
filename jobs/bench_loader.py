"""Benchmark: mid-training steps/s streaming from a trajectory store vs. the same training on in-memory tensors.

    python jobs/bench_loader.py --teacher /tmp/digits_final/export --store runs/digits/store_heun_k8.zarr \\
        [--form cm] [--batch 128] [--steps-per-block 10] [--repetitions 30] [--num-workers 0] [--threads 1]

Both sources feed the same student (the teacher's UNet, CMT loss, RAdam step) with the same batch size and torch
threads, in one process. Blocks of `--steps-per-block` steps alternate between the two sources in ABBA order
(stream, memory, memory, stream, ...) so drifting machine load hits both equally; the first block of each is a
warm-up and is not counted. Besides the ratio of total
rates, the median over adjacent (stream, memory) block pairs of their rate ratio is reported: on a shared machine
it is the robust figure. The streamed batches come from `trainer.data.stream.TrajectoryStream` (what trainer/mid.py
uses); the in-memory ones from `trainer.data.in_memory.InMemoryTrajectories` (every training sample preloaded as
tensors, mid's stream.source=memory). Data wait = time spent inside `next(batches)` (plus the host-to-device copy).
Prints one JSON object: steps/s of each, their ratio (target ≥ 0.95), and the fraction of step time spent
waiting for data (target ≤ 2 %).

    python jobs/bench_loader.py --loader-only --store URL --mode cm|mf|endpoints|ecd [--batch 128] [--epochs 2] \\
        [--synthetic 4x32x32 --trajectories 2048 --steps 16]

measures the loader alone (no teacher, no training): samples/s of `TrajectoryStream` over whole epochs in the
process (num_workers 0 by default), and the bytes the process read per sample handed out (`rchar` of
/proc/self/io: every byte read through a system call, page cache included), after one warm-up epoch. With
`--synthetic CxHxW` a missing store is first written with standard-normal float16 points (K = --steps, shards of 256,
chunks of 64 trajectories, the default codec; the loader's work does not depend on the values, its bytes do a little).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from functools import partial

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=None, help="teacher directory (load_teacher); not with --loader-only")
    parser.add_argument("--store", required=True, action="append", help="trajectory store url (repeatable)")
    parser.add_argument("--loader-only", action="store_true", help="time the loader alone: samples/s, bytes/sample")
    parser.add_argument("--mode", choices=["cm", "mf", "endpoints", "ecd"], default="cm", help="--loader-only mode")
    parser.add_argument("--epochs", type=int, default=2, help="--loader-only: counted epochs after one warm-up")
    parser.add_argument("--synthetic", default=None, help="--loader-only: write a missing store of shape e.g. 4x32x32")
    parser.add_argument("--trajectories", type=int, default=2048, help="--synthetic: trajectories")
    parser.add_argument("--steps", type=int, default=16, help="--synthetic: solver steps K (K+1 points)")
    parser.add_argument("--form", choices=["cm", "mf"], default="cm")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps-per-block", type=int, default=10)
    parser.add_argument("--repetitions", type=int, default=30, help="counted blocks per source (after 1 warm-up)")
    parser.add_argument("--num-workers", type=int, default=0, help="stream DataLoader workers (0: in-process)")
    parser.add_argument("--prefetch-factor", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=8192)
    parser.add_argument("--pairs-per-trajectory", type=int, default=None, help="mf: pairs drawn per trajectory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the stream's data wait")
    return parser.parse_args(argv)


def bytes_read_by(action) -> int:
    """Bytes this process read through system calls (/proc/self/io rchar) while `action()` ran."""

    def rchar() -> int:
        """The process's cumulative rchar counter."""
        with open("/proc/self/io") as stream:
            return next(int(line.split()[1]) for line in stream if line.startswith("rchar:"))

    before = rchar()
    action()
    return rchar() - before


def write_synthetic_store(url: str, shape: tuple[int, ...], trajectories: int, steps: int) -> None:
    """A complete store of standard-normal float16 points at a VP schedule (σ̃ from 80 to 0.002, then 0)."""
    import numpy as np

    from storage_schema import GenerationSpec, create_store

    spec = GenerationSpec(teacher_fingerprint="synthetic", sample_shape=shape, solver="dpmpp-2m", steps=steps,
                          grid="logsnr", seed_base=0, num_trajectories=trajectories, shard_size=256, chunk_size=64)
    sigma_edm = np.append(np.geomspace(80.0, 0.002, steps), 0.0)  # [K+1]
    alpha = 1.0 / np.sqrt(1.0 + sigma_edm**2)
    store = create_store(url, spec, alpha, sigma_edm * alpha)
    rng = np.random.default_rng(0)
    for shard in range(spec.num_shards):
        start, stop = spec.shard_bounds(shard)
        points = rng.standard_normal((stop - start, steps + 1, *shape)).astype(np.float16)  # [n, K+1, *S]
        store.write_shard(shard, points, np.arange(start, stop))


def loader_only(args: argparse.Namespace) -> dict:
    """Samples/s and bytes read per sample of the stream alone, over `args.epochs` epochs after a warm-up epoch."""
    import itertools

    from storage_schema import open_store
    from trainer.data.options import StreamConfig
    from trainer.data.stream import TrajectoryStream

    if args.synthetic and not os.path.exists(args.store[0]):
        shape = tuple(int(size) for size in args.synthetic.split("x"))
        write_synthetic_store(args.store[0], shape, args.trajectories, args.steps)
    stream = TrajectoryStream(StreamConfig(
        urls=tuple(args.store), mode=args.mode, batch_per_process=args.batch, shuffle_buffer=args.shuffle_buffer,
        num_workers=args.num_workers, prefetch_factor=args.prefetch_factor,
        pairs_per_trajectory=args.pairs_per_trajectory if args.mode == "mf" else None,
    ), rank=0, world_size=1)
    batches = iter(stream)
    per_epoch = stream.batches_per_epoch()
    for _ in itertools.islice(batches, per_epoch):  # warm-up epoch
        pass
    started = time.perf_counter()
    read = bytes_read_by(lambda: [None for _ in itertools.islice(batches, per_epoch * args.epochs)])
    seconds = time.perf_counter() - started
    samples = per_epoch * args.epochs * args.batch
    spec = open_store(args.store[0]).spec
    return {"mode": args.mode, "sample_shape": list(spec.sample_shape), "points": spec.num_points,
            "dtype": spec.dtype, "batch_per_process": args.batch, "num_workers": args.num_workers,
            "samples": samples, "seconds": round(seconds, 3), "samples_per_s": round(samples / seconds, 1),
            "bytes_read_per_sample": round(read / samples, 1),
            "stored_bytes_by_array": open_store(args.store[0]).describe()["bytes_by_array"]}


def timed_steps(model, optimizer, loss_fn, batches: Iterator, steps: int) -> tuple[float, float]:
    """Run `steps` training steps; return (wall seconds, seconds waiting inside next(batches))."""
    wait = 0.0
    started = time.perf_counter()
    for step in range(steps):
        before = time.perf_counter()
        batch = {name: tensor.to("cpu") for name, tensor in next(batches).items()}
        wait += time.perf_counter() - before
        loss = loss_fn(model, batch, step).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return time.perf_counter() - started, wait


def main(argv: list[str] | None = None) -> int:
    """Build both sources and the student, run the interleaved blocks, print the JSON result."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.loader_only:
        print(json.dumps(loader_only(args), indent=2))
        return 0
    if args.teacher is None:
        print("error: --teacher is needed to time training steps (or pass --loader-only)", file=sys.stderr)
        return 2
    from pipeline.teacher import load_teacher
    from trainer.config import load_config
    from trainer.data.in_memory import InMemoryTrajectories
    from trainer.data.options import StreamConfig
    from trainer.data.stream import TrajectoryStream
    from trainer.losses import squared_l2
    from trainer.methods.cmt import cm_loss, mf_loss
    from trainer.mid import MidConfig, check_stores
    from trainer.student import FlowMapStudent

    overrides = [f"teacher={args.teacher}", f"stores=[{','.join(args.store)}]", f"form={args.form}",
                 f"batch_per_process={args.batch}", "loop.output_dir=/dev/null", "loop.total_steps=1",
                 "loop.lr=1e-4", "loop.checkpoint_every_steps=0", "loop.log_every_steps=1",
                 "loop.eval_every_steps=0"]
    if args.pairs_per_trajectory is not None:
        overrides.append(f"stream.pairs_per_trajectory={args.pairs_per_trajectory}")
    cfg = load_config(MidConfig, None, overrides)
    teacher = load_teacher(args.teacher)
    infos = check_stores(cfg, sample_shape=teacher.sample_shape, teacher_fingerprint=teacher.fingerprint, world_size=1)

    stream = TrajectoryStream(StreamConfig(
        urls=tuple(args.store), mode=args.form, batch_per_process=args.batch, shuffle_buffer=args.shuffle_buffer,
        num_workers=args.num_workers, prefetch_factor=args.prefetch_factor,
        pairs_per_trajectory=args.pairs_per_trajectory if args.form == "mf" else None,
    ), rank=0, world_size=1)
    preload_started = time.perf_counter()
    memory = InMemoryTrajectories(infos, args.form, batch_per_process=args.batch, seed=0, rank=0, world_size=1)
    preload_seconds = time.perf_counter() - preload_started

    base = FlowMapStudent.from_teacher(teacher, second_time_input=args.form == "mf")
    loss_fn = partial(cm_loss, distance=squared_l2) if args.form == "cm" else mf_loss
    runs = {}
    for name, source in (("stream", stream), ("memory", memory)):
        model = copy.deepcopy(base).train()
        runs[name] = {"model": model, "optimizer": torch.optim.RAdam(model.parameters(), lr=1e-4),
                      "batches": iter(source), "seconds": [], "wait": []}

    order = []
    for repetition in range(args.repetitions + 1):
        order += ["stream", "memory"] if repetition % 2 == 0 else ["memory", "stream"]
    profiler = None
    for position, name in enumerate(order):
        run = runs[name]
        warmup = position < 2
        if args.profile and name == "stream" and not warmup and profiler is None:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        seconds, wait = timed_steps(run["model"], run["optimizer"], loss_fn, run["batches"], args.steps_per_block)
        if profiler is not None and name == "stream":
            profiler.disable()
        if not warmup:
            run["seconds"].append(seconds)
            run["wait"].append(wait)

    def rate(name: str) -> float:
        """Counted steps per second of one source."""
        return args.steps_per_block * len(runs[name]["seconds"]) / sum(runs[name]["seconds"])

    per_block = {name: [args.steps_per_block / s for s in runs[name]["seconds"]] for name in runs}
    result = {
        "form": args.form,
        "batch_per_process": args.batch,
        "torch_threads": args.threads,
        "stream_num_workers": args.num_workers,
        "steps_per_block": args.steps_per_block,
        "counted_blocks_per_source": args.repetitions,
        "student_parameters": sum(p.numel() for p in base.parameters()),
        "preload_seconds": round(preload_seconds, 3),
        "preloaded_samples": len(memory.tensors[next(iter(memory.tensors))]),
        "stream_steps_per_s": rate("stream"),
        "memory_steps_per_s": rate("memory"),
        "ratio_stream_over_memory": rate("stream") / rate("memory"),
        "ratio_median_of_adjacent_pairs": statistics.median(
            stream / memory for stream, memory in zip(per_block["stream"], per_block["memory"])),
        "stream_data_wait_fraction": sum(runs["stream"]["wait"]) / sum(runs["stream"]["seconds"]),
        "memory_data_wait_fraction": sum(runs["memory"]["wait"]) / sum(runs["memory"]["seconds"]),
        "stream_blocks_steps_per_s": [round(value, 3) for value in per_block["stream"]],
        "memory_blocks_steps_per_s": [round(value, 3) for value in per_block["memory"]],
        "targets": {"ratio": ">= 0.95", "data_wait_fraction": "<= 0.02"},
    }
    print(json.dumps(result, indent=2))
    if profiler is not None:
        import pstats

        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
