"""Streaming trajectory batches: values in every mode, rank × worker split, exact resume, mixing, every error."""

from __future__ import annotations

import io
import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from storage_schema import GenerationSpec, create_store
from trainer.batches import ResumableBatches
from trainer.config import ConfigError
from trainer.data import (
    READ_BYTES,
    IncompleteStoreError,
    NotEnoughShardsError,
    SampleShapeError,
    StreamConfig,
    StreamError,
    StreamStateError,
    TeacherMismatchError,
    TeacherMismatchWarning,
    TrajectoryStream,
    UnusablePointsWarning,
    make_stream,
)
from trainer.loop import LoopConfig, make_accelerator

SHAPE = (1, 4, 4)


def vp_schedule(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """VP (α² + σ² = 1) levels from σ̃ = 80 down to 0.002, then the clean endpoint (α = 1, σ = 0)."""
    sigma_edm = np.append(np.geomspace(80.0, 0.002, steps), 0.0)  # [K+1]
    alpha = 1.0 / np.sqrt(1.0 + sigma_edm**2)
    return alpha, sigma_edm * alpha


def make_store(
    root: Path,
    name: str,
    *,
    num_trajectories: int = 32,
    shard_size: int = 4,
    chunk_size: int = 2,
    steps: int = 4,
    shape: tuple[int, ...] = SHAPE,
    fingerprint: str = "sha256:teacher-a",
    num_classes: int | None = None,
    schedule: tuple[np.ndarray, np.ndarray] | None = None,
    shards: list[int] | None = None,
    seed_base: int = 0,
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Write a store; return (url, stored traj as float64 [N, K+1, *S], alpha, sigma, labels)."""
    spec = GenerationSpec(
        teacher_fingerprint=fingerprint, sample_shape=shape, solver="dpmpp-3m", steps=steps, grid="logsnr",
        seed_base=seed_base, num_trajectories=num_trajectories, shard_size=shard_size, chunk_size=chunk_size,
        num_classes=num_classes,
    )
    alpha, sigma = schedule if schedule is not None else vp_schedule(steps)
    url = str(root / f"{name}.zarr")
    store = create_store(url, spec, alpha, sigma)
    rng = np.random.default_rng(len(name) + 1000 * steps)
    traj = rng.standard_normal((num_trajectories, steps + 1, *shape)).astype(np.float16)  # [N, K+1, *S]
    labels = rng.integers(0, num_classes, num_trajectories) if num_classes else None  # [N]
    for shard in range(spec.num_shards) if shards is None else shards:
        start, stop = spec.shard_bounds(shard)
        store.write_shard(
            shard, traj[start:stop], seed_base + np.arange(start, stop),
            None if labels is None else labels[start:stop],
        )
    return url, traj.astype(np.float64), alpha, sigma, labels


def config(urls, **overrides) -> StreamConfig:
    """A small stream config: batches of 8, a 16-sample buffer, in-process reading, indices included."""
    fields = {"urls": tuple(urls), "batch_per_process": 8, "shuffle_buffer": 16, "num_workers": 0,
              "include_indices": True}
    fields.update(overrides)
    return StreamConfig(**fields)


def take(stream: TrajectoryStream, count: int) -> list[dict[str, torch.Tensor]]:
    """The next `count` batches of a stream (its iterator closed afterwards)."""
    iterator = iter(stream)
    batches = list(itertools.islice(iterator, count))
    iterator.close()
    return batches


def concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Batches joined along the batch axis as numpy arrays."""
    return {name: torch.cat([batch[name] for batch in batches]).numpy() for name in batches[0]}


def sample_ids(samples: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    """(store, trajectory, point[, point_r]) of each sample."""
    columns = [samples[name] for name in ("store", "index", "point", "point_r") if name in samples]
    return list(zip(*(column.tolist() for column in columns)))


def assert_batches_equal(first: list[dict[str, torch.Tensor]], second: list[dict[str, torch.Tensor]]) -> None:
    """Bitwise equality of two batch sequences (same keys, dtypes and values)."""
    assert len(first) == len(second)
    for one, other in zip(first, second):
        assert one.keys() == other.keys()
        for name in one:
            assert one[name].dtype == other[name].dtype
            assert torch.equal(one[name], other[name]), name


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    """float32 results against a float64 closed form: within float32 rounding."""
    np.testing.assert_allclose(actual, expected, rtol=3e-7, atol=1e-30)


@pytest.fixture
def digits_like(tmp_path):
    """A conditional VP store of 32 trajectories in 8 shards of 4 (chunks of 2), K = 4."""
    return make_store(tmp_path, "vp", num_classes=3)


# values ---------------------------------------------------------------------------------------------------------
def check_values(samples, stores) -> None:
    """Every sample equals the closed-form rescaling of its stored points; stores[s] = (traj, α, σ, labels)."""
    mode_keys = set(samples)
    for position, (traj, alpha, sigma, labels) in enumerate(stores):
        rows = samples["store"] == position
        index, point = samples["index"][rows], samples["point"][rows]
        last = len(alpha) - 1
        x_a = traj[index, point]  # [n, *S]

        def edm(values: np.ndarray, points: np.ndarray, alpha: np.ndarray = alpha) -> np.ndarray:
            """x̃ = x/α of stored states [n, *S] at their points [n]."""
            return values / alpha[points].reshape(-1, 1, 1, 1)

        if "x_t" in mode_keys:
            point_r = samples["point_r"][rows]
            time_key = "sigma" if "sigma" in mode_keys else "sigma_t"
            close(samples["x_t"][rows], edm(x_a, point))
            close(samples[time_key][rows], sigma[point] / alpha[point])
            close(samples["x0"][rows], edm(traj[index, last], np.full_like(point, last)))
            if "x_r" in mode_keys:
                assert np.all(point_r == point + 1)
                close(samples["x_r"][rows], edm(traj[index, point_r], point_r))
                close(samples["sigma_r"][rows], sigma[point_r] / alpha[point_r])
                assert np.all(samples["sigma_t"][rows] > samples["sigma_r"][rows])
            else:
                assert np.all(point_r == last) and np.all(point < last)
                assert np.all(samples["sigma"][rows] > sigma[last] / alpha[last])
        elif "z_t" in mode_keys:
            point_r = samples["point_r"][rows]
            for x_key, t_key, points in (("z_t", "t", point), ("z_r", "r", point_r)):
                total = (alpha[points] + sigma[points]).reshape(-1, 1, 1, 1)  # x_fm = x/(α+σ), τ = σ/(α+σ)
                close(samples[x_key][rows], traj[index, points] / total)
                close(samples[t_key][rows], sigma[points] / (alpha[points] + sigma[points]))
            assert np.all(samples["t"][rows] > samples["r"][rows])
        else:
            assert np.all(point == last)
            close(samples["x0"][rows], edm(x_a, point))
        if labels is not None:
            np.testing.assert_array_equal(samples["labels"][rows], labels[index])
        for name, values in samples.items():
            if name in ("labels", "store", "index", "point", "point_r"):
                assert values.dtype == np.int64
            else:
                assert values.dtype == np.float32


@pytest.mark.parametrize(
    "mode,points_per_trajectory",
    [("cm", 4), ("mf", 10), ("endpoints", 1), ("ecd", 4)],
)
def test_every_mode_gives_the_closed_form_rescaling_of_every_stored_point_once(
    digits_like, mode, points_per_trajectory
):
    """One epoch on one process: the exact conversion of every (trajectory, point[s]) sample exactly once."""
    url, traj, alpha, sigma, labels = digits_like
    stream = TrajectoryStream(config([url], mode=mode, batch_per_process=4), rank=0, world_size=1)
    assert isinstance(stream, ResumableBatches)
    epoch = stream.batches_per_epoch()
    assert epoch == 32 * points_per_trajectory // 4
    batches = take(stream, epoch)
    assert stream.state_dict()["epoch"] == 1 and stream.state_dict()["batch_in_epoch"] == 0
    samples = concat(batches)
    check_values(samples, [(traj, alpha, sigma, labels)])
    ids = sample_ids(samples)
    assert len(ids) == len(set(ids)) == 32 * points_per_trajectory
    assert batches[0]["labels"].shape == (4,)


def test_points_with_equal_time_or_zero_alpha_are_left_out(tmp_path):
    """A repeated level and an α = 0 prior point (flow matching, τ = 1) never appear; α = 0 is warned about."""
    tau = np.array([1.0, 0.7, 0.4, 0.4, 0.1, 0.0])  # flow matching: α = 1 − τ, σ = τ; points 2 and 3 share a time
    url, traj, alpha, sigma, _ = make_store(tmp_path, "fm", steps=5, schedule=(1 - tau, tau))
    for mode, expected_ids in (
        ("cm", {(p, 5) for p in (1, 2, 3, 4)}),
        ("ecd", {(1, 2), (3, 4), (4, 5)}),
        ("mf", {(a, b) for a in range(1, 6) for b in range(a + 1, 6) if tau[a] != tau[b]}),
    ):
        with pytest.warns(UnusablePointsWarning, match=r"points \[0\] have α = 0"):
            stream = TrajectoryStream(config([url], mode=mode, batch_per_process=4), rank=0, world_size=1)
        samples = concat(take(stream, stream.batches_per_epoch()))
        assert {(a, b) for _, _, a, b in sample_ids(samples)} == expected_ids
        check_values(samples, [(traj, alpha, sigma, None)])


def test_subsets_per_trajectory_are_distinct_and_of_the_asked_size(digits_like):
    """points_per_trajectory / pairs_per_trajectory draw that many distinct samples from each trajectory."""
    url, traj, alpha, sigma, labels = digits_like
    for mode, key, size in (("cm", "points_per_trajectory", 2), ("mf", "pairs_per_trajectory", 3)):
        stream = TrajectoryStream(config([url], mode=mode, **{key: size}), rank=0, world_size=1)
        samples = concat(take(stream, stream.batches_per_epoch()))
        check_values(samples, [(traj, alpha, sigma, labels)])
        ids = sample_ids(samples)
        assert len(set(ids)) == len(ids) == 32 * size
        per_trajectory = np.bincount(samples["index"], minlength=32)
        assert np.all(per_trajectory == size)
    first = concat(take(TrajectoryStream(config([url], points_per_trajectory=2), rank=0, world_size=1), 8))
    assert len({(i, p) for _, i, p, _ in sample_ids(first)}) == 64  # the draw really is a subset of 2 of 4


# split over ranks and workers -----------------------------------------------------------------------------------
def test_two_ranks_times_two_workers_read_disjoint_shards_and_cover_the_epoch_once(digits_like):
    """world_size 2 × num_workers 2: each rank's shards are its own and together they cover every sample once."""
    url = digits_like[0]
    seen = []
    for rank in (0, 1):
        stream = TrajectoryStream(config([url], num_workers=2), rank=rank, world_size=2)
        count = stream.batches_per_epoch()
        assert count == 2 * (2 * 4 * 4) // 8  # 2 workers × (2 shards × 4 trajectories × 4 points) / batch 8
        samples = concat(take(stream, count))
        assert stream.state_dict()["epoch"] == 1
        seen.append(samples)
        described = stream.describe()
        assert described["readers"] == 4 and described["shards_per_rank"] == [4, 4]
        assert described["samples_dropped_per_epoch"] == 0
    shards = [set((samples["index"] // 4).tolist()) for samples in seen]
    assert len(shards[0]) == len(shards[1]) == 4 and not shards[0] & shards[1]
    ids = sample_ids(seen[0]) + sample_ids(seen[1])
    assert len(ids) == len(set(ids)) == 32 * 4


def test_uneven_shards_give_every_rank_the_same_number_of_batches(tmp_path):
    """5 shards over 2 ranks: both yield min over readers of ⌊samples/B⌋ batches per epoch; the rest is dropped."""
    url = make_store(tmp_path, "uneven", num_trajectories=18)[0]  # shards of 4, 4, 4, 4, 2
    streams = [TrajectoryStream(config([url]), rank=rank, world_size=2) for rank in (0, 1)]
    counts = {stream.batches_per_epoch(epoch) for stream in streams for epoch in range(4)}
    assert len({stream.batches_per_epoch() for stream in streams}) == 1
    for stream in streams:
        per_rank = stream.describe()["samples_per_rank"]
        assert stream.batches_per_epoch() == min(per_rank) // 8
        assert stream.describe()["samples_dropped_per_epoch"] == 18 * 4 - 2 * stream.batches_per_epoch() * 8
        take(stream, stream.batches_per_epoch())
        assert stream.state_dict()["epoch"] == 1
    assert counts <= {3, 4}


def test_make_stream_takes_rank_and_world_size_from_the_accelerator(digits_like, tmp_path):
    """make_stream: rank/world from the project's Accelerator, expected shape and fingerprint from the caller."""
    loop = LoopConfig(output_dir=str(tmp_path / "run"), total_steps=1, lr=1e-3, checkpoint_every_steps=0,
                      log_every_steps=1, eval_every_steps=0)
    accelerator = make_accelerator(loop)
    stream = make_stream(config([digits_like[0]]), accelerator, expected_fingerprint="sha256:teacher-a",
                         expected_sample_shape=SHAPE)
    assert (stream.rank, stream.world_size) == (accelerator.process_index, accelerator.num_processes)
    assert stream.describe()["world_size"] == accelerator.num_processes
    with pytest.raises(SampleShapeError):
        make_stream(config([digits_like[0]]), accelerator, expected_sample_shape=(3, 4, 4))


def test_make_stream_pins_worker_batches_for_a_cuda_device_only(digits_like):
    """The one constructor turns pin_memory on where it pays: DataLoader workers feeding a CUDA device."""
    with_workers = config([digits_like[0]], num_workers=1)
    assert make_stream(with_workers, rank=0, world_size=1, device="cuda").pin_memory
    assert not make_stream(with_workers, rank=0, world_size=1, device="cpu").pin_memory
    assert not make_stream(config([digits_like[0]]), rank=0, world_size=1, device="cuda").pin_memory  # in-process


# exact resume ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_stream_continues_bitwise_with_the_uninterrupted_batches(digits_like, num_workers):
    """State after n batches → new stream → load_state_dict → the next m batches equal the uninterrupted ones."""
    url = digits_like[0]
    cfg = config([url], num_workers=num_workers, include_indices=False)
    reference_stream = TrajectoryStream(cfg, rank=0, world_size=1)
    per_epoch = reference_stream.batches_per_epoch()
    assert per_epoch == 16
    reference = take(reference_stream, 40)
    for consumed, following in ((5, 14), (16, 3), (21, 12)):  # mid-epoch across a boundary, at one, odd offset
        interrupted = TrajectoryStream(cfg, rank=0, world_size=1)
        assert_batches_equal(take(interrupted, consumed), reference[:consumed])
        buffer = io.BytesIO()
        torch.save(interrupted.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        assert (state["epoch"], state["batch_in_epoch"]) == divmod(consumed, per_epoch)
        resumed = TrajectoryStream(cfg, rank=0, world_size=1)
        resumed.load_state_dict(state)
        assert_batches_equal(take(resumed, following), reference[consumed : consumed + following])


def test_resuming_with_other_settings_is_refused(digits_like):
    """A saved position from another seed or worker count cannot be loaded."""
    url = digits_like[0]
    stream = TrajectoryStream(config([url]), rank=0, world_size=1)
    take(stream, 3)
    state = stream.state_dict()
    for change in ({"seed": 1}, {"num_workers": 1}, {"batch_per_process": 4}):
        other = TrajectoryStream(config([url], **change), rank=0, world_size=1)
        with pytest.raises(StreamStateError, match="other settings"):
            other.load_state_dict(state)
    with pytest.raises(StreamStateError, match="world_size"):
        TrajectoryStream(config([url]), rank=0, world_size=2).load_state_dict(state)


def test_the_saved_shard_pool_is_used_on_resume_even_when_more_shards_were_committed(tmp_path):
    """allow_incomplete: a run resumed after more shards got committed keeps its original pool and batches."""
    url, traj, _, _, _ = make_store(tmp_path, "growing", shards=[0, 1, 2, 3])
    cfg = config([url], allow_incomplete=True, include_indices=True)
    reference = take(TrajectoryStream(cfg, rank=0, world_size=1), 12)
    interrupted = TrajectoryStream(cfg, rank=0, world_size=1)
    take(interrupted, 5)
    state = interrupted.state_dict()
    from storage_schema import open_store

    store = open_store(url, "r+")
    for shard in (4, 5):
        start, stop = store.shard_bounds(shard)
        store.write_shard(shard, traj[start:stop], np.arange(start, stop))
    resumed = TrajectoryStream(cfg, rank=0, world_size=1)
    assert resumed.describe()["shards_in_pool"] == 6
    resumed.load_state_dict(state)
    assert resumed.describe()["shards_in_pool"] == 4
    assert_batches_equal(take(resumed, 7), reference[5:12])


# determinism and mixing -----------------------------------------------------------------------------------------
def test_same_seed_same_batches_other_seed_other_order(digits_like):
    """The batch sequence is a function of the seed."""
    url = digits_like[0]
    first = take(TrajectoryStream(config([url], seed=7), rank=0, world_size=1), 16)
    again = take(TrajectoryStream(config([url], seed=7), rank=0, world_size=1), 16)
    other = take(TrajectoryStream(config([url], seed=8), rank=0, world_size=1), 16)
    assert_batches_equal(first, again)
    first_ids, other_ids = sample_ids(concat(first)), sample_ids(concat(other))
    assert first_ids != other_ids and sorted(first_ids) == sorted(other_ids)


def test_two_stores_form_one_pool_each_converted_with_its_own_schedule(tmp_path):
    """A VP store (K = 4) and an EDM store (K = 6, α = 1) with the same sample shape mix in one epoch."""
    vp = make_store(tmp_path, "vp", num_trajectories=16)
    edm_sigma = np.append(np.geomspace(80.0, 0.002, 6), 0.0)
    edm = make_store(tmp_path, "edm", num_trajectories=8, steps=6, schedule=(np.ones(7), edm_sigma),
                     fingerprint="sha256:teacher-b")
    stream = TrajectoryStream(config([vp[0], edm[0]]), rank=0, world_size=1)
    assert stream.describe()["shards_in_pool"] == 4 + 2
    assert stream.teacher_fingerprints == ("sha256:teacher-a", "sha256:teacher-b")
    samples = concat(take(stream, stream.batches_per_epoch()))
    check_values(samples, [vp[1:], edm[1:]])
    ids = sample_ids(samples)
    assert len(ids) == len(set(ids)) == 16 * 4 + 8 * 6
    mixed_batches = sum(len(set(batch.tolist())) == 2 for batch in samples["store"].reshape(-1, 8))
    assert mixed_batches > 0


# errors ---------------------------------------------------------------------------------------------------------
def test_an_incomplete_store_is_refused_unless_allowed(tmp_path):
    """Uncommitted shards: error naming the fix; allow_incomplete trains on the committed shards only."""
    url = make_store(tmp_path, "partial", shards=[0, 2, 5])[0]
    with pytest.raises(IncompleteStoreError, match=r"3 of 8 shards committed.*allow_incomplete"):
        TrajectoryStream(config([url]), rank=0, world_size=1)
    stream = TrajectoryStream(config([url], allow_incomplete=True), rank=0, world_size=1)
    samples = concat(take(stream, stream.batches_per_epoch()))
    assert set((samples["index"] // 4).tolist()) == {0, 2, 5}
    empty = make_store(tmp_path, "empty", shards=[])[0]
    with pytest.raises(IncompleteStoreError, match="no committed shard"):
        TrajectoryStream(config([empty], allow_incomplete=True), rank=0, world_size=1)


def test_sample_shapes_must_agree_with_each_other_and_with_the_student(tmp_path):
    """Different sample shapes across stores, or from the expected one, are refused."""
    small = make_store(tmp_path, "small")[0]
    wide = make_store(tmp_path, "wide", shape=(1, 4, 8))[0]
    with pytest.raises(SampleShapeError, match="different sample shapes"):
        TrajectoryStream(config([small, wide]), rank=0, world_size=1)
    with pytest.raises(SampleShapeError, match=r"student expects \(3, 4, 4\)"):
        TrajectoryStream(config([small], expected_sample_shape=(3, 4, 4)), rank=0, world_size=1)


def test_another_teachers_store_warns_or_fails_under_strict(digits_like):
    """A fingerprint other than the student's teacher: warning, TeacherMismatchError when strict."""
    url = digits_like[0]
    with pytest.warns(TeacherMismatchWarning, match="teacher-a.*teacher-z"):
        TrajectoryStream(config([url], expected_fingerprint="sha256:teacher-z"), rank=0, world_size=1)
    with pytest.raises(TeacherMismatchError, match="strict"):
        TrajectoryStream(config([url], expected_fingerprint="sha256:teacher-z", strict=True), rank=0, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrajectoryStream(config([url], expected_fingerprint="sha256:teacher-a", strict=True), rank=0, world_size=1)


@pytest.mark.parametrize(("mode", "trajectories", "shard_size", "world_size", "workers", "batch"), [
    ("endpoints", 24, 12, 2, 2, 3),  # 2 shards over 4 readers: shards are split by chunk
    ("cm", 24, 12, 2, 2, 8),
    ("endpoints", 12, 4, 2, 0, 3),  # 3 shards over 2 readers: whole shards would leave one reader a shard short
])
def test_an_epoch_covers_every_trajectory_once_even_with_fewer_shards_than_readers(
    tmp_path, mode, trajectories, shard_size, world_size, workers, batch
):
    """Readers are dealt equal runs of chunks, so one epoch over all ranks yields every sample exactly once."""
    url = make_store(tmp_path, f"few-{mode}", num_trajectories=trajectories, shard_size=shard_size)[0]
    seen = []
    for rank in range(world_size):
        stream = TrajectoryStream(config([url], mode=mode, num_workers=workers, batch_per_process=batch), rank=rank,
                                  world_size=world_size)
        assert stream.describe()["samples_dropped_per_epoch"] == 0
        seen += sample_ids(concat(take(stream, stream.batches_per_epoch())))
        assert stream.state_dict()["epoch"] == 1
    points = 1 if mode == "endpoints" else 4
    assert len(seen) == len(set(seen)) == trajectories * points
    assert {index for _, index, *_ in seen} == set(range(trajectories))


def test_fewer_chunks_than_readers_or_too_few_samples_are_refused(tmp_path):
    """6 chunks over 2 ranks × 4 workers: error naming both counts and the fixes; too large a batch is refused too."""
    url = make_store(tmp_path, "few", num_trajectories=12)[0]
    with pytest.raises(NotEnoughShardsError, match=r"6 committed chunks \(3 shards\) cannot be split over 8 readers"
                                                   r".*num_workers to 3 or less.*smaller chunk_size"):
        TrajectoryStream(config([url], num_workers=4), rank=0, world_size=2)
    with pytest.raises(NotEnoughShardsError, match="batch_per_process=64"):
        TrajectoryStream(config([url], batch_per_process=64), rank=0, world_size=2)


def test_endpoints_mode_reads_the_endpoint_array_for_its_batches_after_the_digest_check(tmp_path, monkeypatch):
    """The digest covers traj and endpoint, so a reader decodes each shard once in the run to check it. A shard within
    one read: that read feeds the batches, in endpoints mode too. A larger shard: endpoints then reads only the
    `endpoint` array (1/17 of the trajectories' bytes) for its batches, cm the trajectories again. From the second
    epoch on no shard is checked again: endpoints reads the endpoint array alone."""
    from jobs.bench_loader import bytes_read_by
    from storage_schema import open_store

    url = make_store(tmp_path, "bytes", num_trajectories=64, shard_size=16, chunk_size=8, steps=16, shape=(3, 16, 16))[0]
    sizes = {name: stored - (Path(url) / name / "zarr.json").stat().st_size  # the shard objects alone
             for name, stored in open_store(url).describe()["bytes_by_array"].items() if name in ("traj", "endpoint")}
    traj_chunk_bytes = 8 * 17 * 3 * 16 * 16 * 2  # a shard is 2 chunks: traj + endpoint exceed this read
    first, second = {}, {}
    for read_bytes in (READ_BYTES, traj_chunk_bytes):
        monkeypatch.setattr("trainer.data.reader.READ_BYTES", read_bytes)
        for mode in ("endpoints", "cm"):
            stream = TrajectoryStream(config([url], mode=mode, batch_per_process=16, shuffle_buffer=0), rank=0,
                                      world_size=1)
            batches = iter(stream)
            epoch = stream.batches_per_epoch()
            first[mode, read_bytes] = bytes_read_by(lambda: [next(batches) for _ in range(epoch)])
            second[mode, read_bytes] = bytes_read_by(lambda: [next(batches) for _ in range(epoch)])
    checked = sizes["traj"] + sizes["endpoint"]  # one decode of every shard for its digest
    margin = sizes["traj"] / 17  # shard indexes, seeds: less than one point per trajectory
    for mode in ("endpoints", "cm"):
        assert checked <= first[mode, READ_BYTES] < checked + margin
    assert checked + sizes["endpoint"] <= first["endpoints", traj_chunk_bytes] < checked + sizes["endpoint"] + margin
    assert first["cm", traj_chunk_bytes] >= checked + sizes["traj"]
    for read_bytes in (READ_BYTES, traj_chunk_bytes):  # the last block read may carry over into the next epoch:
        for mode, name in (("endpoints", "endpoint"), ("cm", "traj")):  # up to one of the 4 shards is not read again
            assert 3 / 4 * sizes[name] <= second[mode, read_bytes] < sizes[name] + margin, (mode, read_bytes)


def test_mixed_conditioning_and_bad_settings_are_refused(tmp_path):
    """Conditional with unconditional stores, and knobs that do not apply to the mode."""
    conditional = make_store(tmp_path, "cond", num_classes=3)[0]
    plain = make_store(tmp_path, "plain")[0]
    with pytest.raises(StreamError, match="class conditioning"):
        TrajectoryStream(config([conditional, plain]), rank=0, world_size=1)
    with pytest.raises(ConfigError, match="pairs_per_trajectory"):
        config([plain], mode="mf", points_per_trajectory=2)
    with pytest.raises(ConfigError, match="<= 4"):
        TrajectoryStream(config([plain], points_per_trajectory=5), rank=0, world_size=1)
    with pytest.raises(ConfigError, match="mode"):
        config([plain], mode="ect")


# worker processes -----------------------------------------------------------------------------------------------
def test_both_worker_transports_deliver_the_same_batches(digits_like, monkeypatch):
    """Batches sent through the pipe (small) and as shared memory (large) arrive bitwise equal."""
    cfg = config([digits_like[0]], num_workers=2)
    through_pipe = take(TrajectoryStream(cfg, rank=0, world_size=1), 6)
    monkeypatch.setattr("trainer.data.transport.SHARED_MEMORY_BYTES", 0)  # forked workers inherit it
    through_shared_memory = take(TrajectoryStream(cfg, rank=0, world_size=1), 6)
    assert_batches_equal(through_pipe, through_shared_memory)
    check_values(concat(through_pipe), [digits_like[1:]])


def test_spawned_workers_reopen_the_stores_and_give_the_same_batches(digits_like):
    """A spawned worker gets the reader by pickling (stores reopen from their URL): same batches as forked ones."""
    forked = take(TrajectoryStream(config([digits_like[0]], num_workers=1), rank=0, world_size=1), 5)
    cfg = config([digits_like[0]], num_workers=1, worker_start_method="spawn")
    spawned = take(TrajectoryStream(cfg, rank=0, world_size=1), 5)
    assert_batches_equal(forked, spawned)
