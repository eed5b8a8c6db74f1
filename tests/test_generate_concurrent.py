"""Two `pipeline/generate.py` runs of one spec and one --out at the same time, each with its own local Ray cluster: both
end with the complete, deep-valid store, byte-identical to a single run's, every shard committed by exactly one run;
a run that finds shards held by another says so and waits, and takes them over when that run dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from diffusers import DDPMPipeline, DDPMScheduler

from pipeline.generate import run
from pipeline.generate_options import GenerateConfig
from pipeline.fault_points import POINT_ENV, RELEASE_FILE_ENV, SOLVED_STAGE, hold_line, shard_stage
from storage_schema import open_store
from tests.helpers import HANG_LIMIT_S, wait_until
from tests.test_generate import _summary, store_files, tiny_unet

REPO = Path(__file__).resolve().parents[1]
NUM_TRAJECTORIES, STEPS, SHARD_SIZE = 48, 4, 8  # 6 shards
pytestmark = pytest.mark.slow  # two generate runs with a Ray cluster each, plus a reference run: minutes on 2 cores


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A saved tiny DDPMPipeline teacher directory."""
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(path)
    return path


def _args(teacher: Path, out: Path) -> list[str]:
    """The one command both runs type."""
    return ["--teacher", str(teacher), "--num-trajectories", str(NUM_TRAJECTORIES), "--steps", str(STEPS),
            "--shard-size", str(SHARD_SIZE), "--batch-size", str(SHARD_SIZE), "--out", str(out), "--no-progress"]


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory) -> dict[str, str]:
    """The files of the store a single uninterrupted run writes."""
    out = tmp_path_factory.mktemp("reference") / "store.zarr"
    run(GenerateConfig(teacher=str(teacher), num_trajectories=NUM_TRAJECTORIES, steps=STEPS, shard_size=SHARD_SIZE,
                       batch_size=SHARD_SIZE, out=str(out), progress=False))
    return store_files(out)


class Run:
    """`python pipeline/generate.py ARGS` in its own session, its merged output collected line by line."""

    def __init__(self, args: list[str], **env: str):
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "pipeline" / "generate.py"), *args], cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self._reader.start()

    def said(self, text: str) -> str | None:
        """The first output line containing `text`, if any yet."""
        return next((line for line in list(self.lines) if text in line), None)

    def finish(self) -> tuple[int, str]:
        """Exit status and whole output, once the run has ended."""
        status = self.process.wait(timeout=HANG_LIMIT_S)
        self._reader.join(timeout=HANG_LIMIT_S)
        return status, "".join(self.lines)


def test_two_runs_started_together_share_the_shards_and_both_end_with_the_same_store(teacher, reference, tmp_path):
    out = tmp_path / "store.zarr"
    runs = [Run(_args(teacher, out)), Run(_args(teacher, out))]
    outputs = [run_.finish() for run_ in runs]
    for status, output in outputs:
        assert status == 0, output
        assert "a trajectory store already exists" not in output and "open_store" not in output
    summaries = [_summary(output) for _, output in outputs]
    written = [set(summary["shards_written"]) for summary in summaries]
    assert not written[0] & written[1], "no shard was written by both runs"
    assert written[0] | written[1] == set(range(NUM_TRAJECTORIES // SHARD_SIZE)), "every shard was written by one run"
    for mine, summary in zip(written, summaries):
        assert set(summary["shards_joined"]) <= set(range(NUM_TRAJECTORIES // SHARD_SIZE)) - mine
    store = open_store(str(out))
    assert store.is_complete and store.validate(deep=True).ok
    assert store_files(out) == reference, "byte-identical to a single run's store, and no claims left"


def test_a_run_waits_for_a_shard_another_run_holds_and_takes_it_over_when_that_run_dies(teacher, reference, tmp_path):
    out = tmp_path / "store.zarr"
    holder = Run(_args(teacher, out),
                 **{POINT_ENV: f"{shard_stage(SOLVED_STAGE)}:1", RELEASE_FILE_ENV: str(tmp_path / "never")})
    wait_until(lambda: holder.said(hold_line(shard_stage(SOLVED_STAGE), 1)) or holder.process.poll() is not None,
               "the first run holds shard 1 mid-way")
    assert holder.said(hold_line(shard_stage(SOLVED_STAGE), 1)), "".join(holder.lines)
    joiner = Run(_args(teacher, out))
    wait_until(lambda: joiner.said("waiting: shard(s) 1") or joiner.process.poll() is not None,
               "the second run says it waits for shard 1")
    message = joiner.said("waiting: shard(s) 1")
    assert message and f"of {out} are being written by another generate run (pid {holder.process.pid} on" in message, (
        "".join(joiner.lines))
    assert 1 not in open_store(str(out)).committed_shards()

    os.killpg(holder.process.pid, signal.SIGKILL)  # the first run dies with its Ray cluster
    holder.finish()
    status, output = joiner.finish()
    assert status == 0, output
    assert 1 in _summary(output)["shards_written"], "the second run took over the dead run's shard"
    store = open_store(str(out))
    assert store.is_complete and store.validate(deep=True).ok
    assert store_files(out) == reference
