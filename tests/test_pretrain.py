"""Smoke test of stage-1 pre-training on the tiny preset: CLI, outputs, export loadable as a teacher, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image

from pipeline.png_grid import grid_array, save_grid
from tests.helpers import HANG_LIMIT_S, assert_close
from trainer.config import load_config
from trainer.loop import complete_checkpoints
from trainer.pretrain import PretrainConfig, main, run
from trainer.run_dir import RunDir

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_PRESET = REPO_ROOT / "jobs" / "tiny" / "pretrain.yaml"


def run_cli(output_dir: Path) -> dict:
    """`python trainer/pretrain.py --config jobs/tiny/pretrain.yaml loop.output_dir=...`, run by path; its summary."""
    command = [sys.executable, "trainer/pretrain.py", "--config", str(TINY_PRESET), f"loop.output_dir={output_dir}"]
    finished = subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


def test_pretrain_cli_writes_a_loadable_teacher_and_resumes_from_its_checkpoint(tmp_path):
    from pipeline.solvers import solve
    from pipeline.teacher import load_teacher

    output_dir = tmp_path / "run"
    first = run_cli(output_dir)
    assert first["start_step"] == 0 and first["final_step"] == 6
    assert [step for step, _ in complete_checkpoints(output_dir)] == [3, 6]
    for step in (3, 6):
        grid = Image.open(output_dir / "samples" / f"step_{step}.png")
        assert grid.format == "PNG" and grid.mode == "L" and min(grid.size) >= 4 * 32
    cfg = load_config(PretrainConfig, output_dir / "config.yaml")
    assert cfg == load_config(PretrainConfig, TINY_PRESET, [f"loop.output_dir={output_dir}"])

    export_dir = output_dir / "export"
    assert (export_dir / "model_index.json").exists()
    assert list(export_dir.glob("unet/*.safetensors")) and not list(export_dir.rglob("*.bin"))
    teacher = load_teacher(export_dir)
    trajectory = solve(teacher, torch.arange(4), steps=3)
    assert trajectory.points.shape == (4, 4, 1, 8, 8)
    assert torch.isfinite(trajectory.points).all()

    # A kill after the step-3 checkpoint leaves no step-6 checkpoint and no export: the same command resumes.
    shutil.rmtree(output_dir / "checkpoints" / "step_6")
    shutil.rmtree(export_dir)
    second = run_cli(output_dir)
    assert second["start_step"] == 3 and second["final_step"] == 6
    assert (export_dir / "model_index.json").exists()
    assert [record["step"] for record in RunDir(output_dir).read_metrics() if "loss" in record] == [1, 2, 3, 4, 5, 6]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    output_dir = tmp_path / "never"
    assert main(["--config", str(TINY_PRESET), f"loop.output_dir={output_dir}", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["config"]["loop"]["output_dir"] == str(output_dir)
    assert plan["dataset"]["image_shape"] == [1, 8, 8] and plan["model_parameters"] > 0
    assert not output_dir.exists()


def test_cli_reports_an_unknown_key_with_a_suggestion(capsys):
    assert main(["--config", str(TINY_PRESET), "loop.totl_steps=3"]) == 2
    assert "did you mean `loop.total_steps`" in capsys.readouterr().err


def test_class_conditional_run_logs_fd_and_exports_a_conditional_teacher(tmp_path):
    from pipeline.teacher import load_teacher

    overrides = [f"loop.output_dir={tmp_path}", "model.class_conditional=true", "compute_fd=true",
                 "num_eval_samples=64", "loop.total_steps=2", "loop.eval_every_steps=0"]
    result = run(load_config(PretrainConfig, TINY_PRESET, overrides))
    assert result.final_step == 2 and result.start_step == 0
    final_record = RunDir(tmp_path).read_metrics()[-1]
    assert final_record["step"] == 2 and final_record["FD-digits"] > 0
    assert result.metrics["FD-digits"] == final_record["FD-digits"]
    assert load_teacher(result.export_dir).num_classes == 10


def test_sample_grid_layout_and_pixel_mapping(tmp_path):
    images = torch.full((5, 1, 8, 8), -1.0)  # [N, C, H, W]
    images[1] = 1.0
    grid = grid_array(images, nrow=3, padding=1, upscale=2)
    assert grid.shape == (2 * (16 + 1) + 1, 3 * (16 + 1) + 1, 1)
    assert (grid[1:17, 18:34] == 255).all() and (grid[1:17, 1:17] == 0).all()
    path = save_grid(images, tmp_path / "grid.png")  # 8×8 tiles are upscaled to 32×32 by default
    picture = Image.open(path)
    assert picture.size == (3 * 33 + 1, 2 * 33 + 1) and picture.mode == "L"


def test_a_grid_of_non_finite_samples_is_written_with_black_nan_pixels_and_no_warning(tmp_path):
    """A diverged student's samples still make a grid (its FD reports the divergence): NaN black, ±inf clipped."""
    images = torch.zeros(3, 1, 4, 4)
    images[0, 0, 0, 0], images[1, 0, 0, 0], images[2, 0, 0, 0] = float("nan"), float("inf"), -float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grid = grid_array(images, nrow=3, padding=0)
    assert [int(grid[0, 4 * i, 0]) for i in range(3)] == [0, 255, 0] and int(grid[1, 1, 0]) == 128


