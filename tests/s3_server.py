"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1, reached the way users reach S3.

The code under test gets no S3 settings of its own: botocore (under s3fs) reads the endpoint from the standard
`AWS_ENDPOINT_URL` and the credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, which the `s3_server`
fixture (tests/conftest.py) sets for the test process and every process it starts (drivers, Ray nodes, trainers).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import HANG_LIMIT_S, free_port, wait_until

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def _answers(endpoint: str, server: subprocess.Popen, log) -> bool:
    """Whether the server answers HTTP (fails at once if its process ended, e.g. the port was taken)."""
    if server.poll() is not None:
        log.seek(0)
        raise AssertionError(f"moto_server exited with {server.returncode}: {log.read().decode(errors='replace')}")
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=HANG_LIMIT_S):
            return True
    except (urllib.error.URLError, ConnectionError):
        return False


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run `moto_server` on a free loopback port until the block ends; yields its endpoint URL once it answers."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: the server logs every request and must never block
        server = subprocess.Popen(
            [str(MOTO_SERVER), "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_until(lambda: _answers(endpoint, server, log), f"moto_server answers on {endpoint}")
            yield endpoint
        finally:
            server.terminate()
            server.wait(timeout=HANG_LIMIT_S)


def new_bucket() -> str:
    """Create a bucket with a fresh name on the server named by AWS_ENDPOINT_URL; returns "s3://<name>"."""
    import s3fs

    name = f"cmt-test-{secrets.token_hex(6)}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


def object_digests(url: str) -> dict[str, str]:
    """sha256 of every object under an s3:// prefix, keyed by the object's path relative to the prefix."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = url.removeprefix("s3://").rstrip("/")
    return {path.removeprefix(f"{root}/"): hashlib.sha256(fs.cat_file(path)).hexdigest() for path in fs.find(root)}
