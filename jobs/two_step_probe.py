"""Where an MF-form student's 2-step FD comes from: the intermediate time, and which of its two maps limits it.

    python jobs/two_step_probe.py --student NAME=EXPORT_DIR [--student NAME=EXPORT_DIR ...] [--intermediate 0.5 0.8]
        [--draws 0 1 2 3 4 5] [--hybrids] [--num 1000] [--json OUT]

The MF form's 2-step sampler (`FlowMapStudent.sample`) maps the prior at τ_max to an intermediate τ_mid, then to 0:
x0 = Ψ_{τ_mid→0}(Ψ_{τ_max→τ_mid}(z)). For every named export (MF form) and every --intermediate τ_mid it prints
FD-<dataset> of the 2-step samples on each evaluation-noise draw (draw 0: the training runs' own noise; draw k: the
noise `jobs.fd_redraws.fd_redraws` re-draws), and their mean ± std over the draws ≥ 1.

--hybrids adds, for every ordered pair (A, B) of exports, the 2-step FD of A's first map followed by B's second map
at each τ_mid: which student's first or second map limits the 2-step FD after post-training.

Choose τ_mid on draw 0 and judge it on the other draws: draw 0 alone misleads (README, "The demo's output").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class TwoStepProbeError(ValueError):
    """A probe that cannot run as asked; the message names the fix."""


def two_step(first: Any, second: Any, noise: Tensor, tau_mid: float, *, batch_size: int = 250) -> Tensor:
    """Ψ^second_{τ_mid→0}(Ψ^first_{τ_max→τ_mid}(z_T)) for standard-normal `noise` [N, *S] → [N, *S]; with
    first = second this is `FlowMapStudent.sample(noise, 2, intermediate=τ_mid)`."""
    out = []
    with torch.no_grad():
        for start in range(0, len(noise), batch_size):
            tau_max, z = first.mf_prior(noise[start:start + batch_size])  # [b, *S] at τ_max
            z_mid = first.flow_map(z, t=tau_max, r=tau_mid)  # [b, *S]
            out.append(second.flow_map(z_mid, t=tau_mid, r=0.0))
    return torch.cat(out)


def draw_noise(student: Any, draw: int, num: int) -> Tensor:
    """The evaluation noise [num, *S] of draw `draw` (0: the runs' own), as the training runs and fd_redraws draw it."""
    from jobs.fd_redraws import draw_seeds
    from pipeline.solvers import prior_noise

    return prior_noise(draw_seeds(draw, num), student.sample_shape)


def probe(students: dict[str, str], *, intermediates: Sequence[float], draws: Sequence[int], num: int = 1000,
          hybrids: bool = False, dataset: str = "digits") -> dict[str, Any]:
    """{"rows": [{first, second, tau_mid, fd: {draw: FD}, fresh_mean, fresh_std}]}."""
    from trainer.metrics import FDMetric
    from trainer.student import FlowMapStudent

    if not students or num < 2 or not draws or not intermediates:
        raise TwoStepProbeError("pass at least one --student, --num >= 2, one --draws and one --intermediate")
    if min(draws) < 0:
        raise TwoStepProbeError(f"--draws must be >= 0 (0: the runs' own noise), got {min(draws)}")
    loaded = {name: FlowMapStudent.from_pretrained(path).eval() for name, path in students.items()}
    for name, student in loaded.items():
        if student.num_classes is not None:
            raise TwoStepProbeError(f"--student {name}={students[name]} is class-conditional: this probe scores "
                                    "unconditional students (python -m trainer.sample --label K draws one class)")
        if not student.second_time_input:
            raise TwoStepProbeError(f"--student {name}={students[name]} is a CM-form export: this probe reads MF-form "
                                    "students (trainer/mid.py form=mf, MeanFlow)")
        tau_max = student.mf_tau_max()
        bad = [tau for tau in intermediates if not 0 < tau < tau_max]
        if bad:
            raise TwoStepProbeError(f"--intermediate {bad}: τ_mid must lie in (0, τ_max = {tau_max:.4f})")
    metric = FDMetric(dataset)
    pairs = [(a, b) for a in loaded for b in loaded] if hybrids else [(a, a) for a in loaded]
    rows = []
    for first, second in pairs:
        for tau_mid in intermediates:
            scores = {draw: float(metric(two_step(loaded[first], loaded[second], draw_noise(loaded[first], draw, num),
                                                  tau_mid))) for draw in draws}
            fresh = [value for draw, value in scores.items() if draw >= 1]
            row = {"first": first, "second": second, "tau_mid": tau_mid, "fd": scores,
                   "fresh_mean": statistics.fmean(fresh) if fresh else None,
                   "fresh_std": statistics.stdev(fresh) if len(fresh) > 1 else None}
            rows.append(row)
            print(format_row(row), flush=True)
    return {"students": students, "num": num, "draws": list(draws), "rows": rows}


def format_row(row: dict[str, Any]) -> str:
    """One markdown row: maps, τ_mid, draw 0's FD, the fresh draws' mean ± std."""
    if row["fresh_mean"] is None:
        fresh = "–"
    elif row["fresh_std"] is None:
        fresh = f"{row['fresh_mean']:.1f}"
    else:
        fresh = f"{row['fresh_mean']:.1f} ± {row['fresh_std']:.1f}"
    draw0 = row["fd"].get(0)
    return (f"| {row['first']} | {row['second']} | {row['tau_mid']:g} | "
            f"{'–' if draw0 is None else f'{draw0:.1f}'} | {fresh} |")


def _named(text: str) -> tuple[str, str]:
    """NAME=DIR → (name, dir)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise TwoStepProbeError(f"--student {text!r}: write NAME=EXPORT_DIR")
    return name, path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prints a markdown table (first map, second map, τ_mid, draw 0, fresh draws) and optionally JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", action="append", required=True, metavar="NAME=EXPORT_DIR")
    parser.add_argument("--intermediate", type=float, nargs="+", default=[0.5])
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--hybrids", action="store_true", help="also every first map with every other second map")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    print("| first map | second map | τ_mid | FD, draw 0 (runs') | FD, fresh draws |\n|---|---|---:|---:|---|",
          flush=True)
    try:
        students = dict(_named(text) for text in args.student)
        result = probe(students, intermediates=args.intermediate, draws=args.draws, num=args.num,
                       hybrids=args.hybrids, dataset=args.dataset)
    except TwoStepProbeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
