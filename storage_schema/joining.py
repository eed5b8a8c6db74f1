"""Opening a store that other writers may be creating at the same time: one creates it, the others wait and join.

The creation is claimed like a shard (claim name ``create``, see `storage_schema.claims`). The writer that holds the
claim removes what an interrupted creation left (a store still marked as being created holds no shard data), writes
the empty store and releases the claim; a writer that finds the claim live waits until the store exists; a stale
claim (its writer died) is taken over.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from storage_schema.claims import CLAIM_DIR, CREATE, ClaimRecord, ShardClaims
from storage_schema.errors import InvalidSpecError, SpecMismatchError, StoreExistsError
from storage_schema.opening import (
    _checked_schedule,
    _checked_user_attrs,
    _filesystem,
    _group_attributes,
    _location_kind,
    foreign_files_message,
    open_store,
    write_new_store,
)
from storage_schema.spec import GenerationSpec
from storage_schema.store import TrajectoryStore

POLL_S = 1.0  # how often a waiting writer looks again


def _unfinished_spec_differs(fs: Any, path: str, spec: GenerationSpec) -> list[str]:
    """Differences between `spec` and the spec an interrupted creation recorded (empty when they agree)."""
    recorded = (_group_attributes(fs, path) or {}).get("spec")
    try:
        return spec.differences(GenerationSpec.from_dict(recorded))
    except InvalidSpecError:
        return ["the unfinished store records no readable spec"]


def store_claims(
    url: str | os.PathLike[str], *, owner: str | None = None, storage_options: dict[str, Any] | None = None
) -> ShardClaims:
    """The writer claims at `url` (a store, or where one is to be created), seen by writer `owner` (new by default)."""
    fs, path = _filesystem(os.fspath(url), storage_options)
    return ShardClaims(fs, path, owner=owner)


def open_or_create_store(
    url: str | os.PathLike[str],
    spec: GenerationSpec,
    schedule: Callable[[], tuple[np.ndarray, np.ndarray]],
    *,
    claims: ShardClaims | None = None,
    on_wait: Callable[[ClaimRecord], None] | None = None,
    attrs: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    poll_s: float = POLL_S,
) -> TrajectoryStore:
    """The store of `spec` at `url` opened "r+": joined when it exists, else created once among concurrent writers.

    `schedule()` gives α and σ [K+1]; it is called only by the writer that creates the store. `claims` are this
    writer's (`store_claims(url)`, kept alive by the caller; new ones by default). `on_wait(claim)` is called once per
    claim this writer waits for (another writer is creating the store). A store of another spec, or files that are not
    a store, are refused and left untouched.
    """
    url = os.fspath(url)
    user_attrs = _checked_user_attrs(attrs)
    fs, path = _filesystem(url, storage_options)
    claims = claims or ShardClaims(fs, path)
    announced = set()
    while True:
        fs.invalidate_cache(path)
        kind, names = _location_kind(fs, path)
        if kind == "store":
            return open_store(url, "r+", expected_spec=spec, storage_options=storage_options)
        if kind == "foreign":
            raise StoreExistsError(foreign_files_message(url, names))
        if kind == "incomplete_store" and (differences := _unfinished_spec_differs(fs, path, spec)):
            raise SpecMismatchError(
                f"an unfinished store of another spec lies at {url}: " + "; ".join(differences)
                + "; use the cache path of your spec (cache_path) or create_store(..., overwrite=True)"
            )
        holder = claims.try_acquire(CREATE)
        if holder is None:
            try:
                _create_under_claim(url, fs, path, spec, schedule, user_attrs, storage_options)
            finally:
                claims.release(CREATE)
            continue
        if on_wait is not None and (holder.name, holder.epoch) not in announced:
            announced.add((holder.name, holder.epoch))
            on_wait(holder)
        time.sleep(poll_s)


def _create_under_claim(
    url: str, fs: Any, path: str, spec: GenerationSpec, schedule: Callable[[], tuple[np.ndarray, np.ndarray]],
    user_attrs: dict[str, Any], storage_options: dict[str, Any] | None,
) -> None:
    """Holding the creation claim: unless another writer finished meanwhile, clear an unfinished creation and create."""
    fs.invalidate_cache(path)
    kind, names = _location_kind(fs, path)
    if kind == "store":
        return
    alpha, sigma = schedule()
    alpha = _checked_schedule("alpha", alpha, spec.num_points)
    sigma = _checked_schedule("sigma", sigma, spec.num_points)
    for name in names:
        if name != CLAIM_DIR:
            fs.rm(f"{path.rstrip('/')}/{name}", recursive=True)
    write_new_store(url, spec, alpha, sigma, user_attrs, storage_options)
