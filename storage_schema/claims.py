"""Writer claims: which writer creates a store or writes one of its shards, so that concurrent writers never write
the same shard and a claim left by a crashed writer is recognised as stale.

A claim is one small JSON object ``<store>/claim/<name>.<epoch>``: ``name`` is a shard index or ``create``; the
newest epoch of a name is its claim. Only exclusive creation (fsspec mode ``"xb"``: ``O_EXCL`` on local files,
``If-None-Match: *`` on S3 through s3fs) decides who holds a claim, so two writers never both win; a holder only
ever overwrites its own object, to refresh its heartbeat. A claim is live while its holder lives: on the same host
while its process (pid and start time) runs; from another host while its heartbeat changes within the lease, as
seen on this reader's own clock (no clocks are compared between hosts). A stale claim is taken over by creating
the next epoch. Claims of committed shards are garbage and are removed when a store is finished, so a complete
store holds no claims and equal specs still give byte-identical stores.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CLAIM_DIR = "claim"
CREATE = "create"
HEARTBEAT_S = 10.0  # a holder rewrites its claims this often
LEASE_S = 120.0  # a claim from another host whose heartbeat has not changed for this long is stale


@dataclass(frozen=True)
class ClaimRecord:
    """The newest claim of one name: who holds it (None while its object is being written) and its raw bytes."""

    name: str
    epoch: int
    owner: str | None
    host: str | None
    pid: int | None
    process_start: str | None
    raw: bytes

    def describe(self) -> str:
        """Who holds the claim, for messages ("pid 123 on host-a")."""
        return f"pid {self.pid} on {self.host}" if self.owner else "a writer that is just taking it"


def _process_state(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks) of a local process from /proc, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return None
    except OSError:
        return "?", ""
    return fields[0].decode(), fields[19].decode()


def _process_start(pid: int) -> str | None:
    """Start time of a local process (tells a reused pid apart), or None where /proc is not available."""
    state = _process_state(pid) if os.path.isdir("/proc") else None
    return state[1] if state and state[1] else None


def _process_alive(pid: int, process_start: str | None) -> bool:
    """Whether the local process that made a claim still runs (a zombie or a reused pid does not count)."""
    if os.path.isdir("/proc"):
        state = _process_state(pid)
        if state is None or state[0] in ("Z", "X"):
            return False
        return process_start is None or not state[1] or state[1] == process_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardClaims:
    """The claims of one store, seen by one writer (its `owner` id); thread-safe."""

    def __init__(self, fs: Any, store_path: str, *, owner: str | None = None, lease_s: float = LEASE_S):
        """Claims under `<store_path>/claim` on the fsspec filesystem `fs`; a new owner id unless one is given."""
        self._fs = fs
        self._dir = f"{store_path.rstrip('/')}/{CLAIM_DIR}"
        self.owner = owner or uuid.uuid4().hex
        self.lease_s = lease_s
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._process_start = _process_start(self._pid)
        self._held: dict[str, tuple[int, int]] = {}  # name -> (epoch, heartbeat count)
        self._seen: dict[tuple[str, int], tuple[bytes, float]] = {}  # other hosts' claims: raw bytes, first seen
        self._lock = threading.Lock()

    def _path(self, name: str, epoch: int) -> str:
        """Object path of one claim."""
        return f"{self._dir}/{name}.{epoch}"

    def _content(self, beat: int) -> bytes:
        """This writer's claim object: owner, host, pid, process start time and heartbeat count."""
        record = {"owner": self.owner, "host": self._host, "pid": self._pid, "process_start": self._process_start,
                  "beat": beat}
        return json.dumps(record, sort_keys=True).encode()

    def _epochs(self) -> dict[str, list[int]]:
        """Epochs present for every claimed name, from one fresh listing."""
        self._fs.invalidate_cache(self._dir)
        try:
            entries = self._fs.ls(self._dir, detail=False)
        except FileNotFoundError:
            return {}
        epochs: dict[str, list[int]] = {}
        for entry in entries:
            name, _, epoch = entry.rstrip("/").rsplit("/", 1)[-1].rpartition(".")
            if name and epoch.isdigit():
                epochs.setdefault(name, []).append(int(epoch))
        return epochs

    def _read(self, name: str, epoch: int) -> ClaimRecord | None:
        """The claim object name.epoch, or None when it is gone; an object still being written has no owner yet."""
        try:
            raw = self._fs.cat_file(self._path(name, epoch))
        except FileNotFoundError:
            return None
        try:
            record = json.loads(raw)
            return ClaimRecord(name, epoch, str(record["owner"]), str(record["host"]), int(record["pid"]),
                               record.get("process_start"), raw)
        except (ValueError, KeyError, TypeError):
            return ClaimRecord(name, epoch, None, None, None, None, raw)

    def records(self) -> dict[str, ClaimRecord]:
        """The newest claim of every claimed name."""
        newest = {}
        for name, epochs in self._epochs().items():
            record = self._read(name, max(epochs))
            if record is not None:
                newest[name] = record
        return newest

    def is_live(self, record: ClaimRecord) -> bool:
        """Whether the claim's holder still works on it (see the module docstring)."""
        if record.owner == self.owner:
            return True
        if record.host == self._host and record.pid is not None:
            return _process_alive(record.pid, record.process_start)
        key, now = (record.name, record.epoch), time.monotonic()
        with self._lock:
            raw, first_seen = self._seen.get(key, (None, now))
            if raw != record.raw:
                self._seen[key] = (record.raw, now)
                return True
        return now - first_seen < self.lease_s

    def try_acquire(self, name: str) -> ClaimRecord | None:
        """Claim `name` when it is free or its holder is stale: None when this writer holds it now, else the live claim."""
        name = str(name)
        epochs = self._epochs().get(name)
        current = self._read(name, max(epochs)) if epochs else None
        if current is not None and current.owner == self.owner:
            return None
        if current is not None and self.is_live(current):
            return current
        epoch = 0 if not epochs else max(epochs) + 1
        with self._lock:
            try:
                self._create(self._path(name, epoch), self._content(0))
            except FileExistsError:
                return self._read(name, epoch) or ClaimRecord(name, epoch, None, None, None, None, b"")
            self._held[name] = (epoch, 0)
        return None

    def _create(self, path: str, content: bytes) -> None:
        """Create one claim object exclusively (FileExistsError when another writer made it first)."""
        for _ in range(3):  # a finishing writer may remove the empty claim folder between makedirs and open
            self._fs.makedirs(self._dir, exist_ok=True)
            try:
                handle = self._fs.open(path, "xb")
            except FileNotFoundError:
                continue
            try:
                with handle:
                    handle.write(content)
            except FileExistsError:  # object stores check exclusivity when the object is written, at close
                raise
            except OSError:  # e.g. a full device: an empty claim would block others for a whole lease
                with contextlib.suppress(OSError):
                    self._fs.rm_file(path)
                raise
            return
        raise FileNotFoundError(f"cannot create {path}: its folder keeps disappearing")

    def holds(self, name: str) -> bool:
        """Whether this writer's claim is still the newest claim of `name` (read fresh from storage)."""
        epochs = self._epochs().get(str(name))
        current = self._read(str(name), max(epochs)) if epochs else None
        return current is not None and current.owner == self.owner

    def release(self, name: str) -> None:
        """Drop this writer's claim of `name` and the stale ones before it (a newer epoch of a taker stays)."""
        name = str(name)
        with self._lock:
            held = self._held.pop(name, None)
        if held is None:
            return
        for epoch in self._epochs().get(name, []):
            if epoch <= held[0]:
                with contextlib.suppress(FileNotFoundError):
                    self._fs.rm_file(self._path(name, epoch))

    def heartbeat(self) -> None:
        """Rewrite every claim this writer holds with a new heartbeat count (what other hosts watch)."""
        with self._lock:
            for name, (epoch, beat) in list(self._held.items()):
                self._fs.pipe_file(self._path(name, epoch), self._content(beat + 1))
                self._held[name] = (epoch, beat + 1)

    @contextlib.contextmanager
    def keep_alive(self, interval_s: float = HEARTBEAT_S) -> Iterator[ShardClaims]:
        """Heartbeat every `interval_s` in a background thread while the block runs; release every claim after it."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval_s):
                with contextlib.suppress(OSError):  # a missed beat (full device, network) only uses up lease margin
                    self.heartbeat()

        thread = threading.Thread(target=beat, name="claim-heartbeat", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            for name in list(self._held):
                self.release(name)

    def remove(self, names: set[str]) -> None:
        """Delete every claim of the given names whatever its holder (for names whose work is done: committed shards)."""
        for name, epochs in self._epochs().items():
            if name in names:
                for epoch in epochs:
                    with contextlib.suppress(FileNotFoundError):
                        self._fs.rm_file(self._path(name, epoch))
        if not self._epochs() and self._fs.exists(self._dir) and self._fs.isdir(self._dir):
            with contextlib.suppress(OSError):
                self._fs.rmdir(self._dir)
