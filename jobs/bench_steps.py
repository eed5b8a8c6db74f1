"""Benchmark: seconds per optimizer step of every training method on a depth-reduced class-conditional DiT, in float32
and under Accelerate's bf16 mixed precision.

    python jobs/bench_steps.py [--width 1152] [--heads 16] [--depth 2] [--latent 32] [--batch 4] [--steps 3]
        [--precisions no bf16] [--methods mid-cm mid-mf ect ecd meanflow-jvp meanflow-fd] [--threads 2]

The DiT has DiT-XL/2's layout (patch 2, learned sigma, 1000 classes, 4-channel latents) with random weights; width,
heads and depth are flags (DiT-XL/2: 1152, 16, 28). Each method runs the stage's own loss
(`trainer.methods.cmt.cm_loss` / `mf_loss`, `trainer.methods.ect.ECTLoss` / `StoredECDLoss`,
`trainer.methods.meanflow.MeanFlowLoss` with the ImageNet-256 preset's guidance and 10 % label dropout) on synthetic
batches of the mode's shapes (the values do not change the compute), then backward, gradient clipping and one RAdam
step, on the model Accelerate prepared with that precision. Prints one JSON object: median seconds per step after
`--warmup` steps, per method and precision.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial

import torch

METHODS = ("mid-cm", "mid-mf", "ect", "ecd", "meanflow-jvp", "meanflow-fd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1152, help="DiT hidden size (heads × head dim)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32, help="latent side (4 × side × side)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="counted steps per method and precision")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16", "fp16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def synthetic_batch(method: str, batch: int, shape: tuple[int, ...], generator: torch.Generator) -> dict:
    """A batch with the keys and shapes of the method's data mode (stored points in the teacher's latent space)."""
    def state() -> torch.Tensor:
        """Latents [B, *S]."""
        return torch.randn(batch, *shape, generator=generator)

    def level(low: float, high: float) -> torch.Tensor:
        """Times [B] uniform in [low, high]."""
        return low + (high - low) * torch.rand(batch, generator=generator)

    labels = torch.randint(0, 1000, (batch,), generator=generator)
    if method == "mid-cm":
        return {"x_t": state() * 3, "sigma": level(0.1, 80.0), "x0": state(), "labels": labels}
    if method == "mid-mf":
        t = level(0.3, 0.95)
        return {"z_t": state(), "t": t, "z_r": state(), "r": t * 0.5, "labels": labels}
    if method == "ecd":
        sigma_t = level(0.5, 40.0)
        return {"x_t": state() * 3, "sigma_t": sigma_t, "x_r": state() * 2, "sigma_r": sigma_t * 0.8, "x0": state(),
                "labels": labels}
    return {"x0": state(), "labels": labels}


def loss_for(method: str, student: torch.nn.Module) -> object:
    """The stage's loss of `method` (mid-training, ECT, stored ECD, MeanFlow with the ImageNet-256 guidance)."""
    from trainer.label_dropout import LabelDropout
    from trainer.losses import squared_l2
    from trainer.methods.cmt import cm_loss, mf_loss
    from trainer.methods.ect import ECTConfig, ECTLoss, StoredECDLoss, ect_sigma_range
    from trainer.methods.meanflow import MeanFlowConfig, MeanFlowLoss, tau_max

    if method == "mid-cm":
        return partial(cm_loss, distance=squared_l2)
    if method == "mid-mf":
        return mf_loss
    ect = ECTConfig()
    if method == "ect":
        return ECTLoss(ect, ect_sigma_range(ect, student.schedule))
    if method == "ecd":
        return StoredECDLoss(ect)
    mf = MeanFlowConfig(derivative=method.split("-")[1], guidance_scale=0.2, guidance_kappa=0.92, guidance_t_max=0.75)
    return LabelDropout(MeanFlowLoss(mf, mf.derivative, tau_max(student, mf), null_class=student.null_class), 0.1,
                        student.null_class)


def time_method(method: str, precision: str, teacher: object, args: argparse.Namespace) -> float:
    """Median seconds per optimizer step of `method` under `precision`."""
    from trainer.loop import LoopConfig, make_accelerator
    from trainer.student import FlowMapStudent

    with tempfile.TemporaryDirectory() as scratch:
        accelerator = make_accelerator(LoopConfig(output_dir=scratch, total_steps=1, lr=1e-4, checkpoint_every_steps=0,
                                                  log_every_steps=1, eval_every_steps=0, mixed_precision=precision))
    second_time = method == "mid-mf" or method.startswith("meanflow")
    student = FlowMapStudent.from_teacher(teacher, second_time_input=second_time).train()
    loss_fn = loss_for(method, student)
    model, optimizer = accelerator.prepare(student, torch.optim.RAdam(student.parameters(), lr=1e-4))
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for step in range(args.warmup + args.steps):
        batch = synthetic_batch(method, args.batch, tuple(student.sample_shape), generator)
        started = time.perf_counter()
        loss = loss_fn(model, batch, step).mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            seconds.append(time.perf_counter() - started)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{method} under {precision}: non-finite loss {float(loss)}")
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    """Build the DiT, time every method under every precision, print the JSON result."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from pipeline.teacher import Teacher

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=args.heads, attention_head_dim=args.width // args.heads,
                                in_channels=4, out_channels=8, num_layers=args.depth, sample_size=args.latent,
                                patch_size=2, num_embeds_ada_norm=1000)
    teacher = Teacher(dit, DDPMScheduler(beta_schedule="linear"))
    timings: dict[str, dict[str, float]] = {}
    for precision in args.precisions:
        for method in args.methods:
            seconds = round(time_method(method, precision, teacher, args), 3)
            timings.setdefault(precision, {})[method] = seconds
            print(f"[bench_steps] {precision} {method}: {seconds} s/step", file=sys.stderr, flush=True)
    print(json.dumps({"seconds_per_step": timings, "dit": {"width": args.width, "heads": args.heads,
                      "depth": args.depth, "latent": [4, args.latent, args.latent],
                      "parameters": sum(p.numel() for p in dit.parameters())},
                      "batch": args.batch, "counted_steps": args.steps, "threads": torch.get_num_threads()},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
