"""jobs/ablate_store.py: a missing store is refused naming it and its generate command; the quick solver preset on a
tiny EDM-form teacher (stores written where generation caches them) skips the solver it cannot run and scores the
others; the quick trajectories preset (slow: 6 runs) gives the table, plot, post-training and the online reference."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from jobs.ablate_store import QUICK, AblationConfig, AblationError, cell_config, locate_store, main, run, runnable
from pipeline.generate import GenerateConfig, build_spec
from pipeline.generate_options import resolve_defaults
from pipeline.teacher import load_teacher
from pipeline.teacher_identity import teacher_identity
from storage_schema import open_store
from tests.helpers import write_store_of_spec
from tests.test_compare_inits import tiny_teacher_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
K = 4  # solver steps of the tiny stores: the tiny preset's batch of 8 is 2 online trajectories × 4 points


def tiny_config(root: Path, teacher_dir: Path, preset: str, **fields) -> AblationConfig:
    """The quick preset on the tiny teacher, tiny mid/post presets, a private cache, 4 steps per stage."""
    base = dataclasses.replace(AblationConfig(), **QUICK)
    return dataclasses.replace(
        base, preset=preset, out=str(root / "out"), teacher=str(teacher_dir), cache_root=str(root / "cache"),
        mid_preset=str(REPO_ROOT / "jobs" / "tiny" / "mid.yaml"), post_preset=str(REPO_ROOT / "jobs" / "tiny" /
                                                                                  "post.yaml"),
        num_trajectories=(16, 32), base_trajectories=16, base_steps=K, teacher_forwards=K, mid_steps=4,
        post_steps=4, num_eval_samples=32, overrides=("ect:ect.p_mean=1.0",), **fields)


def write_cached_stores(cfg: AblationConfig) -> list[str]:
    """Every runnable cell's store, solved and written at its cache location as pipeline/generate.py would."""
    compare = cfg.compare_config()
    teacher = load_teacher(cfg.teacher)
    identity = teacher_identity(cfg.teacher)
    urls = []
    for cell in cfg.cells():
        if runnable(teacher, cell) is not None:
            continue
        cell_compare = cell_config(compare, cell)
        generate_cfg, _ = resolve_defaults(GenerateConfig(teacher=cfg.teacher, num_trajectories=cell.num_trajectories,
                                                          solver=cell.solver, steps=cell.steps, grid=cell.grid))
        spec = build_spec(generate_cfg, identity)
        urls.append(locate_store(cell_compare)["url"])
        write_store_of_spec(teacher, spec, urls[-1])
    return urls


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny DDPM teacher directory."""
    root = tmp_path_factory.mktemp("ablate")
    return {"root": root, "teacher": tiny_teacher_dir(root / "teacher")}


def test_missing_stores_are_refused_naming_them_and_the_generate_command(tiny, tmp_path, capsys):
    cfg = tiny_config(tmp_path, tiny["teacher"], "trajectories")
    with pytest.raises(AblationError) as refused:
        run(cfg)
    message = str(refused.value)
    assert "preset trajectories names 2 store(s) that do not exist" in message
    for count in (16, 32):
        command = (f"python pipeline/generate.py --teacher {tiny['teacher']} --num-trajectories {count} --steps {K} "
                   f"--solver dpmpp-3m --grid logsnr")
        assert command in message
    expected_urls = [locate_store(cell_config(cfg.compare_config(), cell))["url"] for cell in cfg.cells()]
    assert all(url in message for url in expected_urls)
    assert not (tmp_path / "out" / "runs").exists()
    assert main(["--preset", "trajectories", "--quick", "--teacher", str(tiny["teacher"]), "--out",
                 str(tmp_path / "cli"), "--cache-root", str(tmp_path / "cache")]) == 2
    assert "do not exist" in capsys.readouterr().err
    assert main(["--preset", "solver-steps", "--values", "two"]) == 2
    assert "takes whole numbers" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_trajectories_preset_reports_every_store_and_the_online_reference(tiny, tmp_path):
    cfg = tiny_config(tmp_path, tiny["teacher"], "trajectories", report_dir=str(tmp_path / "docs"))
    urls = write_cached_stores(cfg)
    result = run(cfg)
    assert [row["label"] for row in result["rows"]] == ["16", "32"]
    assert [row["store"] for row in result["rows"]] == urls
    assert [open_store(url).spec.num_trajectories for url in urls] == [16, 32]
    for row in result["rows"]:
        assert set(row["cmt_fd"]) == set(row["post_fd"]) == {"1step", "2step"}
        assert row["pairs"] == 4 * 8 and row["generation_teacher_forwards"] == row["num_trajectories"] * K
    online = result["online"]
    assert online["trajectories_solved"] == 4 * 2 and online["teacher_forwards"] == 4 * 2 * K  # 2 per step
    online_config = (tmp_path / "out" / "runs" / online["mid_run"] / "config.yaml").read_text()
    assert "data: online" in online_config
    cmt_reference = online["cmt_fd"]
    within = result["smallest_within_10pct_of_online"]["cmt_fd"]
    for steps in ("1step", "2step"):
        close = [row["label"] for row in result["rows"] if row["cmt_fd"][steps] <= 1.1 * cmt_reference[steps]]
        assert within[steps] == (close[0] if close else None)
    docs = tmp_path / "docs"
    assert json.loads((docs / "ablate_trajectories.json").read_text())["rows"] == result["rows"]
    assert (docs / "ablate_trajectories.png").read_bytes()[:8] == PNG_MAGIC
    markdown = (docs / "ablate_trajectories.md").read_text()
    assert "| 16 | 16 × 5 |" in markdown and "| online (fresh trajectories every step) | 8 × 5 |" in markdown
    runs_before = sorted(path.name for path in (tmp_path / "out" / "runs").iterdir())
    again = run(cfg)  # every run finished: read back, nothing trained again
    assert sorted(path.name for path in (tmp_path / "out" / "runs").iterdir()) == runs_before
    assert again["rows"] == result["rows"]


@pytest.mark.slow  # a store per solver and a mid run each: ~17 s; the refusal itself is in test_online.py
def test_quick_solver_preset_runs_heun_on_an_edm_teacher_and_skips_a_solver_it_cannot_run(tmp_path):
    from diffusers import DDPMPipeline, EDMEulerScheduler

    from tests.helpers import tiny_unet

    edm_dir = tmp_path / "edm_teacher"  # an EDM-form teacher (as trainer/pretrain.py schedule=edm exports it)
    scheduler = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type="epsilon")
    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(edm_dir, safe_serialization=True)
    cfg = tiny_config(tmp_path, edm_dir, "solver", post_method="none", solvers=("heun", "ddim", "dpmpp-3m"))
    write_cached_stores(cfg)
    result = run(cfg)
    labels = [row["label"] for row in result["rows"]]
    assert labels == [f"heun K={(K + 1) // 2}", f"ddim K={K}", f"dpmpp-3m K={K}"]
    ddim = result["rows"][1]
    assert "solver 'ddim' cannot drive a edm schedule" in ddim["skipped"] and "cmt_fd" not in ddim
    heun, dpm = result["rows"][0], result["rows"][2]
    for row in (heun, dpm):
        assert "cmt_fd" in row and "post_fd" not in row
    assert dpm["generation_teacher_forwards"] == 16 * K and heun["generation_teacher_forwards"] == 16 * (K - 1)
    markdown = Path(result["files"]["markdown"]).read_text()
    assert f"| ddim K={K} | – | – | – | not runnable for this teacher: solver 'ddim' cannot drive" in markdown
