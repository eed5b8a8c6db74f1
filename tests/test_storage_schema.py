"""Trajectory store schema 1: spec and cache key, round trips, reads, validation, CLI, every bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage_schema import (
    CODECS,
    TEACHER_PRECISIONS,
    SCHEMA_VERSION,
    CorruptShardError,
    GenerationSpec,
    InvalidSpecError,
    NotAStoreError,
    ReadOnlyStoreError,
    SchemaVersionError,
    ShardAlreadyCommittedError,
    ShardDataError,
    ShardIndexError,
    ShardNotCommittedError,
    SpecMismatchError,
    StoreExistsError,
    cache_path,
    create_store,
    open_store,
)
from storage_schema.cli import main as cli_main
from tests.helpers import HANG_LIMIT_S

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_spec(**overrides) -> GenerationSpec:
    """A tiny spec: 10 trajectories of 5 points of 1x8x8, shards of 4 (last one short), chunks of 2."""
    fields = dict(
        teacher_fingerprint="sha256:teacher-a",
        sample_shape=(1, 8, 8),
        solver="dpmpp-3m",
        steps=4,
        grid="logsnr",
        seed_base=100,
        num_trajectories=10,
        shard_size=4,
        chunk_size=2,
    )
    fields.update(overrides)
    return GenerationSpec(**fields)


def schedule(spec: GenerationSpec) -> tuple[np.ndarray, np.ndarray]:
    """EDM-like (alpha, sigma) for the spec's K+1 points."""
    return np.ones(spec.num_points), np.geomspace(80.0, 0.002, spec.num_points)


