"""jobs/ablate_store.py: a missing store is refused naming it and its generate command; the quick solver preset on a
tiny EDM-form teacher (stores written where generation caches them) skips the solver it cannot run and scores the
others; the quick trajectories preset (slow: 6 runs) gives the table, plot, post-training and the online reference;
--seeds trains each cell once per seed and reports the mean and spread."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest
import yaml

from jobs.ablate_store import (
    QUICK,
    AblationConfig,
    AblationError,
    cell_config,
    locate_store,
    main,
    markdown_table,
    run,
    runnable,
)
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
    for seeds in (["1", "1"], ["-1"]):
        assert main(["--preset", "solver-steps", "--seeds", *seeds]) == 2
        assert "pass distinct whole numbers >= 0, e.g. --seeds 0 1 2" in capsys.readouterr().err


def test_table_shows_the_mean_and_spread_over_seeds_and_a_single_seed_plainly():
    seeds = [{"seed": 0, "cmt_fd": {"1step": 20.0, "2step": 9.0}}, {"seed": 1, "cmt_fd": {"1step": 22.0, "2step": 11.0}}]
    row = {"label": "K=8", "num_trajectories": 4096, "steps": 8, "generation_teacher_forwards": 32768, "pairs": 128,
           "cmt_fd": {"1step": 21.0, "2step": 10.0}, "cmt_fd_std": {"1step": 1.41421, "2step": 1.41421},
           "seeds": seeds}
    result = {"preset": "solver-steps", "rows": [row],
              "config": {**dataclasses.asdict(AblationConfig(preset="solver-steps", post_method="none")),
                         "seeds": [0, 1]}}
    markdown = markdown_table(result)
    assert "| K=8 | 4,096 × 9 | 32,768 | 128 | 21.0 ± 1.4 / 10.0 ± 1.4 |" in markdown
    assert "mean ± sample standard deviation over 2 training seeds (0, 1)" in markdown
    single = {**result, "rows": [{**row, "seeds": seeds[:1]}], "config": {**result["config"], "seeds": [0]}}
    assert "| 21.0 / 10.0 |" in markdown_table(single) and "One training seed (0)" in markdown_table(single)


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


@pytest.mark.slow  # a store and 2 seeds × (mid + post) runs: ~20 s
def test_seeds_train_each_cell_once_per_seed_and_report_mean_and_spread(tiny, tmp_path):
    cfg = tiny_config(tmp_path, tiny["teacher"], "solver-steps", solver_steps=(K,), seeds=(0, 1))
    write_cached_stores(cfg)
    result = run(cfg)
    (row,) = result["rows"]
    assert [run_["seed"] for run_ in row["seeds"]] == [0, 1]
    runs_dir = tmp_path / "out" / "runs"
    mid_runs = [run_["mid_run"] for run_ in row["seeds"]]
    post_runs = [run_["post_run"] for run_ in row["seeds"]]
    assert len(set(mid_runs)) == len(set(post_runs)) == 2
    loop_seeds = [yaml.safe_load((runs_dir / name / "config.yaml").read_text())["loop"]["seed"] for name in mid_runs]
    assert loop_seeds == [0, 1]
    assert "-s1-" in post_runs[1] and "-s0-" in post_runs[0]
    for key in ("cmt_fd", "post_fd"):
        for steps in ("1step", "2step"):
            values = [run_[key][steps] for run_ in row["seeds"]]
            assert row[key][steps] == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert row[f"{key}_std"][steps] == pytest.approx(statistics.stdev(values), rel=1e-12)
    assert " ± " in Path(result["files"]["markdown"]).read_text()
    single = run(dataclasses.replace(cfg, seeds=(0,)))  # seed 0 is the single-seed run: reused, not trained again
    assert single["rows"][0]["mid_run"] == mid_runs[0] and single["rows"][0]["seeds"][0]["cmt_fd"] == \
        row["seeds"][0]["cmt_fd"]
