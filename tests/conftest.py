"""Shared test setup: one CPU thread per test process, no model-hub access, and the loopback S3 server fixture."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray clusters started by tests bind loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import tempfile

# Caches (FD classifiers, teacher fingerprint memos, trajectory stores) go to a per-session directory, never ~/.cache.
os.environ.setdefault("CMT_CACHE_DIR", tempfile.mkdtemp(prefix="cmt-test-cache-"))

import pytest
import torch

from tests.s3_server import S3_CREDENTIALS, moto_server

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on loopback; the standard AWS variables name it to this process and its
    children (drivers, Ray nodes, trainers). Yields the endpoint URL."""
    with moto_server() as endpoint, pytest.MonkeyPatch.context() as environment:
        environment.setenv("AWS_ENDPOINT_URL", endpoint)
        for name, value in S3_CREDENTIALS.items():
            environment.setenv(name, value)
        yield endpoint
