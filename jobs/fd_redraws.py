"""The FD's own noise: a student export scored on fresh draws of the evaluation noise.

A run's FD curve is measured on one fixed draw (seeds EVAL_SEED + i, `trainer/evaluation.py`), so two runs compared
on it share that draw's luck. Re-draw k ≥ 1 starts its seeds at EVAL_SEED + k·REDRAW_SEED_STRIDE, far from the runs'
own draw and from each other; the studies (`jobs/study_conditioning.py`, `jobs/compare_inits.py --redraws`) report a
student's FD over seeds × re-draws, so a difference can be judged against both spreads.

Scores are cached beside the export (<run>/fd_redraws.json) with the draw count, sample count and dataset they were
made with; a cache made with other values is scored again. Caches written before those were recorded hold 1,000
FD-digits samples per draw (every study of that time), which is what a missing field is taken to mean.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REDRAW_SEED_STRIDE = 100_003  # re-draw k's evaluation noise seeds start at EVAL_SEED + k·stride (the runs use k = 0)
EVAL_PRESET = "jobs/digits/mid.yaml"  # its evaluation keys (eval_intermediate None: the student's own default)
CACHE_NAME = "fd_redraws.json"
UNRECORDED = {"num_samples": 1000, "fd_dataset": "digits"}  # what a cache from before these were recorded holds


def redraw_eval_seed(draw: int) -> int:
    """The first evaluation-noise seed of re-draw `draw` (0: the training runs' own draw, trainer.evaluation.EVAL_SEED)."""
    from trainer.evaluation import EVAL_SEED

    return EVAL_SEED + draw * REDRAW_SEED_STRIDE


def _cached(path: Path, redraws: int, num_samples: int, fd_dataset: str) -> dict[str, list[float]] | None:
    """The cache at `path` when it was made with these settings, else None."""
    if not path.exists():
        return None
    cached = json.loads(path.read_text())
    made_with = {key: cached.get(key, default) for key, default in UNRECORDED.items()}
    if len(cached["fd_1step"]) != redraws or made_with != {"num_samples": num_samples, "fd_dataset": fd_dataset}:
        return None
    return {"fd_1step": cached["fd_1step"], "fd_2step": cached["fd_2step"]}


def fd_redraws(export_dir: Path, redraws: int, num_samples: int, fd_dataset: str = "digits") -> dict[str, list[float]]:
    """FD-<fd_dataset> of the export's 1- and 2-step samples on re-draws 1..`redraws` of the evaluation noise."""
    from trainer.config import load_config
    from trainer.evaluation import eval_seeds
    from trainer.metrics import FDMetric
    from trainer.mid import MidConfig
    from trainer.sample import draw_samples
    from trainer.student import FlowMapStudent

    cache = Path(export_dir).parent / CACHE_NAME
    cached = _cached(cache, redraws, num_samples, fd_dataset)
    if cached is not None:
        return cached
    student = FlowMapStudent.from_pretrained(export_dir).eval()
    metric = FDMetric(fd_dataset)
    scores: dict[str, list[float]] = {"fd_1step": [], "fd_2step": []}
    for k in range(1, redraws + 1):
        cfg = load_config(MidConfig, EVAL_PRESET, [f"eval_seed={redraw_eval_seed(k)}", f"num_eval_samples={num_samples}"])
        for steps in (1, 2):
            samples = draw_samples(student, eval_seeds(cfg), steps, intermediate=cfg.eval_intermediate)
            scores[f"fd_{steps}step"].append(float(metric(samples)))
    cache.write_text(json.dumps({**scores, "num_samples": num_samples, "fd_dataset": fd_dataset}))
    return scores


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value); a diverged run's infinite FD makes both infinite."""
    if not all(math.isfinite(value) for value in values):
        return {"mean": math.inf, "std": math.inf, "n": len(values)}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def pooled_redraws(per_run: Sequence[dict[str, list[float]]]) -> dict[str, Any]:
    """Runs' re-draw scores (one dict per seed) summarised per step count: the pooled mean ± std over seeds × draws,
    the spread over seeds (std of each seed's mean over draws) and over draws (mean of each seed's std over draws)."""
    summary: dict[str, Any] = {}
    for key in ("fd_1step", "fd_2step"):
        scores = [run[key] for run in per_run]
        summary[key] = {
            **mean_std([value for run in scores for value in run]),
            "seed_means": [statistics.fmean(run) for run in scores],
            "std_over_seeds": mean_std([statistics.fmean(run) for run in scores])["std"],
            "std_over_draws": statistics.fmean(mean_std(run)["std"] for run in scores),
        }
    return summary
