"""Creating and opening a trajectory store: what lies at a location, the checks on creation, and the spec check on
opening. `TrajectoryStore` (`storage_schema/store.py`) is what they return.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from typing import Any

import fsspec
import numpy as np
import zarr

from storage_schema.claims import CLAIM_DIR
from storage_schema.errors import InvalidSpecError, NotAStoreError, SchemaVersionError, SpecMismatchError, StoreExistsError
from storage_schema.layout import (
    ALPHA,
    COMMIT,
    FORMAT_NAME,
    INCOMPLETE_FORMAT_NAME,
    LAYOUT_NAMES,
    RESERVED_ATTRS,
    SIGMA,
    array_layouts,
    compressors,
    consolidate_metadata,
    zarr_store,
)
from storage_schema.spec import SCHEMA_VERSION, GenerationSpec
from storage_schema.store import TrajectoryStore

PACKAGE_DIST_NAME = "cmt-pipeline"
UNKNOWN_PACKAGE_VERSION = "0+unknown"


def package_version() -> str:
    """Installed version of the `cmt-pipeline` distribution, or "0+unknown"."""
    try:
        return importlib.metadata.version(PACKAGE_DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN_PACKAGE_VERSION


def _filesystem(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """fsspec filesystem and root path for a URL or plain path (for listing, sizes and deletion)."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _child_names(fs: Any, path: str) -> list[str]:
    """Base names of the entries directly under `path`."""
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))


def _group_attributes(fs: Any, path: str) -> dict[str, Any] | None:
    """Attributes of the Zarr v3 group whose zarr.json lies at `path`, or None when there is none."""
    try:
        with fs.open(f"{path.rstrip('/')}/zarr.json", "rb") as handle:
            metadata = json.loads(handle.read())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
        return None
    if not isinstance(metadata, dict) or metadata.get("node_type") != "group" or metadata.get("zarr_format") != 3:
        return None
    attributes = metadata.get("attributes", {})
    return attributes if isinstance(attributes, dict) else None


def _location_kind(fs: Any, path: str) -> tuple[str, list[str]]:
    """Classify what lies at `path`: absent, empty, claimed (only writer claims: creation under way), store,
    incomplete_store or foreign (with its entries)."""
    if not fs.exists(path):
        return "absent", []
    if fs.isfile(path):
        return "foreign", [path.rstrip("/").rsplit("/", 1)[-1]]
    names = _child_names(fs, path)
    if not names:
        return "empty", []
    if names == [CLAIM_DIR]:
        return "claimed", names
    attributes = _group_attributes(fs, path)
    ours = attributes is not None and attributes.get("format") in (FORMAT_NAME, INCOMPLETE_FORMAT_NAME)
    if ours and set(names) <= LAYOUT_NAMES:
        return ("store" if attributes["format"] == FORMAT_NAME else "incomplete_store"), names
    return "foreign", names


def _checked_schedule(name: str, values: Any, num_points: int) -> np.ndarray:
    """alpha or sigma as a read-only float64[K+1] array of finite, non-negative values."""
    array = np.array(values, dtype=np.float64)
    if array.shape != (num_points,):
        raise InvalidSpecError(
            f"{name} must have shape ({num_points},) (one value per trajectory point, K+1 = steps+1), got {array.shape}"
        )
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise InvalidSpecError(f"{name} must be finite and >= 0 at every point, got {array.tolist()}")
    array.flags.writeable = False
    return array


