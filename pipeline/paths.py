"""Where the project keeps its caches and outputs: local paths and fsspec URLs (s3://, gs://, ...) through one code path.

`location()` turns what a user typed ($CMT_CACHE_DIR, --out, --cache-root, --cache-dir) into either an absolute local
path or a URL whose filesystem package is installed, naming the variable or flag when it cannot. Every cached thing
(trajectory stores, teacher memos, converted weights, FD classifiers) lives under `cache_root()` and is read and
written with the helpers below, which use the local filesystem for paths and fsspec for URLs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from storage_schema.spec import has_url_scheme

CACHE_ENV_VAR = "CMT_CACHE_DIR"


class LocationError(ValueError):
    """A cache root or output location that cannot be used; the message names the variable or flag and the fix."""


def location(value: str | os.PathLike, *, named: str) -> str:
    """A local path (absolute, ~ expanded; file:// stripped) or a URL whose filesystem package is installed.

    `named` is how the user gave it (``CMT_CACHE_DIR``, ``--out`` ...), so errors speak the user's words.
    """
    text = os.fspath(value)
    if not text.strip():
        raise LocationError(f"{named} is empty: give a directory or a URL such as s3://bucket/cmt-cache")
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    if not has_url_scheme(text):  # file:// was stripped above: from here on it is a plain path
        return str(Path(text).expanduser().absolute())
    import fsspec
    from fsspec.registry import known_implementations

    protocol = text.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError as error:
        raise LocationError(
            f"{named}={text}: fsspec knows no filesystem for {protocol}:// ({error}); use a local directory or a URL "
            f"such as s3://bucket/path or gs://bucket/path"
        ) from error
    except ImportError as error:
        package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
        raise LocationError(
            f"{named}={text}: the {protocol}:// filesystem needs the Python package {package!r}, which is not "
            f"installed here: `pip install {package}` (on every machine of the job, e.g. in the Ray runtime env), "
            f"or use a local directory"
        ) from error
    return text.rstrip("/")


def join(root: str, *parts: str) -> str:
    """`root/part/...` for local paths and URLs alike."""
    return "/".join([root.rstrip("/"), *parts]) if has_url_scheme(root) else os.path.join(root, *parts)


def cache_root() -> str:
    """The project's cache root: $CMT_CACHE_DIR (a path or URL), else $XDG_CACHE_HOME/cmt-pipeline, else ~/.cache/cmt-pipeline."""
    if os.environ.get(CACHE_ENV_VAR):
        return location(os.environ[CACHE_ENV_VAR], named=CACHE_ENV_VAR)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return str((base / "cmt-pipeline").absolute())


def cache_location(*parts: str) -> str:
    """A place under the cache root (`cache_location("teachers", "x.json")`)."""
    return join(cache_root(), *parts)


def trajectory_cache_root() -> str:
    """Default directory of cached trajectory stores (`<cache root>/trajectories`)."""
    return cache_location("trajectories")


def _filesystem(url: str):
    """The fsspec filesystem and path of a URL."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def exists(place: str) -> bool:
    """True when a file or directory exists at a local path or URL."""
    if not has_url_scheme(place):
        return os.path.exists(place)
    fs, path = _filesystem(place)
    return fs.exists(path)


def read_bytes(place: str) -> bytes | None:
    """The bytes of a file at a local path or URL, or None when there is none."""
    if not has_url_scheme(place):
        return Path(place).read_bytes() if os.path.isfile(place) else None
    fs, path = _filesystem(place)
    return fs.cat_file(path) if fs.isfile(path) else None


def write_bytes(place: str, data: bytes) -> None:
    """Write a whole file so readers never see part of it (local: temporary file + rename; object stores: one put)."""
    if has_url_scheme(place):
        fs, path = _filesystem(place)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
        return
    directory = os.path.dirname(place)
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(place)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, place)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def read_text(place: str) -> str | None:
    """The UTF-8 text of a file at a local path or URL, or None when there is none."""
    data = read_bytes(place)
    return None if data is None else data.decode()


def write_text(place: str, text: str) -> None:
    """Write a whole UTF-8 text file atomically (see `write_bytes`)."""
    write_bytes(place, text.encode())


def local_copy(place: str, directory: str | os.PathLike) -> Path:
    """A local file with the contents of `place`: the file itself when local, else a download into `directory`."""
    if not has_url_scheme(place):
        return Path(place)
    fs, path = _filesystem(place)
    target = Path(directory) / path.rsplit("/", 1)[-1]
    fs.get_file(path, str(target))
    return target
