"""Defaults of `pipeline/generate.py` that adapt to the one flag a user typed, and explicit conflicts refused in flag words.

Each flag alone (next to the required --teacher and --num-trajectories) over its valid values goes through the CLI's
--dry-run, which builds the store's spec and, for a new store, the teacher's time grid: it fails exactly where the real
run would before any teacher work. One real run shows the adapted solver grid and chunk size end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffusers import DDPMPipeline, DDPMScheduler

from pipeline.generate import main
from pipeline.config_loader import ConfigError
from pipeline.generate import GenerateError
from pipeline.generate_options import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_GRID,
    DEFAULT_SHARD_SIZE,
    GenerateConfig,
    GenerateOptionError,
)
from pipeline.solver_names import GRIDS, SCHEDULER_GRID_ONLY, SOLVERS
from storage_schema import CODECS, open_store
from tests.helpers import tiny_unet

DEFAULTS = {"solver": "dpmpp-3m", "steps": 16, "grid": DEFAULT_GRID, "shard_size": DEFAULT_SHARD_SIZE,
            "chunk_size": DEFAULT_CHUNK_SIZE, "dtype": "float16", "codec": "blosc-zstd-shuffle", "seed_base": 0}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny DDPM teachers: unconditional and class-conditional (4 classes)."""
    root = tmp_path_factory.mktemp("teachers")
    for name, classes in (("unconditional", None), ("conditional", 4)):
        unet = tiny_unet(num_class_embeds=classes)
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(root / name)
    return {"unconditional": root / "unconditional", "conditional": root / "conditional"}


def _cli(teacher: Path, out: Path, *flags: str) -> list[str]:
    """The required flags, an --out of this test, and the flags under test."""
    return ["--teacher", str(teacher), "--num-trajectories", "40", "--out", str(out), "--no-progress", *flags]


def _notes(stderr: str) -> list[str]:
    """The `note:` lines a run printed on stderr."""
    return [line for line in stderr.splitlines() if line.startswith("note:")]


def _expected(**changes) -> dict:
    """The spec fields every one-flag run is checked on: the defaults, with the changes the flag makes."""
    return {**DEFAULTS, **changes}


def _chunk_for(shard: int) -> int:
    """The chunk size a --shard-size alone must get: the largest divisor of the shard size up to the default."""
    return max(size for size in range(1, min(shard, DEFAULT_CHUNK_SIZE) + 1) if shard % size == 0)


ONE_FLAG = [
    ((), _expected(), 0),
    *[(("--solver", solver), _expected(solver=solver, grid="scheduler" if solver in SCHEDULER_GRID_ONLY else DEFAULT_GRID),
       int(solver in SCHEDULER_GRID_ONLY)) for solver in SOLVERS],
    *[(("--grid", grid), _expected(grid=grid), 0) for grid in GRIDS],
    *[(("--steps", str(steps)), _expected(steps=steps), 0) for steps in (1, 2, 7, 16, 40)],
    (("--sigma-max", "40"), _expected(grid_params=[["sigma_max", 40.0]]), 0),
    (("--sigma-min", "0.05"), _expected(grid_params=[["sigma_min", 0.05]]), 0),
    (("--seed", "1000"), _expected(seed_base=1000), 0),
    *[(("--dtype", dtype), _expected(dtype=dtype), 0) for dtype in ("float16", "float32")],
    *[(("--codec", codec), _expected(codec=codec), 0) for codec in CODECS],
    *[(("--shard-size", str(shard)), _expected(shard_size=shard, chunk_size=_chunk_for(shard)),
       int(_chunk_for(shard) != DEFAULT_CHUNK_SIZE)) for shard in (1, 16, 40, 64, 97, 100, 256, 1000)],
    *[(("--chunk-size", str(chunk)), _expected(shard_size=shard, chunk_size=chunk), int(shard != DEFAULT_SHARD_SIZE))
      for chunk, shard in ((1, 256), (8, 256), (48, 240), (64, 256), (100, 300), (256, 256), (512, 512))],
    *[((flag, value), _expected(), 0) for flag, value in (
        ("--batch-size", "1"), ("--batch-size", "7"), ("--num-workers", "3"), ("--cpus-per-worker", "2"),
        ("--gpus-per-worker", "0.5"), ("--max-task-retries", "0"), ("--ray-address", "127.0.0.1:1"))],
    (("--overwrite",), _expected(), 0),
]


@pytest.mark.parametrize("flags, spec_fields, note_count", ONE_FLAG, ids=lambda value: " ".join(value)
                         if isinstance(value, tuple) else None)
