"""jobs/fd_redraws.py: re-draw k is the evaluation noise from EVAL_SEED + k·stride, scores are cached with the settings
they were made with (an old cache means 1,000 FD-digits samples) and extended draw by draw, the pooled summary matches
a hand computation, and the CLI pairs students and a teacher on the same draws."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from jobs.eval_teacher import teacher_fd
from jobs.fd_redraws import (
    CACHE_NAME,
    MAX_DRAW_SAMPLES,
    REDRAW_SEED_STRIDE,
    _cached,
    draw_seeds,
    fd_redraws,
    main,
    pooled_redraws,
    redraw_eval_seed,
)
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
    assert fd_redraws(export, 1, NUM_SAMPLES)["fd_1step"] == [-1.0]
    extended = fd_redraws(export, 3, NUM_SAMPLES)  # only draw 3 is scored; the cache keeps the first two
    first = redraw_eval_seed(3)
    third = float(metric(draw_samples(student, list(range(first, first + NUM_SAMPLES)), 1)))
    assert extended["fd_1step"] == [-1.0, -2.0, pytest.approx(third, rel=1e-6)]
    assert json.loads(cache.read_text())["fd_1step"] == extended["fd_1step"]


def test_every_draw_is_its_own_block_below_two_to_the_32():
    """torch keeps a seed's low 32 bits: a draw past 2³² would repeat small seeds, where training draws its noise."""
    blocks = [draw_seeds(draw, MAX_DRAW_SAMPLES) for draw in range(60)]
    assert all(0 < block[0] and block[-1] < 2**32 for block in blocks)
    assert len({seed for block in blocks for seed in block}) == 60 * MAX_DRAW_SAMPLES  # disjoint
    assert redraw_eval_seed(10) == EVAL_SEED + 10 * REDRAW_SEED_STRIDE  # draws 1..10 as every earlier study drew them
    assert redraw_eval_seed(11) == EVAL_SEED - REDRAW_SEED_STRIDE
    with pytest.raises(ValueError, match="48,546 each"):
        draw_seeds(3, MAX_DRAW_SAMPLES + 1)


def test_a_cache_is_used_only_with_the_settings_it_was_made_with(tmp_path):
    path = tmp_path / CACHE_NAME
    empty = {"fd_1step": [], "fd_2step": []}
    assert _cached(path, 1000, "digits") == empty
    path.write_text(json.dumps({"fd_1step": [1.0, 2.0], "fd_2step": [3.0, 4.0]}))  # before settings were recorded
    assert _cached(path, 1000, "digits") == {"fd_1step": [1.0, 2.0], "fd_2step": [3.0, 4.0]}
    assert _cached(path, 200, "digits") == empty
    assert _cached(path, 1000, "mnist") == empty
    twelve = [float(k) for k in range(12)]  # the first seed layout: its draws 11 and 12 had wrapped past 2³²
    path.write_text(json.dumps({"fd_1step": twelve, "fd_2step": twelve}))
    assert _cached(path, 1000, "digits")["fd_1step"] == twelve[:10]
    path.write_text(json.dumps({"fd_1step": twelve, "fd_2step": twelve, "seed_layout": 2}))
    assert _cached(path, 1000, "digits")["fd_1step"] == twelve


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
    one = pooled_redraws([{"fd_1step": [10.0], "fd_2step": [5.0]}])["fd_1step"]  # one seed, one draw: unmeasured
    assert (one["std_over_seeds"], one["std_over_draws"]) == (None, None)


def test_the_cli_pairs_students_and_the_teacher_on_the_same_draws(tmp_path, capsys):
    teacher_dir = tiny_teacher_dir(tmp_path / "teacher")
    student = FlowMapStudent.from_teacher(load_teacher(teacher_dir))
    student.save_pretrained(tmp_path / "a" / "export")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    student.save_pretrained(tmp_path / "b" / "export")
    out = tmp_path / "table.json"
    assert main(["--student", f"a={tmp_path / 'a' / 'export'}", "--student", f"b={tmp_path / 'b' / 'export'}",
                 "--draws", "3", "--num-samples", str(NUM_SAMPLES), "--teacher", str(teacher_dir),
                 "--teacher-steps", "2", "--json", str(out)]) == 0
    table = json.loads(out.read_text())
    a, b = table["models"]["a"]["fd_1step"], table["models"]["b"]["fd_1step"]
    student.eval()
    metric = FDMetric("digits")
    for draw in (0, 2):  # draw 0 is the runs' own evaluation noise, draw 2 a fresh one: scored here independently
        first = EVAL_SEED if draw == 0 else redraw_eval_seed(draw)
        expected = float(metric(draw_samples(student, list(range(first, first + NUM_SAMPLES)), 1)))
        assert b["per_draw"][draw] == pytest.approx(expected, rel=1e-6)
    differences = [x - y for x, y in zip(b["per_draw"], a["per_draw"])]
    assert b["minus_a"]["mean"] == pytest.approx(statistics.fmean(differences))
    assert b["minus_a"]["worst"] == pytest.approx(max(differences))
    assert b["minus_a"]["draws_better"] == sum(d < 0 for d in differences)
    assert b["runs_draw_rank"] == sorted(b["per_draw"]).index(b["per_draw"][0]) + 1
    teacher = table["models"]["teacher, 2 steps"]["fd"]
    rows = teacher_fd(str(teacher_dir), "digits", [2], num=NUM_SAMPLES, solver="dpmpp-3m", grid="logsnr", batch=500,
                      student_draws=3)["rows"]
    assert teacher["per_draw"] == pytest.approx([row["fd"] for row in rows], rel=1e-6) and "minus_a" not in teacher
    assert "| b | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--student", "no-equals-sign"], "write NAME=EXPORT"),
    (["--student", "a=/not/an/export"], "student export directory"),
    (["--student", "a={export}", "--student", "a={export}"], "two students share a NAME"),
    (["--student", "a={export}", "--num-samples", "1"], "--num-samples 1: pass 2 to 48,546"),
    (["--student", "a={export}", "--dataset", "cifar"], "--dataset cifar: choose from digits, mnist"),
    (["--student", "a={export}", "--teacher", "/no/teacher"], "--teacher /no/teacher: not a directory"),
    (["--student", "a={export}", "--teacher-steps", "0"], "--teacher-steps 0: pass 1 or more"),
])
def test_bad_input_is_refused_in_the_clis_words(export, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([text.format(export=export) for text in argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_fewer_than_two_draws_are_refused(export, capsys):
    with pytest.raises(SystemExit):
        main(["--student", f"a={export}", "--draws", "1"])
    assert "--draws 1: pass 2 or more" in capsys.readouterr().err
