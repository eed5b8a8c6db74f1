"""Tests of the shared training loop on a small linear regression.

This file is also a script (`python tests/test_loop.py train|multiprocess ...`) so that the
SIGKILL and two-process tests can run the very same training code in child processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import HANG_LIMIT_S, assert_close
from trainer.batches import InMemoryBatches
from trainer.loop import CHECKPOINT_MARKER, LoopConfig, complete_checkpoints, make_accelerator, train_loop
from trainer.run_dir import RunDir

NUM_FEATURES = 4
NUM_SAMPLES = 96
BATCH_PER_PROCESS = 8
REPO_ROOT = Path(__file__).resolve().parents[1]
THIS_SCRIPT = Path(__file__).resolve()
SCRIPT_ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # this file run as a script imports tests.helpers


def regression_data(num_samples: int = NUM_SAMPLES) -> dict[str, torch.Tensor]:
    """y = x·w + small noise, with each sample's index kept for data-order checks."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(num_samples, NUM_FEATURES, generator=generator)  # [N, F]
    w = torch.tensor([1.5, -2.0, 0.5, 3.0])  # [F]
    y = x @ w + 0.05 * torch.randn(num_samples, generator=generator)  # [N]
    return {"x": x, "y": y, "index": torch.arange(num_samples)}


def regression_loss(model: torch.nn.Module, batch, step: int) -> torch.Tensor:
    """Per-sample squared error with input jitter drawn from the global torch RNG (so resume must restore it)."""
    jittered = batch["x"] + 0.01 * torch.randn_like(batch["x"])  # [B, F]
    return (model(jittered).squeeze(-1) - batch["y"]) ** 2  # [B]


class SaveCounter:
    """A checkpointed extra object that can freeze its process while a checkpoint is being written."""

    def __init__(self, stop_on_save: int | None = None) -> None:
        """Count saves; SIGSTOP this process during save number `stop_on_save` (None: never)."""
        self.saves = 0
        self.stop_on_save = stop_on_save

    def state_dict(self) -> dict[str, int]:
        """Called by accelerate.save_state after model, optimizer and RNG files are written."""
        self.saves += 1
        if self.saves == self.stop_on_save:
            os.kill(os.getpid(), signal.SIGSTOP)
        return {"saves": self.saves}

    def load_state_dict(self, state) -> None:
        """Restore the count."""
        self.saves = state["saves"]


def loop_config(output_dir: Path, **overrides) -> LoopConfig:
    """A small, fast LoopConfig for the regression."""
    settings = {
        "output_dir": str(output_dir),
        "total_steps": 20,
        "lr": 0.5,
        "lr_schedule": "constant",
        "checkpoint_every_steps": 5,
        "keep_checkpoints": 2,
        "log_every_steps": 1,
        "eval_every_steps": 0,
        "ema_decay": 0.9,
        "torch_threads": 1,
        "seed": 7,
    }
    settings.update(overrides)
    return LoopConfig(**settings)


def run_regression(cfg: LoopConfig, *, loss_fn=regression_loss, evaluate=None, extra=()):
    """Train a fresh Linear(F, 1) under `cfg` (model init seeded, so every run starts from the same weights)."""
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    model = torch.nn.Linear(NUM_FEATURES, 1)
    batches = InMemoryBatches(regression_data(), batch_per_process=BATCH_PER_PROCESS, seed=cfg.seed)
    return train_loop(cfg, model=model, loss_fn=loss_fn, batches=batches, accelerator=accelerator,
                      evaluate=evaluate, extra_checkpoint_objects=extra)


