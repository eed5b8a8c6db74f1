"""jobs/compare_inits.py: the quick comparison on a tiny teacher and store (outputs, compute accounting, equal
compute, fractions, reuse on a re-run), the dry-run plan with scoped overrides, and the pure helpers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDPMPipeline, DDPMScheduler

from jobs.compare_accounting import first_crossing
from jobs.compare_budget import BUDGET_RECORD, baseline_budget, budget_key
from jobs.compare_config import METHOD_FORMS, QUICK, CompareError, parse_scoped_override
from jobs.compare_inits import main, run
from jobs.compare_report import JSON_NAME, MARKDOWN_NAME, PLOT_NAME, SETTINGS_LOG
from pipeline.teacher import load_teacher
from trainer.run_dir import RunDir
from tests.helpers import tiny_unet, write_solved_store

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("ect", "meanflow")
INITS = ("cmt", "teacher", "random")
SEEDS = (0, 1)


def tiny_teacher_dir(directory: Path) -> Path:
    """A tiny random 1×8×8 DDPM teacher (digits-shaped, so FD-digits applies), saved as trainer/pretrain.py does."""
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(directory)
    return directory


def tiny_store(teacher_dir: Path, url: Path, *, num_trajectories: int = 32, steps: int = 4) -> Path:
    """The teacher's DPM-Solver++(3M) trajectories in a 2-shard float32 store (pipeline/generate.py's bytes, no Ray)."""
    return write_solved_store(load_teacher(teacher_dir), url, num_trajectories=num_trajectories, steps=steps,
                              shard_size=num_trajectories // 2, chunk_size=num_trajectories // 4)


def final_train_seconds(run_dir: Path) -> float:
    """The last train_seconds a run logged, read straight from its metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max((r for r in records if "train_seconds" in r), key=lambda r: r["step"])["train_seconds"]


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory):
    """QUICK on a tiny teacher + store, in-process, two seeds; (config, returned JSON, output dir)."""
    root = tmp_path_factory.mktemp("compare")
    teacher_dir = tiny_teacher_dir(root / "teacher")
    store = tiny_store(teacher_dir, root / "store.zarr")
    cfg = dataclasses.replace(
        QUICK, out=str(root / "out"), teacher=str(teacher_dir), store=str(store), launcher="inprocess",
        mid_preset=str(REPO_ROOT / "jobs" / "tiny" / "mid.yaml"),
        post_preset=str(REPO_ROOT / "jobs" / "tiny" / "post.yaml"),
        mid_steps=6, cmt_post_steps=(("ect", 4), ("meanflow", 4)), max_baseline_steps=40, num_eval_samples=32,
        generation_probe_trajectories=8, seeds=SEEDS, amortise_over=4,
    )
    return cfg, run(cfg), root / "out"


