"""jobs/compare_batch.py and compare_inits --batch-sizes: each cell at its own best batch size, at equal training
samples; the choice made once on the first seed and kept for seeds added later; the CLI's refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from jobs.compare_batch import BATCH_RECORD, batch_key, best_batch, chosen_batch, preset_batch, run_batch, scaled_steps
from jobs.compare_config import QUICK, CompareError
from jobs.compare_inits import cell_plan, main, run
from jobs.study_runs import post_plan
from jobs.compare_report import MARKDOWN_NAME, SETTINGS_LOG
from trainer.run_dir import RunDir
from tests.test_compare_inits import REPO_ROOT, tiny_store, tiny_teacher_dir

TINY_POST = REPO_ROOT / "jobs" / "tiny" / "post.yaml"


def test_candidates_train_on_as_many_samples_as_the_reference():
    assert scaled_steps(400, 128, 64) == 800
    assert scaled_steps(400, 128, 256) == 200
    assert scaled_steps(1127, 128, 512) == 282  # 281.75 rounds to the nearest step
    assert scaled_steps(3, 8, 64) == 1  # never below one step


def test_the_best_batch_is_the_lowest_1_step_fd_then_2_step_then_the_smaller_batch():
    assert best_batch({64: {1: 20.0, 2: 9.0}, 128: {1: 18.0, 2: 15.0}, 256: {1: 19.0, 2: 8.0}}) == 128
    assert best_batch({64: {1: 18.0, 2: 9.0}, 128: {1: 18.0, 2: 8.5}}) == 128
    assert best_batch({256: {1: 18.0, 2: 9.0}, 64: {1: 18.0, 2: 9.0}}) == 64
    assert best_batch({64: {1: float("nan"), 2: 1.0}, 128: {1: 900.0, 2: 800.0}}) == 128  # a diverged run ranks last


def plan_of(init, reference, batch, **changes):
    """The post-training plan cell_plan makes for seed 0 of `init` under QUICK on the tiny preset."""
    cfg = dataclasses.replace(QUICK, post_preset=str(TINY_POST), **changes)
    return cell_plan(cfg, "ect", init, 0, reference, batch, store_url="/s.zarr",
                     cmt_export=Path("/x") if init == "cmt" else None, runs_dir=Path("/runs"))


def test_a_cells_steps_keep_its_training_samples_with_a_baselines_cap_applied_at_the_reference_batch():
    assert plan_of("cmt", (8, 400), 16).total_steps == 200
    assert plan_of("cmt", (8, 400), 4).total_steps == 800  # the CMT cell has no cap
    assert plan_of("random", (8, 300), 4, max_baseline_steps=400).total_steps == 600  # 300 at batch 8, then scaled
    assert plan_of("random", (8, 500), 4, max_baseline_steps=400).total_steps == 800  # capped to 400 at batch 8 first
    assert plan_of("random", (8, 500), 16, max_baseline_steps=400).total_steps == 200
    assert plan_of("random", (None, 500), None, max_baseline_steps=400).total_steps == 400  # no sweep: the cap alone


def test_a_candidate_at_the_presets_batch_is_the_run_a_study_without_batch_sizes_makes():
    without = post_plan(dataclasses.replace(QUICK, post_preset=str(TINY_POST)), "ect", "random", 0, 300,
                        store_url="/s.zarr", cmt_export=None, runs_dir=Path("/runs"))
    at_preset = plan_of("random", (8, 300), 8)  # the tiny preset trains at batch 8
    assert at_preset.name == without.name and at_preset.overrides == without.overrides
    other = plan_of("random", (8, 300), 16)
    assert other.name != without.name and "batch_per_process=16" in other.builtin_overrides  # in the settings log


def test_a_sweep_is_recorded_once_and_kept_when_another_invocation_recorded_first(tmp_path):
    sweeps = []

    def sweep():
        sweeps.append(1)
        return {"chosen": 64 * len(sweeps)}

    key = batch_key("ect", "random", ["ect-random-s0-0123abcd", "ect-random-s0-4567abcd"])
    assert chosen_batch(tmp_path, key, sweep)["chosen"] == 64
    assert chosen_batch(tmp_path, key, sweep)["chosen"] == 64 and len(sweeps) == 1  # seeds added later reuse it
    assert set(json.loads((tmp_path / BATCH_RECORD).read_text())) == {key}
    assert batch_key("ect", "random", ["ect-random-s0-4567abcd", "ect-random-s0-0123abcd"]) == key  # order: no setting
    assert len({key, batch_key("ect", "teacher", ["ect-random-s0-0123abcd", "ect-random-s0-4567abcd"]),
                batch_key("ect", "random", ["ect-random-s0-0123abcd", "ect-random-s0-89abcdef"])}) == 3

    other = batch_key("ecd", "cmt", ["ecd-cmt-s0-0123abcd"])

    def sweep_while_another_records():  # a parallel invocation finishes its sweep of the same cell first
        chosen_batch(tmp_path, other, lambda: {"chosen": 128})
        return {"chosen": 64}

    assert chosen_batch(tmp_path, other, sweep_while_another_records)["chosen"] == 128


def test_a_runs_batch_is_its_last_override_else_its_presets(tmp_path):
    assert preset_batch(TINY_POST) == 8
    assert run_batch(["loop.seed=0"], TINY_POST) == 8
    assert run_batch(["batch_per_process=16", "--batch-per-process=32"], TINY_POST) == 32
    assert run_batch([], tmp_path / "missing.yaml") is None
    (tmp_path / "no_batch.yaml").write_text("method: ect\n")
    with pytest.raises(CompareError, match="sets no batch_per_process"):
        preset_batch(tmp_path / "no_batch.yaml")


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "64", "64"], "distinct sizes"),
    (["--batch-sizes", "0", "64"], "distinct sizes"),
    (["--batch-sizes", "64", "128", "--set", "ect:batch_per_process=32"], "both choose the post-training batch"),
    (["--batch-sizes", "64", "128", "--set", "all:batch_per_process=32"], "both choose the post-training batch"),
])
def test_bad_batch_sizes_are_refused_in_the_clis_words(tmp_path, capsys, argv, message):
    assert main(["--quick", "--dry-run", "--out", str(tmp_path), "--store", str(tmp_path / "s.zarr"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_dry_run_says_how_the_batch_sizes_are_chosen(tmp_path, capsys):
    assert main(["--quick", "--dry-run", "--out", str(tmp_path), "--store", str(tmp_path / "s.zarr"),
                 "--batch-sizes", "32", "64", "--set", "mid:batch_per_process=64"]) == 0  # mid's batch is no conflict
    plan = json.loads(capsys.readouterr().out)
    assert plan["config"]["batch_sizes"] == [32, 64] and "[32, 64] on seed 0" in plan["batch_sweep"]
    post = [entry for entry in plan["runs"] if entry["command"][0] == "trainer/post.py"]
    assert post and all(entry["run"].endswith("<from the batch sweep>") for entry in post)


@pytest.mark.slow  # 8 tiny runs: ~20 s on 2 quiet cores
def test_every_cell_trains_at_its_best_batch_size_and_a_later_seed_reuses_the_choice(tmp_path):
    teacher_dir = tiny_teacher_dir(tmp_path / "teacher")
    store = tiny_store(teacher_dir, tmp_path / "store.zarr")
    cfg = dataclasses.replace(
        QUICK, out=str(tmp_path / "out"), teacher=str(teacher_dir), store=str(store), launcher="inprocess",
        mid_preset=str(REPO_ROOT / "jobs" / "tiny" / "mid.yaml"), post_preset=str(TINY_POST), methods=("ect",),
        inits=("cmt", "random"), mid_steps=6, cmt_post_steps=(("ect", 4),), max_baseline_steps=400,
        num_eval_samples=32, generation_probe_trajectories=8, seeds=(0,), batch_sizes=(4, 16))
    first = run(cfg)
    sweeps = first["accounting"]["methods"]["ect"]["batch_sweeps"]
    assert set(sweeps) == {"cmt", "random"}
    for init, sweep in sweeps.items():
        steps = {entry["batch"]: entry["steps"] for entry in sweep["candidates"]}
        assert sweep["selected_on_seed"] == 0 and sorted(steps) == [4, 16]
        assert sweep["reference_steps"] < 400  # under the cap, so the samples below are the budget's
        reference = sweep["reference_steps"] * sweep["reference_batch"]
        for batch, count in steps.items():  # the same number of training samples, to the rounding of one step
            assert abs(count * batch - reference) <= batch / 2
        # Ranked on the runs' draw and QUICK's one fresh draw (--redraws 1), every candidate on the same draws.
        assert sweep["ranked_on_draws"] == 2
        ranked = {}
        for entry in sweep["candidates"]:
            fresh = json.loads((tmp_path / "out" / "runs" / entry["run"] / "fd_redraws.json").read_text())
            for key in ("1step", "2step"):
                assert entry["ranked_fd"][key] == pytest.approx((entry["final_fd"][key] + fresh[f"fd_{key}"][0]) / 2)
            ranked[entry["batch"]] = (entry["ranked_fd"]["1step"], entry["ranked_fd"]["2step"])
        assert ranked[sweep["chosen"]] == min(ranked.values())
        for entry in sweep["candidates"]:  # each candidate really trained at its batch size
            config = (tmp_path / "out" / "runs" / entry["run"] / "config.yaml").read_text()
            assert f"batch_per_process: {entry['batch']}" in config
            assert RunDir(tmp_path / "out" / "runs" / entry["run"]).finished(entry["steps"])
    assert sweeps["cmt"]["reference_batch"] == 8 and sweeps["cmt"]["reference_steps"] == 4  # the tiny preset's
    assert sweeps["random"]["reference_batch"] == sweeps["cmt"]["chosen"]  # the budget is fitted at CMT's batch
    cells = {cell["init"]: cell for cell in first["cells"]}
    for init, cell in cells.items():
        assert cell["batch_size"] == sweeps[init]["chosen"]
        assert cell["runs"] == [next(e["run"] for e in sweeps[init]["candidates"] if e["batch"] == cell["batch_size"])]
    markdown = (tmp_path / "out" / MARKDOWN_NAME).read_text()
    assert "## Batch size of each cell" in markdown and f"| **{sweeps['cmt']['chosen']}** |" in markdown
    logged = {json.loads(line)["run"] for line in (tmp_path / "out" / SETTINGS_LOG).read_text().splitlines()}
    assert {entry["run"] for sweep in sweeps.values() for entry in sweep["candidates"]} <= logged  # losers too

    later = run(dataclasses.replace(cfg, seeds=(1,)))  # a seed added later: no new sweep, one run per cell
    assert later["accounting"]["methods"]["ect"]["batch_sweeps"] == json.loads(json.dumps(sweeps))
    runs = sorted(path.name for path in (tmp_path / "out" / "runs").iterdir() if "-s1-" in path.name)
    assert len(runs) == 2
    for cell in later["cells"]:
        assert cell["batch_size"] == sweeps[cell["init"]]["chosen"]
        assert cell["post_steps"] == cells[cell["init"]]["post_steps"]
