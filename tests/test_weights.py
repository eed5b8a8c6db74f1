"""Pickled .bin weights: read through weights-only unpickling (tensors only), never running code from the file."""

from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from pipeline.paths import cache_location
from pipeline.teacher import PickleCheckpointError, load_teacher
from tests.helpers import HANG_LIMIT_S, tiny_unet

REPO = Path(__file__).resolve().parents[1]


class _CodePayload:
    """Pickles as a call to exec(source): unpickling it with plain pickle runs `source`."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return builtins.exec, (self.source,)


def _model_dir(path: Path, state: object, model: UNet2DModel) -> Path:
    """A diffusers model directory with the model's config.json and `state` pickled as diffusion_pytorch_model.bin."""
    model.save_config(path)
    torch.save(state, path / "diffusion_pytorch_model.bin")
    DDPMScheduler().save_pretrained(path / "scheduler")
    return path


def test_a_bin_with_a_code_payload_is_refused_and_the_payload_never_runs(tmp_path):
    model = tiny_unet()
    marker, control_marker = tmp_path / "payload-ran", tmp_path / "control-payload-ran"
    state = dict(model.state_dict())
    evil = _model_dir(tmp_path / "evil", {**state, "payload": _CodePayload(f"open({str(marker)!r}, 'w').close()")},
                      model)
    control = tmp_path / "control.bin"
    torch.save({**state, "payload": _CodePayload(f"open({str(control_marker)!r}, 'w').close()")}, control)
    unsafe = subprocess.run(  # proves the payload is real: a plain unpickling in another process runs it
        [sys.executable, "-c", f"import torch; torch.load({str(control)!r}, weights_only=False)"],
        cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT_S,
    )
    assert unsafe.returncode == 0 and control_marker.exists(), unsafe.stderr

    converted_before = set(Path(cache_location("converted-weights")).rglob("*"))
    with pytest.raises(PickleCheckpointError, match="weights-only unpickling refused it") as info:
        load_teacher(evil)
    assert "exec" in str(info.value) and "Nothing from the file was run" in str(info.value)
    assert not marker.exists(), "the payload ran"
    assert set(Path(cache_location("converted-weights")).rglob("*")) == converted_before, "nothing was converted"


@pytest.mark.parametrize("state, message", [
    (lambda s: {**s, "epoch": 3}, r"'epoch' \(int\)"),
    (lambda s: list(s.values()), "holds a list, not a {name: tensor} state dict"),
    (lambda s: {"state_dict": s}, r"'state_dict' \(dict\)"),
])
def test_a_bin_with_anything_but_tensors_is_refused(tmp_path, state, message):
    model = tiny_unet()
    with pytest.raises(PickleCheckpointError, match=message):
        load_teacher(_model_dir(tmp_path / "model", state(dict(model.state_dict())), model))


def test_the_same_weights_as_bin_or_safetensors_give_one_fingerprint(tmp_path):
    model = tiny_unet()
    model.save_pretrained(tmp_path / "safetensors" / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "safetensors" / "scheduler")
    as_bin = _model_dir(tmp_path / "bin", dict(model.state_dict()), model)
    assert not list(as_bin.glob("*.safetensors"))
    assert load_teacher(as_bin).fingerprint == load_teacher(tmp_path / "safetensors" / "unet").fingerprint
    with torch.no_grad():
        model.conv_out.bias.add_(1e-3)
    changed = _model_dir(tmp_path / "changed", dict(model.state_dict()), model)
    assert load_teacher(changed).fingerprint != load_teacher(as_bin).fingerprint
