"""Shared test setup: one CPU thread per test process, and no model-hub access."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray clusters started by tests bind loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch

torch.set_num_threads(1)
