"""Cost plans: per-forward MACs counted from the model's config, throughput from a measurement or a stated GPU."""

from __future__ import annotations

import pytest

from jobs.published_teachers import DIT_TRANSFORMER, TINY
from pipeline.cost import cost_plan, count_forward_macs


def test_every_dit_block_adds_the_same_counted_cost():
    """MACs(depth) is affine in depth: the blocks are identical, so the counter must see each one the same."""
    counts = [count_forward_macs("Transformer2DModel", {**DIT_TRANSFORMER, **TINY["transformer"], "num_layers": depth})
              for depth in (1, 2, 3)]
    assert counts[0] > 0 and counts[2] - counts[1] == counts[1] - counts[0] > 0


def test_a_measured_throughput_wins_over_the_datasheet_and_cpu_workers_have_no_gpu_hours():
    gpu = {"name": "G", "peak_tflops": {"bf16": 100.0}, "utilization": 0.5}
    derived = cost_plan(10**6, macs=10**9, macs_source="counted", precision="bf16", precision_source="test", gpu=gpu,
                        gpus=4)
    assert derived["forward_samples_per_gpu_s"] == pytest.approx(100e12 * 0.5 / 2e9)
    assert derived["estimated_wall_hours"] == pytest.approx(derived["estimated_gpu_hours"] / 4, rel=1e-3)
    measured = cost_plan(10**6, macs=10**9, macs_source="counted", precision="bf16", precision_source="test", gpu=gpu,
                         gpus=4, measured=250.0, measured_source="bench on G")
    assert measured["forward_samples_per_gpu_s"] == 250.0 and measured["throughput_source"] == "measured: bench on G"
    assert measured["estimated_gpu_hours"] == pytest.approx(10**6 / 250.0 / 3600, rel=1e-3)
    missing_peak = cost_plan(10**6, macs=10**9, macs_source="counted", precision="fp16", precision_source="test",
                             gpu=gpu, gpus=1)
    assert missing_peak["estimated_gpu_hours"] is None and "peak_tflops.fp16" in missing_peak["throughput_source"]
    cpu = cost_plan(10**6, macs=10**9, macs_source="counted", precision="fp32", precision_source="test", gpu=gpu,
                    gpus=0)
    assert cpu["estimated_gpu_hours"] is None and "CPUs" in cpu["throughput_source"]