def shard_data(spec: GenerationSpec, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Deterministic float64 trajectories, seeds and labels for one shard (sample i from seed_base + i)."""
    start, stop = spec.shard_bounds(index)
    seeds = spec.seed_base + np.arange(start, stop)  # [n]
    traj = np.stack(
        [np.random.default_rng(int(seed)).standard_normal((spec.num_points, *spec.sample_shape)) for seed in seeds]
    )  # [n, K+1, *S]
    labels = seeds % spec.num_classes if spec.is_conditional else None  # [n]
    return traj, seeds, labels


def fill_store(store, shards=None) -> None:
    """Write the given shards (default: all) with `shard_data`."""
    for index in range(store.num_shards) if shards is None else shards:
        store.write_shard(index, *shard_data(store.spec, index))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (to prove that failed operations changed nothing)."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def memory_url():
    """A fresh memory:// store URL, removed afterwards (the memory filesystem is process-global)."""
    root = f"memory://test-{uuid.uuid4().hex}"
    yield f"{root}/store.zarr"
    fs, path = fsspec.core.url_to_fs(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def filled_store(tmp_path):
    """A complete, unconditional float16 store on local disk."""
    spec = small_spec()
    store = create_store(tmp_path / "store.zarr", spec, *schedule(spec))
    fill_store(store)
    return store


# ---------------------------------------------------------------- spec and cache key

FIELD_CHANGES = {
    "teacher_fingerprint": lambda spec: spec.teacher_fingerprint + "-b",
    "sample_shape": lambda spec: (*spec.sample_shape, 2),
    "solver": lambda spec: spec.solver + "-b",
    "steps": lambda spec: spec.steps + 1,
    "grid": lambda spec: spec.grid + "-b",
    "seed_base": lambda spec: spec.seed_base + 1,
    "num_trajectories": lambda spec: spec.num_trajectories + 1,
    "shard_size": lambda spec: spec.shard_size * 2,
    "chunk_size": lambda spec: 1 if spec.chunk_size != 1 else spec.shard_size,
    "dtype": lambda spec: "float32" if spec.dtype == "float16" else "float16",
    "codec": lambda spec: CODECS[(CODECS.index(spec.codec) + 1) % len(CODECS)],
    "guidance_scale": lambda spec: 1.5 if spec.guidance_scale is None else spec.guidance_scale + 1.0,
    "num_classes": lambda spec: 10 if spec.num_classes is None else spec.num_classes + 1,
    "prior": lambda spec: spec.prior + "-b",
    "grid_params": lambda spec: (*spec.grid_params, ("zz_extra", 1.0)),
    "label_plan": lambda spec: "uniform" if spec.label_plan is None else spec.label_plan + ",0",
    "teacher_precision": lambda spec: TEACHER_PRECISIONS[
        (TEACHER_PRECISIONS.index(spec.teacher_precision) + 1) % len(TEACHER_PRECISIONS)
    ],
}

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    str.strip
)
specs = st.builds(
    lambda chunk, multiple, label_plan, **kw: GenerationSpec(
        chunk_size=chunk,
        shard_size=chunk * multiple,
        label_plan=label_plan if kw["num_classes"] is not None else None,
        **kw,
    ),
    label_plan=st.none() | text,
    chunk=st.integers(1, 32),
    multiple=st.integers(2, 8),
    teacher_fingerprint=text,
    sample_shape=st.lists(st.integers(1, 16), min_size=1, max_size=3).map(tuple),
    solver=text,
    steps=st.integers(1, 40),
    grid=text,
    seed_base=st.integers(0, 2**40),
    num_trajectories=st.integers(1, 10**6),
    dtype=st.sampled_from(["float16", "float32"]),
    codec=st.sampled_from(CODECS),
    guidance_scale=st.none() | st.floats(0, 20, allow_nan=False),
    num_classes=st.none() | st.integers(1, 1000),
    prior=text,
    teacher_precision=st.sampled_from(TEACHER_PRECISIONS),
    grid_params=st.dictionaries(text, st.floats(-100, 100, allow_nan=False), max_size=3).map(
        lambda params: tuple(params.items())
    ),
)


def test_fp32_specs_keep_the_keys_they_had_before_teacher_precision_existed():
    """The default precision is left out of the canonical JSON, so stores written before the field keep their keys."""
    import hashlib

    spec = GenerationSpec(teacher_fingerprint="t", sample_shape=(1, 8, 8), solver="euler", steps=4, grid="logsnr",
                          seed_base=0, num_trajectories=8)
    before = {k: v for k, v in spec.to_dict().items() if k != "teacher_precision"} | {"schema_version": SCHEMA_VERSION}
    old_key = hashlib.sha256(json.dumps(before, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]
    assert spec.cache_key() == old_key
    keys = {dataclasses.replace(spec, teacher_precision=p).cache_key() for p in TEACHER_PRECISIONS}
    assert len(keys) == len(TEACHER_PRECISIONS), "stores made at different precisions never share a key"
    with pytest.raises(InvalidSpecError, match="teacher_precision must be one of"):
        dataclasses.replace(spec, teacher_precision="fp8")


def test_field_change_table_covers_every_spec_field():
    """A new spec field must get a change rule, so the key test below keeps covering every field."""
    assert set(FIELD_CHANGES) == {field.name for field in dataclasses.fields(GenerationSpec)}


@settings(max_examples=40, deadline=None)
@given(spec=specs)
def test_cache_key_same_spec_same_key_any_field_change_new_key(spec):
    """Equal specs (rebuilt from JSON) share key and path; changing any one field changes the key."""
    rebuilt = GenerationSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert rebuilt == spec
    assert rebuilt.cache_key() == spec.cache_key()
    assert cache_path("/cache", rebuilt) == cache_path("/cache", spec) == f"/cache/{spec.cache_key()}.zarr"
    assert len(spec.cache_key()) == 20 and int(spec.cache_key(), 16) >= 0
    for name, change in FIELD_CHANGES.items():
        base = dataclasses.replace(spec, num_classes=3) if name == "label_plan" and not spec.is_conditional else spec
        changed = dataclasses.replace(base, **{name: change(base)})
        assert changed.cache_key() != base.cache_key(), name


def test_equivalent_spec_spellings_share_one_key():
    """Lists vs tuples, int vs float guidance and grid_params order do not change the key."""
    spec = small_spec(guidance_scale=2.0, grid_params=(("sigma_max", 80.0), ("sigma_min", 0.002)))
    spelled_otherwise = small_spec(
        sample_shape=[1, 8, 8], guidance_scale=2, grid_params=(("sigma_min", 0.002), ("sigma_max", 80))
    )
    assert spelled_otherwise == spec
    assert spelled_otherwise.cache_key() == spec.cache_key()
    assert json.loads(spec.canonical_json())["schema_version"] == SCHEMA_VERSION


def test_cache_path_for_urls_and_paths(tmp_path):
    """Local roots use the OS separator; URL roots keep their scheme and lose a trailing slash."""
    spec = small_spec()
    assert cache_path("memory://cache/", spec) == f"memory://cache/{spec.cache_key()}.zarr"
    assert cache_path(tmp_path, spec) == os.path.join(str(tmp_path), f"{spec.cache_key()}.zarr")


def test_spec_geometry():
    """num_shards, shard/chunk bounds and shard_chunks for a short last shard."""
    spec = small_spec()
    assert spec.num_shards == 3 and spec.num_chunks == 5 and spec.num_points == 5
    assert [spec.shard_bounds(index) for index in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert list(spec.shard_chunks(2)) == [4] and spec.chunk_bounds(4) == (8, 10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_trajectories": 0}, "set num_trajectories"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"chunk_size": 3}, "must divide shard_size"),
        ({"dtype": "bfloat16"}, "dtype must be one of"),
        ({"codec": "gzip"}, "codec must be one of"),
        ({"sample_shape": ()}, "sample_shape"),
        ({"sample_shape": (3, 0, 4)}, "sample_shape"),
        ({"seed_base": -1}, "seed_base"),
        ({"teacher_fingerprint": ""}, "teacher_fingerprint"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"num_classes": 0}, "num_classes"),
        ({"steps": True}, "steps must be an integer"),
        ({"grid_params": (("a", 1.0), ("a", 2.0))}, "unique"),
        ({"label_plan": "uniform"}, "set num_classes or drop label_plan"),
    ],
)
def test_invalid_spec_is_refused_with_the_fix(overrides, message):
    """Each invalid field raises InvalidSpecError whose message names the field or the fix."""
    with pytest.raises(InvalidSpecError, match=message):
        small_spec(**overrides)


def test_from_dict_refuses_unknown_and_missing_fields():
    """Typos and missing fields in a recorded spec are reported by name."""
    data = small_spec().to_dict()
    with pytest.raises(InvalidSpecError, match="teacher_fingerprnt"):
        GenerationSpec.from_dict({**data, "teacher_fingerprnt": "x"})
    del data["solver"]
    with pytest.raises(InvalidSpecError, match="solver"):
        GenerationSpec.from_dict(data)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("location", ["disk", "memory"])
@pytest.mark.parametrize("conditional", [False, True])
def test_round_trip(location, conditional, tmp_path, memory_url):
    """Values (after the float16 cast), seeds, labels, alpha/sigma, attrs and describe survive a reopen."""
    url = str(tmp_path / "store.zarr") if location == "disk" else memory_url
    spec = small_spec(num_classes=7 if conditional else None)
    alpha, sigma = schedule(spec)
    store = create_store(url, spec, alpha, sigma, attrs={"teacher_id": "toy", "notes": {"k": [1, 2]}})
    digests = {index: store.write_shard(index, *shard_data(spec, index)) for index in range(spec.num_shards)}

    reopened = open_store(url, expected_spec=spec)
    assert reopened.spec == spec and reopened.mode == "r"
    np.testing.assert_array_equal(reopened.alpha, alpha)
    np.testing.assert_array_equal(reopened.sigma, sigma)
    assert reopened.alpha.dtype == np.float64
    assert reopened.user_attrs == {"teacher_id": "toy", "notes": {"k": [1, 2]}}
    assert reopened.attrs["schema_version"] == SCHEMA_VERSION and reopened.attrs["spec"] == spec.to_dict()
    assert isinstance(reopened.attrs["package_version"], str)
    for index in range(spec.num_shards):
        traj, seeds, labels = shard_data(spec, index)
        shard = reopened.read_shard(index, verify=True)
        assert shard["traj"].dtype == np.float16
        np.testing.assert_array_equal(shard["traj"], traj.astype(np.float16))
        np.testing.assert_array_equal(shard["seed"], seeds)
        if conditional:
            np.testing.assert_array_equal(shard["label"], labels)
        else:
            assert shard["label"] is None
        assert reopened.shard_digest(index) == digests[index]
    assert reopened.committed_shards() == [0, 1, 2] and reopened.missing_shards() == [] and reopened.is_complete

    summary = reopened.describe()
    assert summary["key"] == spec.cache_key() and summary["shards_committed"] == summary["shards_total"] == 3
    assert summary["traj_shape"] == [10, 5, 1, 8, 8] and summary["dtype"] == "float16"
    assert summary["raw_float32_bytes"] == 10 * 5 * 64 * 4
    fs, path = fsspec.core.url_to_fs(url)
    assert summary["bytes_stored"] == fs.du(path, total=True) > 0
    assert summary["compression_ratio"] == pytest.approx(summary["raw_float32_bytes"] / summary["bytes_stored"])
    assert reopened.validate(deep=True).ok


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_codec_and_dtype_round_trips(codec, dtype, memory_url):
    """Each codec/dtype pair stores and returns the exact storage-dtype values."""
    spec = small_spec(codec=codec, dtype=dtype, num_trajectories=4)
    store = create_store(memory_url, spec, *schedule(spec))
    traj, seeds, _ = shard_data(spec, 0)
    store.write_shard(0, traj, seeds)
    stored = open_store(memory_url).read_shard(0)["traj"]
    assert stored.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(stored, traj.astype(dtype))


def test_blosc_shuffle_uses_the_float16_item_size(tmp_path):
    """Blosc shuffles float16 in 2-byte items and int64 seeds in 8-byte items, inside the shard codec."""
    spec = small_spec(codec="blosc-zstd-shuffle")
    create_store(tmp_path / "s.zarr", spec, *schedule(spec))
    for name, itemsize in (("traj", 2), ("seed", 8)):
        metadata = json.loads((tmp_path / "s.zarr" / name / "zarr.json").read_text())
        (sharding,) = metadata["codecs"]
        assert sharding["name"] == "sharding_indexed"
        blosc = [codec for codec in sharding["configuration"]["codecs"] if codec["name"] == "blosc"][0]
        assert blosc["configuration"]["typesize"] == itemsize and blosc["configuration"]["shuffle"] == "shuffle"


def test_each_shard_is_one_object_per_array(filled_store):
    """traj/seed shards are single objects named by shard index; commit records are one object per shard."""
    root = Path(filled_store.url)
    for index in range(filled_store.num_shards):
        assert (root / "traj" / "c" / str(index) / "0" / "0" / "0" / "0").is_file()
        assert (root / "seed" / "c" / str(index)).is_file()
        assert (root / "commit" / "c" / str(index) / "0").is_file()
    assert len(list((root / "traj" / "c").iterdir())) == filled_store.num_shards


def test_raw_array_access_and_consolidated_metadata(filled_store):
    """create_store consolidates metadata; array() exposes the zarr arrays; consolidate() needs mode 'r+'."""
    metadata = json.loads((Path(filled_store.url) / "zarr.json").read_text())
    assert set(metadata["consolidated_metadata"]["metadata"]) >= {"traj", "seed", "alpha", "sigma", "commit"}
    store = open_store(filled_store.url)
    assert store.array("traj").shape == (10, 5, 1, 8, 8) and store.array("traj").shards == (4, 5, 1, 8, 8)
    with pytest.raises(KeyError, match="label"):
        store.array("label")
    before = snapshot(Path(store.url))
    with pytest.raises(ReadOnlyStoreError):
        store.consolidate()
    assert snapshot(Path(store.url)) == before
    open_store(store.url, "r+").consolidate()
    assert open_store(store.url).validate(deep=True).ok


def test_read_points_and_chunks_match_full_arrays(filled_store):
    """read_points across shard borders and read_chunk equal slices of the written data."""
    spec = filled_store.spec
    everything = np.concatenate([shard_data(spec, index)[0] for index in range(spec.num_shards)]).astype(np.float16)
    np.testing.assert_array_equal(filled_store.read_points(3, 9, [0, -1]), everything[3:9][:, [0, 4]])
    np.testing.assert_array_equal(filled_store.read_points(0, 10), everything)
    np.testing.assert_array_equal(filled_store.read_points(5, 6, 2), everything[5:6, 2])
    chunk = filled_store.read_chunk(4, point_indices=[1, 2])
    assert (chunk["start"], chunk["stop"]) == (8, 10)
    np.testing.assert_array_equal(chunk["traj"], everything[8:10][:, [1, 2]])
    np.testing.assert_array_equal(chunk["seed"], spec.seed_base + np.arange(8, 10))
    with pytest.raises(ShardIndexError, match="point_indices"):
        filled_store.read_points(0, 2, [5])
    with pytest.raises(ShardIndexError, match="start < stop"):
        filled_store.read_points(4, 11)


def test_repair_rewrites_a_committed_shard(filled_store):
    """repair=True replaces the data and the digest of a committed shard."""
    store = open_store(filled_store.url, "r+")
    traj, seeds, _ = shard_data(store.spec, 1)
    old_digest = store.shard_digest(1)
    new_digest = store.write_shard(1, traj + 1.0, seeds, repair=True)
    assert new_digest != old_digest and store.shard_digest(1) == new_digest
    np.testing.assert_array_equal(store.read_shard(1, verify=True)["traj"], (traj + 1.0).astype(np.float16))
    assert store.validate(deep=True).ok


def test_partial_store_reports_missing_shards(tmp_path):
    """Uncommitted shards are listed as missing (not problems); reads of them are refused."""
    spec = small_spec()
    store = create_store(tmp_path / "s.zarr", spec, *schedule(spec))
    fill_store(store, shards=[0, 2])
    assert store.committed_shards() == [0, 2] and store.missing_shards() == [1] and not store.is_complete
    report = store.validate(deep=True)
    assert report.ok and report.missing_shards == [1] and report.checked_shards == [0, 2]
    assert store.shard_digest(1) is None
    with pytest.raises(ShardNotCommittedError, match=r"\[1\]"):
        store.read_shard(1)
    with pytest.raises(ShardNotCommittedError):
        store.read_points(2, 6)
    with pytest.raises(ShardNotCommittedError):
        store.read_chunk(2)
    assert np.isnan(store.read_shard(1, require_committed=False)["traj"]).all()
    assert cli_main(["validate", str(tmp_path / "s.zarr"), "--require-complete"]) == 1
    assert cli_main(["validate", str(tmp_path / "s.zarr")]) == 0


# ---------------------------------------------------------------- validation and CLI


def test_flipped_byte_fails_deep_validation_naming_the_shard(filled_store, capsys):
    """One flipped byte in shard 1's object: CLI `validate --deep` exits 1 and names shard 1 only."""
    shard_file = Path(filled_store.url) / "traj" / "c" / "1" / "0" / "0" / "0" / "0"
    content = bytearray(shard_file.read_bytes())
    content[len(content) // 3] ^= 0xFF
    shard_file.write_bytes(bytes(content))

    assert open_store(filled_store.url).validate(deep=False).ok
    completed = subprocess.run(
        [sys.executable, "-m", "storage_schema", "validate", filled_store.url, "--deep"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_LIMIT_S,
    )
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "shard 1:" in completed.stdout and "shard 0:" not in completed.stdout

    assert cli_main(["validate", filled_store.url, "--deep", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and all(problem.startswith("shard 1:") for problem in report["problems"])
    reopened = open_store(filled_store.url)
    with pytest.raises(CorruptShardError, match="shard"):
        reopened.read_shard(1, verify=True)
    np.testing.assert_array_equal(reopened.read_shard(0)["traj"], shard_data(reopened.spec, 0)[0].astype(np.float16))


def test_deep_validation_reports_non_finite_values(tmp_path):
    """The store keeps what it is given; deep validation names the shard holding NaN/Inf."""
    spec = small_spec()
    store = create_store(tmp_path / "s.zarr", spec, *schedule(spec))
    fill_store(store)
    traj, seeds, _ = shard_data(spec, 2)
    traj[0, 0, 0, 0, 0] = np.nan
    traj[1, 3, 0, 1, 1] = 1e6  # overflows float16 to inf
    with np.errstate(over="ignore"):
        store.write_shard(2, traj, seeds, repair=True)
    report = store.validate(deep=True)
    assert report.problems == ["shard 2: 2 non-finite values (NaN/Inf) in traj"]
    assert store.validate(deep=False).ok


def test_shallow_validation_finds_a_committed_shard_without_data(filled_store):
    """Deleting a committed shard's object is found without decoding anything."""
    (Path(filled_store.url) / "seed" / "c" / "2").unlink()
    report = open_store(filled_store.url).validate()
    assert not report.ok and report.problems == ["shard 2: committed but its object 'seed/c/2' is missing"]


def test_cli_describe_text_and_json(filled_store, capsys):
    """describe prints the key and progress; --json gives the describe() dict."""
    assert cli_main(["describe", filled_store.url]) == 0
    text = capsys.readouterr().out
    assert filled_store.key in text and "3/3 committed" in text
    assert cli_main(["describe", filled_store.url, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["key"] == filled_store.key and summary["num_trajectories"] == 10


def test_cli_on_a_path_that_is_not_a_store_exits_non_zero(tmp_path, capsys):
    """Both commands exit 2 with the error type on a path that holds no store."""
    assert cli_main(["describe", str(tmp_path / "nothing")]) == 2
    assert "NotAStoreError" in capsys.readouterr().err
    assert cli_main(["validate", str(tmp_path), "--deep", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"] == "NotAStoreError"


# ---------------------------------------------------------------- bad inputs leave data unchanged


def test_open_nothing_is_not_a_store_and_creates_nothing(tmp_path, memory_url):
    """A missing path raises NotAStoreError in both modes and no directory appears."""
    for url in (str(tmp_path / "missing.zarr"), memory_url):
        for mode in ("r", "r+"):
            with pytest.raises(NotAStoreError, match="create_store"):
                open_store(url, mode)
    assert not (tmp_path / "missing.zarr").exists()
    fs, path = fsspec.core.url_to_fs(memory_url)
    assert not fs.exists(path)


def test_open_foreign_directory_or_zarr_group_is_not_a_store(tmp_path):
    """User files or a plain Zarr group are not trajectory stores and stay untouched."""
    import zarr

    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "thesis.txt").write_text("precious")
    zarr.create_group(str(tmp_path / "plain.zarr"), attributes={"hello": 1})
    for root in (user_dir, tmp_path / "plain.zarr"):
        before = snapshot(root)
        with pytest.raises(NotAStoreError, match="not a trajectory store"):
            open_store(root, "r+")
        assert snapshot(root) == before


@pytest.mark.parametrize(("version", "says"), [(1, "adds the `endpoint` array.*pipeline/generate.py"),
                                               (3, "reads version 2; regenerate")])
def test_other_schema_version_is_refused(filled_store, version, says):
    """A store of schema version 1 (before `endpoint`) or 3 raises SchemaVersionError naming the fix, unmodified."""
    root = Path(filled_store.url)
    metadata = json.loads((root / "zarr.json").read_text())
    metadata["attributes"]["schema_version"] = version
    (root / "zarr.json").write_text(json.dumps(metadata))
    before = snapshot(root)
    with pytest.raises(SchemaVersionError, match=f"schema version {version}.*{says}"):
        open_store(root, "r+")
    assert snapshot(root) == before


def test_endpoints_are_the_last_trajectory_points_and_read_alone(filled_store):
    """`endpoint` holds traj[:, K] bytewise; read_endpoints returns it (and labels) without the trajectories."""
    spec = filled_store.spec
    traj = filled_store.read_trajectories(0, spec.num_trajectories)["traj"]  # [N, K+1, *S]
    endpoints = filled_store.read_endpoints(0, spec.num_trajectories)
    assert endpoints["endpoint"].shape == (spec.num_trajectories, *spec.sample_shape)
    assert np.array_equal(endpoints["endpoint"], traj[:, -1]) and set(endpoints) == {"endpoint", "label"}
    assert filled_store.array("endpoint").chunks == (spec.chunk_size, *spec.sample_shape)


def test_spec_mismatch_lists_the_differing_fields(filled_store):
    """Another teacher fingerprint is named with expected and found values."""
    before = snapshot(Path(filled_store.url))
    other = dataclasses.replace(filled_store.spec, teacher_fingerprint="sha256:teacher-b", steps=8)
    with pytest.raises(SpecMismatchError) as raised:
        open_store(filled_store.url, "r+", expected_spec=other)
    message = str(raised.value)
    assert "teacher_fingerprint: expected 'sha256:teacher-b', found 'sha256:teacher-a'" in message
    assert "steps: expected 8, found 4" in message and "solver" not in message
    assert snapshot(Path(filled_store.url)) == before


def test_shard_index_out_of_range(filled_store):
    """Writing or reading shard 3 of 3 (or -1) raises ShardIndexError and changes nothing."""
    store = open_store(filled_store.url, "r+")
    before = snapshot(Path(store.url))
    traj, seeds, _ = shard_data(store.spec, 2)
    for index in (3, -1):
        with pytest.raises(ShardIndexError, match="0..2"):
            store.write_shard(index, traj, seeds)
        with pytest.raises(ShardIndexError):
            store.read_shard(index)
    with pytest.raises(ShardIndexError):
        store.shard_digest(3)
    assert snapshot(Path(store.url)) == before


def _bad_shard_inputs(spec):
    """(description, traj, seeds, labels, message) cases that write_shard must refuse for shard 1."""
    traj, seeds, labels = shard_data(spec, 1)
    cases = [
        ("too few trajectories", traj[:3], seeds[:3], None if labels is None else labels[:3], r"shape \(4, 5, 1, 8, 8\)"),
        ("wrong sample shape", traj[..., :4], seeds, labels, r"shape \(4, 5, 1, 8, 8\)"),
        ("missing point", traj[:, :4], seeds, labels, "steps\\+1 points"),
        ("integer traj", traj.astype(np.int32), seeds, labels, "must be a float array"),
        ("seeds too short", traj, seeds[:2], labels, "must be 4 integers"),
        ("float seeds", traj, seeds.astype(np.float64), labels, "must be 4 integers"),
        ("seeds of other samples", traj, seeds + 1, labels, "seed_base \\+ i"),
    ]
    if spec.is_conditional:
        cases += [
            ("labels missing", traj, seeds, None, "pass the 4 class labels"),
            ("labels out of range", traj, seeds, labels + spec.num_classes, r"\[0, 5\)"),
            ("labels wrong length", traj, seeds, labels[:1], "labels for shard 1 must be 4 integers"),
        ]
    else:
        cases.append(("labels for unconditional", traj, seeds, np.zeros(4, dtype=np.int64), "unconditional"))
    return cases


@pytest.mark.parametrize("conditional", [False, True])
def test_wrong_shard_data_is_refused_and_changes_nothing(tmp_path, conditional):
    """Every malformed shard raises ShardDataError; the committed shard 1 keeps its bytes and digest."""
    spec = small_spec(num_classes=5 if conditional else None)
    store = create_store(tmp_path / "s.zarr", spec, *schedule(spec))
    fill_store(store)
    before, digest = snapshot(tmp_path / "s.zarr"), store.shard_digest(1)
    for description, traj, seeds, labels, message in _bad_shard_inputs(spec):
        with pytest.raises(ShardDataError, match=message):
            store.write_shard(1, traj, seeds, labels, repair=True)
    assert snapshot(tmp_path / "s.zarr") == before and store.shard_digest(1) == digest


def test_write_through_read_only_store_is_refused(filled_store):
    """mode 'r' refuses write_shard with ReadOnlyStoreError naming mode 'r+'."""
    store = open_store(filled_store.url, "r")
    before = snapshot(Path(store.url))
    with pytest.raises(ReadOnlyStoreError, match="mode='r\\+'"):
        store.write_shard(0, *shard_data(store.spec, 0), repair=True)
    assert snapshot(Path(store.url)) == before


def test_rewriting_a_committed_shard_needs_repair(filled_store):
    """Without repair=True a committed shard is not overwritten."""
    store = open_store(filled_store.url, "r+")
    before = snapshot(Path(store.url))
    traj, seeds, _ = shard_data(store.spec, 0)
    with pytest.raises(ShardAlreadyCommittedError, match="repair=True"):
        store.write_shard(0, traj * 2, seeds)
    assert snapshot(Path(store.url)) == before


def test_create_over_existing_store_needs_overwrite(filled_store):
    """create_store refuses an existing store unless overwrite=True, which replaces it."""
    root = Path(filled_store.url)
    spec = filled_store.spec
    before = snapshot(root)
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        create_store(root, spec, *schedule(spec))
    assert snapshot(root) == before
    fresh = create_store(root, spec, *schedule(spec), overwrite=True)
    assert fresh.committed_shards() == [] and fresh.missing_shards() == [0, 1, 2]


def test_create_never_deletes_user_files_even_with_overwrite(tmp_path, memory_url):
    """A directory holding other files (or a store with extra user files) is refused even with overwrite."""
    spec = small_spec()
    user_dir = tmp_path / "results"
    user_dir.mkdir()
    (user_dir / "table.csv").write_text("a,b\n1,2\n")
    store_with_extra = tmp_path / "store.zarr"
    fill_store(create_store(store_with_extra, spec, *schedule(spec)))
    (store_with_extra / "README.md").write_text("my notes")
    for root in (user_dir, store_with_extra):
        before = snapshot(root)
        with pytest.raises(StoreExistsError, match="not a trajectory store"):
            create_store(root, spec, *schedule(spec), overwrite=True)
        assert snapshot(root) == before
    with fsspec.open(f"{memory_url}/keep.txt", "w") as handle:
        handle.write("keep")
    with pytest.raises(StoreExistsError):
        create_store(memory_url, spec, *schedule(spec), overwrite=True)
    with fsspec.open(f"{memory_url}/keep.txt", "r") as handle:
        assert handle.read() == "keep"


def test_unfinished_creation_is_not_opened_but_can_be_replaced(filled_store):
    """A store whose creation did not finish is refused by open_store and replaced with overwrite=True."""
    root = Path(filled_store.url)
    metadata = json.loads((root / "zarr.json").read_text())
    metadata["attributes"]["format"] = "cmt-trajectory-store/creating"
    (root / "zarr.json").write_text(json.dumps(metadata))
    with pytest.raises(NotAStoreError, match="did not finish"):
        open_store(root)
    with pytest.raises(StoreExistsError):
        create_store(root, filled_store.spec, *schedule(filled_store.spec))
    assert create_store(root, filled_store.spec, *schedule(filled_store.spec), overwrite=True).validate().ok


@pytest.mark.parametrize(
    ("alpha", "sigma", "attrs", "message"),
    [
        (np.ones(4), np.ones(5), None, r"alpha must have shape \(5,\)"),
        (np.ones(5), np.array([1, 1, np.inf, 1, 1]), None, "sigma must be finite"),
        (np.ones(5), np.ones(5), {"spec": "mine"}, "reserved"),
        (np.ones(5), np.ones(5), {"bad": object()}, "JSON-serialisable"),
    ],
)
def test_create_refuses_bad_schedule_or_attrs_before_writing(tmp_path, alpha, sigma, attrs, message):
    """Schedules of the wrong length or with Inf and unusable attrs fail before anything is written."""
    with pytest.raises(InvalidSpecError, match=message):
        create_store(tmp_path / "s.zarr", small_spec(), alpha, sigma, attrs=attrs)
    assert not (tmp_path / "s.zarr").exists()


def test_storage_schema_imports_neither_torch_nor_ray_nor_trainer():
    """The schema package stays importable without the heavy or downstream packages."""
    script = (
        "import sys, storage_schema, storage_schema.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'trainer', 'pipeline'}))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_LIMIT_S
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def _first_shard_checksum(store) -> float:
    """Sum of shard 0's trajectories in float64 (run in a child process)."""
    return float(store.read_shard(0, verify=True)["traj"].astype(np.float64).sum())


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_store_is_usable_in_worker_processes(filled_store, start_method):
    """A store handed to a forked or spawned worker (pickled and reopened) reads the same data."""
    import multiprocessing
    import pickle

    clone = pickle.loads(pickle.dumps(filled_store))
    assert clone.url == filled_store.url and clone.spec == filled_store.spec and clone.mode == filled_store.mode
    expected = _first_shard_checksum(filled_store)
    with multiprocessing.get_context(start_method).Pool(1) as pool:
        assert pool.apply(_first_shard_checksum, (filled_store,)) == expected


def test_opening_for_writing_validating_and_describing_change_nothing(filled_store):
    """open_store('r+'), validate and describe only read."""
    before = snapshot(Path(filled_store.url))
    store = open_store(filled_store.url, "r+")
    assert store.validate(deep=True).ok and store.describe()["complete"]
    assert snapshot(Path(filled_store.url)) == before