@pytest.mark.slow  # the tiny comparison these four share trains 9 runs: ~30 s on 2 quiet cores
def test_quick_run_writes_table_json_plot_and_settings_log_with_every_cell(tiny_comparison):
    _, result, out = tiny_comparison
    assert (out / PLOT_NAME).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / JSON_NAME).read_text())["cells"] == result["cells"]
    cells = {(cell["method"], cell["init"]) for cell in result["cells"]}
    assert cells == {(method, init) for method in METHODS for init in INITS}
    markdown = (out / MARKDOWN_NAME).read_text()
    for method in ("ECT", "MeanFlow"):
        for init in ("CMT", "diffusion", "random"):
            assert f"| {method} | {init} |" in markdown
    logged = [json.loads(line) for line in (out / SETTINGS_LOG).read_text().splitlines()]
    assert len(logged) == len(METHODS) * len(INITS) * len(SEEDS)
    assert all(set(row["improved"]) == {"1step", "2step"} for row in logged)
    # One "settings tried" entry per cell (both seeds of a cell share its settings), in the JSON and the markdown.
    tried = {(entry["method"], entry["init"]): entry for entry in result["settings_tried"]}
    assert set(tried) == cells and all(entry["seeds"] == list(SEEDS) for entry in tried.values())
    assert "loop.ema_warmup=true" in tried[("ect", "random")]["settings"]
    assert "## Every setting tried" in markdown
    for cell in result["cells"]:
        assert cell["final_fd"]["1step"]["n"] == len(SEEDS) and cell["final_fd"]["2step"]["std"] is not None
        # The CMT student's FD before post-training sits beside every row, and is the CMT runs' own init_eval.json.
        cmt_cell = next(c for c in result["cells"] if c["method"] == cell["method"] and c["init"] == "cmt")
        assert cell["cmt_student_fd"] == cmt_cell["init_fd"]
        init_eval = json.loads((out / "runs" / cmt_cell["runs"][0] / "init_eval.json").read_text())
        assert cell["cmt_student_fd"]["1step"]["mean"] == pytest.approx(init_eval["fd_1step"])
    # QUICK scores every final export and each mid-trained student again on one fresh evaluation draw (--redraws).
    assert result["redraws"]["draws"] == 1 and "fresh draws of the evaluation noise" in markdown
    for cell in result["cells"]:
        fresh = cell["redraw_fd"]["fd_1step"]
        assert fresh["n"] == len(SEEDS) and len(fresh["seed_means"]) == len(SEEDS)
        for name, mean in zip(cell["runs"], fresh["seed_means"]):
            assert json.loads((out / "runs" / name / "fd_redraws.json").read_text())["fd_1step"] == [
                pytest.approx(mean)]
        student = result["redraws"]["cmt_students"][METHOD_FORMS[cell["method"]]]["fd_1step"]["mean"]
        assert cell["redraw_improved"]["1step"] == all(mean < student for mean in fresh["seed_means"])


@pytest.mark.slow
def test_cmt_runs_are_charged_generation_and_mid_training_and_baselines_get_that_much_more(tiny_comparison):
    cfg, result, out = tiny_comparison
    accounting = result["accounting"]
    generation = accounting["generation_seconds"]
    assert generation > 0 and "estimated" in accounting["generation_source"]  # --store: re-timed now
    assert not accounting["baselines_charged_for_generation"]  # post-training reads dataset:digits
    for cell in result["cells"]:
        method = accounting["methods"][cell["method"]]
        mid_seconds = accounting["mid"][method["form"]]["seconds"]
        mid_dir = out / "runs" / accounting["mid"][method["form"]]["run"]
        assert mid_seconds == pytest.approx(final_train_seconds(mid_dir)) and mid_seconds > 0
        post_seconds = [final_train_seconds(out / "runs" / name) for name in cell["runs"]]
        curve = cell["curve"]
        if cell["init"] == "cmt":
            # The CMT curve starts with mid-training's own evaluations (before its last step), at generation + the
            # mid run's train_seconds; post-training starts after generation + all of mid-training.
            evaluated = [record for record in RunDir(mid_dir).read_evaluations() if record["step"] < cfg.mid_steps]
            assert [record["step"] for record in evaluated] == [3]  # QUICK's mid_evals=2 of mid_steps=6
            first_post = curve["stage"].index("post")
            assert curve["stage"][:first_post] == ["mid"] * len(evaluated)
            for index, record in enumerate(evaluated):
                assert curve["steps"][index] == record["step"]
                assert curve["charged_seconds"][index] == pytest.approx(generation + record["train_seconds"])
                assert curve["charged_seconds_amortised"][index] == pytest.approx(generation / 4
                                                                                  + record["train_seconds"])
                assert curve["fd_1step_mean"][index] == record["fd_1step"] and curve["fd_1step_std"][index] == 0
            assert curve["charged_seconds"][first_post] == pytest.approx(generation + mid_seconds)
            assert curve["charged_seconds_amortised"][first_post] == pytest.approx(generation / 4 + mid_seconds)
            assert cell["charged_seconds"]["mean"] == pytest.approx(generation + mid_seconds + sum(post_seconds) / 2)
            assert cell["post_steps"] == 4
            # Steps/s and the first-steps overhead: a line through every evaluation point of the CMT runs.
            points = [(r["step"], r["train_seconds"]) for name in cell["runs"]
                      for r in map(json.loads, (out / "runs" / name / "metrics.jsonl").read_text().splitlines())
                      if "fd_1step" in r]
            slope, intercept = np.polyfit(*zip(*points), 1)
            assert method["steps_per_second"] == pytest.approx(1 / slope)
            assert method["startup_seconds"] == pytest.approx(max(intercept, 0.0), abs=1e-9)
            budget = cell["charged_seconds"]["mean"]
            assert method["baseline_budget_seconds"] == pytest.approx(budget)
            expected_steps = round((budget - method["startup_seconds"]) * method["steps_per_second"])
            assert method["baseline_steps"] == min(40, max(1, expected_steps))
        else:
            assert curve["charged_seconds"][0] == 0.0
            assert cell["charged_seconds"]["mean"] == pytest.approx(sum(post_seconds) / 2)
            assert cell["post_steps"] == method["baseline_steps"]


