"""jobs/fd_redraws.py: re-draw k is the evaluation noise from EVAL_SEED + k·stride, scores are cached with the settings
they were made with (an old cache means 1,000 FD-digits samples), and the pooled summary matches a hand computation."""

from __future__ import annotations

import json
import statistics

import pytest

from jobs.fd_redraws import CACHE_NAME, REDRAW_SEED_STRIDE, _cached, fd_redraws, pooled_redraws, redraw_eval_seed
from pipeline.teacher import load_teacher
from tests.test_compare_inits import tiny_teacher_dir
from trainer.evaluation import EVAL_SEED
from trainer.metrics import FDMetric
from trainer.sample import draw_samples
from trainer.student import FlowMapStudent

NUM_SAMPLES = 24


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny teacher's CM-form student, exported as a run's export/ directory."""
    root = tmp_path_factory.mktemp("redraws")
    student = FlowMapStudent.from_teacher(load_teacher(tiny_teacher_dir(root / "teacher")))
    student.save_pretrained(root / "run" / "export")
    return root / "run" / "export"


def test_each_redraw_is_the_evaluation_noise_from_its_own_seed_and_the_scores_are_cached(export):
    scores = fd_redraws(export, 2, NUM_SAMPLES)
    assert {key: len(values) for key, values in scores.items()} == {"fd_1step": 2, "fd_2step": 2}
    student = FlowMapStudent.from_pretrained(export).eval()
    metric = FDMetric("digits")
    for draw in (1, 2):
        first = EVAL_SEED + draw * REDRAW_SEED_STRIDE
        assert redraw_eval_seed(draw) == first
        for steps in (1, 2):
            samples = draw_samples(student, list(range(first, first + NUM_SAMPLES)), steps)
            assert scores[f"fd_{steps}step"][draw - 1] == pytest.approx(float(metric(samples)), rel=1e-6)
    assert scores["fd_1step"][0] != scores["fd_1step"][1]  # two draws, not one scored twice
    cache = export.parent / CACHE_NAME
    recorded = json.loads(cache.read_text())
    assert (recorded["num_samples"], recorded["fd_dataset"]) == (NUM_SAMPLES, "digits")
    cache.write_text(json.dumps({**recorded, "fd_1step": [-1.0, -2.0]}))  # a marker: read back, not recomputed
    assert fd_redraws(export, 2, NUM_SAMPLES)["fd_1step"] == [-1.0, -2.0]
    assert fd_redraws(export, 1, NUM_SAMPLES)["fd_1step"] == [pytest.approx(scores["fd_1step"][0], rel=1e-6)]


def test_a_cache_is_used_only_with_the_settings_it_was_made_with(tmp_path):
    path = tmp_path / CACHE_NAME
    assert _cached(path, 2, 1000, "digits") is None
    path.write_text(json.dumps({"fd_1step": [1.0, 2.0], "fd_2step": [3.0, 4.0]}))  # before settings were recorded
    assert _cached(path, 2, 1000, "digits") == {"fd_1step": [1.0, 2.0], "fd_2step": [3.0, 4.0]}
    assert _cached(path, 3, 1000, "digits") is None
    assert _cached(path, 2, 200, "digits") is None
    assert _cached(path, 2, 1000, "mnist") is None


def test_pooled_redraws_match_a_hand_computation():
    runs = [{"fd_1step": [10.0, 12.0, 14.0], "fd_2step": [5.0, 5.0, 8.0]},
            {"fd_1step": [20.0, 22.0, 27.0], "fd_2step": [6.0, 7.0, 8.0]}]
    pooled = pooled_redraws(runs)["fd_1step"]
    values = [10.0, 12.0, 14.0, 20.0, 22.0, 27.0]
    assert pooled["mean"] == pytest.approx(sum(values) / 6) and pooled["n"] == 6
    assert pooled["std"] == pytest.approx(statistics.stdev(values))
    assert pooled["seed_means"] == pytest.approx([12.0, 23.0])
    assert pooled["std_over_seeds"] == pytest.approx(statistics.stdev([12.0, 23.0]))
    assert pooled["std_over_draws"] == pytest.approx((2.0 + statistics.stdev([20.0, 22.0, 27.0])) / 2)
    assert pooled_redraws(runs)["fd_2step"]["seed_means"] == pytest.approx([6.0, 7.0])
