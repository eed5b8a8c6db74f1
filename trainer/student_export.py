"""The student export format: write and read a `FlowMapStudent` directory (safetensors only, never pickles).

    <dir>/student.json              format version, time convention, net class, prediction type, parameterisation,
                                    schedule family, second time input, teacher fingerprint, sample shape, classes,
                                    latent (samples are VAE latents)
    <dir>/unet/                     the network (diffusers save_pretrained, safetensors); the teacher's architecture
    <dir>/scheduler/                the teacher's scheduler config (its noise schedule)
    <dir>/second_time.safetensors   MF form only: the (t − r) embedding (`trainer.second_time`)
    <dir>/vae/                      latent students: the teacher's VAE (diffusers save_pretrained), to decode samples

Format history, every version still read: 1 had no parameterisation (read the teacher's way, with a warning); 2 kept
the MF form's (t − r) embedding inside a UNet2DModel as its `class_embed_type="timestep"` class slot, which is moved
into the `SecondTimeEmbedding` on load (the same computation: the UNet added that slot's output to its time
embedding); 3 holds the embedding beside the network, for every architecture, and records `latent`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "NET_DIR",
    "SCHEDULER_DIR",
    "SECOND_TIME_FILE",
    "STUDENT_FILE",
    "STUDENT_FORMAT_VERSION",
    "VAE_DIR",
    "load_student",
    "load_vae",
    "save_student",
    "student_export_dir",
]

STUDENT_FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)
STUDENT_FILE = "student.json"
NET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
SECOND_TIME_FILE = "second_time.safetensors"
VAE_DIR = "vae"


def student_export_dir(path: str | os.PathLike) -> Path | None:
    """The student export `path` names: the directory itself, or the export/ of a training run's directory (None when
    neither holds a student.json)."""
    from trainer.run_dir import RunDir

    path = Path(path).expanduser()
    for candidate in (path, RunDir(path).export):
        if (candidate / STUDENT_FILE).is_file():
            return candidate
    return None


def metadata(student: Any) -> dict[str, Any]:
    """The contents of student.json for `student`."""
    from trainer.student import STUDENT_TIME_CONVENTION

    return {
        "format_version": STUDENT_FORMAT_VERSION,
        "kind": "FlowMapStudent",
        "time_convention": STUDENT_TIME_CONVENTION,
        "net_class": type(student.net).__name__,
        "prediction_type": student.prediction_type,
        "parameterization": student.parameterization.to_dict(),
        "schedule_family": student.schedule.family,
        "second_time_input": student.second_time_input,
        "second_time_scale": student.schedule.num_train_timesteps,
        "teacher_fingerprint": student.teacher_fingerprint,
        "sample_shape": list(student.sample_shape),
        "num_classes": student.num_classes,
        "latent": student.latent,
    }


def save_student(student: Any, directory: str | os.PathLike, *, vae: nn.Module | None = None) -> Path:
    """Write `student` (and a latent student's `vae`) into `directory` (created if missing)."""
    from safetensors.torch import save_file

    from trainer.student import StudentLoadError

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not hasattr(student.net, "save_pretrained"):
        raise StudentLoadError(f"{type(student.net).__name__} has no save_pretrained: only diffusers nets export")
    student.net.save_pretrained(directory / NET_DIR, safe_serialization=True)
    student.scheduler.save_pretrained(directory / SCHEDULER_DIR)
    if student.second_time_input:
        state = {name: tensor.detach().contiguous() for name, tensor in student.second_time.state_dict().items()}
        save_file(state, str(directory / SECOND_TIME_FILE))
    if vae is not None:
        vae.save_pretrained(directory / VAE_DIR, safe_serialization=True)
    (directory / STUDENT_FILE).write_text(json.dumps(metadata(student), indent=2))
    return directory


def _read_metadata(directory: Path) -> dict[str, Any]:
    """student.json of an export, checked for kind and version (StudentLoadError names the fix)."""
    from trainer.student import StudentLoadError

    meta_file = directory / STUDENT_FILE
    if not meta_file.is_file():
        hint = ""
        if (directory / "model_index.json").is_file() or (directory / "config.json").is_file():
            hint = (" It looks like a diffusers teacher: build a student from it with "
                    "FlowMapStudent.from_teacher(load_teacher(dir)).")
        raise StudentLoadError(
            f"{directory} is not a student export (no {STUDENT_FILE}); pass the `export` directory written by "
            f"trainer/mid.py or FlowMapStudent.save_pretrained.{hint}"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as error:
        raise StudentLoadError(f"{meta_file} is not valid JSON ({error}); re-export the student") from error
    if meta.get("kind") != "FlowMapStudent" or meta.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise StudentLoadError(
            f"{meta_file} holds format {meta.get('kind')!r} v{meta.get('format_version')!r}; this code reads "
            f"FlowMapStudent v{'/v'.join(map(str, READABLE_FORMAT_VERSIONS))}: re-export with this version of the "
            "project"
        )
    return meta


def _recorded_parameterization(meta: dict[str, Any], directory: Path) -> Any:
    """The parameterisation student.json records; format 1 exports predate them and read the teacher's way."""
    from trainer.parameterization import PARAMETERIZATION_NAMES, Parameterization
    from trainer.student import StudentLoadError

    if meta.get("format_version") == 1:
        warnings.warn(
            f"{directory} is a format-1 student export, written before parameterisations were recorded: it is read "
            "with the teacher's own c_skip/c_out (parameterization 'teacher'), which is what wrote it. Re-export it "
            "(load and save_pretrained) to record this and silence the warning",
            stacklevel=4,
        )
        return Parameterization("teacher")
    recorded = meta.get("parameterization")
    try:
        return Parameterization.from_dict(recorded)
    except ValueError as error:
        raise StudentLoadError(
            f"{directory}/{STUDENT_FILE} records parameterization {recorded!r}, which this code cannot read ({error}; "
            f"known: {', '.join(name for name in PARAMETERIZATION_NAMES if name != 'auto')}): re-export the student"
        ) from error


def _net_without_timestep_class_slot(net: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A format-2 MF net (UNet2DModel with class_embed_type="timestep") rebuilt without that slot, and the slot's
    weights under `SecondTimeEmbedding`'s key names."""
    config = {key: value for key, value in net.config.items() if not key.startswith("_")}
    config["class_embed_type"] = None
    state = net.state_dict()
    slot = {f"embedding.{key[len('class_embedding.'):]}": value
            for key, value in state.items() if key.startswith("class_embedding.")}
    rebuilt = type(net)(**config)
    rebuilt.load_state_dict({key: value for key, value in state.items() if not key.startswith("class_embedding.")})
    return rebuilt, slot


def load_student(directory: str | os.PathLike, *, second_time_input: bool | None = None,
                 device: str | torch.device = "cpu", cls: type | None = None) -> Any:
    """Load a student export of any readable format as `cls` (FlowMapStudent or a subclass); `second_time_input` (if
    given) must match the export."""
    import diffusers
    from safetensors.torch import load_file

    from trainer.student import STUDENT_TIME_CONVENTION, FlowMapStudent, StudentLoadError, _scheduler_from_config

    directory = Path(directory)
    meta = _read_metadata(directory)
    parameterization = _recorded_parameterization(meta, directory)
    if meta.get("time_convention") != STUDENT_TIME_CONVENTION:
        raise StudentLoadError(
            f"{directory} uses another time convention ({meta.get('time_convention')!r}); this code expects "
            f"{STUDENT_TIME_CONVENTION!r}: re-export the student with this version of the project"
        )
    if second_time_input is not None and bool(meta["second_time_input"]) != bool(second_time_input):
        raise StudentLoadError(
            f"{directory} holds a student with second_time_input={meta['second_time_input']} "
            f"({'MF' if meta['second_time_input'] else 'CM'} form), but second_time_input={second_time_input} "
            "was asked for: pass the matching export, or the matching form"
        )
    net_cls = getattr(diffusers, str(meta.get("net_class")), None)
    if not (isinstance(net_cls, type) and issubclass(net_cls, diffusers.ModelMixin)):
        raise StudentLoadError(f"net class {meta.get('net_class')!r} of {directory} is not a diffusers model class")
    if not (directory / NET_DIR / "config.json").is_file() or not (directory / SCHEDULER_DIR).is_dir():
        raise StudentLoadError(f"{directory} lacks {NET_DIR}/ or {SCHEDULER_DIR}/: incomplete export, re-export it")
    net = net_cls.from_pretrained(str(directory / NET_DIR), use_safetensors=True)
    second_time_state = None
    if meta["second_time_input"] and meta["format_version"] < 3:
        if getattr(net.config, "class_embed_type", None) != "timestep":
            raise StudentLoadError(f"{directory}: student.json says second_time_input but the net has no (t − r) input")
        net, second_time_state = _net_without_timestep_class_slot(net)
    elif meta["second_time_input"]:
        if not (directory / SECOND_TIME_FILE).is_file():
            raise StudentLoadError(f"{directory} lacks {SECOND_TIME_FILE} (the MF form's (t − r) embedding): re-export")
        second_time_state = load_file(str(directory / SECOND_TIME_FILE))
    config = json.loads((directory / SCHEDULER_DIR / "scheduler_config.json").read_text())
    student = (cls or FlowMapStudent)(
        net,
        _scheduler_from_config(config),
        prediction_type=meta["prediction_type"],
        second_time_input=bool(meta["second_time_input"]),
        teacher_fingerprint=meta.get("teacher_fingerprint"),
        sample_shape=tuple(meta["sample_shape"]),
        num_classes=meta.get("num_classes"),
        parameterization=parameterization,
        latent=bool(meta.get("latent", False)),
    )
    if second_time_state is not None:
        student.second_time.load_state_dict(second_time_state)
    if student.schedule.family != meta.get("schedule_family"):
        raise StudentLoadError(f"{directory}: scheduler family differs from student.json; re-export the student")
    return student.to(device)


def load_vae(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module | None:
    """The VAE saved with a latent student's export (`vae/`), or None when the export has none."""
    from pipeline.weights import load_model_dir

    path = Path(directory) / VAE_DIR
    if not (path / "config.json").is_file():
        return None
    return load_model_dir(path, "vae").to(device).eval()
