"""The project's one config loader: a YAML preset, then command-line values, resolved into a frozen dataclass.

Every CLI builds its settings this way: the training stages (`trainer/config.py`: `--config`, `--dry-run` and
`key=value` overrides) and the generation job (`pipeline/generate_options.py`: its flags). A config is a frozen
dataclass whose `__post_init__` checks its own values; sub-configs are nested dataclasses (the training loop's
`LoopConfig` sits under the key `loop`). A preset is a nested YAML mapping:

    dataset: digits
    loop:
      total_steps: 3000
      lr: 2.0e-4

Overrides name a key by its dotted path and accept these spellings (dashes and underscores are equal):

    loop.lr=1e-3    --loop.lr=1e-3    --loop.lr 1e-3    --loop.total-steps 100

A leaf name that occurs once in the whole config may be used alone (`lr=1e-3` means `loop.lr=1e-3`);
a name that occurs in several places must be written in full. A bool may be given as a bare flag
(`--loop.ema-warmup`). Values are parsed to the field's declared type: int, float, bool, str,
`X | None` (`none`/`null` give None), `Literal[...]` (checked against its choices), `tuple[X, ...]`
(`[32,64]` or `32,64`), `dict` (a YAML mapping, `{a: 1}` in an override) and nested dataclasses. A CLI with a parser
of its own (argparse) hands over values it has already typed (`parsed_values`), which are taken as they are.
An unknown key raises `UnknownKeyError` naming the key, the closest valid key and the preset file; a required key
that nothing sets raises `MissingKeyError`. Both are `ConfigError`s and carry the key, so a CLI can say it in the
words its users type. A `ConfigError` (or subclass) raised by a config's own checks passes through unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

ConfigT = TypeVar("ConfigT")

_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A preset or override that cannot be turned into a config; the message says how to fix it."""


class UnknownKeyError(ConfigError):
    """A key the config does not have: `key` as written (dotted), the closest valid key, all valid keys, and whether
    the preset file (rather than an override) named it."""

    def __init__(self, message: str, *, key: str, suggestion: str | None, valid_keys: Sequence[str], in_preset: bool):
        super().__init__(message)
        self.key, self.suggestion, self.valid_keys, self.in_preset = key, suggestion, tuple(valid_keys), in_preset


class MissingKeyError(ConfigError):
    """A required key (a field without a default) that neither the preset nor the command line set."""

    def __init__(self, message: str, *, key: str):
        super().__init__(message)
        self.key = key


def load_config(
    cls: type[ConfigT],
    yaml_path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    parsed_values: Mapping[str, Any] | None = None,
) -> ConfigT:
    """Build `cls` from the YAML preset at `yaml_path` (optional), then `parsed_values` (dotted key → a value a CLI's
    own parser already typed, taken as it is), then `overrides` (`key=value` text, parsed to the field types) in order."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    preset_name = str(yaml_path) if yaml_path is not None else "<no preset>"
    leaf_types = _leaf_types(cls)
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    typed: set[str] = set()
    if yaml_path is not None:
        preset = read_preset(Path(yaml_path))
        for key, value in _flatten_mapping(preset, cls, preset_name, prefix=""):
            raw[key] = value
            sources[key] = f"preset {preset_name}"
    for key, value in (parsed_values or {}).items():
        key = _resolve_key(key.replace("-", "_"), leaf_types, preset_name)
        raw[key] = value
        sources[key] = "the command line"
        typed.add(key)
    for key, value in _split_overrides(overrides, leaf_types, preset_name):
        raw[key] = value
        sources[key] = f"override `{key}={value}`"
        typed.discard(key)
    return _build(cls, _Settings(raw, sources, typed, preset_name), prefix="")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config (tuples as lists) that YAML can write and `load_config` reads back."""
    result: dict[str, Any] = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            result[field.name] = config_to_dict(value)
        elif isinstance(value, tuple):
            result[field.name] = list(value)
        else:
            result[field.name] = value
    return result


