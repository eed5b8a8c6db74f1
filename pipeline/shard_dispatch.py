"""Dispatching a store's missing shards to Ray actors, claim by claim, next to other generate runs on the same store.

A shard goes to an actor only once this run holds its claim and it is still uncommitted (`storage_schema.claims`).
A shard another live run holds is left to it: this run says so once per run it waits for, in the CLI's words, and
takes the shard over if that run dies. A shard that fails releases its claim; "no space left on device" stops the
dispatch, since nothing more can be written until space is freed.
"""

from __future__ import annotations

import errno
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from storage_schema import ClaimLostError, ClaimRecord, ShardClaims, TrajectoryStore

POLL_S = 1.0  # how often an idle run looks again at the shards other runs hold
TASKS_PER_ACTOR = 2  # one running, one queued: an actor never waits for the driver between shards


@dataclass
class DispatchOutcome:
    """What the dispatch did: shard results, failures, shards committed by other runs, and whether space ran out."""

    results: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    joined: list[int] = field(default_factory=list)
    no_space: bool = False


def root_message(error: BaseException) -> str:
    """The innermost message of a (Ray-wrapped) exception."""
    cause = getattr(error, "cause", None)
    return str(cause) if cause is not None else str(error).strip().splitlines()[-1]


def is_no_space(error: BaseException) -> bool:
    """Whether an exception (Ray-wrapped, chained or not) is ENOSPC: no space left on the device."""
    seen = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        pending += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return "No space left on device" in str(error)


class ShardDispatcher:
    """Feeds claimed shards to actors (`TASKS_PER_ACTOR` each) until every pending shard is committed by someone."""

    def __init__(self, store: TrajectoryStore, claims: ShardClaims, actors: list[Any], progress_bar: Any):
        """`actors` are ShardWorker actor handles; `progress_bar` is a tqdm bar counting trajectories."""
        self.store = store
        self.claims = claims
        self.actors = actors
        self.bar = progress_bar
        self.outcome = DispatchOutcome()
        self._todo: list[int] = []
        self._in_flight: dict[Any, tuple[int, Any]] = {}
        self._announced_runs: set[str | None] = set()
        self._announced_idle: tuple[int, ...] = ()

    def run(self, pending: list[int]) -> DispatchOutcome:
        """Write the pending shards this run can claim and wait for the others; returns the outcome."""
        import ray

        self._todo = sorted(pending)
        while self._todo or self._in_flight:
            waiting = self._fill()
            if self._in_flight:
                ready, _ = ray.wait(list(self._in_flight), num_returns=1, timeout=POLL_S)
                for reference in ready:
                    self._collect(reference)
            elif self._todo:
                self._say_idle(waiting)
                time.sleep(POLL_S)
        return self.outcome

    def _trajectories(self, index: int) -> int:
        """Number of trajectories in shard `index`."""
        start, stop = self.store.shard_bounds(index)
        return stop - start

    def _fill(self) -> dict[int, ClaimRecord]:
        """Claim and submit shards while actors have room; returns the shards other live runs hold."""
        load = {id(actor): 0 for actor in self.actors}
        for _, actor in self._in_flight.values():
            load[id(actor)] += 1
        free = [actor for actor in self.actors for _ in range(TASKS_PER_ACTOR - load[id(actor)])]
        waiting: dict[int, ClaimRecord] = {}
        if not free or not self._todo:
            return waiting
        records = self.claims.records()
        for index in list(self._todo):
            if not free:
                break
            holder = records.get(str(index))
            if holder is None or holder.owner == self.claims.owner or not self.claims.is_live(holder):
                try:
                    holder = self.claims.try_acquire(str(index))
                except OSError as error:
                    if not is_no_space(error):
                        raise
                    self._stop_for_no_space(index, error)
                    break
            if holder is not None:
                waiting[index] = holder
                continue
            self._todo.remove(index)
            if self.store.shard_digest(index) is not None:  # committed by another run before this one claimed it
                self.claims.release(str(index))
                self.outcome.joined.append(index)
                self.bar.update(self._trajectories(index))
                continue
            actor = free.pop()
            self._in_flight[actor.generate_shard.remote(index)] = (index, actor)
        self._say_joined(waiting)
        return waiting

    def _collect(self, reference: Any) -> None:
        """Record one finished task: its result, its failure, or a claim another run took over (then wait for it)."""
        import ray

        index, _ = self._in_flight.pop(reference)
        try:
            result = ray.get(reference)
        except Exception as error:  # noqa: BLE001 - a failed shard is reported, the others go on
            self.claims.release(str(index))
            if isinstance(getattr(error, "cause", None), ClaimLostError):
                self._todo.append(index)  # another run took the shard over; it is waited for like its other shards
            elif is_no_space(error):
                self._stop_for_no_space(index, error)
            else:
                self.outcome.failures.append({"index": index, "error": root_message(error)})
        else:
            self.claims.release(str(index))
            self.outcome.results.append({**result, "finished_at": time.perf_counter()})
            self.bar.update(result["trajectories"])
        self.bar.set_postfix(written=len(self.outcome.results), failed=len(self.outcome.failures))

    def _stop_for_no_space(self, index: int, error: BaseException) -> None:
        """Record the shard that met a full device and dispatch nothing more (running shards still finish)."""
        self.outcome.no_space = True
        self.outcome.failures.append({"index": index, "error": root_message(error)})
        self._todo.clear()

    def _say_joined(self, waiting: dict[int, ClaimRecord]) -> None:
        """Once per other run: which of its shards this run leaves to it."""
        for owner in sorted({record.owner or "" for record in waiting.values()} - self._announced_runs):
            self._announced_runs.add(owner)
            shards = sorted(index for index, record in waiting.items() if (record.owner or "") == owner)
            holder = waiting[shards[0]].describe()
            self._say(
                f"joining: another generate run ({holder}) is writing shard(s) {_listed(shards)} of "
                f"{self.store.url}; this run writes only shards nobody holds and waits for that run's (it takes them "
                f"over if that run dies)"
            )

    def _say_idle(self, waiting: dict[int, ClaimRecord]) -> None:
        """When only other runs' shards are left: which ones this run waits for (said again when the set changes)."""
        shards = tuple(sorted(waiting))
        if shards and shards != self._announced_idle:
            self._announced_idle = shards
            holders = ", ".join(sorted({record.describe() for record in waiting.values()}))
            self._say(
                f"waiting: shard(s) {_listed(list(shards))} of {self.store.url} are being written by another generate "
                f"run ({holders}); this run finishes when they are committed, or writes them itself if that run dies "
                f"(Ctrl-C is safe: the same command resumes)"
            )

    def _say(self, message: str) -> None:
        """One line on stderr that does not break the progress bar."""
        self.bar.write(message, file=sys.stderr)


def _listed(shards: list[int]) -> str:
    """'1, 2, 5' (at most 10 shown)."""
    return ", ".join(map(str, shards[:10])) + (f" and {len(shards) - 10} more" if len(shards) > 10 else "")