@pytest.mark.slow
def test_fractions_interpolate_the_cmt_curve_against_each_baseline_final_fd(tiny_comparison):
    _, result, _ = tiny_comparison
    assert len(result["fractions"]) == len(METHODS) * 2 * 2  # 2 baselines × 1- and 2-step
    cells = {(cell["method"], cell["init"]): cell for cell in result["cells"]}
    for row in result["fractions"]:
        cmt, baseline = cells[(row["method"], "cmt")], cells[(row["method"], row["baseline"])]
        steps = f"{row['steps']}step"
        assert row["baseline_final_fd"] == baseline["final_fd"][steps]["mean"]
        expected = first_crossing(cmt["curve"]["charged_seconds"], cmt["curve"][f"fd_{steps}_mean"],
                                  row["baseline_final_fd"])
        assert row["cmt_seconds_to_reach"] == expected
        if expected is None:
            assert row["fraction"] is None
        else:
            assert expected >= cmt["curve"]["charged_seconds"][0]  # never before generation is paid
            assert row["fraction"] == pytest.approx(expected / baseline["charged_seconds"]["mean"])


@pytest.mark.slow
def test_a_rerun_reuses_every_stage_and_logs_nothing_twice(tiny_comparison):
    cfg, result, out = tiny_comparison
    metrics_before = {path: path.read_text() for path in (out / "runs").glob("*/metrics.jsonl")}
    again = run(cfg)
    assert {path: path.read_text() for path in (out / "runs").glob("*/metrics.jsonl")} == metrics_before
    assert again["accounting"]["generation_seconds"] == result["accounting"]["generation_seconds"]  # recorded
    assert again["cells"] == result["cells"]
    assert len((out / SETTINGS_LOG).read_text().splitlines()) == len(METHODS) * len(INITS) * len(SEEDS)


@pytest.mark.slow
def test_a_seed_added_later_trains_only_its_own_runs_and_keeps_the_baselines_step_count(tiny_comparison, tmp_path):
    base, _, _ = tiny_comparison  # its teacher and store; ECT alone, one seed first
    cfg = dataclasses.replace(base, out=str(tmp_path / "out"), methods=("ect",), seeds=(0,))
    first = run(cfg)
    runs = tmp_path / "out" / "runs"
    finished = {path.parent.name: path.read_text() for path in runs.glob("*/metrics.jsonl")}
    again = run(dataclasses.replace(cfg, seeds=(0, 1)))
    after = {path.parent.name: path.read_text() for path in runs.glob("*/metrics.jsonl")}
    assert {name: after[name] for name in finished} == finished  # no finished run trained again or renamed
    added = sorted(set(after) - set(finished))
    assert len(added) == len(INITS) and all("-s1-" in name for name in added)
    assert again["accounting"]["methods"]["ect"]["baseline_steps"] == first["accounting"]["methods"]["ect"][
        "baseline_steps"]
    assert again["accounting"]["methods"]["ect"]["baseline_budget_fitted_on_seeds"] == [0]
    steps = {cell["init"]: cell["post_steps"] for cell in first["cells"]}
    assert all(cell["post_steps"] == steps[cell["init"]] for cell in again["cells"])
    assert all(cell["final_fd"]["1step"]["n"] == 2 for cell in again["cells"])


