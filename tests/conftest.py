"""Shared test setup: one CPU thread per test process, and no model-hub access."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray clusters started by tests bind loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import tempfile

# Caches (FD classifiers, teacher fingerprint memos, trajectory stores) go to a per-session directory, never ~/.cache.
os.environ.setdefault("CMT_CACHE_DIR", tempfile.mkdtemp(prefix="cmt-test-cache-"))

import torch

torch.set_num_threads(1)
