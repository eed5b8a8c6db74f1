"""Trajectory store, schema version 2: the only code that knows the on-storage layout.

This docstring is the authoritative description of the format. Nothing here imports torch, Ray or the
trainer; only numpy, zarr, numcodecs (through zarr) and fsspec.

Location and identity
---------------------
A store is a Zarr v3 group. Its canonical place is ``cache_path(cache_root, spec)`` =
``<cache root>/<cache key>.zarr``. The cache key is the first 20 hex characters (80 bits) of
``sha256(spec.canonical_json())``; the canonical JSON is the spec's fields plus ``"schema_version": 2``,
sorted keys, separators ``","``/``":"``, ASCII, no NaN. Tuples are lists there; ``grid_params`` is
sorted by name; ints given for float fields are normalised to floats, so equal specs share a key and a
schema bump changes every key. ``teacher_precision`` (fp32 | tf32 | bf16 | fp16: what the teacher network computed
in) was added after the first version-2 stores were written: it enters the canonical JSON only when it is not
``fp32``, so stores written before it (all fp32) keep their keys, and stores of different precisions never share one. Plain paths open with ``zarr.storage.LocalStore``; anything with a scheme
(``memory://``, ``s3://``, ``file://`` ...) opens with ``zarr.storage.FsspecStore.from_url``. Listing,
sizes and deletion go through ``fsspec.core.url_to_fs`` for both.

Group attributes (``zarr.json``, written once by ``create_store``, never by shard writers)
------------------------------------------------------------------------------------------
- ``format``: ``"cmt-trajectory-store"`` (``"cmt-trajectory-store/creating"`` until creation finished;
  such a store is not opened, only replaced with ``overwrite=True``).
- ``schema_version``: 2. Stores of version 1 (no ``endpoint`` array) are refused with ``SchemaVersionError``, which
  says to regenerate them (the same generation command writes the version-2 store under its new cache key).
- ``spec``: ``GenerationSpec.to_dict()``.
- ``package_version``: version of the ``cmt-pipeline`` distribution that wrote it (``"0+unknown"`` if absent).
- No timestamp or host name: the same spec written by the same package version gives byte-identical stores,
  whatever the number of workers, the shard order or interruptions.
- any user attributes passed to ``create_store(attrs=...)`` (top level; the names above are reserved).
- ``consolidated_metadata`` (zarr-python's key, not in the v3 spec): every array's metadata, written once at
  creation so a remote store opens with one read; array metadata never changes after creation.

Arrays (N = num_trajectories, K = steps, P = K + 1 points, S = sample_shape)
---------------------------------------------------------------------------
=========  ==============  ========  ===================  ==================  ==========  ==========
name       shape           dtype     chunks               shards              codec       fill
=========  ==============  ========  ===================  ==================  ==========  ==========
traj       (N, P, *S)      spec      (chunk_size, P, *S)  (shard_size, P, *S) spec.codec  NaN
endpoint   (N, *S)         spec      (chunk_size, *S)     (shard_size, *S)    spec.codec  NaN
seed       (N,)            int64     (chunk_size,)        (shard_size,)       spec.codec  -1
label      (N,)            int64     (chunk_size,)        (shard_size,)       spec.codec  -1
alpha      (P,)            float64   (P,)                 none                none        0
sigma      (P,)            float64   (P,)                 none                none        0
commit     (num_shards,33) uint8     (1, 33)              none                none        0
=========  ==============  ========  ===================  ==================  ==========  ==========

- ``traj[i, j]`` is point j of trajectory i in the teacher's own state space x = α·x0 + σ·ε:
  j = 0 is the prior noise, j = K the solver's clean endpoint; ``alpha[j]``, ``sigma[j]`` are its α_t, σ_t.
  dtype is ``float16`` (default) or ``float32``, little-endian.
- ``endpoint[i]`` = ``traj[i, K]`` bytewise (written by ``write_shard`` from the traj it is given): the clean endpoints
  alone, so readers of endpoints only (ECT, MeanFlow) decode 1/(K+1) of the trajectory bytes (``read_endpoints``).
- ``seed[i] = seed_base + i`` (enforced on write): sample i's prior noise comes from its own generator.
- ``label`` exists only when ``num_classes`` is set (conditional teacher); values in [0, num_classes).
  ``spec.label_plan`` (free string, e.g. "uniform", conditional specs only) records how labels were drawn.
- ``traj``/``endpoint``/``seed``/``label`` use the sharding codec: shard s (trajectories
  [s·shard_size, min((s+1)·shard_size, N))) is ONE object per array, e.g. ``traj/c/s/0/0/0/0`` and
  ``seed/c/s`` (default chunk-key encoding, ``/`` separator). Inside a shard, chunks of ``chunk_size``
  whole trajectories are compressed independently (the unit of streaming reads, see ``chunk_bounds``);
  the shard index sits at the end with a crc32c checksum. Writers of different shards never touch the
  same object. Empty chunks are written too (``write_empty_chunks``), so committed data always has objects.
- Codecs (default ``blosc-zstd-shuffle``: best bytes ratio measured on real trajectories): ``zstd`` = ZstdCodec(level 3); ``blosc-zstd-shuffle`` / ``blosc-lz4-shuffle`` /
  ``blosc-zstd-bitshuffle`` = BloscCodec(clevel 5) with ``typesize`` = the array's item size (2 for
  float16, 8 for int64); ``none`` = uncompressed.

Commit protocol (safe for concurrent writers of different shards in different processes)
----------------------------------------------------------------------------------------
``commit[s]`` is shard s's record, one object ``commit/c/s/0`` of 33 bytes: bytes 0..31 = the shard's
sha256 digest, byte 32 = 1 when committed. An all-zero record is not stored at all (absent = uncommitted).
``write_shard(s)``: (1) if the record is non-zero (only allowed with ``repair=True`` when committed), clear
it; (2) write traj and endpoint, then seed (then label); (3) write the record. A writer killed before (3) leaves the
shard uncommitted; readers trust committed shards only. Commit state never lives in ``zarr.json``.

The digest is sha256 over: ``b"cmt-trajectory-shard/v2\\0"``, ``(s, start, stop)`` as three ``<i8``,
the shard's traj bytes then its endpoint bytes in the storage dtype (C order, little-endian), its seeds as ``<i8``,
and (when conditional) its labels as ``<i8``. ``validate(deep=True)`` recomputes it from the decoded data, and
``verify_shard(s)`` for one shard in bounded reads. ``uncommit_shard(s)`` clears a record (``python -m
storage_schema validate URL --deep --uncommit-corrupt`` does so for every shard failing the deep check), so
re-running the generation job rewrites exactly those shards.

Writer claims (several writers of one store at once: ``storage_schema/claims.py``)
----------------------------------------------------------------------------------
``claim/<name>.<epoch>`` (JSON: owner id, host, pid, process start time, heartbeat count) says which writer
creates the store (name ``create``) or writes shard ``name``; the newest epoch is the claim. It is taken only by
exclusive creation (fsspec mode ``"xb"``), refreshed by its holder's heartbeat, and taken over (next epoch) when
stale: its process is gone (same host) or its heartbeat has not changed for ``LEASE_S`` (another host). A writer
writes a shard only while it holds the shard's claim (checked again right before the commit record) and only if
the shard is still uncommitted once claimed; ``open_or_create_store`` creates a store once among concurrent
writers (the others wait, then join). Claims are not data: they are left out of sizes, and removed when a store is
complete, so a finished store holds none and equal specs still give byte-identical stores.

Temporary files: zarr's LocalStore writes ``<key stem>.<32 hex>.partial`` and renames it over the key; a writer
killed mid-write leaves it. They are never read and not counted in sizes; ``validate`` lists them and
``remove_partial_files`` (``python -m storage_schema validate URL --remove-partial``) deletes them when no writer is
live.
"""

