"""bf16 throughout, on CPU: the student runs in bf16 under Accelerate's mixed precision, MeanFlow's derivative (JVP
and finite difference) in float32, and every stage (mid CM / MF, ECT, ECD, MeanFlow with guidance) trains a
class-conditional UNet student in bf16; precisions the device cannot run are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from pipeline.teacher import Teacher, load_teacher
from tests.helpers import tiny_unet, write_solved_store
from trainer.config import ConfigError, load_config
from trainer.loop import LoopConfig, make_accelerator
from trainer.methods.meanflow import meanflow_prediction_and_derivative
from trainer.mid import MidConfig
from trainer.mid import run as mid_run
from trainer.post import PostConfig
from trainer.post import run as post_run
from trainer.run_dir import RunDir
from trainer.student import FlowMapStudent

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "tiny"


def loop_config(tmp_path: Path, precision: str) -> LoopConfig:
    """A one-step loop config with the given mixed precision."""
    return LoopConfig(output_dir=str(tmp_path / precision), total_steps=1, lr=1e-3, checkpoint_every_steps=0,
                      log_every_steps=1, eval_every_steps=0, mixed_precision=precision)


def test_the_prediction_runs_in_bf16_and_the_derivative_in_float32(tmp_path):
    """The failure of bf16 JVP ("Input type (torch.FloatTensor) and weight type (CPUBFloat16Type)") is gone: du/dt
    is taken in float32 for both methods, and the two agree."""
    accelerator = make_accelerator(loop_config(tmp_path, "bf16"))
    teacher = Teacher(tiny_unet(attention=True, num_class_embeds=3), DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    student = FlowMapStudent.from_teacher(teacher, second_time_input=True)
    torch.nn.init.normal_(student.second_time.embedding.linear_2.weight, std=0.02)
    model = accelerator.prepare(student)
    dtypes = []
    student.net.conv_in.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    z, v = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    results = {}
    for method in ("jvp", "fd"):
        dtypes.clear()
        u, du_dt = meanflow_prediction_and_derivative(model, z, t=t, r=t * 0.5, v=v, labels=labels, method=method,
                                                      fd_delta=1e-4, dropout_seed=0)
        # one forward for the prediction, in bf16; the derivative's forwards (1 JVP or 2 differences) in float32
        assert dtypes.count(torch.bfloat16) == 1 and dtypes.count(torch.float32) == len(dtypes) - 1 >= 1
        assert u.requires_grad and bool(torch.isfinite(u).all()) and bool(torch.isfinite(du_dt).all())
        results[method] = du_dt
    relative = ((results["jvp"] - results["fd"]).norm() / results["jvp"].norm()).item()
    assert relative < 1e-2, relative


def test_precisions_the_device_cannot_run_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="loop.mixed_precision=fp16 is not available on cpu.*bf16 on CPU"):
        make_accelerator(loop_config(tmp_path, "fp16"))
    assert make_accelerator(loop_config(tmp_path, "bf16")).mixed_precision == "bf16"
    assert make_accelerator(loop_config(tmp_path, "no")).mixed_precision == "no"  # a later stage gets its own


@pytest.fixture(scope="module")
def conditional(tmp_path_factory) -> dict[str, Path]:
    """A class-conditional tiny UNet teacher (3 classes, no null row) and a 2-shard store of its trajectories."""
    root = tmp_path_factory.mktemp("bf16")
    DDPMPipeline(unet=tiny_unet(num_class_embeds=3), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")
                 ).save_pretrained(root / "teacher")
    write_solved_store(load_teacher(root / "teacher"), root / "store.zarr", num_trajectories=16, steps=4,
                       shard_size=8)
    return {"root": root, "teacher": root / "teacher", "store": root / "store.zarr"}


BF16 = ["loop.mixed_precision=bf16", "loop.total_steps=2", "loop.checkpoint_every_steps=0"]


def finite_run(output_dir: Path) -> None:
    """The run logged finite losses and skipped no step."""
    records = [record for record in RunDir(output_dir).read_metrics() if "loss" in record]
    assert records and all(torch.isfinite(torch.tensor(record["loss"])) for record in records)
    assert records[-1]["skipped_steps"] == 0


def test_every_stage_trains_a_class_conditional_unet_in_bf16(conditional):
    root = conditional["root"]
    for form in ("cm", "mf"):
        mid_run(load_config(MidConfig, TINY / "mid.yaml", [
            f"teacher={conditional['teacher']}", f"stores=[{conditional['store']}]", f"form={form}",
            f"loop.output_dir={root / f'mid_{form}'}", "label_dropout=0.2", *BF16]))
        finite_run(root / f"mid_{form}")
        exported = FlowMapStudent.from_pretrained(root / f"mid_{form}" / "export")
        assert exported.null_class == 3  # label dropout gave the UNet its null class
    runs = (("ect", "cm", []), ("ecd", "cm", []),
            ("meanflow", "mf", ["meanflow.derivative=jvp", "meanflow.guidance_scale=2.0", "meanflow.guidance_kappa=0.5",
                                "meanflow.guidance_t_max=0.8"]),
            ("meanflow", "mf", ["meanflow.derivative=fd", "meanflow.guidance_scale=2.0"]))
    for index, (method, form, extra) in enumerate(runs):
        output_dir = root / f"post_{index}_{method}"
        result = post_run(load_config(PostConfig, TINY / "post.yaml", [
            f"teacher={conditional['teacher']}", f"method={method}", f"init=cmt:{root / f'mid_{form}'}",
            f"data=store:{conditional['store']}", f"loop.output_dir={output_dir}", *BF16, *extra]))
        finite_run(output_dir)
        report = json.loads((output_dir / "ranks" / "rank_0.json").read_text())
        assert report["derivative"] == (extra[0].split("=")[1] if extra else None)
        assert result.loop.final_step == 2
