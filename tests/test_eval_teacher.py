"""jobs/eval_teacher.py scores the teacher on the same noise the students are scored on."""

from jobs.eval_teacher import draw_seeds
from jobs.fd_redraws import REDRAW_SEED_STRIDE
from jobs.study_conditioning import MID_PRESET
from trainer.config import load_config
from trainer.evaluation import EVAL_SEED, eval_seeds
from trainer.mid import MidConfig


def test_student_draws_are_the_runs_evaluation_noise_and_the_fresh_redraws():
    assert draw_seeds(None, 4) == [0, 1, 2, 3]
    runs = load_config(MidConfig, MID_PRESET, ["num_eval_samples=5"])
    assert draw_seeds(0, 5) == eval_seeds(runs)  # the training runs' own evaluation draw
    for draw in (1, 4):
        redraw = load_config(MidConfig, MID_PRESET, [f"eval_seed={EVAL_SEED + draw * REDRAW_SEED_STRIDE}",
                                                     "num_eval_samples=5"])  # as fd_redraws configures draw k
        assert draw_seeds(draw, 5) == eval_seeds(redraw)
    assert not set(draw_seeds(1, 1000)) & set(draw_seeds(0, 1000))