def logged_losses(output_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every metrics.jsonl record that has a loss."""
    return [(record["step"], record["loss"]) for record in RunDir(output_dir).read_metrics() if "loss" in record]


def test_loss_decreases_and_metrics_are_logged(tmp_path):
    result = run_regression(loop_config(tmp_path, total_steps=60, log_every_steps=10, checkpoint_every_steps=0))
    losses = logged_losses(tmp_path)
    assert [step for step, _ in losses] == [10, 20, 30, 40, 50, 60]
    assert losses[-1][1] < 0.05 * losses[0][1]
    assert result.final_step == 60 and result.start_step == 0 and result.skipped_steps == 0
    record = RunDir(tmp_path).read_metrics()[-1]
    assert {"step", "loss", "lr", "skipped_steps"} <= set(record)
    assert (tmp_path / "logs").is_dir()


def test_an_evaluation_between_logging_steps_records_its_train_seconds(tmp_path):
    run_regression(loop_config(tmp_path, total_steps=6, log_every_steps=4, eval_every_steps=3,
                               checkpoint_every_steps=0), evaluate=lambda model, step: {"score": float(step)})
    records = {record["step"]: record for record in RunDir(tmp_path).read_metrics()}
    assert sorted(records) == [3, 4, 6] and "loss" not in records[3] and records[3]["score"] == 3.0
    assert 0 < records[3]["train_seconds"] < records[4]["train_seconds"] < records[6]["train_seconds"]


def test_the_logged_gradient_norm_is_the_mean_global_norm_before_clipping(tmp_path):
    norms: dict[int, float] = {}

    def loss_recording_the_gradient_norm(model, batch, step):
        loss = regression_loss(model, batch, step)  # [B]
        gradients = torch.autograd.grad(loss.mean(), list(model.parameters()), retain_graph=True)
        norms[step] = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in gradients])))
        return loss

    run_regression(loop_config(tmp_path, total_steps=6, log_every_steps=3, checkpoint_every_steps=0, grad_clip=0.01),
                   loss_fn=loss_recording_the_gradient_norm)
    logged = {record["step"]: record["grad_norm"] for record in RunDir(tmp_path).read_metrics()}
    assert min(norms.values()) > 10 * 0.01, "the norms are far above the clip, so clipped norms would not match"
    for step, first in ((3, 0), (6, 3)):
        expected = sum(norms[s] for s in range(first, step)) / 3
        assert logged[step] == pytest.approx(expected, rel=1e-5)


def test_linear_schedule_decays_to_zero(tmp_path):
    run_regression(loop_config(tmp_path, total_steps=10, lr_schedule="linear", warmup_steps=2, lr=1.0,
                               checkpoint_every_steps=0))
    lrs = [record["lr"] for record in RunDir(tmp_path).read_metrics()]
    assert lrs[:2] == [0.5, 1.0]  # warm-up over 2 steps
    assert lrs[2:] == pytest.approx([(10 - step) / 8 for step in range(2, 10)])  # decays to 0 at step 10


def test_nan_loss_step_is_skipped_and_counted(tmp_path):
    nan_step = 3
    weights_seen: dict[int, torch.Tensor] = {}
    ema_seen: dict[int, torch.Tensor] = {}

    def loss_with_nan(model, batch, step):
        weights_seen[step] = model.weight.detach().clone()
        loss = regression_loss(model, batch, step)
        return loss * float("nan") if step == nan_step else loss

    def record_ema(ema_model, step):
        ema_seen[step] = ema_model.weight.detach().clone()
        return {}

    cfg = loop_config(tmp_path, total_steps=6, eval_every_steps=1, checkpoint_every_steps=0)
    result = run_regression(cfg, loss_fn=loss_with_nan, evaluate=record_ema)
    assert result.skipped_steps == 1
    assert not torch.equal(weights_seen[nan_step], weights_seen[nan_step - 1])
    assert torch.equal(weights_seen[nan_step + 1], weights_seen[nan_step])  # no optimizer step
    assert not torch.equal(weights_seen[nan_step + 2], weights_seen[nan_step + 1])
    assert torch.equal(ema_seen[nan_step + 1], ema_seen[nan_step])  # no EMA update
    assert not torch.equal(ema_seen[nan_step + 2], ema_seen[nan_step + 1])
    skipped_by_step = {record["step"]: record["skipped_steps"] for record in RunDir(tmp_path).read_metrics()}
    assert skipped_by_step[nan_step] == 0 and skipped_by_step[nan_step + 1] == 1 and skipped_by_step[6] == 1
    assert torch.isfinite(weights_seen[5]).all()


def test_accumulating_two_half_batches_matches_one_full_batch(tmp_path):
    def exact_loss(model, batch, step):
        return (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2  # [B]

    weights = {}
    for accum, batch in ((1, 8), (2, 4)):
        cfg = loop_config(tmp_path / f"accum{accum}", total_steps=5, grad_accum_steps=accum, checkpoint_every_steps=0)
        accelerator = make_accelerator(cfg)
        torch.manual_seed(0)
        model = torch.nn.Linear(NUM_FEATURES, 1)
        initial_weight = model.weight.detach().clone()
        batches = InMemoryBatches(regression_data(), batch_per_process=batch, seed=cfg.seed)
        train_loop(cfg, model=model, loss_fn=exact_loss, batches=batches, accelerator=accelerator)
        weights[accum] = model.weight.detach().clone()
    assert_close(weights[1], weights[2], ulps=256, what="accumulated vs full batch")  # summation order differs
    assert not torch.allclose(weights[1], initial_weight, atol=1e-2)


def test_keeps_only_the_newest_checkpoints(tmp_path):
    run_regression(loop_config(tmp_path, total_steps=10, checkpoint_every_steps=2, keep_checkpoints=3))
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [6, 8, 10]
    assert sorted(entry.name for entry in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_6", "step_8"]


def test_resume_gives_the_identical_loss_sequence_and_ignores_half_written_checkpoints(tmp_path):
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    run_regression(loop_config(reference_dir, total_steps=20), extra=[SaveCounter()])

    first = run_regression(loop_config(resumed_dir, total_steps=10), extra=[SaveCounter()])
    assert first.final_step == 10
    checkpoints = resumed_dir / "checkpoints"
    # Leave what a kill during the save of step 15 would: a temp dir, and a step dir without its marker.
    shutil.copytree(checkpoints / "step_10", checkpoints / ".tmp-step_15")
    (checkpoints / ".tmp-step_15" / "optimizer.bin").write_bytes(b"truncated")
    shutil.copytree(checkpoints / "step_10", checkpoints / "step_15")
    (checkpoints / "step_15" / CHECKPOINT_MARKER).unlink()
    counter = SaveCounter()
    second = run_regression(loop_config(resumed_dir, total_steps=20), extra=[counter])

    assert second.start_step == 10 and second.final_step == 20
    assert counter.saves == 2 + 2  # restored count from step 10, then saves at 15 and 20
    assert logged_losses(resumed_dir) == logged_losses(reference_dir)
    assert [step for step, _ in complete_checkpoints(resumed_dir)] == [15, 20]
    assert not any(entry.name.startswith(".tmp") for entry in checkpoints.iterdir())


def test_sigkill_during_a_checkpoint_write_then_rerun_resumes_bitwise(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    run_regression(loop_config(reference_dir, lr_schedule="linear"), extra=[SaveCounter()])

    command = [sys.executable, str(THIS_SCRIPT), "train", str(killed_dir)]
    child = subprocess.Popen([*command, "--stop-on-save", "2"], cwd=REPO_ROOT, env=SCRIPT_ENV)
    _, status = os.waitpid(child.pid, os.WUNTRACED)  # returns once the child froze inside the step-10 save
    assert os.WIFSTOPPED(status), f"child ended before reaching the step-10 checkpoint (status {status})"
    assert RunDir(killed_dir).read_metrics()[-1]["step"] == 10
    assert (killed_dir / "checkpoints" / ".tmp-step_10" / "model.safetensors").exists()
    child.kill()
    child.wait()

    assert [step for step, _ in complete_checkpoints(killed_dir)] == [5]
    rerun = subprocess.run(command, check=False, cwd=REPO_ROOT, env=SCRIPT_ENV, capture_output=True, text=True,
                           timeout=HANG_LIMIT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result == {"start_step": 5, "final_step": 20}
    assert logged_losses(killed_dir) == logged_losses(reference_dir)


def test_two_processes_keep_identical_parameters_and_see_disjoint_batches(tmp_path):
    environment = {**SCRIPT_ENV, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(THIS_SCRIPT), "multiprocess", str(tmp_path),
    ]
    launched = subprocess.run(
        command, check=False, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=HANG_LIMIT_S
    )
    assert launched.returncode == 0, launched.stderr[-3000:]

    reports = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [report["world_size"] for report in reports] == [2, 2]
    for name, tensor in reports[0]["parameters"].items():
        assert torch.equal(tensor, reports[1]["parameters"][name])
    assert not torch.equal(reports[0]["parameters"]["weight"], reports[0]["initial_weight"])
    steps = sorted(reports[0]["indices"])
    assert steps == list(range(6)) and sorted(reports[1]["indices"]) == steps
    for step in steps:
        rank0, rank1 = set(reports[0]["indices"][step]), set(reports[1]["indices"][step])
        assert len(rank0) == len(rank1) == BATCH_PER_PROCESS and not rank0 & rank1
    final_checkpoint = tmp_path / "run" / "checkpoints" / "step_6"
    assert (final_checkpoint / "random_states_0.pkl").exists() and (final_checkpoint / "random_states_1.pkl").exists()


def _free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_command(output_dir: str, stop_on_save: int | None) -> None:
    """Child process of the SIGKILL test: the reference regression run, optionally freezing mid-save."""
    cfg = loop_config(Path(output_dir), lr_schedule="linear")
    result = run_regression(cfg, extra=[SaveCounter(stop_on_save)])
    print(json.dumps({"start_step": result.start_step, "final_step": result.final_step}))


def _multiprocess_command(output_dir: str) -> None:
    """One rank of the two-process test: train 6 steps, record the batch indices seen and the final parameters."""
    indices: dict[int, list[int]] = {}

    def recording_loss(model, batch, step):
        indices[step] = batch["index"].tolist()
        return regression_loss(model, batch, step)

    cfg = loop_config(Path(output_dir) / "run", total_steps=6, checkpoint_every_steps=3, torch_threads=None)
    accelerator = make_accelerator(cfg)
    torch.manual_seed(100 + accelerator.process_index)  # a different init per rank: DDP must broadcast rank 0's
    model = torch.nn.Linear(NUM_FEATURES, 1)
    batches = InMemoryBatches(regression_data(), batch_per_process=BATCH_PER_PROCESS, seed=cfg.seed)
    initial_weight = model.weight.detach().clone()
    result = train_loop(cfg, model=model, loss_fn=recording_loss, batches=batches, accelerator=accelerator)
    assert result.final_step == 6
    report = {
        "world_size": accelerator.num_processes,
        "indices": indices,
        "initial_weight": initial_weight,
        "parameters": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
    }
    torch.save(report, Path(output_dir) / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="child processes of tests/test_loop.py")
    parser.add_argument("command", choices=["train", "multiprocess"])
    parser.add_argument("output_dir")
    parser.add_argument("--stop-on-save", type=int, default=None)
    arguments = parser.parse_args()
    if arguments.command == "train":
        _train_command(arguments.output_dir, arguments.stop_on_save)
    else:
        _multiprocess_command(arguments.output_dir)


@pytest.mark.parametrize("constant", [False, True])
def test_constant_ema_holds_the_initial_weights_where_the_default_ramp_follows_the_raw_ones(tmp_path, constant):
    torch.manual_seed(0)
    initial = torch.nn.Linear(NUM_FEATURES, 1).weight.detach().clone()  # the weights run_regression starts from
    exported = {}

    def keep_ema(ema_model, directory):
        exported["weight"] = ema_model.weight.detach().clone()

    cfg = loop_config(tmp_path, total_steps=1, checkpoint_every_steps=0, ema_constant=constant)
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    model = torch.nn.Linear(NUM_FEATURES, 1)
    batches = InMemoryBatches(regression_data(), batch_per_process=BATCH_PER_PROCESS, seed=cfg.seed)
    train_loop(cfg, model=model, loss_fn=regression_loss, batches=batches, accelerator=accelerator, export=keep_ema)
    raw = model.weight.detach()
    decay = 0.9 if constant else 0.0  # diffusers' EMAModel copies the raw weights at its first update
    expected = decay * initial + (1 - decay) * raw
    assert not torch.allclose(raw, initial), "one step moved the raw weights"
    torch.testing.assert_close(exported["weight"], expected)
