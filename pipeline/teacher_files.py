"""Find a teacher's files in every diffusers layout, locally or in the Hugging Face hub cache (no torch, no weights read).

Layouts (ARCHITECTURE.md, "Teacher layouts"):

- ``pipeline``  model_index.json with the model in ``unet/`` or ``transformer/``, the scheduler in ``scheduler/``, the
                VAE in ``vae/`` (DiTPipeline, facebook/DiT-XL-2-256; what ``save_pretrained`` writes).
- ``flat``      model_index.json, config.json, the weights and scheduler_config.json all at the root, no ``unet/``
                folder (google/ddpm-cifar10-32 as published).
- ``model``     a bare model directory (config.json + weights); the scheduler comes from ``scheduler_config.json``
                beside it, ``scheduler/`` inside or next to it, or is given separately.

A source is a local directory or a hub id (``org/name``) with an optional revision (branch, tag, commit or
``refs/pr/N``), resolved through ``huggingface_hub`` so ``HF_HUB_OFFLINE`` and the hub cache are honoured. Only
configs and weights are fetched; code files in a repository are never downloaded or run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PickleCheckpointError",
    "TeacherFiles",
    "TeacherLoadError",
    "diffusers_class",
    "locate_teacher",
    "scheduler_config_file",
]

MODEL_KEYS = ("transformer", "unet")
WEIGHT_PREFIX = "diffusion_pytorch_model"


class TeacherLoadError(ValueError):
    """The teacher could not be loaded; the message names the problem and the fix."""


class PickleCheckpointError(TeacherLoadError):
    """A pickled checkpoint that cannot be read as plain tensors; it is refused, and nothing in it runs."""


@dataclass(frozen=True)
class TeacherFiles:
    """Where a teacher's parts are: the model directory, the scheduler config and the VAE directory (or None)."""

    source: str  # what the user named: a directory or a hub id
    root: Path  # that directory, or the hub snapshot of the revision
    layout: str  # "pipeline" | "flat" | "model"
    model_dir: Path
    scheduler_config: Path | None
    vae_dir: Path | None

    def model_config(self) -> dict[str, Any]:
        """The model's config.json as a dict."""
        return json.loads((self.model_dir / "config.json").read_text())


def diffusers_class(name: Any, base: type, what: str) -> type:
    """A class from the diffusers namespace that subclasses `base` (never remote code, never a custom class)."""
    import diffusers

    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TeacherLoadError(
            f"{what} class {name!r} is not a diffusers {base.__name__} class; custom code is never loaded "
            "(no trust_remote_code): save the component with a built-in diffusers class"
        )
    return cls


def scheduler_config_file(location: str | os.PathLike) -> Path:
    """The scheduler_config.json of a scheduler given separately (the file, its directory, or `<dir>/scheduler`)."""
    path = Path(location).expanduser()
    for candidate in (path, path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
        if candidate.is_file() and candidate.name == "scheduler_config.json":
            return candidate
    raise TeacherLoadError(
        f"--scheduler {location}: no scheduler_config.json there; give the scheduler's directory or its "
        "scheduler_config.json (e.g. the scheduler/ folder of the pipeline the model was trained with)"
    )


def _checked_index(root: Path) -> tuple[dict[str, Any], str]:
    """model_index.json and the key of its model component; refuses components from other libraries."""
    index = json.loads((root / "model_index.json").read_text())
    key = next((k for k in MODEL_KEYS if k in index), None)
    if key is None:
        components = sorted(k for k in index if not k.startswith("_"))
        raise TeacherLoadError(
            f"{root}/model_index.json lists neither a 'unet' nor a 'transformer' component (components: "
            f"{components}): pass the model directory instead"
        )
    for component in (key, "vae"):
        entry = index.get(component)
        if isinstance(entry, list) and entry and entry[0] not in ("diffusers", None):
            raise TeacherLoadError(
                f"component {component!r} comes from library {entry[0]!r}; only diffusers classes are loaded "
                "(no remote code): re-save it with a diffusers class"
            )
    return index, key


def _first_scheduler(*candidates: Path) -> Path | None:
    """The first existing scheduler_config.json among `candidates`."""
    return next((c for c in candidates if c.is_file()), None)


def _local_layout(source: str, root: Path) -> TeacherFiles:
    """Classify a local directory (or hub snapshot) into a layout and find its parts."""
    if not root.is_dir():
        raise TeacherLoadError(f"{root} is a file, not a directory: pass a diffusers pipeline or model directory")
    if (root / "model_index.json").is_file():
        index, key = _checked_index(root)
        nested = root / key
        if (nested / "config.json").is_file():
            vae_listed = isinstance(index.get("vae"), list) and index["vae"][0]
            if vae_listed and not (root / "vae" / "config.json").is_file():
                raise TeacherLoadError(f"{root}/model_index.json lists a 'vae' but {root}/vae/config.json is missing")
            scheduler = _first_scheduler(root / "scheduler" / "scheduler_config.json")
            return TeacherFiles(source, root, "pipeline", nested, scheduler, root / "vae" if vae_listed else None)
        if (root / "config.json").is_file():
            return TeacherFiles(source, root, "flat", root, _first_scheduler(root / "scheduler_config.json"), None)
        raise TeacherLoadError(
            f"{root}/model_index.json lists {key!r}, but neither {key}/config.json (a pipeline) nor config.json at "
            "the root (a flat model repository) exists: the download is incomplete"
        )
    if (root / "config.json").is_file():
        scheduler = _first_scheduler(
            root / "scheduler_config.json", root / "scheduler" / "scheduler_config.json",
            root.parent / "scheduler" / "scheduler_config.json",
        )
        return TeacherFiles(source, root, "model", root, scheduler, None)
    if (root / "scheduler_config.json").is_file():
        raise TeacherLoadError(
            f"{root} is a scheduler directory, not a model: pass the pipeline directory (with model_index.json) or "
            "the model directory, and this one as the scheduler (--scheduler, scheduler= in Python)"
        )
    raise TeacherLoadError(
        f"{root} is not a diffusers model or pipeline directory: expected model_index.json (a pipeline or a flat model "
        "repository) or config.json + diffusion_pytorch_model.safetensors/.bin (a model saved with save_pretrained)"
    )


def looks_like_path(source: str) -> bool:
    """True for strings that are clearly filesystem paths rather than hub ids."""
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1 or os.path.isabs(source)


def locate_teacher(source: str | os.PathLike, *, revision: str | None = None, weights: bool = True) -> TeacherFiles:
    """The teacher's files for a local directory or a hub id (weights fetched only when `weights`)."""
    path = Path(source).expanduser()
    if path.exists():
        if revision is not None:
            raise TeacherLoadError(
                f"--revision {revision} applies to hub ids, but {source} is a local directory: drop --revision"
            )
        return _local_layout(str(source), path)
    if looks_like_path(str(source)):
        raise TeacherLoadError(f"{source} does not exist: pass an existing diffusers pipeline or model directory")
    from pipeline.hub import fetch_weights, snapshot

    files = _local_layout(str(source), snapshot(str(source), revision, ["*.json"]))
    if weights:
        for directory in (files.model_dir, files.vae_dir):
            if directory is not None:
                fetch_weights(str(source), revision, files.root, directory)
    return files