def test_edm_loss_is_lambda_weighted_denoiser_error_by_hand():
    """EDM eq. 8: λ(σ̃)·mean((D_θ(x0 + σ̃ε, σ̃) − x0)²) with λ = (σ̃² + σ_d²)/(σ̃·σ_d)², D = c_skip·x̃ + c_out·F."""
    from functools import partial

    from tests.helpers import tiny_unet
    from trainer.pretrain import EDMTrainingConfig, build_scheduler, edm_loss

    cfg = load_config(PretrainConfig, TINY_PRESET, ["schedule=edm", "edm.sigma_data=0.6"])
    scheduler, edm = build_scheduler(cfg), cfg.edm
    assert isinstance(edm, EDMTrainingConfig) and type(scheduler).__name__ == "EDMEulerScheduler"
    model = tiny_unet()
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.manual_seed(3)
    loss = partial(edm_loss, scheduler=scheduler, edm=edm, class_conditional=False)(model, {"images": x0}, 0)
    torch.manual_seed(3)  # the same draws, by hand
    sigma = (torch.randn(5, dtype=torch.float64) * edm.p_std + edm.p_mean).exp()
    noise = torch.randn_like(x0)
    s_d = 0.6
    x_noisy = x0 + sigma.float().reshape(-1, 1, 1, 1) * noise
    c_in = 1 / torch.sqrt(sigma**2 + s_d**2)
    c_skip = s_d**2 / (sigma**2 + s_d**2)
    c_out = sigma * s_d / torch.sqrt(sigma**2 + s_d**2)
    with torch.no_grad():
        network = model(c_in.float().reshape(-1, 1, 1, 1) * x_noisy, (0.25 * sigma.log()).float()).sample
    denoised = c_skip.float().reshape(-1, 1, 1, 1) * x_noisy + c_out.float().reshape(-1, 1, 1, 1) * network
    weight = (sigma**2 + s_d**2) / (sigma * s_d) ** 2
    by_hand = weight.float() * (denoised - x0).pow(2).flatten(1).mean(1)
    assert torch.allclose(loss.detach(), by_hand, rtol=1e-4), (loss, by_hand)


def test_an_edm_teacher_trains_exports_and_loads_as_an_edm_teacher(tmp_path):
    from pipeline.teacher import load_teacher
    from trainer.student import FlowMapStudent

    overrides = [f"loop.output_dir={tmp_path}", "schedule=edm", "loop.total_steps=2", "loop.eval_every_steps=0"]
    result = run(load_config(PretrainConfig, TINY_PRESET, overrides))
    teacher = load_teacher(result.export_dir)
    assert teacher.schedule.family == "edm" and teacher.sigma_edm_range == (0.002, 80.0)
    student = FlowMapStudent.from_teacher(teacher)  # "auto": an EDM teacher's own reading is already bounded
    assert student.parameterization.name == "teacher"
    x, sigma = torch.randn(2, 1, 8, 8) * 3, torch.tensor([0.1, 50.0], dtype=torch.float64)
    with torch.no_grad():
        assert_close(student.denoise(x, sigma), teacher.denoise(x, sigma.numpy()), magnitude=float(x.abs().max()))
    assert main(["--config", str(TINY_PRESET), "schedule=edm", "prediction_type=v_prediction", "--dry-run"]) == 2
