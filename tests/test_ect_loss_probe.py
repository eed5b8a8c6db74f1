"""jobs/ect_loss_probe.py: the probe scores a student equal to the teacher exactly like the diffusion init, and
`--raw` reads a run's newest checkpoint (raw weights), not its EMA export."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from jobs.ect_loss_probe import main, probe, raw_student
from pipeline.teacher import load_teacher
from tests.test_compare_inits import tiny_teacher_dir
from trainer.loop import CHECKPOINT_MARKER
from trainer.student import FlowMapStudent

DIFFUSION = "diffusion init (teacher x0)"


@pytest.fixture(scope="module")
def teacher_and_run(tmp_path_factory):
    """A tiny teacher, and a run directory whose export is the teacher-init student and whose checkpoints hold
    perturbed weights (step_10 the newest, step_9 an older one with other weights)."""
    root = tmp_path_factory.mktemp("probe")
    teacher_dir = tiny_teacher_dir(root / "teacher")
    student = FlowMapStudent.from_teacher(load_teacher(teacher_dir), init="teacher")
    run_dir = root / "run"
    student.save_pretrained(run_dir / "export")
    for step, scale in ((9, 0.5), (10, 0.05)):
        generator = torch.Generator().manual_seed(step)
        state = {name: (value + scale * torch.randn(value.shape, generator=generator)).contiguous()
                 for name, value in student.state_dict().items()}
        checkpoint = run_dir / "checkpoints" / f"step_{step}"
        checkpoint.mkdir(parents=True)
        save_file(state, checkpoint / "model.safetensors")
        (checkpoint / CHECKPOINT_MARKER).write_text("{}")  # complete, as trainer/loop.py marks it
    return teacher_dir, run_dir


def test_teacher_init_export_scores_like_the_diffusion_init_and_raw_weights_differ(teacher_and_run):
    teacher_dir, run_dir = teacher_and_run
    result = probe(str(teacher_dir), {"same": str(run_dir / "export")}, q=64.0, num=64, batch=32, seed=0,
                   teacher_step="euler", raw_runs={"raw": str(run_dir)})
    assert result["same"] == pytest.approx(result[DIFFUSION], rel=1e-6)
    assert all(value > 0 for row in result.values() for value in row.values())
    assert result["raw"]["ect"] != pytest.approx(result[DIFFUSION]["ect"], rel=1e-3)


def test_raw_student_loads_the_newest_checkpoint_by_step_number(teacher_and_run):
    _, run_dir = teacher_and_run
    newest = raw_student(str(run_dir)).state_dict()
    from safetensors.torch import load_file

    expected = load_file(run_dir / "checkpoints" / "step_10" / "model.safetensors")
    assert all(torch.equal(newest[name], expected[name]) for name in expected)


def test_cli_refuses_a_missing_directory_by_name(teacher_and_run, tmp_path, capsys):
    teacher_dir, _ = teacher_and_run
    with pytest.raises(SystemExit):
        main(["--teacher", str(teacher_dir), "--student", f"gone={tmp_path / 'missing'}"])
    assert "--student" in capsys.readouterr().err
