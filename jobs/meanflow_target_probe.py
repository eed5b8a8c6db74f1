"""How far MeanFlow's regression target is from the teacher's flow map, beside how far the student already is.

    python jobs/meanflow_target_probe.py --teacher DIR --student EXPORT_DIR [--num 256] [--secant 0.05 0.1]
        [--central 1e-4 1e-2] [--pairs T:R ...] [--ode-steps 48] [--dataset digits] [--json OUT]

Post-training with MeanFlow regresses the student's average velocity u_θ(z, t, r) onto (Geng et al. 2025, Eq. 10)

    u_tgt = v − (t − r)·du/dt,  du/dt = v·∂_z u_θ + ∂_t u_θ

so it can only improve a student whose u_θ is farther from the truth than u_tgt is. This probe measures both against
the teacher's own flow map, the map CMT distilled. For real images x0 (--dataset, the teacher's training set), fresh
noise ε and each (t, r) pair in τ (flow-matching view, z = (1 − t)·x0 + t·ε):

    u_ref = (z − Ψ_{t→r}(z))/(t − r),  Ψ_{t→r}: Heun on the teacher's PF-ODE dx̃/dσ̃ = (x̃ − D(x̃, σ̃))/σ̃, --ode-steps
                                       log-spaced levels from σ̃(t) = t/(1 − t) to σ̃(r)

and prints the mean squared error per element of: the student's u_θ; the target with du/dt by JVP (what
`meanflow.derivative=jvp|auto` trains on); the target with du/dt by the secant of each --secant half-width
(`meanflow.derivative=secant`); with --central, the target with du/dt by the central difference at each δ (what
`meanflow.derivative=fd` trains on at `fd_delta` = δ, which training allows up to τ_min/2 = 0.0025; a δ far above
1e-4 shows whether u_θ is smooth in t; pairs where t − δ ≤ r or t + δ ≥ 1 are left out). Every target uses the teacher's velocity v = (z − D(z))/t, so its error is the
derivative's alone (the paper's v = ε − x0 adds zero-mean noise on top). r = 0 is probed at r = τ_min = 0.005, the
smallest r MeanFlow trains (or at the teacher's lowest level, where its schedule ends above it); t = τ_max is the student's 1-step start. The default pairs are the 1- and 2-step
samplers' maps (τ_max → 0, τ_max → 0.5, 0.5 → 0) and pairs across the sampler's range. One batch, eval mode, float32.

The reference integrates with `pipeline.ode_step` (ECD's per-sample Heun step on the teacher's EDM-view denoiser, which
every teacher family provides) between arbitrary levels; the store's solvers start from the prior only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TAU_MIN = 0.005  # MeanFlowConfig.tau_min: the smallest r (and t) MeanFlow trains
DEFAULT_SECANTS = (0.05, 0.1)
DEFAULT_PAIRS = ("max:0", "max:0.5", "0.5:0", "0.9:0.3", "0.7:0.1", "0.3:0", "0.3:0.1", "0.5:0.45", "0.1:0")


class ProbeError(ValueError):
    """A probe that cannot run as asked; the message names the fix."""


def parse_pairs(texts: Sequence[str], tau_max: float, r_floor: float = TAU_MIN) -> list[tuple[float, float]]:
    """'T:R' pairs in τ ('max' = the student's τ_max) → [(t, r)], r raised to `r_floor`; refuses r ≥ t or t > τ_max."""
    pairs = []
    for text in texts:
        try:
            t_text, r_text = text.split(":")
            t = tau_max if t_text == "max" else float(t_text)
            r = float(r_text)
        except ValueError as error:
            raise ProbeError(f"--pairs {text!r}: write T:R in τ, e.g. 0.5:0 or max:0") from error
        r = max(r, r_floor)
        if not (r < t <= tau_max + 1e-12):
            raise ProbeError(f"--pairs {text!r}: need τ_min = {r_floor:.4g} ≤ r < t ≤ τ_max = {tau_max:.4f}")
        pairs.append((t, r))
    return pairs


@torch.no_grad()
def teacher_flow_map(teacher: Any, z: Tensor, t: float, r: float, steps: int) -> Tensor:
    """Ψ_{t→r}(z) of the teacher's PF-ODE in the flow-matching view → [B, *S]: `pipeline.ode_step`'s Heun step over
    `steps` log-spaced σ̃ levels from σ̃(t) to σ̃(r) (r must lie inside the teacher's schedule, where Heun corrects)."""
    from pipeline.ode_step import ode_step
    from pipeline.time_convention import edm_from_fm, fm_from_edm

    x, sigma_from = edm_from_fm(z, t)  # [B, *S] x̃, σ̃(t)
    sigma_to = r / (1.0 - r)
    sigmas = torch.logspace(math.log10(sigma_from), math.log10(sigma_to), steps + 1, dtype=torch.float64)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = ode_step(teacher, x, sigma, sigma_next, method="heun")  # [B, *S]
    return fm_from_edm(x, sigma_to)[0]  # [B, *S]


def probe(teacher_dir: str, student_dir: str, *, pairs: Sequence[str] = DEFAULT_PAIRS, num: int = 256,
          secants: Sequence[float] = DEFAULT_SECANTS, centrals: Sequence[float] = (), ode_steps: int = 48,
          dataset: str = "digits", seed: int = 0) -> dict[str, Any]:
    """{"tau_max", "rows": [{t, r, reference, student, target_jvp, target_central: {δ: error},
    target_secant: {δ: error}}]} (MSE per element)."""
    from pipeline.teacher import load_teacher
    from trainer.image_datasets import load_dataset
    from trainer.losses import central_difference, secant_derivative, total_derivative_jvp
    from trainer.methods.meanflow import (
        MeanFlowConfig,
        jvp_attention_context,
        tau_max,
        teacher_tau_floor,
        teacher_velocity,
    )
    from trainer.student import FlowMapStudent

    if num < 2 or ode_steps < 1 or any(not 0 < delta <= 0.5 for delta in secants):
        raise ProbeError("--num must be >= 2, --ode-steps >= 1 and every --secant in (0, 0.5]")
    if any(not 0 < delta < 0.05 for delta in centrals):
        raise ProbeError("every --central δ must lie in (0, 0.05); use --secant for wider windows")
    teacher = load_teacher(teacher_dir)
    student = FlowMapStudent.from_pretrained(student_dir).eval()
    if student.num_classes is not None or getattr(teacher, "num_classes", None) is not None:
        raise ProbeError(f"--student {student_dir} or its teacher is class-conditional: this probe reads unconditional "
                         "models (it passes no labels)")
    if not student.second_time_input:
        raise ProbeError(f"--student {student_dir} is a CM-form export: MeanFlow trains MF-form students (mid-training "
                         "form=mf)")
    limit = tau_max(student, MeanFlowConfig())
    chosen = parse_pairs(pairs, limit, max(TAU_MIN, teacher_tau_floor(teacher)))
    images = load_dataset(dataset).images  # [N, C, H, W] in [-1, 1]
    if tuple(images.shape[1:]) != tuple(student.sample_shape):
        raise ProbeError(f"--dataset {dataset} images are {tuple(images.shape[1:])}, the student's samples "
                         f"{tuple(student.sample_shape)}: pass the teacher's training set")
    generator = torch.Generator().manual_seed(seed)
    x0 = images[torch.randperm(len(images), generator=generator)[:num]]  # [B, *S]
    noise = torch.randn(x0.shape, generator=generator)  # [B, *S]

    def u_fn(z_in: Tensor, *, t: Tensor, r: Tensor) -> Tensor:
        """The student's average velocity u_θ(z, t, r) in float32."""
        return student.velocity(z_in.float(), t=t, r=r)

    def error(u: Tensor, reference: Tensor) -> float:
        return float(((u.double() - reference.double()) ** 2).mean())

    rows = []
    for t_value, r_value in chosen:
        batch = x0.shape[0]
        t = torch.full((batch,), t_value, dtype=torch.float64)  # [B]
        r = torch.full((batch,), r_value, dtype=torch.float64)  # [B]
        z = (1.0 - t_value) * x0 + t_value * noise  # [B, *S]
        gap = t_value - r_value
        with torch.no_grad():
            reference = (z - teacher_flow_map(teacher, z, t_value, r_value, ode_steps)) / gap  # [B, *S]
            v = teacher_velocity(teacher, z, t, None)  # [B, *S]
            student_u = u_fn(z, t=t, r=r)  # [B, *S]
        with jvp_attention_context(student), torch.no_grad():
            _, du_dt = total_derivative_jvp(u_fn, z, t=t, r=r, v=v)  # [B, *S]
        row = {"t": t_value, "r": r_value, "reference": float((reference.double() ** 2).mean()),
               "student": error(student_u, reference), "target_jvp": error(v - gap * du_dt, reference),
               "target_central": {}, "target_secant": {}}
        for delta in centrals:  # none where t ± δ leaves (r, 1): a negative gap or τ ≥ 1 the student never sees
            inside = r_value < t_value - delta and t_value + delta < 1.0
            slope = central_difference(u_fn, z, t=t, r=r, v=v, delta=delta) if inside else None  # [B, *S]
            row["target_central"][str(delta)] = None if slope is None else error(v - gap * slope, reference)
        for delta in secants:
            slope = secant_derivative(u_fn, z, t=t, r=r, v=v, delta=delta, t_max=limit)  # [B, *S]
            row["target_secant"][str(delta)] = error(v - gap * slope, reference)
        rows.append(row)
        print(format_row(row), flush=True)
    return {"teacher": teacher_dir, "student": student_dir, "tau_max": limit, "num": num, "ode_steps": ode_steps,
            "rows": rows}


def format_row(row: dict[str, Any]) -> str:
    """One markdown table row: t, r, ‖u_ref‖², then each error with its ratio to the student's."""
    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.3g} ({value / row['student']:.3g}×)"

    others = " | ".join(cell(value) for value in [*row["target_central"].values(), *row["target_secant"].values()])
    return (f"| {row['t']:.4f} | {row['r']:.3f} | {row['reference']:.3f} | {row['student']:.3g} | "
            f"{cell(row['target_jvp'])} | {others} |")


def header(secants: Sequence[float], centrals: Sequence[float] = ()) -> str:
    """The markdown table's header."""
    names = " | ".join([*(f"target, central δ = {delta:g}" for delta in centrals),
                        *(f"target, secant ±{delta}" for delta in secants)])
    columns = len(centrals) + len(secants)
    return ("| t | r | ‖u_ref‖² | student | target, JVP | " + names + " |\n"
            + "|---:|---:|---:|---:|---:|" + "---:|" * columns)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prints the table (errors, and × the student's error) and optionally writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the teacher pipeline dir the student was distilled from")
    parser.add_argument("--student", required=True, help="an MF-form student export (trainer/mid.py form=mf)")
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--secant", type=float, nargs="+", default=list(DEFAULT_SECANTS))
    parser.add_argument("--central", type=float, nargs="*", default=[], help="central-difference δ's to compare")
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), help="T:R in τ; 'max' = τ_max")
    parser.add_argument("--ode-steps", type=int, default=48)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    print(header(args.secant, args.central), flush=True)
    try:
        result = probe(args.teacher, args.student, pairs=args.pairs, num=args.num, secants=args.secant,
                       centrals=args.central, ode_steps=args.ode_steps, dataset=args.dataset, seed=args.seed)
    except ProbeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
