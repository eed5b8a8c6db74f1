"""Shared test setup: one CPU thread per test process, and no model-hub access."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

torch.set_num_threads(1)
