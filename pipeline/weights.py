"""Model weights: safetensors as they are; pickled ``.bin`` through weights-only unpickling, converted once to safetensors.

A ``diffusion_pytorch_model.bin`` (what facebook/DiT-XL-2-256 publishes on its main revision) is read with
``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which builds tensors and plain containers only and
refuses every other global, so no code from the file ever runs. The result must be a flat ``{name: tensor}`` dict;
anything else is refused. The tensors are written once as safetensors under ``<cache root>/converted-weights/`` and
every later load (any process, any node sharing the cache) reads that file. The teacher's fingerprint hashes the
loaded tensors, so the same weights give the same fingerprint in either format.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from torch import nn

from pipeline.paths import cache_location, exists, local_copy, write_bytes
from pipeline.teacher_files import WEIGHT_PREFIX, PickleCheckpointError, TeacherLoadError, diffusers_class

__all__ = ["converted_weights", "load_model_dir", "read_pickled_tensors"]

_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def read_pickled_tensors(path: Path) -> dict:
    """{name: tensor} from a pickled checkpoint through weights-only unpickling; anything else is refused."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - every unpickling failure is a refusal with the reason
        reason = next((line.strip() for line in str(error).splitlines() if "Unsupported" in line), None)
        raise PickleCheckpointError(
            f"{path} is not plain tensors: weights-only unpickling refused it "
            f"({reason or f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else error!r}'}). "
            "Nothing from the file was run. Only pickles of {name: tensor} dicts are read; get the weights as "
            "safetensors (e.g. the repository's safetensors revision, --revision refs/pr/<N>) or from a source you trust"
        ) from error
    if not isinstance(state, dict):
        raise PickleCheckpointError(
            f"{path} holds a {type(state).__name__}, not a {{name: tensor}} state dict: save the model with "
            "save_pretrained (or torch.save(model.state_dict()))"
        )
    extras = [f"{name!r} ({type(value).__name__})" for name, value in state.items()
              if not (isinstance(name, str) and isinstance(value, torch.Tensor))]
    if extras:
        raise PickleCheckpointError(
            f"{path} holds entries that are not tensors: {', '.join(extras[:5])}{' ...' if len(extras) > 5 else ''}; "
            "only a flat {name: tensor} state dict is a model checkpoint. Save the model alone with save_pretrained"
        )
    return state


def _pickle_stamp(path: Path) -> str:
    """sha256 of a pickled file's real path, size and mtime: the key of its conversion in the cache."""
    real = path.resolve()
    stat = real.stat()
    return hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()


def converted_weights(pickled: Path) -> str:
    """Cache location of the safetensors conversion of `pickled` (converted now if it is not there yet)."""
    from safetensors.torch import save

    place = cache_location("converted-weights", _pickle_stamp(pickled), f"{WEIGHT_PREFIX}.safetensors")
    if not exists(place):
        tensors = {name: tensor.contiguous() for name, tensor in read_pickled_tensors(pickled).items()}
        write_bytes(place, save(tensors, metadata={"converted_from": pickled.name}))
    return place


def _weights_variant(directory: Path) -> tuple[str, str | None]:
    """('safetensors', variant) or ('pickle', file name) for a model directory; refuses directories without weights."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    if {f"{WEIGHT_PREFIX}.safetensors", f"{WEIGHT_PREFIX}.safetensors.index.json"} & set(names):
        return "safetensors", None
    for name in names:
        parts = name.split(".")
        if name.startswith(f"{WEIGHT_PREFIX}.") and name.endswith(".safetensors") and len(parts) == 3:
            return "safetensors", parts[1]
    if f"{WEIGHT_PREFIX}.bin" in names:
        return "pickle", f"{WEIGHT_PREFIX}.bin"
    pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES) or n.endswith(".bin.index.json")]
    if pickles:
        raise PickleCheckpointError(
            f"{directory} holds only {', '.join(pickles)}: sharded, variant or non-diffusers pickles are not read. "
            f"Get {WEIGHT_PREFIX}.safetensors (or a single {WEIGHT_PREFIX}.bin state dict) for this model"
        )
    raise TeacherLoadError(
        f"{directory} has no {WEIGHT_PREFIX}.safetensors (or .bin): save the model with "
        "save_pretrained(dir, safe_serialization=True)"
    )


def load_model_dir(directory: Path, what: str = "model") -> nn.Module:
    """Load one diffusers model directory (config.json + safetensors, or a .bin read as tensors only)."""
    from diffusers import ModelMixin

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise TeacherLoadError(f"{directory} has no config.json: it is not a diffusers {what} directory")
    cls = diffusers_class(json.loads(config_file.read_text()).get("_class_name"), ModelMixin, what)
    kind, detail = _weights_variant(directory)
    if kind == "safetensors":
        return cls.from_pretrained(str(directory), use_safetensors=True, variant=detail)
    converted = converted_weights(directory / detail)
    with tempfile.TemporaryDirectory(prefix="cmt-converted-") as staging:
        shutil.copyfile(config_file, Path(staging) / "config.json")
        weights = local_copy(converted, staging)
        if weights.parent != Path(staging):
            os.symlink(weights, Path(staging) / f"{WEIGHT_PREFIX}.safetensors")
        return cls.from_pretrained(staging, use_safetensors=True)
