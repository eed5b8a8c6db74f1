"""`TrajectoryStore`: an opened trajectory store, its per-shard commit protocol, reads, validation and description.

See the package docstring (`storage_schema/__init__.py`) for the authoritative layout; what lies where and how it is
coded and hashed is `storage_schema/layout.py`, creating and opening a store `storage_schema/opening.py`.

Why this file is over 500 lines: it is one class, and the class is the commit protocol. Writing a shard (clear the
commit record, write data, write the digest last), reading only committed shards, uncommitting, verifying a shard
against its digest and validating the whole store all read and write the same commit records under the same
invariants (a shard counts only once its record matches its bytes); split over several files, each half would have
to trust private state of the other.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage_schema.claims import CLAIM_DIR, LEASE_S, ShardClaims
from storage_schema.errors import (
    ClaimLostError,
    CorruptShardError,
    ReadOnlyStoreError,
    ShardAlreadyCommittedError,
    ShardDataError,
    ShardIndexError,
    ShardNotCommittedError,
    StoreBusyError,
)
from storage_schema.layout import (
    ALPHA,
    COMMIT,
    COMMIT_RECORD_BYTES,
    COMMITTED_FLAG,
    DIGEST_BYTES,
    ENDPOINT,
    FORMAT_NAME,
    LABEL,
    PARTIAL_SUFFIX,
    RESERVED_ATTRS,
    SEED,
    SIGMA,
    TRAJ,
    array_layouts,
    compute_shard_digest,
    consolidate_metadata,
    finish_digest,
    hash_values,
    shard_hasher,
    shard_object_key,
    storage_dtype,
    zarr_store,
)
from storage_schema.spec import SCHEMA_VERSION, GenerationSpec

WriteStageHook = Callable[[str, int], None]
_write_stage_hook: WriteStageHook | None = None


def set_write_stage_hook(hook: WriteStageHook | None) -> None:
    """Install a fault-injection hook called as hook(stage, shard) inside write_shard (tests only).

    Stages, in order: "commit_cleared", "traj_written", "data_written", "committed".
    """
    global _write_stage_hook
    _write_stage_hook = hook


def _reach_stage(stage: str, index: int) -> None:
    """Call the fault-injection hook, if any, at one stage of write_shard."""
    if _write_stage_hook is not None:
        _write_stage_hook(stage, index)


def _reopen(
    url: str, mode: str, spec: GenerationSpec, storage_options: dict[str, Any] | None
) -> TrajectoryStore:
    """Unpickling helper: open the same store again (in a worker process, after pickling)."""
    from storage_schema.opening import open_store  # opening.py builds TrajectoryStore objects: imported when called

    return open_store(url, mode, expected_spec=spec, storage_options=storage_options)


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of `TrajectoryStore.validate`: problems found, shards checked, shards not yet committed, and the
    temporary files of interrupted writes (not problems: readers never see them; `remove_partial_files` deletes them)."""

    problems: list[str]
    checked_shards: list[int]
    missing_shards: list[int]
    deep: bool
    partial_files: dict[str, int] = field(default_factory=dict)
    corrupt_shards: list[int] = field(default_factory=list)  # deep: committed shards that fail decoding or checks

    @property
    def ok(self) -> bool:
        """True when no problem was found (missing shards are not problems)."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "ok": self.ok,
            "deep": self.deep,
            "problems": list(self.problems),
            "checked_shards": list(self.checked_shards),
            "missing_shards": list(self.missing_shards),
            "partial_files": dict(self.partial_files),
            "corrupt_shards": list(self.corrupt_shards),
        }


class TrajectoryStore:
    """An opened trajectory store; create with `create_store` or open with `open_store`."""

    def __init__(
        self, url: str, mode: str, spec: GenerationSpec, attrs: dict[str, Any], arrays: dict[str, Any], fs: Any,
        fs_path: str, storage_options: dict[str, Any] | None = None,
    ) -> None:
        """Wrap opened arrays; use `open_store` / `create_store` instead of calling this directly."""
        self.url = url
        self.mode = mode
        self.spec = spec
        self.attrs = attrs
        self._arrays = arrays
        self._fs = fs
        self._fs_path = fs_path.rstrip("/")
        self._storage_options = storage_options
        self._dtype = storage_dtype(spec)
        self.alpha = _readonly(np.asarray(arrays[ALPHA][:], dtype=np.float64))  # [K+1]
        self.sigma = _readonly(np.asarray(arrays[SIGMA][:], dtype=np.float64))  # [K+1]

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle as (url, mode, spec, storage options); unpickling reopens the store (DataLoader workers, Ray)."""
        return _reopen, (self.url, self.mode, self.spec, self._storage_options)

    def __repr__(self) -> str:
        return f"TrajectoryStore({self.url!r}, mode={self.mode!r}, key={self.key!r})"

    @property
    def key(self) -> str:
        """Cache key of the store's spec."""
        return self.spec.cache_key()

    @property
    def num_shards(self) -> int:
        """Number of shards (one writer each)."""
        return self.spec.num_shards

    @property
    def num_chunks(self) -> int:
        """Number of chunks along N (the unit of streaming reads)."""
        return self.spec.num_chunks

    @property
    def user_attrs(self) -> dict[str, Any]:
        """The attributes given to create_store (group attributes minus the reserved ones)."""
        return {name: value for name, value in self.attrs.items() if name not in RESERVED_ATTRS}

    def array(self, name: str) -> Any:
        """The underlying zarr array `name` (traj, seed, label, alpha, sigma, commit), e.g. for dask.from_zarr."""
        if name not in self._arrays:
            raise KeyError(f"no array {name!r} in this store; it has {sorted(self._arrays)}")
        return self._arrays[name]

    def consolidate(self) -> None:
        """Rewrite the consolidated metadata in zarr.json (create_store already does; arrays never change after)."""
        if self.mode != "r+":
            raise ReadOnlyStoreError(f"{self.url} was opened read-only; open it with mode='r+' to consolidate")
        consolidate_metadata(zarr_store(self.url, read_only=False, storage_options=self._storage_options))

    def shard_bounds(self, index: int) -> tuple[int, int]:
        """Trajectory range [start, stop) of shard `index`."""
        return self.spec.shard_bounds(index)

    def claims(self, owner: str | None = None, *, lease_s: float = LEASE_S) -> ShardClaims:
        """The writer claims of this store, seen by writer `owner` (a new one by default); see `storage_schema.claims`."""
        return ShardClaims(self._fs, self._fs_path, owner=owner, lease_s=lease_s)

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """Trajectory range [start, stop) of chunk `index`."""
        return self.spec.chunk_bounds(index)

    def shard_chunks(self, index: int) -> range:
        """Chunk indices inside shard `index`."""
        return self.spec.shard_chunks(index)

    def write_shard(
        self, index: int, traj: Any, seeds: Any, labels: Any = None, *, repair: bool = False,
        claims: ShardClaims | None = None,
    ) -> str:
        """Write shard `index` (data first, commit record last) and return its hex digest.

        With `claims`, the writer must hold the shard's claim when it starts and still hold it right before the commit
        record is written; otherwise ClaimLostError, and the shard stays uncommitted.
        """
        if self.mode != "r+":
            raise ReadOnlyStoreError(
                f"{self.url} was opened read-only; open it with open_store(url, mode='r+') to write shards"
            )
        start, stop = self.spec.shard_bounds(index)
        traj_stored, seeds_stored, labels_stored = self._checked_shard_data(index, start, stop, traj, seeds, labels)
        self._require_claim(index, claims)
        record = self._commit_records(index, index + 1)[0]  # [33]
        if record[DIGEST_BYTES] == COMMITTED_FLAG and not repair:
            raise ShardAlreadyCommittedError(
                f"shard {index} of {self.url} is already committed; pass repair=True to rewrite it"
            )
        if record.any():
            self._arrays[COMMIT][index] = np.zeros(COMMIT_RECORD_BYTES, dtype=np.uint8)
        _reach_stage("commit_cleared", index)
        self._arrays[TRAJ][start:stop] = traj_stored
        self._arrays[ENDPOINT][start:stop] = traj_stored[:, -1]
        _reach_stage("traj_written", index)
        self._arrays[SEED][start:stop] = seeds_stored
        if labels_stored is not None:
            self._arrays[LABEL][start:stop] = labels_stored
        _reach_stage("data_written", index)
        digest = compute_shard_digest(index, start, stop, traj_stored, seeds_stored, labels_stored, self._dtype)
        self._require_claim(index, claims)
        self._arrays[COMMIT][index] = np.frombuffer(digest + bytes([COMMITTED_FLAG]), dtype=np.uint8)
        _reach_stage("committed", index)
        return digest.hex()

    def _require_claim(self, index: int, claims: ShardClaims | None) -> None:
        """Raise ClaimLostError when `claims` no longer holds shard `index` (another writer took it over)."""
        if claims is not None and not claims.holds(str(index)):
            raise ClaimLostError(
                f"shard {index} of {self.url} is claimed by another writer now (this writer's claim looked stale to "
                "it); this writer did not commit it"
            )

    def _checked_shard_data(
        self, index: int, start: int, stop: int, traj: Any, seeds: Any, labels: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Validate one shard's data against the spec and cast it to the storage dtypes."""
        spec, length = self.spec, stop - start
        traj = np.asarray(traj)
        if traj.dtype.kind != "f":
            raise ShardDataError(f"traj for shard {index} must be a float array, got dtype {traj.dtype}; cast it")
        expected_shape = (length, spec.num_points, *spec.sample_shape)
        if traj.shape != expected_shape:
            raise ShardDataError(
                f"traj for shard {index} must have shape {expected_shape} (trajectories {start}..{stop - 1}, "
                f"steps+1 points, sample_shape), got {traj.shape}"
            )
        seeds = np.asarray(seeds)
        if seeds.dtype.kind not in "iu" or seeds.shape != (length,):
            raise ShardDataError(
                f"seeds for shard {index} must be {length} integers, got shape {seeds.shape} dtype {seeds.dtype}"
            )
        expected_seeds = spec.seed_base + np.arange(start, stop, dtype=np.int64)  # [n]
        if not np.array_equal(seeds.astype(np.int64), expected_seeds):
            raise ShardDataError(
                f"seeds for shard {index} must be seed_base + i for i in {start}..{stop - 1} "
                f"({expected_seeds[0]}..{expected_seeds[-1]}); got {seeds[:3].tolist()}...; generate sample i "
                "from seed_base + i"
            )
        if not spec.is_conditional:
            if labels is not None:
                raise ShardDataError(
                    f"the store is unconditional (num_classes=None) but labels were given for shard {index}; "
                    "pass labels=None or create the store with num_classes set"
                )
            return np.ascontiguousarray(traj, dtype=self._dtype), seeds.astype("<i8"), None
        if labels is None:
            raise ShardDataError(
                f"the store is conditional (num_classes={spec.num_classes}); pass the {length} class labels of shard {index}"
            )
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (length,):
            raise ShardDataError(
                f"labels for shard {index} must be {length} integers, got shape {labels.shape} dtype {labels.dtype}"
            )
        if labels.min() < 0 or labels.max() >= spec.num_classes:
            raise ShardDataError(
                f"labels for shard {index} must lie in [0, {spec.num_classes}), got range "
                f"[{labels.min()}, {labels.max()}]"
            )
        return np.ascontiguousarray(traj, dtype=self._dtype), seeds.astype("<i8"), labels.astype("<i8")

    def _commit_records(self, first_shard: int, stop_shard: int) -> np.ndarray:
        """Commit records of shards [first_shard, stop_shard) read fresh from the store; [n, 33] uint8."""
        try:
            return np.asarray(self._arrays[COMMIT][first_shard:stop_shard], dtype=np.uint8)
        except Exception as error:
            raise CorruptShardError(
                f"cannot read the commit records of shards {first_shard}..{stop_shard - 1} in {self.url}: "
                f"{type(error).__name__}: {error}; run `python -m storage_schema validate {self.url}`"
            ) from error

    def _require_committed(self, first_shard: int, stop_shard: int) -> None:
        """Raise ShardNotCommittedError unless every shard in [first_shard, stop_shard) is committed."""
        flags = self._commit_records(first_shard, stop_shard)[:, DIGEST_BYTES]  # [n]
        missing = [first_shard + offset for offset in np.flatnonzero(flags != COMMITTED_FLAG).tolist()]
        if missing:
            raise ShardNotCommittedError(
                f"shards {missing} of {self.url} are not committed (never written or interrupted); generate them "
                "(write_shard) or pass require_committed=False to read whatever bytes are there"
            )

    def _normalised_points(self, point_indices: Any) -> Any:
        """Point selection as a slice, an int or an int64 index array, range-checked against K+1."""
        points = self.spec.num_points
        if point_indices is None:
            return slice(None)
        if isinstance(point_indices, slice):
            return point_indices
        selection = np.asarray(point_indices)
        if selection.dtype.kind not in "iu" or selection.ndim > 1:
            raise ShardIndexError(f"point_indices must be an int, a slice or a 1-D int sequence, got {point_indices!r}")
        if selection.size and (selection.min() < -points or selection.max() >= points):
            raise ShardIndexError(
                f"point_indices {selection.tolist()} out of range; trajectories have {points} points (0..{points - 1})"
            )
        selection = np.where(selection < 0, selection + points, selection).astype(np.int64)
        return int(selection) if selection.ndim == 0 else selection

    def _read_range(
        self, start: int, stop: int, point_indices: Any, *, seeds: bool = True, trajectories: bool = True,
        endpoints: bool = False,
    ) -> dict[str, np.ndarray | None]:
        """traj/seed/label (and endpoint) of trajectories [start, stop), decoding errors raised as CorruptShardError."""
        points = self._normalised_points(point_indices)
        try:
            traj = None
            if trajectories:
                traj = self._arrays[TRAJ].get_orthogonal_selection((slice(start, stop), points))  # [n, P, *S]
            endpoint = self._arrays[ENDPOINT][start:stop] if endpoints else None  # [n, *S]
            seed = self._arrays[SEED][start:stop] if seeds else None  # [n]
            label = self._arrays[LABEL][start:stop] if self.spec.is_conditional else None  # [n]
        except Exception as error:
            first, last = start // self.spec.shard_size, (stop - 1) // self.spec.shard_size
            raise CorruptShardError(
                f"cannot decode trajectories {start}..{stop - 1} (shards {first}..{last}) of {self.url}: "
                f"{type(error).__name__}: {error}; run `python -m storage_schema validate {self.url} --deep` "
                "and rewrite the damaged shards with write_shard(..., repair=True)"
            ) from error
        return {"traj": traj, "seed": seed, "label": label, **({"endpoint": endpoint} if endpoints else {})}

    def read_shard(
        self, index: int, *, require_committed: bool = True, verify: bool = False
    ) -> dict[str, np.ndarray | None]:
        """Shard `index` as dict(traj=[n, K+1, *S], endpoint=[n, *S], seed=[n], label=[n] or None); verify re-checks the
        digest."""
        start, stop = self.spec.shard_bounds(index)
        if require_committed:
            self._require_committed(index, index + 1)
        data = self._read_range(start, stop, None, endpoints=True)
        if verify:
            computed = compute_shard_digest(index, start, stop, data["traj"], data["seed"], data["label"], self._dtype,
                                            data["endpoint"])
            self._check_digest(index, computed)
        return data

    def verify_shard(self, index: int, *, read_bytes: int | None = None) -> None:
        """Decode committed shard `index` and check it against its commit digest (CorruptShardError if it fails).

        Whole chunks are read, at most `read_bytes` of decoded trajectories at a time (None: the whole shard at once),
        then the endpoints in as many trajectories per read, hashed as they arrive, so memory stays at one read whatever
        the shard size.
        """
        start, stop = self.spec.shard_bounds(index)
        spec = self.spec
        chunk_bytes = spec.chunk_size * spec.num_points * math.prod(spec.sample_shape) * self._dtype.itemsize
        rows = spec.shard_size if read_bytes is None else spec.chunk_size * max(1, read_bytes // chunk_bytes)
        hasher = shard_hasher(index, start, stop)
        for first in range(start, stop, rows):
            block = self._read_range(first, min(first + rows, stop), None, seeds=False)["traj"]  # [n, K+1, *S]
            hash_values(hasher, block, self._dtype)
        for first in range(start, stop, rows):
            block = self._read_range(first, min(first + rows, stop), None, seeds=False, trajectories=False,
                                     endpoints=True)["endpoint"]  # [n, *S]
            hash_values(hasher, block, self._dtype)
        ids = self._read_range(start, stop, None, trajectories=False)
        self._check_digest(index, finish_digest(hasher, ids["seed"], ids["label"]))

    def _check_digest(self, index: int, computed: bytes) -> None:
        """Raise unless `computed` is shard `index`'s committed digest (ShardNotCommittedError when there is none)."""
        recorded = self.shard_digest(index)
        if recorded is None:
            raise ShardNotCommittedError(f"shard {index} of {self.url} is not committed: it has no digest to check")
        if recorded != computed.hex():
            raise CorruptShardError(
                f"shard {index} of {self.url} does not match its commit digest (recorded {recorded[:16]}…, computed "
                f"{computed.hex()[:16]}…): its bytes changed after commit; rewrite it with "
                "write_shard(..., repair=True)"
            )

    def uncommit_shard(self, index: int) -> None:
        """Clear shard `index`'s commit record (its objects stay), so a generation re-run writes it again."""
        if self.mode != "r+":
            raise ReadOnlyStoreError(
                f"{self.url} was opened read-only; open it with open_store(url, mode='r+') to uncommit shards"
            )
        self.spec.shard_bounds(index)
        self._arrays[COMMIT][index] = np.zeros(COMMIT_RECORD_BYTES, dtype=np.uint8)

    def read_points(
        self, start: int, stop: int, point_indices: Any = None, *, require_committed: bool = True
    ) -> np.ndarray:
        """traj[start:stop, point_indices] read whole chunks at a time; [n, P, *S] (or [n, *S] for an int)."""
        self._check_range(start, stop, require_committed)
        return self._read_range(int(start), int(stop), point_indices, seeds=False)["traj"]

    def read_trajectories(self, start: int, stop: int, *, require_committed: bool = True) -> dict[str, np.ndarray | None]:
        """traj [n, P, *S] and label [n] (or None) of trajectories [start, stop), no seeds: the streaming read."""
        self._check_range(start, stop, require_committed)
        block = self._read_range(int(start), int(stop), None, seeds=False)
        return {"traj": block["traj"], "label": block["label"]}

    def read_endpoints(self, start: int, stop: int, *, require_committed: bool = True) -> dict[str, np.ndarray | None]:
        """endpoint [n, *S] (= traj[:, K]) and label [n] (or None) of trajectories [start, stop): only the endpoint
        chunks are decoded, 1/(K+1) of the trajectory bytes."""
        self._check_range(start, stop, require_committed)
        block = self._read_range(int(start), int(stop), None, seeds=False, trajectories=False, endpoints=True)
        return {"endpoint": block["endpoint"], "label": block["label"]}

    def _check_range(self, start: int, stop: int, require_committed: bool) -> None:
        """Refuse a range outside the store (and, when asked, one touching an uncommitted shard)."""
        n = self.spec.num_trajectories
        for name, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ShardIndexError(f"{name} must be an int, got {value!r}")
        if not 0 <= start < stop <= n:
            raise ShardIndexError(f"need 0 <= start < stop <= {n} (the store holds {n} trajectories), got {start}, {stop}")
        if require_committed:
            self._require_committed(start // self.spec.shard_size, (stop - 1) // self.spec.shard_size + 1)

    def read_chunk(
        self, index: int, point_indices: Any = None, *, require_committed: bool = True
    ) -> dict[str, np.ndarray | None]:
        """Chunk `index` as dict(traj=[n, P, *S], seed=[n], label=[n] or None, start=int, stop=int)."""
        start, stop = self.spec.chunk_bounds(index)
        if require_committed:
            shard = start // self.spec.shard_size
            self._require_committed(shard, shard + 1)
        return {**self._read_range(start, stop, point_indices), "start": start, "stop": stop}

    def committed_shards(self) -> list[int]:
        """Indices of shards whose commit record is set."""
        flags = self._commit_records(0, self.num_shards)[:, DIGEST_BYTES]  # [num_shards]
        return np.flatnonzero(flags == COMMITTED_FLAG).tolist()

    def missing_shards(self) -> list[int]:
        """Indices of shards not committed yet (never written, interrupted or being repaired)."""
        flags = self._commit_records(0, self.num_shards)[:, DIGEST_BYTES]  # [num_shards]
        return np.flatnonzero(flags != COMMITTED_FLAG).tolist()

    @property
    def is_complete(self) -> bool:
        """True when every shard is committed."""
        return not self.missing_shards()

    def shard_digest(self, index: int) -> str | None:
        """Hex sha256 digest recorded for shard `index`, or None when it is not committed."""
        self.spec.shard_bounds(index)
        record = self._commit_records(index, index + 1)[0]  # [33]
        if record[DIGEST_BYTES] != COMMITTED_FLAG:
            return None
        return record[:DIGEST_BYTES].tobytes().hex()

    def _objects(self) -> tuple[dict[str, int], dict[str, int]]:
        """Sizes in bytes of the store's own objects and of the `*.partial` files of interrupted local writes, keyed by
        path relative to the root, from one fresh listing (writer claims are neither)."""
        prefix = f"{self._fs_path.lstrip('/')}/"
        own, partial = {}, {}
        self._fs.invalidate_cache(self._fs_path)
        for path, info in self._fs.find(self._fs_path, detail=True).items():
            relative = path.lstrip("/").removeprefix(prefix)
            if relative.endswith(PARTIAL_SUFFIX):
                partial[relative] = int(info.get("size") or 0)
            elif relative.split("/", 1)[0] != CLAIM_DIR:
                own[relative] = int(info.get("size") or 0)
        return own, partial

    def partial_files(self) -> dict[str, int]:
        """Temporary files left by interrupted local writes (`*.partial`), relative path → bytes."""
        return self._objects()[1]

    def remove_partial_files(self) -> dict[str, int]:
        """Delete the `*.partial` files and return them; refused (StoreBusyError) while a writer of the store is live."""
        claims = self.claims()
        live = [record for record in claims.records().values() if claims.is_live(record)]
        if live:
            raise StoreBusyError(
                f"{self.url} is being written ({live[0].describe()} holds claim {live[0].name!r}), and its temporary "
                "files may be in use: remove partial files after that writer ends"
            )
        partial = self.partial_files()
        for relative in partial:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(f"{self._fs_path}/{relative}")
        return partial

    def validate(self, deep: bool = False) -> ValidationReport:
        """Check metadata, layout and commit records; deep also re-hashes committed shards and finds NaN/Inf."""
        problems: list[str] = []
        spec = self.spec
        for name, expected in (("format", FORMAT_NAME), ("schema_version", SCHEMA_VERSION)):
            if self.attrs.get(name) != expected:
                problems.append(f"group attribute {name!r} is {self.attrs.get(name)!r}, expected {expected!r}")
        for name in ("package_version",):
            if not isinstance(self.attrs.get(name), str):
                problems.append(f"group attribute {name!r} is missing or not a string")
        problems += self._layout_problems()
        for name, values in (("alpha", self.alpha), ("sigma", self.sigma)):
            if not np.all(np.isfinite(values)) or np.any(values < 0):
                problems.append(f"{name} holds non-finite or negative values: {values.tolist()}")

        try:
            records = self._commit_records(0, self.num_shards)  # [num_shards, 33]
        except CorruptShardError as error:
            return ValidationReport(problems + [str(error)], [], list(range(self.num_shards)), deep)
        flags = records[:, DIGEST_BYTES]  # [num_shards]
        for shard in np.flatnonzero((flags != 0) & (flags != COMMITTED_FLAG)).tolist():
            problems.append(f"shard {shard}: commit record has an invalid flag byte {int(flags[shard])}")
        committed = np.flatnonzero(flags == COMMITTED_FLAG).tolist()
        missing = np.flatnonzero(flags != COMMITTED_FLAG).tolist()
        own, partial = self._objects()
        object_names = set(own)
        layouts = array_layouts(spec)
        sharded = [name for name, layout in layouts.items() if layout.shards is not None]
        for shard in committed:
            for name in sharded:
                key = shard_object_key(name, layouts[name], shard)
                if key not in object_names:
                    problems.append(f"shard {shard}: committed but its object {key!r} is missing")
        corrupt = []
        if deep:
            for shard in committed:
                found = self._deep_shard_problems(shard, records[shard, :DIGEST_BYTES].tobytes())
                problems += found
                corrupt += [shard] if found else []
        return ValidationReport(problems, committed, missing, deep, partial, corrupt)

    def _layout_problems(self) -> list[str]:
        """Differences between the arrays on storage and the layout the spec prescribes."""
        problems = []
        for name, layout in array_layouts(self.spec).items():
            array = self._arrays[name]
            chunks = tuple(array.chunks)
            shards = tuple(array.shards) if array.shards is not None else None
            actual = (tuple(array.shape), str(array.dtype), chunks, shards)
            expected = (layout.shape, layout.dtype, layout.chunks, layout.shards)
            if actual != expected:
                problems.append(
                    f"array {name!r}: (shape, dtype, chunks, shards) is {actual}, the spec prescribes {expected}"
                )
        return problems

    def _deep_shard_problems(self, shard: int, recorded_digest: bytes) -> list[str]:
        """Decode one committed shard and report digest mismatch, NaN/Inf, seed or label violations."""
        start, stop = self.spec.shard_bounds(shard)
        try:
            data = self._read_range(start, stop, None, endpoints=True)
        except CorruptShardError as error:
            return [f"shard {shard}: cannot be decoded ({error.__cause__.__class__.__name__}: {error.__cause__})"]
        problems = []
        computed = compute_shard_digest(shard, start, stop, data["traj"], data["seed"], data["label"], self._dtype,
                                        data["endpoint"])
        if computed != recorded_digest:
            problems.append(
                f"shard {shard}: digest mismatch (recorded {recorded_digest.hex()[:16]}..., computed "
                f"{computed.hex()[:16]}...); its bytes changed after commit, rewrite it with repair=True"
            )
        if not np.array_equal(data["endpoint"], data["traj"][:, -1], equal_nan=True):
            problems.append(f"shard {shard}: endpoint differs from traj[:, K]; rewrite it with repair=True")
        non_finite = int(np.size(data["traj"]) - np.count_nonzero(np.isfinite(data["traj"])))
        if non_finite:
            problems.append(f"shard {shard}: {non_finite} non-finite values (NaN/Inf) in traj")
        expected_seeds = self.spec.seed_base + np.arange(start, stop, dtype=np.int64)  # [n]
        if not np.array_equal(data["seed"], expected_seeds):
            problems.append(f"shard {shard}: seeds are not seed_base + i for i in {start}..{stop - 1}")
        if data["label"] is not None and (data["label"].min() < 0 or data["label"].max() >= self.spec.num_classes):
            problems.append(f"shard {shard}: labels outside [0, {self.spec.num_classes})")
        return problems

    def describe(self) -> dict[str, Any]:
        """Summary: identity, spec, shape, codec, commit progress, bytes stored and compression ratio."""
        spec = self.spec
        committed = self.committed_shards()
        committed_trajectories = sum(stop - start for start, stop in map(spec.shard_bounds, committed))
        sizes = self._objects()[0]
        bytes_by_array: dict[str, int] = {}
        for relative, size in sizes.items():
            top = relative.split("/", 1)[0]
            bytes_by_array[top] = bytes_by_array.get(top, 0) + size
        bytes_stored = sum(sizes.values())
        values_per_trajectory = spec.num_points * math.prod(spec.sample_shape)
        raw_float32_bytes = committed_trajectories * values_per_trajectory * 4
        committed_points = committed_trajectories * spec.num_points
        return {
            "url": self.url,
            "key": self.key,
            "schema_version": self.attrs.get("schema_version"),
            "package_version": self.attrs.get("package_version"),
            "teacher_fingerprint": spec.teacher_fingerprint,
            "solver": spec.solver,
            "grid": spec.grid,
            "num_trajectories": spec.num_trajectories,
            "steps": spec.steps,
            "num_points": spec.num_points,
            "sample_shape": list(spec.sample_shape),
            "traj_shape": [spec.num_trajectories, spec.num_points, *spec.sample_shape],
            "dtype": spec.dtype,
            "codec": spec.codec,
            "conditional": spec.is_conditional,
            "shard_size": spec.shard_size,
            "chunk_size": spec.chunk_size,
            "shards_committed": len(committed),
            "shards_total": spec.num_shards,
            "trajectories_committed": committed_trajectories,
            "complete": len(committed) == spec.num_shards,
            "bytes_stored": bytes_stored,
            "bytes_by_array": dict(sorted(bytes_by_array.items())),
            "raw_float32_bytes": raw_float32_bytes,
            "compression_ratio": raw_float32_bytes / bytes_stored if raw_float32_bytes and bytes_stored else None,
            "traj_bytes_per_point": bytes_by_array.get(TRAJ, 0) / committed_points if committed_points else None,
            "spec": spec.to_dict(),
            "user_attrs": self.user_attrs,
        }


def _readonly(array: np.ndarray) -> np.ndarray:
    """Mark an array read-only and return it."""
    array.flags.writeable = False
    return array
