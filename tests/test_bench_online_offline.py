"""jobs/bench_online_offline.py --quick on a tiny teacher and store: both students trained, the accounting consistent
with the runs' own logs, the report written, and the last line the offline/online cost-per-pair ratio."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from jobs.bench_online_offline import main
from tests.test_compare_inits import tiny_store, tiny_teacher_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS, BATCH, K, TRAJECTORIES = 6, 8, 4, 32  # the tiny mid preset's batch: 2 online trajectories × 4 points per step


def run_main(arguments: list[str]) -> tuple[int, list[str]]:
    """main(arguments) with its printed lines captured."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(arguments)
    return status, printed.getvalue().splitlines()


def logged(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def quick_arguments(teacher_dir: Path, store: Path | str, out: Path, *extra: str) -> list[str]:
    """--quick on the tiny teacher, store and mid preset, 6 steps, 32 FD samples, the store shared by 4 runs."""
    return ["--quick", "--teacher", str(teacher_dir), "--store", str(store), "--out", str(out),
            "--mid-preset", str(REPO_ROOT / "jobs" / "tiny" / "mid.yaml"), "--mid-steps", str(STEPS),
            "--num-eval-samples", "32", "--amortise-over", "4", *extra]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    """One --quick benchmark on a tiny teacher and a 32-trajectory K = 4 store: (printed lines, JSON, out dir)."""
    root = tmp_path_factory.mktemp("bench")
    teacher_dir = tiny_teacher_dir(root / "teacher")
    store = tiny_store(teacher_dir, root / "store.zarr", num_trajectories=TRAJECTORIES, steps=K)
    out = root / "out"
    status, lines = run_main(quick_arguments(teacher_dir, store, out))
    assert status == 0
    return {"lines": lines, "result": json.loads((out / "bench_online_offline.json").read_text()), "out": out,
            "teacher": teacher_dir}


def test_quick_bench_prints_the_cost_ratio_last_and_writes_the_report(bench):
    result, out = bench["result"], bench["out"]
    match = re.fullmatch(r"offline/online cost per pair: (\d+\.\d{3})", bench["lines"][-1])
    assert match, bench["lines"][-1]
    assert float(match.group(1)) == round(result["summary"]["offline_over_online_cost_per_pair"], 3)
    assert (out / "bench_online_offline.png").read_bytes()[:8] == PNG_MAGIC
    markdown = (out / "bench_online_offline.md").read_text()
    for pipeline in ("online", "offline (G once)", "offline (G/4)"):
        assert f"| {pipeline} |" in markdown


def test_quick_bench_accounting_matches_the_runs_logs(bench):
    result, out = bench["result"], bench["out"]
    rows = {row["pipeline"]: row for row in result["summary"]["pipelines"]}
    generation = result["summary"]["generation"]
    assert generation["teacher_forwards"] == TRAJECTORIES * K  # DPM-Solver++: K evaluations per trajectory
    online_dir, offline_dir = (out / "runs" / result["runs"][name] for name in ("online", "offline"))
    online_config = (online_dir / "config.yaml").read_text()
    assert "data: online" in online_config and f"steps: {K}" in online_config
    assert "data: stores" in (offline_dir / "config.yaml").read_text()
    trained = {name: max(r["train_seconds"] for r in logged(directory) if "train_seconds" in r)
               for name, directory in (("online", online_dir), ("offline", offline_dir))}
    report = json.loads((online_dir / "ranks" / "rank_0.json").read_text())["online"]
    pairs = STEPS * BATCH
    assert all(row["pairs"] == pairs for row in rows.values())
    online, once, amortised = rows["online"], rows["offline (G once)"], rows["offline (G/4)"]
    assert online["charged_seconds"] == pytest.approx(trained["online"])
    assert once["charged_seconds"] == pytest.approx(generation["seconds"] + trained["offline"])
    assert amortised["charged_seconds"] == pytest.approx(generation["seconds"] / 4 + trained["offline"])
    assert online["teacher_forwards_per_pair"] == pytest.approx(1.0)  # K forwards buy K training pairs
    assert report["teacher_forward_samples"] == STEPS * 2 * K
    assert 0 < online["teacher_seconds_per_pair"] < online["seconds_per_pair"]  # solving is part of the step
    assert once["teacher_forwards_per_pair"] == pytest.approx(TRAJECTORIES * K / pairs)
    assert result["summary"]["offline_over_online_cost_per_pair"] == pytest.approx(
        once["seconds_per_pair"] / online["seconds_per_pair"])
    budget = result["summary"]["budget_seconds"]
    assert budget == pytest.approx(min(row["charged_seconds"] for row in rows.values()))
    assert online["fd_at_budget"]["1step"] is not None  # online spends nothing before its first step
    for row in rows.values():
        assert len(row["curve"]["charged_seconds"]) == len(row["curve"]["fd_1step"]) == 3  # init + 2 evaluations
        assert row["curve"]["steps"] == [0, STEPS // 2, STEPS]


def test_quick_bench_rerun_reuses_both_runs(bench, tmp_path):
    runs = [bench["out"] / "runs" / run / "metrics.jsonl" for run in bench["result"]["runs"].values()]
    before = [path.stat().st_mtime_ns for path in runs]
    status, lines = run_main(quick_arguments(bench["teacher"], bench["result"]["store"], bench["out"],
                                             "--report-dir", str(tmp_path)))
    assert status == 0
    assert [path.stat().st_mtime_ns for path in runs] == before  # finished runs are read, not trained again
    assert lines[-1] == bench["lines"][-1]
    assert (tmp_path / "bench_online_offline.md").is_file()


def test_bad_settings_are_refused_in_flag_words(tmp_path):
    for arguments, message in ((["--teacher", str(tmp_path / "missing")], "trainer/pretrain.py"),
                               (["--mid-steps", "0"], "--mid-steps 0: pass a value >= 1"),
                               (["--set", "loop.lr"], "--set 'loop.lr': write key=value")):
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            status, _ = run_main(["--quick", "--out", str(tmp_path / "out"), *arguments])
        assert status == 2 and message in errors.getvalue(), errors.getvalue()
    assert not (tmp_path / "out" / "runs").exists()
