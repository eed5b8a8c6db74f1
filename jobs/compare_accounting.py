"""Compute accounting of `jobs/compare_inits.py`: what each run is charged, equal-compute step budgets, the
summary of a cell over seeds, and the fraction of a baseline's compute the CMT pipeline needs to reach its FD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.compare_config import STEP_COUNTS

def first_crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """Smallest x at which the piecewise-linear curve (xs, ys) reaches ys <= target; None if it never does."""
    if ys[0] <= target:
        return float(xs[0])
    for index in range(1, len(xs)):
        if ys[index] <= target:
            x0, y0, x1, y1 = xs[index - 1], ys[index - 1], xs[index], ys[index]
            return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))
    return None


def mean_std(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None with one value)."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else None,
            "n": int(array.size)}


def summarise_cell(runs: Sequence[dict[str, Any]], pre_seconds: float, pre_seconds_amortised: float) -> dict[str, Any]:
    """Curves (charged seconds, FD; mean ± std over seeds, init point first) and final scores of one cell."""
    length = min(len(run["steps"]) for run in runs)
    x = np.array([[0.0, *run["train_seconds"][:length]] for run in runs])  # [seeds, 1 + evals]
    curve: dict[str, Any] = {
        "steps": [0, *runs[0]["steps"][:length]],
        "charged_seconds": (pre_seconds + x.mean(axis=0)).tolist(),
        "charged_seconds_amortised": (pre_seconds_amortised + x.mean(axis=0)).tolist(),
    }
    finals, initial = {}, {}
    for steps in STEP_COUNTS:
        y = np.array([[run["init_fd"][steps], *run["fd"][steps][:length]] for run in runs])  # [seeds, 1 + evals]
        curve[f"fd_{steps}step_mean"] = y.mean(axis=0).tolist()
        curve[f"fd_{steps}step_std"] = (y.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(y.shape[1])).tolist()
        finals[steps] = mean_std(y[:, -1])
        initial[steps] = mean_std(y[:, 0])
    charged = pre_seconds + x[:, -1]
    return {"curve": curve, "final_fd": finals, "init_fd": initial, "charged_seconds": mean_std(charged),
            "charged_seconds_amortised": mean_std(pre_seconds_amortised + x[:, -1]),
            "post_train_seconds": mean_std(x[:, -1]), "post_steps": int(runs[0]["steps"][length - 1])}


def with_mid_curve(summary: dict[str, Any], mid_points: Sequence[dict[str, Any]], pre_seconds: float,
                   pre_seconds_amortised: float) -> dict[str, Any]:
    """A CMT cell's summary with mid-training's own evaluations put first on its curve, at charged seconds
    `pre_seconds` (generation) + the mid run's train_seconds: (step, FD) of each evaluation before mid-training's
    last step (that state is the post-training runs' init point). One mid run serves every seed, so their std is 0."""
    curve = summary["curve"]
    mid_seconds = [point["train_seconds"] for point in mid_points]
    merged = {
        "stage": ["mid"] * len(mid_points) + ["post"] * len(curve["steps"]),
        "steps": [point["step"] for point in mid_points] + curve["steps"],
        "charged_seconds": [pre_seconds + seconds for seconds in mid_seconds] + curve["charged_seconds"],
        "charged_seconds_amortised": ([pre_seconds_amortised + seconds for seconds in mid_seconds]
                                      + curve["charged_seconds_amortised"]),
    }
    for steps in STEP_COUNTS:
        mid_fd = [point[f"fd_{steps}step"] for point in mid_points]
        merged[f"fd_{steps}step_mean"] = mid_fd + curve[f"fd_{steps}step_mean"]
        merged[f"fd_{steps}step_std"] = [0.0] * len(mid_points) + curve[f"fd_{steps}step_std"]
    return {**summary, "curve": merged}


@dataclass(frozen=True)
class Charges:
    """Seconds charged before a run's own post-training: CMT runs (G + mid) and baselines (G if they read the store)."""

    generation: float
    amortise_over: int
    baselines_read_store: bool

    def generation_charged(self, *, amortised: bool = False) -> float:
        """G, or G/N with the store amortised over N experiments."""
        return self.generation / self.amortise_over if amortised else self.generation

    def before_post(self, init: str, mid_seconds: float, *, amortised: bool = False) -> float:
        """Pre-cost of a run of `init` whose CMT pipeline mid-trained for `mid_seconds`."""
        generation = self.generation_charged(amortised=amortised)
        if init == "cmt":
            return generation + mid_seconds
        return generation if self.baselines_read_store else 0.0


def step_time_fit(runs: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(steps/s, first-steps overhead in s) of train_seconds = overhead + steps / rate, least squares over every
    evaluation point of `runs`; with a single step count, rate = steps / seconds and no overhead."""
    steps = np.concatenate([run_["steps"] for run_ in runs]).astype(np.float64)
    seconds = np.concatenate([run_["train_seconds"] for run_ in runs])
    if len(np.unique(steps)) >= 2:
        slope, intercept = np.polyfit(steps, seconds, 1)
        if slope > 0:
            return float(1.0 / slope), float(max(intercept, 0.0))
    last = [(run_["steps"][-1], run_["train_seconds"][-1]) for run_ in runs]
    return sum(s for s, _ in last) / sum(t for _, t in last), 0.0


def compute_fractions(cells: Sequence[dict[str, Any]], amortise_over: int) -> list[dict[str, Any]]:
    """For each baseline cell and step count: the share of its compute the CMT pipeline needs to reach its final FD."""
    rows = []
    for cmt in (cell for cell in cells if cell["init"] == "cmt"):
        for baseline in (c for c in cells if c["method"] == cmt["method"] and c["init"] != "cmt"):
            for steps in STEP_COUNTS:
                target = baseline["final_fd"][steps]["mean"]
                curve = cmt["curve"]
                reach = first_crossing(curve["charged_seconds"], curve[f"fd_{steps}step_mean"], target)
                reach_amortised = first_crossing(curve["charged_seconds_amortised"], curve[f"fd_{steps}step_mean"],
                                                 target)
                baseline_seconds = baseline["charged_seconds"]["mean"]
                baseline_amortised = baseline["charged_seconds_amortised"]["mean"]
                rows.append({
                    "method": cmt["method"], "baseline": baseline["init"], "steps": steps,
                    "baseline_final_fd": target, "baseline_charged_seconds": baseline_seconds,
                    "cmt_seconds_to_reach": reach, "fraction": None if reach is None else reach / baseline_seconds,
                    # reached at the curve's first evaluation (amortised too: same FD points): it may have been
                    # reached earlier, so both fractions are upper bounds
                    "reached_at_first_evaluation": reach is not None and reach == curve["charged_seconds"][0],
                    "cmt_seconds_to_reach_amortised": reach_amortised,
                    "fraction_amortised": None if reach_amortised is None else reach_amortised / baseline_amortised,
                    "amortise_over": amortise_over,
                })
    return rows
