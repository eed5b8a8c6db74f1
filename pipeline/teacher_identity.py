"""A teacher's identity for a store's spec (fingerprint, sample shape, classes), memoised by its files' stamps.

`pipeline/generate.py` keys a store by it; a memo under the cache root (`<cache>/teachers/<stamps>.json`) lets a
cache-hit re-run skip loading the teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.paths import cache_location, read_text, write_text

__all__ = ["TeacherIdentity", "teacher_identity"]


@dataclass(frozen=True)
class TeacherIdentity:
    """What a store's spec needs to know of a teacher, without holding its weights."""

    fingerprint: str
    sample_shape: tuple[int, ...]
    num_classes: int | None


def _directory_stamp(path: Path) -> str:
    """sha256 of (name, size, mtime_ns) of every file under a teacher directory (or of one file)."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def teacher_identity(source: str, revision: str | None = None, scheduler: str | None = None) -> TeacherIdentity:
    """Fingerprint, sample shape and classes of a teacher, memoised by its files' stamps (loads it only on a miss).

    Local directories and hub snapshots alike are stamped by their files, so a cache-hit re-run never imports torch
    or reads weights. The workers re-check the fingerprint of the teacher they load, so a stale memo can never write
    a store under the wrong key.
    """
    from pipeline.teacher_files import locate_teacher, scheduler_config_file

    stamps = [_directory_stamp(locate_teacher(source, revision=revision, weights=False).root), str(revision)]
    if scheduler is not None:
        stamps.append(_directory_stamp(scheduler_config_file(scheduler)))
    memo = cache_location("teachers", hashlib.sha256("\0".join(stamps).encode()).hexdigest() + ".json")
    known = read_text(memo)
    if known is not None:
        known = json.loads(known)
        return TeacherIdentity(known["fingerprint"], tuple(known["sample_shape"]), known["num_classes"])
    from pipeline.teacher import load_teacher

    teacher = load_teacher(source, revision=revision, scheduler=scheduler)
    identity = TeacherIdentity(teacher.fingerprint, tuple(int(s) for s in teacher.sample_shape), teacher.num_classes)
    write_text(memo, json.dumps(dataclasses.asdict(identity)))
    return identity