def _checked_user_attrs(attrs: dict[str, Any] | None) -> dict[str, Any]:
    """User attributes: JSON-serialisable and not using a reserved name."""
    if attrs is None:
        return {}
    if not isinstance(attrs, dict):
        raise InvalidSpecError(f"attrs must be a dict, got {type(attrs).__name__}")
    clashes = sorted(set(attrs) & set(RESERVED_ATTRS))
    if clashes:
        raise InvalidSpecError(f"attrs may not use the reserved names {clashes}; rename them (reserved: {RESERVED_ATTRS})")
    try:
        return json.loads(json.dumps(attrs, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise InvalidSpecError(f"attrs must be JSON-serialisable (no NaN/Inf): {error}") from error


def create_store(
    url: str | os.PathLike[str],
    spec: GenerationSpec,
    alpha: Any,
    sigma: Any,
    *,
    overwrite: bool = False,
    attrs: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> TrajectoryStore:
    """Create an empty schema-2 store for `spec` at `url` and return it opened with mode "r+"."""
    url = os.fspath(url)
    if not isinstance(spec, GenerationSpec):
        raise InvalidSpecError(f"create_store needs a GenerationSpec, got {type(spec).__name__}")
    alpha = _checked_schedule("alpha", alpha, spec.num_points)
    sigma = _checked_schedule("sigma", sigma, spec.num_points)
    user_attrs = _checked_user_attrs(attrs)

    fs, path = _filesystem(url, storage_options)
    kind, names = _location_kind(fs, path)
    if kind == "foreign":
        raise StoreExistsError(foreign_files_message(url, names))
    if kind in ("store", "incomplete_store", "claimed") and not overwrite:
        raise StoreExistsError(
            f"a trajectory store already exists at {url} (or another writer is creating one); open it with "
            "open_or_create_store(url, spec, ...) to join it or open_store(url, 'r+') to add shards, or pass "
            "overwrite=True to delete and recreate it"
        )
    if kind in ("store", "incomplete_store", "claimed"):
        fs.rm(path, recursive=True)
    write_new_store(url, spec, alpha, sigma, user_attrs, storage_options)
    return open_store(url, "r+", expected_spec=spec, storage_options=storage_options)


def foreign_files_message(url: str, names: list[str]) -> str:
    """The refusal to write where files that are not a trajectory store lie."""
    return (
        f"{url} holds files that are not a trajectory store ({', '.join(names[:5])}"
        f"{', ...' if len(names) > 5 else ''}); nothing was changed; choose an empty or new path"
    )


def write_new_store(
    url: str, spec: GenerationSpec, alpha: np.ndarray, sigma: np.ndarray, user_attrs: dict[str, Any],
    storage_options: dict[str, Any] | None,
) -> None:
    """Write the group, arrays, α/σ and consolidated metadata of an empty store where nothing of a store lies yet."""
    final_attrs = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "spec": spec.to_dict(),
        "package_version": package_version(),
        **user_attrs,
    }
    group = zarr.create_group(
        store=zarr_store(url, read_only=False, storage_options=storage_options),
        zarr_format=3,
        attributes={**final_attrs, "format": INCOMPLETE_FORMAT_NAME},
    )
    for name, layout in array_layouts(spec).items():
        itemsize = np.dtype(layout.dtype).itemsize
        group.create_array(
            name,
            shape=layout.shape,
            dtype=layout.dtype,
            chunks=layout.chunks,
            shards=layout.shards,
            compressors=compressors(spec.codec, itemsize) if layout.compressed else None,
            fill_value=layout.fill_value,
            chunk_key_encoding={"name": "default", "separator": "/"},
            dimension_names=layout.dimension_names,
        )
    group[ALPHA][:] = alpha
    group[SIGMA][:] = sigma
    group.attrs.put(final_attrs)
    consolidate_metadata(group.store)


def open_store(
    url: str | os.PathLike[str],
    mode: str = "r",
    *,
    expected_spec: GenerationSpec | None = None,
    storage_options: dict[str, Any] | None = None,
) -> TrajectoryStore:
    """Open an existing store read-only ("r") or for writing shards ("r+"), checking version and spec."""
    url = os.fspath(url)
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' (read) or 'r+' (write shards), got {mode!r}")
    fs, path = _filesystem(url, storage_options)
    if not fs.exists(path):
        raise NotAStoreError(
            f"no trajectory store at {url}: nothing is there; create one with create_store(url, spec, alpha, sigma)"
        )
    attributes = _group_attributes(fs, path)
    if attributes is None or attributes.get("format") not in (FORMAT_NAME, INCOMPLETE_FORMAT_NAME):
        raise NotAStoreError(
            f"{url} is not a trajectory store (no Zarr v3 group with format={FORMAT_NAME!r}); check the path"
        )
    if attributes["format"] == INCOMPLETE_FORMAT_NAME:
        raise NotAStoreError(
            f"creation of the store at {url} did not finish; recreate it with create_store(..., overwrite=True)"
        )
    version = attributes.get("schema_version")
    if version != SCHEMA_VERSION:
        change = (" (version 2 adds the `endpoint` array: the clean endpoints stored apart, so ECT and MeanFlow read "
                  "one point per trajectory instead of decoding all K+1)") if version == 1 else ""
        raise SchemaVersionError(
            f"store at {url} has schema version {version!r}, this code reads version {SCHEMA_VERSION}{change}; "
            "regenerate it by re-running its pipeline/generate.py command (the cache key changes with the version, so "
            "the new store lands beside the old one, which `python -m pipeline.cache rm` removes), or read it with "
            "the cmt-pipeline version that wrote it"
        )
    try:
        spec = GenerationSpec.from_dict(attributes.get("spec"))
    except InvalidSpecError as error:
        raise InvalidSpecError(f"the spec recorded in {url} is invalid: {error}; regenerate the store") from error
    if expected_spec is not None and expected_spec != spec:
        raise SpecMismatchError(
            f"store at {url} was made with another spec: " + "; ".join(expected_spec.differences(spec))
            + "; use the cache path of your spec (cache_path) or regenerate"
        )

    group = zarr.open_group(
        zarr_store(url, read_only=mode == "r", storage_options=storage_options), mode=mode, zarr_format=3
    )
    arrays = {}
    for name, layout in array_layouts(spec).items():
        try:
            array = group[name]
        except KeyError as error:
            raise NotAStoreError(f"store at {url} lacks the array {name!r}; it is damaged, regenerate it") from error
        if tuple(array.shape) != layout.shape or array.dtype != np.dtype(layout.dtype):
            raise NotAStoreError(
                f"array {name!r} in {url} has shape {array.shape} dtype {array.dtype}, the spec needs "
                f"{layout.shape} {layout.dtype}; the store is damaged, regenerate it"
            )
        arrays[name] = array.with_config({"write_empty_chunks": name != COMMIT})
    return TrajectoryStore(url, mode, spec, dict(attributes), arrays, fs, path, storage_options)