def test_each_flag_alone_runs_and_adapted_defaults_say_so(teachers, tmp_path, capsys, flags, spec_fields, note_count):
    status = main(_cli(teachers["unconditional"], tmp_path / "store.zarr", "--dry-run", *flags))
    printed = capsys.readouterr()
    assert status == 0, printed.err
    spec = json.loads(printed.out)["spec"]
    assert {name: spec[name] for name in spec_fields} == spec_fields
    assert len(_notes(printed.err)) == note_count, printed.err
    assert not (tmp_path / "store.zarr").exists(), "a dry run writes nothing"


@pytest.mark.parametrize("flags, label_plan", [((), "uniform"), (("--labels", "uniform"), "uniform"),
                                               (("--labels", "1,3"), "1,3")])
def test_labels_alone_on_a_conditional_teacher(teachers, tmp_path, capsys, flags, label_plan):
    status = main(_cli(teachers["conditional"], tmp_path / "store.zarr", "--dry-run", *flags))
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert json.loads(printed.out)["spec"]["label_plan"] == label_plan


@pytest.mark.parametrize("teacher, flags, words", [
    ("unconditional", ("--solver", "ddim", "--grid", "logsnr"), "--solver ddim cannot run --grid logsnr"),
    ("unconditional", ("--solver", "ddim", "--grid", "karras"), "--solver ddim cannot run --grid karras"),
    ("unconditional", ("--solver", "ddim", "--sigma-max", "40"), "--sigma-max set the end levels"),
    ("unconditional", ("--grid", "scheduler", "--sigma-min", "0.01"), "drop --sigma-min"),
    ("unconditional", ("--shard-size", "12", "--chunk-size", "8"), "--chunk-size 8 does not divide --shard-size 12"),
    ("unconditional", ("--shard-size", "0"), "--shard-size must be at least 1"),
    ("unconditional", ("--labels", "uniform"), "drop --labels"),
    ("unconditional", ("--guidance", "2"), "drop --guidance"),
    ("conditional", ("--labels", "7"), "--labels '7'"),
])
def test_explicit_conflicts_are_refused_in_flag_words_before_any_work(teachers, tmp_path, capsys, teacher, flags,
                                                                     words):
    status = main(_cli(teachers[teacher], tmp_path / "store.zarr", *flags))
    printed = capsys.readouterr()
    assert status == 1 and words in printed.err, printed.err
    assert "open_store" not in printed.err and "grid='" not in printed.err, "API words on a CLI"
    assert not (tmp_path / "store.zarr").exists()


@pytest.mark.parametrize("preset_text, words", [
    ("solver: ddim\ngrid: karras\n", "--solver ddim cannot run --grid karras"),
    ("solver: dpm\n", "--solver dpm: unknown; choose one of"),
    ("shard_size: 12\nchunk_size: 8\n", "--chunk-size 8 does not divide --shard-size 12"),
    ("steps: 0\n", "--steps must be at least 1"),
    ("steps: many\n", "`steps` must be an integer, got 'many' (from preset"),
    ("gpu_precision: fp64\n", "gpu_precision fp64: unknown"),
    ("labels: a,b\n", "--labels 'a,b': expected 'uniform' or comma-separated class ids"),
])
def test_a_preset_is_checked_as_the_flags_are_before_any_work(teachers, tmp_path, capsys, preset_text, words):
    preset = tmp_path / "preset.yaml"
    preset.write_text(preset_text)
    status = main(_cli(teachers["unconditional"], tmp_path / "store.zarr", "--config", str(preset)))
    printed = capsys.readouterr()
    assert status == 1 and words in printed.err, printed.err
    assert not (tmp_path / "store.zarr").exists()


def test_the_config_type_refuses_options_that_cannot_make_a_job_when_it_is_built():
    with pytest.raises(GenerateOptionError, match="--solver ddim cannot run --grid logsnr") as refused:
        GenerateConfig(teacher="unused", num_trajectories=1, solver="ddim", grid="logsnr")
    assert isinstance(refused.value, GenerateError) and isinstance(refused.value, ConfigError)
    with pytest.raises(GenerateOptionError, match="--num-workers and --batch-size must be at least 1"):
        GenerateConfig(teacher="unused", num_trajectories=1, batch_size=0)


def test_ddim_and_a_shard_size_without_grid_or_chunk_size_generate_a_valid_store(teachers, tmp_path, capsys):
    out = tmp_path / "store.zarr"
    status = main(["--teacher", str(teachers["unconditional"]), "--num-trajectories", "24", "--steps", "4",
                   "--solver", "ddim", "--shard-size", "12", "--batch-size", "12", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert [note.split(",")[0] for note in _notes(printed.err)] == [
        "note: --solver ddim steps only between the teacher's own timesteps",
        "note: --shard-size 12 is not a multiple of the default --chunk-size 64: using --chunk-size 12",
    ]
    store = open_store(str(out))
    assert (store.spec.solver, store.spec.grid, store.spec.shard_size, store.spec.chunk_size) == ("ddim", "scheduler", 12, 12)
    assert store.is_complete and store.validate(deep=True).ok
