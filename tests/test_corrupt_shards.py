"""Corrupt data met by the trainer: a committed shard whose chunk fails to decode, or whose data no longer matches its
digest, stops training with the store, the shard and the `validate --deep` command named (checkpoints intact, resume
after regenerating the shard), or with stream.on_corrupt_shard=skip is left out and reported. Real Zarr stores on
disk, corrupted by flipping bytes in a chunk file or by rewriting data behind the commit record."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from diffusers import DDPMPipeline, DDPMScheduler

from pipeline.solvers import solve
from pipeline.teacher import load_teacher
from storage_schema import CorruptShardError, open_store
from storage_schema.cli import main as storage_cli
from tests.helpers import HANG_LIMIT_S, tiny_unet, write_solved_store
from trainer.config import load_config
from trainer.data import StreamConfig, StreamStateError, TrajectoryStream
from trainer.data.corrupt_shards import CorruptDataError, CorruptShardWarning
from trainer.loop import complete_checkpoints
from trainer.mid import MidConfig
from trainer.mid import run as run_mid
from trainer.post import PostConfig
from trainer.post import run as run_post
from trainer.run_dir import RunDir

REPO_ROOT = Path(__file__).resolve().parents[1]
MID_PRESET = REPO_ROOT / "jobs" / "tiny" / "mid.yaml"
POST_PRESET = REPO_ROOT / "jobs" / "tiny" / "post.yaml"
NUM_TRAJECTORIES, STEPS, SHARD_SIZE = 32, 4, 8  # 4 shards of 2 chunks; 128 CM samples = 16 tiny-preset batches
CORRUPT = 2  # the shard the tests damage


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """A tiny teacher directory and an intact 4-shard store of its trajectories."""
    root = tmp_path_factory.mktemp("corrupt")
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(root / "teacher", safe_serialization=True)
    write_solved_store(load_teacher(root / "teacher"), root / "store.zarr", num_trajectories=NUM_TRAJECTORIES,
                       steps=STEPS, shard_size=SHARD_SIZE)
    return {"teacher": root / "teacher", "store": root / "store.zarr"}


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    """A fresh copy of the intact store, for one test to damage."""
    return Path(shutil.copytree(pristine["store"], tmp_path / "store.zarr"))


def break_chunk(url: Path, shard: int) -> None:
    """Overwrite the header of the first compressed chunk in the shard's traj object, so its codec fails."""
    path = url / "traj" / "c" / str(shard) / "0" / "0" / "0" / "0"
    data = bytearray(path.read_bytes())
    data[:16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def rewrite_behind_commit(url: Path, shard: int) -> None:
    """Write valid but different data into a committed shard through Zarr, leaving its commit record as it was."""
    traj = zarr.open_array(str(url / "traj"), mode="r+")
    start, stop = shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE
    traj[start:stop] = traj[start:stop] + 0.5


def regenerate(teacher_dir: Path, url: Path, shard: int) -> str:
    """What re-running the generation command does for an uncommitted shard: solve it again as its writer did (here
    write_solved_store: one batch of all seeds) and write it; returns the new digest."""
    spec = open_store(str(url)).spec
    start, stop = spec.shard_bounds(shard)
    trajectory = solve(load_teacher(teacher_dir), list(range(spec.num_trajectories)), steps=spec.steps,
                       solver=spec.solver, grid=spec.grid)
    return open_store(str(url), "r+").write_shard(shard, trajectory.points[start:stop].numpy(), np.arange(start, stop))


def stream(url: Path, **options) -> TrajectoryStream:
    """A one-rank CM stream over the store that reports where each sample came from."""
    cfg = StreamConfig(urls=(str(url),), batch_per_process=8, shuffle_buffer=32, num_workers=0, include_indices=True,
                       **options)
    return TrajectoryStream(cfg, rank=0, world_size=1)


def shards_in(batches) -> set[int]:
    """The store shards the samples of `batches` came from."""
    return {int(index) // SHARD_SIZE for batch in batches for index in batch["index"]}


def tree_digest(directory: Path) -> str:
    """sha256 over every file's relative path and bytes under `directory`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------------------------
# The store: finding the damage, and clearing it for regeneration


def test_verify_shard_finds_a_broken_chunk_and_data_that_no_longer_matches_its_digest(store):
    """verify_shard reads in bounded pieces or whole; both corruptions are found, intact shards pass."""
    opened = open_store(str(store))
    for read_bytes in (None, 1):  # 1 byte: one chunk per read
        opened.verify_shard(CORRUPT, read_bytes=read_bytes)
    break_chunk(store, CORRUPT)
    rewrite_behind_commit(store, 1)
    for read_bytes in (None, 1):
        with pytest.raises(CorruptShardError, match="cannot decode trajectories 16..") as decode:
            opened.verify_shard(CORRUPT, read_bytes=read_bytes)
        assert "blosc" in str(decode.value.__cause__)
        with pytest.raises(CorruptShardError, match="shard 1 .* does not match its commit digest"):
            opened.verify_shard(1, read_bytes=read_bytes)
        opened.verify_shard(0, read_bytes=read_bytes)


def test_validate_uncommits_corrupt_shards_and_regeneration_restores_the_same_bytes(pristine, store, capsys):
    """`validate --deep --uncommit-corrupt` clears exactly the damaged shards; regenerating gives the old digests."""
    digests = {shard: open_store(str(store)).shard_digest(shard) for shard in range(4)}
    break_chunk(store, CORRUPT)
    rewrite_behind_commit(store, 1)
    with pytest.raises(SystemExit):
        storage_cli(["validate", str(store), "--uncommit-corrupt"])
    assert "--uncommit-corrupt needs --deep" in capsys.readouterr().err
    assert storage_cli(["validate", str(store), "--deep", "--uncommit-corrupt", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["corrupt_shards"] == [1, CORRUPT] == report["uncommitted_shards"]
    assert open_store(str(store)).missing_shards() == [1, CORRUPT]
    for shard in (1, CORRUPT):
        assert regenerate(pristine["teacher"], store, shard) == digests[shard]
    assert storage_cli(["validate", str(store), "--deep"]) == 0
    assert "deep validation" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------------------------
# The stream: stop before any sample of the shard is used, or skip it


@pytest.mark.parametrize("damage", [break_chunk, rewrite_behind_commit])
def test_the_stream_stops_at_a_corrupt_shard_before_using_any_of_its_samples(store, damage):
    """The error names the store, the shard and the validate --deep command; no batch held its samples."""
    damage(store, CORRUPT)
    batches = []
    with pytest.raises(CorruptDataError) as stopped:
        for batch in stream(store):
            batches.append(batch)
    message = str(stopped.value)
    assert f"shard {CORRUPT} of trajectory store {store}" in message
    assert f"`python -m storage_schema validate {store} --deep`" in message
    assert "stream.on_corrupt_shard=skip" in message and "write_shard" not in message
    assert CORRUPT not in shards_in(batches)


def test_a_dataloader_worker_passes_the_error_on(store):
    """With num_workers = 1 the worker's CorruptDataError reaches the training process with its message."""
    break_chunk(store, CORRUPT)
    cfg = StreamConfig(urls=(str(store),), batch_per_process=8, shuffle_buffer=32, num_workers=1)
    with pytest.raises(CorruptDataError, match=f"shard {CORRUPT} of trajectory store"):
        for _ in TrajectoryStream(cfg, rank=0, world_size=1):
            pass


def test_skip_leaves_the_corrupt_shard_out_and_reports_it(store):
    """on_corrupt_shard=skip: checked at start, left out of every epoch, reported; a checkpoint that used it is not."""
    intact = stream(store)
    position = iter(intact)
    for _ in range(3):
        next(position)
    checkpointed = intact.state_dict()  # its pool holds every shard
    rewrite_behind_commit(store, CORRUPT)
    with pytest.warns(CorruptShardWarning, match=f"skipping corrupt shard {CORRUPT}"):
        skipping = stream(store, on_corrupt_shard="skip")
    assert [(entry["shard"], entry["url"]) for entry in skipping.skipped_shards] == [(CORRUPT, str(store))]
    assert "no longer matches its commit digest" in skipping.skipped_shards[0]["problem"]
    assert skipping.log_values() == {"corrupt_shards_skipped": 1}
    assert skipping.describe()["corrupt_shards_skipped"] == skipping.skipped_shards
    two_epochs = [batch for batch, _ in zip(skipping, range(2 * skipping.batches_per_epoch()))]
    assert shards_in(two_epochs) == {0, 1, 3}
    assert stream(store).log_values() == {}  # error mode logs nothing extra
    with pytest.raises(StreamStateError, match=f"trained on shard {CORRUPT} .* which is corrupt now"):
        skipping.load_state_dict(checkpointed)


# -------------------------------------------------------------------------------------------------------------
# Training: the CLI stops with the fix named, checkpoints stay, resume after regenerating; skip in-process


def mid_args(pristine, url: Path, output_dir: Path, *extra: str) -> list[str]:
    """Overrides of the tiny mid-training preset for this store."""
    return [f"teacher={pristine['teacher']}", f"stores=[{url}]", f"loop.output_dir={output_dir}", *extra]


@pytest.mark.slow  # three training runs, one a CLI subprocess: 126 s on the 2-core machine at load 12
def test_mid_training_cli_stops_at_a_corrupt_shard_and_resumes_after_it_is_regenerated(pristine, store, tmp_path):
    """Checkpoint at step 3 on the intact store; a damaged shard stops the CLI run (exit 2, fix named) with that
    checkpoint byte-identical; after validate --uncommit-corrupt and regeneration the same command resumes from it
    and ends with the weights of an uninterrupted run."""
    output_dir, reference_dir = tmp_path / "run", tmp_path / "reference"
    constant_lr = "loop.lr_schedule=constant"  # so a 3-step first run is the first 3 steps of a 12-step one
    steps = ("loop.total_steps=12", "loop.checkpoint_every_steps=3", constant_lr)
    run_mid(load_config(MidConfig, MID_PRESET, mid_args(pristine, pristine["store"], reference_dir, *steps)))
    run_mid(load_config(MidConfig, MID_PRESET, mid_args(pristine, store, output_dir, "loop.total_steps=3", constant_lr)))
    assert [step for step, _ in complete_checkpoints(output_dir)] == [3]
    checkpoint_before = tree_digest(output_dir / "checkpoints" / "step_3")

    break_chunk(store, CORRUPT)
    command = [sys.executable, "trainer/mid.py", "--config", str(MID_PRESET),
               *mid_args(pristine, store, output_dir, *steps)]
    stopped = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert f"shard {CORRUPT} of trajectory store {store} is corrupt" in stopped.stderr
    assert f"`python -m storage_schema validate {store} --deep`" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert tree_digest(output_dir / "checkpoints" / "step_3") == checkpoint_before
    assert max(step for step, _ in complete_checkpoints(output_dir)) < 12  # it stopped before the end

    assert storage_cli(["validate", str(store), "--deep", "--uncommit-corrupt"]) == 1
    regenerate(pristine["teacher"], store, CORRUPT)
    newest = max(step for step, _ in complete_checkpoints(output_dir))  # 3, or 6 if the shard was met after step 6
    resumed = run_mid(load_config(MidConfig, MID_PRESET, mid_args(pristine, store, output_dir, *steps)))
    reference = json.loads((reference_dir / "ranks" / "rank_0.json").read_text())
    assert resumed.loop.start_step == newest and resumed.loop.final_step == 12
    assert resumed.rank_report["parameter_sha256"] == reference["parameter_sha256"]


def test_mid_training_with_skip_trains_without_the_shard_and_reports_it(pristine, store, tmp_path):
    """stream.on_corrupt_shard=skip: the run finishes, metrics.jsonl and the rank report name the skipped shard."""
    rewrite_behind_commit(store, CORRUPT)
    overrides = mid_args(pristine, store, tmp_path / "run", "stream.on_corrupt_shard=skip", "loop.total_steps=20")
    with pytest.warns(CorruptShardWarning):
        result = run_mid(load_config(MidConfig, MID_PRESET, overrides))
    assert result.loop.final_step == 20
    logged = [record for record in RunDir(tmp_path / "run").read_metrics() if "loss" in record]
    assert len(logged) == 20 and all(record["corrupt_shards_skipped"] == 1 for record in logged)
    report = json.loads((tmp_path / "run" / "ranks" / "rank_0.json").read_text())
    assert [(entry["url"], entry["shard"]) for entry in report["corrupt_shards_skipped"]] == [(str(store), CORRUPT)]
    chunks_per_shard = SHARD_SIZE // open_store(str(store)).spec.chunk_size
    read = {chunk // chunks_per_shard for epoch in report["chunks_read"].values() for _, chunk in epoch}
    assert read == {0, 1, 3}  # 20 steps = more than one epoch of the 3 intact shards


def test_post_training_from_a_store_stops_at_a_corrupt_shard(pristine, store, tmp_path):
    """ECT on the store's endpoints meets the damaged shard: CorruptDataError naming store, shard and command."""
    break_chunk(store, CORRUPT)
    cfg = load_config(PostConfig, POST_PRESET, [f"teacher={pristine['teacher']}", f"data=store:{store}",
                                                f"loop.output_dir={tmp_path / 'post'}", "loop.total_steps=8"])
    with pytest.raises(CorruptDataError, match=f"shard {CORRUPT} of trajectory store {store} is corrupt"):
        run_post(cfg)