def test_a_baseline_budget_is_fitted_once_under_a_key_of_everything_it_depends_on_but_the_seeds(tmp_path):
    fits = []

    def fit():
        fits.append(len(fits))
        return {"baseline_steps_for_equal_compute": 1127 + len(fits), "fitted_on_seeds": [0]}

    key = budget_key("ect", "ect-cmt-s0-0123abcd", 84.5, False)
    kept = baseline_budget(tmp_path, key, fit)
    assert kept["baseline_steps_for_equal_compute"] == 1128 and len(fits) == 1
    assert baseline_budget(tmp_path, key, fit) == kept and len(fits) == 1  # a later invocation reuses it
    assert json.loads((tmp_path / BUDGET_RECORD).read_text()) == {key: kept}
    others = {budget_key("meanflow", "ect-cmt-s0-0123abcd", 84.5, False),
              budget_key("ect", "ect-cmt-s0-fedc3210", 84.5, False),
              budget_key("ect", "ect-cmt-s0-0123abcd", 90.0, False),
              budget_key("ect", "ect-cmt-s0-0123abcd", 84.5, True)}
    assert key not in others and len(others) == 4
    for other in others:
        baseline_budget(tmp_path, other, fit)
    assert len(fits) == 5


def test_dry_run_applies_scoped_overrides_to_their_cells_only(tmp_path, capsys):
    assert main(["--quick", "--dry-run", "--out", str(tmp_path), "--store", str(tmp_path / "store.zarr"),
                 "--set", "ect/cmt:loop.lr=1e-4", "--set", "mid/mf:loop.lr=3e-3",
                 "--set", "random:ect.p_mean=-0.8"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for entry in plan["runs"]:
        command = entry["command"]
        is_post = command[0] == "trainer/post.py"
        method = next((text.split("=", 1)[1] for text in command if text.startswith("method=")), None)
        init = next((text.split("=", 1)[1] for text in command if text.startswith("init=")), "")
        assert ("loop.lr=1e-4" in command) == (method == "ect" and init.startswith("cmt:"))
        assert ("loop.lr=3e-3" in command) == (not is_post and "form=mf" in command)
        assert ("ect.p_mean=-0.8" in command) == (init == "random")
        assert ("loop.ema_warmup=true" in command) == (init == "random")
        assert ("ect.q_mode=doubling" in command) == (method == "ect" and init in ("teacher", "random"))


def test_first_crossing_and_override_errors():
    assert first_crossing([10.0, 20.0, 30.0], [100.0, 60.0, 20.0], 40.0) == pytest.approx(25.0)
    assert first_crossing([10.0, 20.0], [30.0, 60.0], 40.0) == 10.0  # already below at the first point
    assert first_crossing([10.0, 20.0], [100.0, 90.0], 40.0) is None
    assert parse_scoped_override("ect/cmt:loop.lr=1e-4") == ("ect/cmt", "loop.lr=1e-4")
    assert parse_scoped_override("data=store:/x.zarr") == ("post", "data=store:/x.zarr")  # ':' inside the value
    with pytest.raises(CompareError, match="unknown scope"):
        parse_scoped_override("ectt:loop.lr=1e-4")
    with pytest.raises(CompareError, match="--seeds"):
        parse_scoped_override("loop.seed=3")
    with pytest.raises(CompareError, match="inits must include cmt"):
        dataclasses.replace(QUICK, inits=("teacher", "random")).validate()


def test_a_baseline_that_reads_the_store_is_charged_for_generation(tmp_path):
    from jobs.study_runs import post_plan, reads_store

    cfg = dataclasses.replace(QUICK, methods=("ect", "ecd"), overrides=("ecd:data=store",))
    plan = {method: post_plan(cfg, method, "teacher", 0, 10, store_url="/s.zarr", cmt_export=None, runs_dir=tmp_path)
            for method in ("ect", "ecd")}
    assert reads_store(plan["ecd"]) and "data=store:/s.zarr" in plan["ecd"].overrides
    assert not reads_store(plan["ect"])  # QUICK's post_data is dataset:digits


def test_meanflow_baselines_train_with_meanflows_own_share_of_r_neq_t_and_the_cmt_student_with_the_presets(tmp_path):
    """The digits post preset's fraction_r_neq_t = 1.0 is for a CMT student; the baselines get the paper's 0.25."""
    from jobs.study_runs import post_plan
    from pipeline.config_loader import load_config
    from trainer.post import PostConfig

    cfg = dataclasses.replace(QUICK, methods=("meanflow",))
    fractions = {}
    for init in ("cmt", "teacher", "random"):
        plan = post_plan(cfg, "meanflow", init, 0, 10, store_url="/s.zarr", cmt_export=tmp_path / "export",
                         runs_dir=tmp_path)
        overrides = [text for text in plan.overrides if not text.startswith("init=")]
        fractions[init] = load_config(PostConfig, cfg.post_preset, overrides).meanflow.fraction_r_neq_t
    assert fractions == {"cmt": 1.0, "teacher": 0.25, "random": 0.25}


def test_run_names_do_not_depend_on_where_the_project_is_checked_out(tmp_path, monkeypatch):
    """A finished study run is found again from another checkout: presets inside the project enter the run's name by
    their path inside it; a preset elsewhere by its absolute path."""
    from jobs.compare_config import CompareConfig
    from jobs.study_runs import PROJECT_ROOT, mid_plan, preset_key

    monkeypatch.chdir(PROJECT_ROOT)  # the studies resolve relative presets from the project root
    inside = PROJECT_ROOT / "jobs" / "digits" / "mid.yaml"
    assert preset_key(str(inside)) == "jobs/digits/mid.yaml"
    outside = tmp_path / "mid.yaml"
    assert preset_key(str(outside)) == str(outside.resolve())
    names = {mid_plan(CompareConfig(teacher="/t", mid_preset=preset), "cm", "/s.zarr", tmp_path).name
             for preset in (str(inside), "jobs/digits/mid.yaml", str(PROJECT_ROOT / "jobs" / ".." / "jobs" / "digits" /
                                                                      "mid.yaml"))}
    assert len(names) == 1
    assert mid_plan(CompareConfig(teacher="/t", mid_preset=str(outside)), "cm", "/s.zarr", tmp_path).name not in names


def test_run_names_change_with_a_presets_settings_and_not_with_its_comments(tmp_path):
    """A finished run trained under a preset's old settings is not reused once the preset changes a setting (the
    digits post preset changed MeanFlow's derivative); editing a comment keeps the name."""
    from jobs.compare_config import CompareConfig
    from jobs.study_runs import post_plan

    preset = tmp_path / "post.yaml"

    def name(text: str) -> str:
        preset.write_text(text)
        return post_plan(CompareConfig(teacher="/t", post_preset=str(preset)), "meanflow", "cmt", 0, 10,
                         store_url="/s.zarr", cmt_export=tmp_path / "export", runs_dir=tmp_path).name

    jvp = name("meanflow:\n  derivative: auto\n")
    assert name("# a comment\nmeanflow:\n  derivative: auto  # another\n") == jvp
    assert name("meanflow:\n  derivative: secant\n") != jvp


def test_a_mid_run_is_evaluated_along_the_way_and_named_without_its_evaluation_cadence(tmp_path):
    """mid_evals sets the mid run's eval_every_steps but not its name: evaluations do not change what is trained
    (tests/test_mid.py), so runs made with another cadence are found again."""
    from jobs.compare_config import CompareConfig
    from jobs.study_runs import mid_plan

    plans = {evals: mid_plan(CompareConfig(teacher="/t", mid_evals=evals), "cm", "/s.zarr", tmp_path)
             for evals in (0, 4, 3)}
    assert len({plan.name for plan in plans.values()}) == 1
    cadence = {evals: [text for text in plan.overrides if text.startswith("loop.eval_every_steps=")]
               for evals, plan in plans.items()}
    assert cadence == {0: ["loop.eval_every_steps=0"], 4: ["loop.eval_every_steps=200"],
                       3: ["loop.eval_every_steps=267"]}  # mid_steps=800
    with pytest.raises(CompareError, match="mid_evals=-1"):
        CompareConfig(teacher="/t", mid_evals=-1).validate()


def test_a_negative_redraw_count_is_refused_with_the_valid_values(capsys):
    assert main(["--redraws", "-1", "--dry-run"]) == 2
    assert "redraws=-1: pass 0" in capsys.readouterr().err


def test_mid_trainings_own_evaluations_start_the_cmt_curve_and_a_fraction_can_fall_between_them():
    """Hand-computed: mid points at G + 100 s (FD 80) and G + 200 s (FD 40); post-training starts at G + 400 s."""
    from jobs.compare_accounting import compute_fractions, summarise_cell, with_mid_curve

    generation = 50.0
    post_run = {"steps": [10], "train_seconds": [100.0], "init_fd": {1: 30.0, 2: 20.0}, "fd": {1: [25.0], 2: [15.0]}}
    cmt = with_mid_curve(summarise_cell([post_run], generation + 400.0, generation / 10 + 400.0),
                         [{"step": 100, "train_seconds": 100.0, "fd_1step": 80.0, "fd_2step": 70.0},
                          {"step": 200, "train_seconds": 200.0, "fd_1step": 40.0, "fd_2step": 35.0}],
                         generation, generation / 10)
    assert cmt["curve"]["stage"] == ["mid", "mid", "post", "post"]
    assert cmt["curve"]["charged_seconds"] == [150.0, 250.0, 450.0, 550.0]
    assert cmt["curve"]["charged_seconds_amortised"] == [105.0, 205.0, 405.0, 505.0]
    assert cmt["curve"]["fd_1step_mean"] == [80.0, 40.0, 30.0, 25.0]
    assert cmt["init_fd"][1]["mean"] == 30.0 and cmt["final_fd"][1]["mean"] == 25.0  # post-training's own
    baseline = {"method": "ect", "init": "random", "final_fd": {1: {"mean": 60.0}, 2: {"mean": 90.0}},
                "charged_seconds": {"mean": 1000.0}, "charged_seconds_amortised": {"mean": 1000.0}}
    rows = {row["steps"]: row for row in compute_fractions([{**cmt, "method": "ect", "init": "cmt"}, baseline], 10)}
    # 1-step: FD 60 is halfway from 80 (150 s) to 40 (250 s): 200 s, 20 % of the baseline's 1,000 s.
    assert rows[1]["cmt_seconds_to_reach"] == pytest.approx(200.0) and rows[1]["fraction"] == pytest.approx(0.2)
    assert not rows[1]["reached_at_first_evaluation"]
    # 2-step: FD 90 is already beaten at the first mid point: 150 s, an upper bound.
    assert rows[2]["cmt_seconds_to_reach"] == 150.0 and rows[2]["reached_at_first_evaluation"]
    assert rows[2]["fraction_amortised"] == pytest.approx(0.105)
