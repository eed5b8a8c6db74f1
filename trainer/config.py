"""The stages' command line and run record: `--config PRESET`, `--dry-run`, `key=value` overrides, `config.yaml`.

Every stage (pretrain, mid, post) has one frozen dataclass config, loaded by the project's one config loader,
`pipeline/config_loader.py` (YAML preset, overrides in every spelling, type parsing, unknown keys named with the closest
valid one), which the generation CLI shares. This module adds what only the stages need: splitting a stage's argv into
the preset, `--dry-run` and the overrides; the flat view of a config for experiment trackers; and the resolved config a
run writes to its output directory. `ConfigError`, `load_config` and `config_to_dict` are the loader's, re-exported
here for the stage modules.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config_loader import ConfigError, config_to_dict, describe_keys, load_config
from trainer.run_dir import RunDir

__all__ = [
    "ConfigError",
    "StageArgs",
    "config_to_dict",
    "flat_config_dict",
    "load_config",
    "parse_stage_args",
    "save_resolved",
    "stage_help",
]


@dataclass(frozen=True)
class StageArgs:
    """What a stage's CLI was asked for: the preset path, the overrides and whether to stop after resolving."""

    config_path: str | None
    overrides: tuple[str, ...]
    dry_run: bool
    help: bool = False


def parse_stage_args(argv: Sequence[str]) -> StageArgs:
    """Split a stage CLI's argv into `--config PATH`, `--dry-run`, `--help` and the remaining key=value overrides."""
    config_path: str | None = None
    dry_run = False
    overrides: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in ("--config", "-c"):
            if index + 1 >= len(argv):
                raise ConfigError("`--config` needs a preset path, e.g. `--config jobs/digits/pretrain.yaml`")
            config_path = argv[index + 1]
            index += 2
            continue
        if token.startswith("--config="):
            config_path = token.split("=", 1)[1]
        elif token in ("--dry-run", "--dry_run"):
            dry_run = True
        elif token in ("-h", "--help"):
            return StageArgs(config_path=config_path, overrides=(), dry_run=False, help=True)
        else:
            overrides.append(token)
        index += 1
    return StageArgs(config_path=config_path, overrides=tuple(overrides), dry_run=dry_run)


def stage_help(cls: type, module_doc: str) -> str:
    """`--help` of a stage: the module docstring's title and usage block, then every key with its default."""
    rows = describe_keys(cls)
    width = max(len(key) for key, _, _ in rows)
    paragraphs = module_doc.strip().split("\n\n")
    usage = [paragraph for paragraph in paragraphs if paragraph.startswith("    ")][:1]
    lines = [paragraphs[0], "", *usage, "",
             "Options: --config PRESET (a YAML file of keys), --dry-run (print the resolved run and exit), --help.",
             "Keys (key=value on the command line; a preset's value replaces the default, the command line wins):", ""]
    lines += [f"  {key.ljust(width)}  {default}  ({type_name})" for key, type_name, default in rows]
    return "\n".join(lines)


def flat_config_dict(cfg: Any) -> dict[str, bool | int | float | str]:
    """Flat `{dotted.key: scalar}` view of a config for experiment trackers (None and tuples as text)."""
    flat: dict[str, bool | int | float | str] = {}

    def visit(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                visit(value, f"{prefix}{key}.")
            elif isinstance(value, (bool, int, float, str)):
                flat[f"{prefix}{key}"] = value
            else:
                flat[f"{prefix}{key}"] = str(value)

    visit(config_to_dict(cfg), "")
    return flat


def save_resolved(cfg: Any, directory: str | os.PathLike) -> Path:
    """Write the resolved config to `<directory>/config.yaml` atomically; returns the file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = RunDir(directory).config
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    handle, temp_name = tempfile.mkstemp(prefix=".config.", suffix=".yaml.tmp", dir=directory)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(temp_name, target)
    return target
