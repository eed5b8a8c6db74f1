"""`GenerationSpec`: the exact recipe of a trajectory store, its canonical JSON and its cache key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage_schema.errors import InvalidSpecError, ShardIndexError

SCHEMA_VERSION = 2  # 2: the clean endpoints also stored apart (`endpoint`), so endpoint readers skip trajectories
CACHE_KEY_HEX_CHARS = 20
STORAGE_DTYPES = ("float16", "float32")
TEACHER_PRECISIONS = ("fp32", "tf32", "bf16", "fp16")  # what the teacher network computed in
DEFAULTS_LEFT_OUT_OF_KEY = {"teacher_precision": "fp32"}  # fields added within v2: keys of earlier (fp32) stores hold
CODECS = ("zstd", "blosc-zstd-shuffle", "blosc-lz4-shuffle", "blosc-zstd-bitshuffle", "none")
BLOSC_MAX_BUFFER_BYTES = 2**31 - 1


def _as_int(name: str, value: Any) -> int:
    """Return `value` as a Python int, refusing bools, floats and strings."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidSpecError(f"{name} must be an integer, got {value!r} ({type(value).__name__}); pass an int")
    return int(value)


def _as_finite_float(name: str, value: Any) -> float:
    """Return `value` as a finite Python float, refusing bools and strings."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidSpecError(f"{name} must be a number, got {value!r} ({type(value).__name__}); pass a float")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidSpecError(f"{name} must be finite, got {number!r}; pass a finite float")
    return number


def _as_text(name: str, value: Any) -> str:
    """Return `value` if it is a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidSpecError(f"{name} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class GenerationSpec:
    """Everything that determines the bytes of a trajectory store; its hash is the cache key."""

    teacher_fingerprint: str
    sample_shape: tuple[int, ...]
    solver: str
    steps: int
    grid: str
    seed_base: int
    num_trajectories: int
    shard_size: int = 256
    chunk_size: int = 64
    dtype: str = "float16"
    codec: str = "blosc-zstd-shuffle"  # measured best bytes ratio on real trajectories (jobs/bench_generate.py)
    guidance_scale: float | None = None
    num_classes: int | None = None
    prior: str = "gaussian"
    grid_params: tuple[tuple[str, float], ...] = ()
    label_plan: str | None = None
    teacher_precision: str = "fp32"

    def __post_init__(self) -> None:
        """Validate every field and normalise containers/numbers so equal specs hash equally."""
        _as_text("teacher_fingerprint", self.teacher_fingerprint)
        _as_text("solver", self.solver)
        _as_text("grid", self.grid)
        _as_text("prior", self.prior)

        if isinstance(self.sample_shape, (str, bytes)) or not hasattr(self.sample_shape, "__iter__"):
            raise InvalidSpecError(
                f"sample_shape must be a tuple of positive ints such as (3, 32, 32), got {self.sample_shape!r}"
            )
        sample_shape = tuple(_as_int("sample_shape entry", size) for size in self.sample_shape)
        if not sample_shape or any(size < 1 for size in sample_shape):
            raise InvalidSpecError(
                f"sample_shape must be a non-empty tuple of positive ints such as (3, 32, 32), got {self.sample_shape!r}"
            )
        object.__setattr__(self, "sample_shape", sample_shape)

        steps = _as_int("steps", self.steps)
        if steps < 1:
            raise InvalidSpecError(f"steps must be >= 1 (the store holds steps + 1 points), got {steps}")
        object.__setattr__(self, "steps", steps)

        seed_base = _as_int("seed_base", self.seed_base)
        if seed_base < 0:
            raise InvalidSpecError(
                f"seed_base must be >= 0 (sample i is seeded with seed_base + i, and seeds are non-negative), got {seed_base}"
            )
        object.__setattr__(self, "seed_base", seed_base)

        num_trajectories = _as_int("num_trajectories", self.num_trajectories)
        if num_trajectories < 1:
            raise InvalidSpecError(
                f"num_trajectories must be >= 1, got {num_trajectories}; set num_trajectories to how many "
                "trajectories the store should hold"
            )
        object.__setattr__(self, "num_trajectories", num_trajectories)

        shard_size = _as_int("shard_size", self.shard_size)
        chunk_size = _as_int("chunk_size", self.chunk_size)
        if shard_size < 1 or chunk_size < 1:
            raise InvalidSpecError(f"shard_size and chunk_size must be >= 1, got {shard_size} and {chunk_size}")
        if shard_size % chunk_size != 0:
            raise InvalidSpecError(
                f"chunk_size ({chunk_size}) must divide shard_size ({shard_size}); pick e.g. "
                f"chunk_size={math.gcd(shard_size, chunk_size)} or shard_size={-(-shard_size // chunk_size) * chunk_size}"
            )
        object.__setattr__(self, "shard_size", shard_size)
        object.__setattr__(self, "chunk_size", chunk_size)

        if self.dtype not in STORAGE_DTYPES:
            raise InvalidSpecError(f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.codec not in CODECS:
            raise InvalidSpecError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.teacher_precision not in TEACHER_PRECISIONS:
            raise InvalidSpecError(f"teacher_precision must be one of {TEACHER_PRECISIONS}, got {self.teacher_precision!r}")
        chunk_bytes = chunk_size * (steps + 1) * math.prod(sample_shape) * np.dtype(self.dtype).itemsize
        if self.codec.startswith("blosc") and chunk_bytes > BLOSC_MAX_BUFFER_BYTES:
            raise InvalidSpecError(
                f"a chunk of {chunk_bytes} bytes exceeds blosc's 2 GiB buffer limit; lower chunk_size or use codec='zstd'"
            )

        if self.guidance_scale is not None:
            object.__setattr__(self, "guidance_scale", _as_finite_float("guidance_scale", self.guidance_scale))
        if self.num_classes is not None:
            num_classes = _as_int("num_classes", self.num_classes)
            if num_classes < 1:
                raise InvalidSpecError(
                    f"num_classes must be >= 1 for a conditional teacher or None for an unconditional one, got {num_classes}"
                )
            object.__setattr__(self, "num_classes", num_classes)

        object.__setattr__(self, "grid_params", self._normalised_grid_params(self.grid_params))
        if self.label_plan is not None:
            _as_text("label_plan", self.label_plan)
            if self.num_classes is None:
                raise InvalidSpecError(
                    f"label_plan={self.label_plan!r} needs a conditional spec; set num_classes or drop label_plan"
                )

    @staticmethod
    def _normalised_grid_params(grid_params: Any) -> tuple[tuple[str, float], ...]:
        """Return grid parameters as name-sorted (str, float) pairs, refusing duplicates."""
        if isinstance(grid_params, dict):
            grid_params = tuple(grid_params.items())
        try:
            pairs = [(name, value) for name, value in grid_params]
        except (TypeError, ValueError) as error:
            raise InvalidSpecError(
                f"grid_params must be (name, value) pairs such as (('sigma_max', 80.0),), got {grid_params!r}"
            ) from error
        names = [_as_text("grid_params name", name) for name, _ in pairs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise InvalidSpecError(f"grid_params names must be unique, {duplicates} appear more than once")
        return tuple(sorted((name, _as_finite_float(f"grid_params[{name!r}]", value)) for name, value in pairs))

    @property
    def num_points(self) -> int:
        """Points per trajectory: K + 1 (index 0 = prior noise, index K = the clean endpoint)."""
        return self.steps + 1

    @property
    def is_conditional(self) -> bool:
        """True when the store records a class label per trajectory."""
        return self.num_classes is not None

    @property
    def num_shards(self) -> int:
        """Number of shards: ceil(N / shard_size); the last one may be short."""
        return -(-self.num_trajectories // self.shard_size)

    @property
    def num_chunks(self) -> int:
        """Number of chunks along N: ceil(N / chunk_size); the last one may be short."""
        return -(-self.num_trajectories // self.chunk_size)

    def shard_bounds(self, index: int) -> tuple[int, int]:
        """Trajectory range [start, stop) held by shard `index`."""
        index = self._checked_index("shard", index, self.num_shards)
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num_trajectories)

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """Trajectory range [start, stop) held by chunk `index`."""
        index = self._checked_index("chunk", index, self.num_chunks)
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.num_trajectories)

    def shard_chunks(self, index: int) -> range:
        """Chunk indices that make up shard `index`, in order."""
        start, stop = self.shard_bounds(index)
        return range(start // self.chunk_size, -(-stop // self.chunk_size))

    @staticmethod
    def _checked_index(kind: str, index: Any, count: int) -> int:
        """Return `index` as an int in [0, count) or raise ShardIndexError naming the valid range."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ShardIndexError(f"{kind} index must be an int, got {index!r}")
        if not 0 <= int(index) < count:
            raise ShardIndexError(f"{kind} index {int(index)} is out of range; this store has {kind}s 0..{count - 1}")
        return int(index)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["sample_shape"] = list(self.sample_shape)
        data["grid_params"] = [[name, value] for name, value in self.grid_params]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSpec:
        """Rebuild a spec from `to_dict()` output (an optional `schema_version` key is checked and dropped)."""
        if not isinstance(data, dict):
            raise InvalidSpecError(f"a generation spec must be a dict, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise InvalidSpecError(f"spec was written for schema version {version}, this code uses {SCHEMA_VERSION}")
        field_names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - field_names)
        if unknown:
            raise InvalidSpecError(f"unknown generation spec fields {unknown}; known fields are {sorted(field_names)}")
        required = {field.name for field in dataclasses.fields(cls) if field.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise InvalidSpecError(f"generation spec lacks required fields {missing}")
        if "grid_params" in data and isinstance(data["grid_params"], list):
            data["grid_params"] = tuple(tuple(pair) for pair in data["grid_params"])
        return cls(**data)

    def canonical_json(self) -> str:
        """Sorted-key, compact JSON of `to_dict()` plus `schema_version`; the input of the cache key.

        Fields added after stores of this schema version were first written enter only when they differ from their
        default (`DEFAULTS_LEFT_OUT_OF_KEY`), so the keys of stores written before them stay valid.
        """
        fields = {k: v for k, v in self.to_dict().items() if DEFAULTS_LEFT_OUT_OF_KEY.get(k, object()) != v}
        payload = {"schema_version": SCHEMA_VERSION, **fields}
        return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

    def cache_key(self) -> str:
        """First 20 hex characters (80 bits) of sha256(canonical_json())."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()[:CACHE_KEY_HEX_CHARS]

    def differences(self, other: GenerationSpec) -> list[str]:
        """Human-readable 'field: expected X, found Y' lines for every field that differs (self = expected)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{name}: expected {mine[name]!r}, found {theirs[name]!r}" for name in mine if mine[name] != theirs[name]
        ]


def has_url_scheme(url: str) -> bool:
    """True for fsspec URLs such as memory://x or s3://bucket/x; False for plain local paths."""
    return "://" in url


def cache_path(cache_root: str | os.PathLike[str], spec: GenerationSpec) -> str:
    """Store location of `spec` under a cache root: "<cache root>/<cache key>.zarr" (paths and URLs)."""
    if not isinstance(spec, GenerationSpec):
        raise InvalidSpecError(f"cache_path needs a GenerationSpec, got {type(spec).__name__}")
    root = os.fspath(cache_root)
    name = f"{spec.cache_key()}.zarr"
    if has_url_scheme(root):
        return f"{root.rstrip('/')}/{name}"
    return os.path.join(root, name)