def describe_keys(cls: type) -> list[tuple[str, str, str]]:
    """(dotted key, type, default) of every settable key of a config dataclass; "required" where it has no default."""
    rows = []
    for key, annotation in _leaf_types(cls).items():
        owner, name = cls, key
        while "." in name:
            head, name = name.split(".", 1)
            owner = _dataclass_of(_field_types(owner)[head])
        field = next(f for f in dataclasses.fields(owner) if f.name == name)
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "required"
        type_name = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
        rows.append((key, type_name, default))
    return rows


def read_preset(path: str | os.PathLike) -> Mapping[str, Any]:
    """Parse a YAML preset into a mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"preset file {path} does not exist; pass an existing YAML file to --config")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"preset file {path} is not valid YAML ({error}); fix the file") from error
    if content is None:
        return {}
    if not isinstance(content, Mapping):
        raise ConfigError(f"preset file {path} must hold a mapping of config keys, got {type(content).__name__}")
    return content


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved type annotations of a dataclass's fields (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key of a (nested) config dataclass mapped to its declared type."""
    leaves: dict[str, Any] = {}
    for name, annotation in _field_types(cls).items():
        nested = _dataclass_of(annotation)
        if nested is not None:
            leaves.update(_leaf_types(nested, f"{prefix}{name}."))
        else:
            leaves[f"{prefix}{name}"] = annotation
    return leaves


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass type behind an annotation (plain, not Optional), or None."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation
    return None


def _unknown_key_error(key: str, valid_keys: Sequence[str], preset_name: str, *, in_preset: bool) -> UnknownKeyError:
    """UnknownKeyError for a key that names the closest valid key and the preset file."""
    close = difflib.get_close_matches(key, valid_keys, n=1, cutoff=0.0)
    hint = f"did you mean `{close[0]}`?" if close else "no similar key exists"
    return UnknownKeyError(
        f"unknown config key `{key}` (preset: {preset_name}); {hint} "
        f"Valid keys: {', '.join(sorted(valid_keys))}",
        key=key, suggestion=close[0] if close else None, valid_keys=valid_keys, in_preset=in_preset,
    )


