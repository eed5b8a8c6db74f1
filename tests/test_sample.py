"""`python -m trainer.sample`: 1- and 2-step samples of a student export written as a PNG grid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from pipeline.solvers import prior_noise
from pipeline.teacher import Teacher
from tests.helpers import HANG_LIMIT_S, assert_close, tiny_unet
from trainer.sample import SampleConfig, SampleError, main, run
from trainer.student import FlowMapStudent

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_teacher(num_class_embeds: int | None = None) -> Teacher:
    """A tiny random 1×8×8 teacher."""
    return Teacher(tiny_unet(num_class_embeds=num_class_embeds), DDPMScheduler(beta_schedule="squaredcos_cap_v2"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A CM-form export (inside a run dir, as trainer/post.py leaves it) and an MF-form export."""
    root = tmp_path_factory.mktemp("exports")
    teacher = tiny_teacher()
    cm = FlowMapStudent.from_teacher(teacher).save_pretrained(root / "run" / "export")
    mf = FlowMapStudent.from_teacher(teacher, second_time_input=True).save_pretrained(root / "mf")
    return {"run": root / "run", "cm": cm, "mf": mf}


def test_cli_writes_a_png_grid_of_the_requested_samples(exports, tmp_path):
    out = tmp_path / "grids" / "grid.png"
    command = [sys.executable, "-m", "trainer.sample", "--model", str(exports["run"]), "--steps", "2", "--num", "6",
               "--out", str(out)]
    finished = subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads(finished.stdout.strip().splitlines()[-1])
    assert summary["num_images"] == 6 and summary["sample_shape"] == [1, 8, 8] and summary["grid"] == str(out)
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.mode == "L"
    assert picture.size == (3 * 33 + 1, 2 * 33 + 1)  # 3 columns × 2 rows of 8×8 tiles upscaled to 32, padding 1


def test_samples_are_the_students_own_one_and_two_step_maps_and_reproducible(exports, tmp_path):
    one = run(SampleConfig(model=str(exports["cm"]), out=str(tmp_path / "one.png"), steps=1, num=5, seed=7))
    student = FlowMapStudent.from_pretrained(exports["cm"]).eval()
    expected = student.sample(prior_noise(range(7, 12), (1, 8, 8)), 1)  # samples are never clamped, only pixels are
    assert_close(one.images, expected, magnitude=80.0, what="CLI 1-step samples")  # computed from x̃ at σ̃ = 80
    two = run(SampleConfig(model=str(exports["cm"]), out=str(tmp_path / "two.png"), steps=2, num=5, seed=7))
    again = run(SampleConfig(model=str(exports["cm"]), out=str(tmp_path / "again.png"), steps=2, num=5, seed=7))
    assert torch.equal(two.images, again.images) and not torch.allclose(two.images, one.images)
    mf = run(SampleConfig(model=str(exports["mf"]), out=str(tmp_path / "mf.png"), steps=2, num=4, intermediate=0.3))
    assert mf.images.shape == (4, 1, 8, 8) and bool(torch.isfinite(mf.images).all())
    in_batches = run(SampleConfig(model=str(exports["cm"]), out=str(tmp_path / "b.png"), steps=2, num=5, seed=7,
                                  batch_size=2))
    # sample i depends on its seed only, not on the batching (up to the batch size's float rounding)
    assert_close(in_batches.samples, two.samples, magnitude=80.0, what="2-step samples in batches of 2")


def test_bad_requests_name_the_fix(exports, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    assert main(["--model", str(teacher_dir), "--out", str(tmp_path / "x.png")]) == 2
    assert "no student export" in capsys.readouterr().err
    assert main(["--model", str(exports["cm"]), "--out", str(tmp_path / "x.png"), "--label", "3"]) == 2
    assert "unconditional" in capsys.readouterr().err
    assert main(["--model", str(exports["cm"]), "--out", str(tmp_path / "x.png"), "--form", "mf"]) == 2
    assert "CM-form student" in capsys.readouterr().err
    with pytest.raises(SampleError, match="--num"):
        SampleConfig(model="m", out="o.png", num=0)
    with pytest.raises(SampleError, match="nothing to write"):
        SampleConfig(model="m")
    assert not (tmp_path / "x.png").exists()
    conditional = FlowMapStudent.from_teacher(tiny_teacher(num_class_embeds=3)).save_pretrained(tmp_path / "cond")
    assert main(["--model", str(conditional), "--out", str(tmp_path / "x.png"), "--label", "3"]) == 2
    assert "--label 3 is not a class of this student: pass 0..2" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_save_tensor_alone_writes_the_raw_samples(exports, tmp_path):
    result = run(SampleConfig(model=str(exports["cm"]), save_tensor=str(tmp_path / "s.pt"), steps=1, num=3))
    assert result.grid_path is None and result.images is None
    assert torch.equal(torch.load(tmp_path / "s.pt", weights_only=True), result.samples)