from storage_schema.claims import CREATE, ClaimRecord, ShardClaims
from storage_schema.errors import (
    ClaimLostError,
    CorruptShardError,
    InvalidSpecError,
    NotAStoreError,
    ReadOnlyStoreError,
    SchemaVersionError,
    ShardAlreadyCommittedError,
    ShardDataError,
    ShardIndexError,
    ShardNotCommittedError,
    SpecMismatchError,
    StoreBusyError,
    StoreError,
    StoreExistsError,
)
from storage_schema.joining import open_or_create_store, store_claims
from storage_schema.opening import create_store, open_store
from storage_schema.spec import CODECS, SCHEMA_VERSION, STORAGE_DTYPES, TEACHER_PRECISIONS, GenerationSpec, cache_path
from storage_schema.store import TrajectoryStore, ValidationReport

__all__ = [
    "CODECS",
    "CREATE",
    "SCHEMA_VERSION",
    "STORAGE_DTYPES",
    "TEACHER_PRECISIONS",
    "ClaimLostError",
    "ClaimRecord",
    "CorruptShardError",
    "GenerationSpec",
    "InvalidSpecError",
    "NotAStoreError",
    "ReadOnlyStoreError",
    "SchemaVersionError",
    "ShardAlreadyCommittedError",
    "ShardClaims",
    "ShardDataError",
    "ShardIndexError",
    "ShardNotCommittedError",
    "SpecMismatchError",
    "StoreBusyError",
    "StoreError",
    "StoreExistsError",
    "TrajectoryStore",
    "ValidationReport",
    "cache_path",
    "create_store",
    "open_or_create_store",
    "open_store",
    "store_claims",
]