def _flatten_mapping(node: Mapping[str, Any], cls: type, preset_name: str, prefix: str):
    """Yield (dotted key, raw value) for every leaf of a preset mapping, checking keys against `cls`."""
    field_types = _field_types(cls)
    for raw_key, value in node.items():
        name = str(raw_key).replace("-", "_")
        if name not in field_types:
            raise _unknown_key_error(f"{prefix}{name}", list(_leaf_types(cls, prefix)), preset_name, in_preset=True)
        nested = _dataclass_of(field_types[name])
        if nested is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"`{prefix}{name}` in preset {preset_name} must be a mapping of its fields "
                    f"({', '.join(f.name for f in dataclasses.fields(nested))}), got {value!r}"
                )
            yield from _flatten_mapping(value, nested, preset_name, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _split_overrides(overrides: Sequence[str], leaf_types: Mapping[str, Any], preset_name: str):
    """Yield (dotted key, string value) from `key=value`, `--key=value`, `--key value` and `--flag` tokens."""
    tokens = list(overrides)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        flag_form = token.startswith("-")
        body = token.lstrip("-")
        if "=" in body:
            key, value = body.split("=", 1)
        elif flag_form:
            key = body
            resolved = _resolve_key(key.replace("-", "_"), leaf_types, preset_name)
            next_token = tokens[index] if index < len(tokens) else None
            takes_value = next_token is not None and not next_token.startswith("--")
            if _is_bool(leaf_types[resolved]) and takes_value and next_token.lower() not in _TRUE_WORDS | _FALSE_WORDS:
                takes_value = False
            if takes_value:
                value = next_token
                index += 1
            elif _is_bool(leaf_types[resolved]):
                value = "true"
            else:
                raise ConfigError(f"override `{token}` needs a value: write `{token}=VALUE` or `{token} VALUE`")
        else:
            raise ConfigError(
                f"cannot read override `{token}`; write `key=value`, `--key=value` or `--key value`"
            )
        yield _resolve_key(key.replace("-", "_"), leaf_types, preset_name), value


def _resolve_key(key: str, leaf_types: Mapping[str, Any], preset_name: str) -> str:
    """Full dotted key for an override key, allowing a leaf name that is unique in the config."""
    if key in leaf_types:
        return key
    matches = [full for full in leaf_types if full.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(
            f"config key `{key}` is ambiguous (preset: {preset_name}); write one of: {', '.join(sorted(matches))}"
        )
    raise _unknown_key_error(key, list(leaf_types), preset_name, in_preset=False)


def _is_bool(annotation: Any) -> bool:
    """Whether a field's type is bool or bool | None."""
    if annotation is bool:
        return True
    return _is_optional(annotation) and _strip_optional(annotation) is bool


def _is_optional(annotation: Any) -> bool:
    """Whether an annotation is a union that admits None."""
    origin = typing.get_origin(annotation)
    return origin in (Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _strip_optional(annotation: Any) -> Any:
    """The non-None member of `X | None`."""
    members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if len(members) != 1:
        raise TypeError(f"unsupported config field type {annotation!r}: only `X | None` unions are allowed")
    return members[0]


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Parse a YAML value or an override string into the declared field type, or raise ConfigError."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"`{key}` must be {expected}, got {value!r} (from {source})")

    if _is_optional(annotation):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        return _coerce(value, _strip_optional(annotation), key, source)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        for choice in choices:
            if value == choice or (isinstance(value, str) and not isinstance(choice, str) and value == str(choice)):
                return choice
        raise fail(f"one of {', '.join(repr(choice) for choice in choices)}")
    if origin is tuple:
        args = typing.get_args(annotation)
        items = value
        if isinstance(value, str):
            text = value.strip()
            items = yaml.safe_load(text) if text[:1] in "[(" else [part for part in text.split(",") if part.strip()]
            if isinstance(items, str) or not isinstance(items, (list, tuple)):
                items = [items]
        if not isinstance(items, (list, tuple)):
            raise fail("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0], f"{key}[{i}]", source) for i, item in enumerate(items))
        if len(items) != len(args):
            raise fail(f"a list of {len(args)} items")
        return tuple(_coerce(item, arg, f"{key}[{i}]", source) for i, (item, arg) in enumerate(zip(items, args)))
    if annotation is dict or origin is dict:
        mapping = value
        if isinstance(value, str) and value.strip()[:1] == "{":
            mapping = yaml.safe_load(value)
        if not isinstance(mapping, Mapping):
            raise fail("a mapping")
        return dict(mapping)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE_WORDS:
            return True
        if text in _FALSE_WORDS:
            return False
        raise fail("true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise fail("an integer") from None
    if annotation is float:
        if isinstance(value, bool):
            raise fail("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise fail("a number") from None
    if annotation is str:
        if isinstance(value, (Mapping, list, tuple)) or value is None:
            raise fail("a string")
        return str(value)
    raise TypeError(f"unsupported config field type {annotation!r} for `{key}`")


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Everything given for one config, by dotted key: the raw value, where it came from (for messages), which values
    are already typed (`parsed_values`), and the preset's name."""

    raw: Mapping[str, Any]
    sources: Mapping[str, str]
    typed: set[str]
    preset_name: str


def _build(cls: type[ConfigT], settings: _Settings, prefix: str, base: Any = None):
    """Build `cls` (or update `base`, an instance of it) from flat dotted settings, recursing into sub-configs."""
    kwargs: dict[str, Any] = {}
    field_types = _field_types(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        annotation = field_types[field.name]
        nested = _dataclass_of(annotation)
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        if nested is not None:
            given = any(name.startswith(f"{key}.") for name in settings.raw)
            if base is not None:
                nested_base = getattr(base, field.name)
            elif field.default is not dataclasses.MISSING:
                nested_base = field.default
            elif field.default_factory is not dataclasses.MISSING:
                nested_base = field.default_factory()
            else:
                nested_base = None
            if given or nested_base is None:
                kwargs[field.name] = _build(nested, settings, f"{key}.", nested_base)
            continue
        if key in settings.typed:
            kwargs[field.name] = settings.raw[key]
        elif key in settings.raw:
            kwargs[field.name] = _coerce(settings.raw[key], annotation, key, settings.sources[key])
        elif base is None and not has_default:
            raise MissingKeyError(
                f"required config key `{key}` is not set; add it to the preset ({settings.preset_name}) "
                f"or pass `{key}=VALUE`",
                key=key,
            )
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid {cls.__name__} (preset: {settings.preset_name}): {error}") from error
