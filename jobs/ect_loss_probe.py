"""What the ECT loss value measures: the loss at fixed draws for the diffusion init, EMA exports and raw weights.

    python jobs/ect_loss_probe.py --teacher DIR [--student NAME=EXPORT_DIR ...] [--raw NAME=RUN_DIR ...]
        [--q 4096] [--num 1024]

For the teacher's own x0 prediction (the diffusion init), every named student export (CM form) and the raw
weights of every named run (its newest checkpoint, not the EMA export), on the SAME digits images, noise and
(t, r) draws, in eval mode, it prints:

- `ect`: ECT's loss d(f(x0 + t·ε, t), f(x0 + r·ε, r))/(t − r) (trainer/methods/ect.py's ECT pair, ECT's time sampler,
  pseudo-Huber d). x_t and x_r share ε, so x_r stands in for x_t's PF-ODE neighbour.
- `ode`: the same distance with x_r = the teacher's PF-ODE step from (x_t, t) to r (ECD's pair): how much f
  changes along the teacher's own trajectory over Δt.

The gap between the two columns is what ECT's shared-noise pair adds over the ODE pair. Both columns are rates of
change of f over a tiny Δt, so they grow with how rough f is, not with how far f is from Ψ_{t→0}.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import torch


def raw_student(run_dir: str):
    """The RAW (not EMA-averaged) weights of a training run: its export's architecture, its last checkpoint's model."""
    from pathlib import Path

    from safetensors.torch import load_file

    from trainer.loop import complete_checkpoints
    from trainer.student import FlowMapStudent

    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints or not Path(run_dir, "export").is_dir():
        raise SystemExit(f"--raw {run_dir}: need a run directory with export/ and a complete checkpoints/step_*/")
    student = FlowMapStudent.from_pretrained(Path(run_dir, "export"))
    student.load_state_dict(load_file(checkpoints[-1][1] / "model.safetensors"))
    return student


def probe(teacher_dir: str, students: dict[str, str], *, q: float, num: int, batch: int, seed: int,
          teacher_step: str, raw_runs: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """{model name: {"ect": mean ECT loss, "ode": mean consistency loss along the teacher's ODE step}}."""
    from pipeline.ode_step import ode_step
    from pipeline.teacher import load_teacher
    from trainer.image_datasets import load_dataset
    from trainer.losses import ect_loss, ect_target
    from trainer.methods.ect import ECTConfig, ect_sigma_range, ect_times
    from trainer.student import FlowMapStudent

    teacher = load_teacher(teacher_dir)
    models = {"diffusion init (teacher x0)": FlowMapStudent.from_teacher(teacher, init="teacher")}
    models.update({name: FlowMapStudent.from_pretrained(path) for name, path in students.items()})
    models.update({name: raw_student(path) for name, path in (raw_runs or {}).items()})
    ect = ECTConfig(q_mode="fixed", q_start=q)
    sigma_range = ect_sigma_range(ect, models["diffusion init (teacher x0)"].schedule, teacher)
    images = load_dataset("digits").images[:num]  # [N, C, H, W]
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for start in range(0, images.shape[0], batch):
        x0 = images[start:start + batch]  # [B, C, H, W]
        t, r = ect_times(x0.shape[0], 0, ect, sigma_range, generator)  # [B] float64 each
        noise = torch.randn(x0.shape, generator=generator)  # [B, C, H, W]
        x_t = x0 + t.float().reshape(-1, 1, 1, 1) * noise
        x_r_data = x0 + r.float().reshape(-1, 1, 1, 1) * noise
        x_r_ode = ode_step(teacher, x_t, t, r, method=teacher_step)  # [B, C, H, W]
        draws.append((x0, t, r, x_t, x_r_data, x_r_ode))
    result = {}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            totals = {"ect": 0.0, "ode": 0.0}
            for x0, t, r, x_t, x_r_data, x_r_ode in draws:
                f_t = model("cm", x_t, t, None)
                for key, x_r, clean in (("ect", x_r_data, x0), ("ode", x_r_ode, x_r_ode)):
                    target = ect_target(model("cm", x_r, r, None), clean, r=r)
                    totals[key] += float(ect_loss(f_t, target, t=t, r=r, weighting=ect.weighting).sum())
            result[name] = {key: value / images.shape[0] for key, value in totals.items()}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print one row per model and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the digits teacher export (trainer/pretrain.py)")
    parser.add_argument("--student", action="append", default=[], metavar="NAME=DIR",
                        help="a CM-form student export (trainer/mid.py or trainer/post.py --method ect); repeatable")
    parser.add_argument("--raw", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="a training run's raw weights (its last checkpoint, not the EMA export); repeatable")
    parser.add_argument("--q", type=float, default=4096.0, help="ECT's q (Δt ≈ t·(1 + 8·sigmoid(−t))/q)")
    parser.add_argument("--num", type=int, default=1024, help="digits images used")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-step", default="heun", choices=("heun", "euler"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    named = {}
    for flag, values in (("--student", args.student), ("--raw", args.raw)):
        named[flag] = {}
        for text in values:
            name, equals, path = text.partition("=")
            if not equals or not os.path.isdir(path):
                parser.error(f"{flag} {text!r}: write NAME=DIR with DIR an existing directory")
            named[flag][name] = path
    result = probe(args.teacher, named["--student"], q=args.q, num=args.num, batch=args.batch, seed=args.seed,
                   teacher_step=args.teacher_step, raw_runs=named["--raw"])
    print(f"{'model':<32} {'ECT loss (data-noise pair)':>27} {'loss along teacher ODE step':>28}")
    for name, row in result.items():
        print(f"{name:<32} {row['ect']:>27.4f} {row['ode']:>28.4f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
