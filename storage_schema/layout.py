"""What lies where in a trajectory store, and how its bytes are coded and hashed.

The array names and layouts (`array_layouts`: shape, dtype, chunks, shards, fill values) used both to create and to
validate a store, the codecs, the key of a shard's object, the shard digest of the commit record, and the Zarr
store a URL opens as. See the package docstring (`storage_schema/__init__.py`) for the authoritative layout.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import FsspecStore, LocalStore

from storage_schema.claims import CLAIM_DIR
from storage_schema.spec import GenerationSpec, has_url_scheme

FORMAT_NAME = "cmt-trajectory-store"
INCOMPLETE_FORMAT_NAME = f"{FORMAT_NAME}/creating"
RESERVED_ATTRS = ("format", "schema_version", "spec", "package_version")

TRAJ, ENDPOINT, SEED, LABEL, ALPHA, SIGMA, COMMIT = "traj", "endpoint", "seed", "label", "alpha", "sigma", "commit"
LAYOUT_NAMES = frozenset({"zarr.json", TRAJ, ENDPOINT, SEED, LABEL, ALPHA, SIGMA, COMMIT, CLAIM_DIR})
# An interrupted local write leaves its temporary file: zarr's LocalStore writes `<key stem>.<32 hex>.partial`, then
# renames it over the key.
PARTIAL_SUFFIX = ".partial"
DIGEST_BYTES = 32
COMMIT_RECORD_BYTES = DIGEST_BYTES + 1
COMMITTED_FLAG = 1
DIGEST_DOMAIN = b"cmt-trajectory-shard/v2\x00"
SEED_FILL = -1
LABEL_FILL = -1
BLOSC_LEVEL = 5
ZSTD_LEVEL = 3


def storage_dtype(spec: GenerationSpec) -> np.dtype:
    """Little-endian numpy dtype of the stored trajectory points."""
    return np.dtype(spec.dtype).newbyteorder("<")


def compressors(codec: str, itemsize: int) -> list[Any] | None:
    """Zarr v3 bytes-to-bytes codecs for a codec name; blosc shuffles with the true item size."""
    if codec == "none":
        return None
    if codec == "zstd":
        return [ZstdCodec(level=ZSTD_LEVEL)]
    blosc_settings = {
        "blosc-zstd-shuffle": ("zstd", "shuffle"),
        "blosc-lz4-shuffle": ("lz4", "shuffle"),
        "blosc-zstd-bitshuffle": ("zstd", "bitshuffle"),
    }
    cname, shuffle = blosc_settings[codec]
    return [BloscCodec(cname=cname, clevel=BLOSC_LEVEL, shuffle=shuffle, typesize=itemsize)]


@dataclass(frozen=True)
class ArrayLayout:
    """Shape, dtype, chunking and sharding of one array of the store."""

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    fill_value: Any
    compressed: bool
    dimension_names: tuple[str, ...]


def array_layouts(spec: GenerationSpec) -> dict[str, ArrayLayout]:
    """The one definition of every array of a schema-2 store (used to create and to validate)."""
    n, points, sample_shape = spec.num_trajectories, spec.num_points, spec.sample_shape
    sample_axes = tuple(f"sample_axis_{axis}" for axis in range(len(sample_shape)))
    layouts = {
        TRAJ: ArrayLayout(
            shape=(n, points, *sample_shape),
            dtype=spec.dtype,
            chunks=(spec.chunk_size, points, *sample_shape),
            shards=(spec.shard_size, points, *sample_shape),
            fill_value=float("nan"),
            compressed=True,
            dimension_names=("trajectory", "point", *sample_axes),
        ),
        ENDPOINT: ArrayLayout(
            shape=(n, *sample_shape),
            dtype=spec.dtype,
            chunks=(spec.chunk_size, *sample_shape),
            shards=(spec.shard_size, *sample_shape),
            fill_value=float("nan"),
            compressed=True,
            dimension_names=("trajectory", *sample_axes),
        ),
        SEED: ArrayLayout((n,), "int64", (spec.chunk_size,), (spec.shard_size,), SEED_FILL, True, ("trajectory",)),
        ALPHA: ArrayLayout((points,), "float64", (points,), None, 0.0, False, ("point",)),
        SIGMA: ArrayLayout((points,), "float64", (points,), None, 0.0, False, ("point",)),
        COMMIT: ArrayLayout(
            (spec.num_shards, COMMIT_RECORD_BYTES), "uint8", (1, COMMIT_RECORD_BYTES), None, 0, False,
            ("shard", "record_byte"),
        ),
    }
    if spec.is_conditional:
        layouts[LABEL] = ArrayLayout(
            (n,), "int64", (spec.chunk_size,), (spec.shard_size,), LABEL_FILL, True, ("trajectory",)
        )
    return layouts


def shard_object_key(name: str, layout: ArrayLayout, shard_index: int) -> str:
    """Store key of the object that holds shard `shard_index` of a sharded array ("traj/c/3/0/0/0/0")."""
    return "/".join([name, "c", str(shard_index)] + ["0"] * (len(layout.shape) - 1))


def compute_shard_digest(
    index: int, start: int, stop: int, traj: np.ndarray, seeds: np.ndarray, labels: np.ndarray | None, dtype: np.dtype,
    endpoints: np.ndarray | None = None,
) -> bytes:
    """sha256 over domain tag, (index, start, stop), traj and endpoint bytes in storage dtype, seeds and labels as <i8.

    `endpoints` defaults to traj[:, -1] (what `write_shard` stores); validation passes the decoded array.
    """
    hasher = shard_hasher(index, start, stop)
    hash_values(hasher, traj, dtype)  # [n*(K+1)*prod(S)*itemsize]
    hash_values(hasher, traj[:, -1] if endpoints is None else endpoints, dtype)  # [n*prod(S)*itemsize]
    return finish_digest(hasher, seeds, labels)


def shard_hasher(index: int, start: int, stop: int) -> Any:
    """A sha256 fed the domain tag and (index, start, stop) as three <i8: the head of every shard digest."""
    hasher = hashlib.sha256(DIGEST_DOMAIN)
    hasher.update(np.array([index, start, stop], dtype="<i8").tobytes())
    return hasher


def hash_values(hasher: Any, values: np.ndarray, dtype: np.dtype) -> None:
    """Feed trajectories [n, K+1, *S] or endpoints [n, *S] in storage dtype, C order (consecutive blocks along n hash as
    one array)."""
    hasher.update(np.ascontiguousarray(values, dtype=dtype).reshape(-1).view(np.uint8))  # [n*prod(shape[1:])*itemsize]


def finish_digest(hasher: Any, seeds: np.ndarray, labels: np.ndarray | None) -> bytes:
    """Feed the shard's seeds (and labels) as <i8 and return the digest."""
    hasher.update(np.ascontiguousarray(seeds, dtype="<i8").view(np.uint8))  # [n*8]
    if labels is not None:
        hasher.update(np.ascontiguousarray(labels, dtype="<i8").view(np.uint8))  # [n*8]
    return hasher.digest()


def zarr_store(url: str, *, read_only: bool, storage_options: dict[str, Any] | None) -> Any:
    """The zarr store for a URL: LocalStore for plain paths, FsspecStore for anything with a scheme."""
    if has_url_scheme(url):
        return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)
    return LocalStore(url, read_only=read_only)


def consolidate_metadata(zarr_store: Any) -> None:
    """Write zarr-python's consolidated metadata (one read opens the store; arrays never change after creation)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)
        warnings.filterwarnings("ignore", message=f"Object at {CLAIM_DIR} is not recognized", category=UserWarning)
        zarr.consolidate_metadata(zarr_store)
