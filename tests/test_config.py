"""Tests of the config system: presets, overrides, type parsing, errors, resolved-config round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from pipeline.config_loader import ConfigError, MissingKeyError, UnknownKeyError, load_config
from trainer.config import parse_stage_args, save_resolved
from trainer.loop import LoopConfig
from trainer.pretrain import PretrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DIGITS_PRESET = REPO_ROOT / "jobs" / "digits" / "pretrain.yaml"
TINY_PRESET = REPO_ROOT / "jobs" / "tiny" / "pretrain.yaml"


@dataclass(frozen=True, kw_only=True)
class Inner:
    width: int = 4
    scale: float | None = None
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    channels: tuple[int, ...] = (1, 2)
    pair: tuple[int, float] = (0, 0.0)
    mode: Literal["fast", "slow"] = "fast"
    verbose: bool = False
    ratio: float = 0.5
    seed: int = 1


def write_preset(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_preset_then_overrides_in_every_spelling(tmp_path):
    preset = write_preset(tmp_path, {"name": "from-yaml", "inner": {"width": 8}, "ratio": "1e-3"})
    cfg = load_config(
        Outer,
        preset,
        ["inner.width=16", "--ratio", "2.5", "--mode=slow", "--inner.scale", "0.25", "--verbose", "channels=[8,16,32]"],
    )
    assert cfg == Outer(name="from-yaml", inner=Inner(width=16, scale=0.25), ratio=2.5, mode="slow", verbose=True,
                        channels=(8, 16, 32))
    assert load_config(Outer, preset).ratio == 1e-3  # YAML's "1e-3" string is parsed as the field's float


def test_values_are_parsed_to_the_field_type(tmp_path):
    cfg = load_config(
        Outer,
        None,
        ["name=123", "channels=4,5", "pair=[3, 0.5]", "verbose=no", "inner.scale=none", "--inner.width", "7"],
    )
    assert cfg.name == "123" and isinstance(cfg.name, str)
    assert cfg.channels == (4, 5) and cfg.pair == (3, 0.5)
    assert cfg.verbose is False and cfg.inner.scale is None and cfg.inner.width == 7
    assert load_config(Outer, None, ["name=x", "--verbose", "--ratio=3"]).verbose is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.width=wide", "`inner.width` must be an integer"),
        ("ratio=fast", "`ratio` must be a number"),
        ("mode=medium", "one of 'fast', 'slow'"),
        ("verbose=maybe", "true or false"),
        ("pair=[1, 2, 3]", "a list of 2 items"),
    ],
)
def test_bad_values_name_the_key_and_the_expected_type(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(Outer, None, ["name=x", override])


def test_unknown_override_names_the_closest_key_and_the_preset(tmp_path):
    preset = write_preset(tmp_path, {"name": "x"})
    with pytest.raises(ConfigError) as caught:
        load_config(Outer, preset, ["inner.widht=3"])
    message = str(caught.value)
    assert "`inner.widht`" in message and "did you mean `inner.width`" in message and str(preset) in message


def test_unknown_preset_key_names_the_closest_key_and_the_file(tmp_path):
    preset = write_preset(tmp_path, {"name": "x", "inner": {"scael": 1.0}})
    expected = r"unknown config key `inner.scael`.*preset\.yaml.*did you mean `inner.scale`"
    with pytest.raises(ConfigError, match=expected):
        load_config(Outer, preset)


def test_real_stage_config_suggests_the_loop_key():
    with pytest.raises(ConfigError, match=r"did you mean `loop.total_steps`") as caught:
        load_config(PretrainConfig, DIGITS_PRESET, ["loop.total_step=5"])
    assert str(DIGITS_PRESET) in str(caught.value)


def test_unique_leaf_names_are_shorthand_and_ambiguous_ones_are_refused():
    cfg = load_config(Outer, None, ["name=x", "width=9", "seed=5"])
    assert cfg.inner.width == 9
    assert cfg.seed == 5 and cfg.inner.seed == 0  # an exact top-level key wins over nested leaves
    with pytest.raises(ConfigError, match="ambiguous.*first.seed, second.seed"):
        load_config(TwoSections, None, ["seed=3"])


@dataclass(frozen=True, kw_only=True)
class TwoSections:
    """Two nested sections that both have a `seed`, so `seed` alone is ambiguous."""

    first: Inner = field(default_factory=Inner)
    second: Inner = field(default_factory=Inner)


def test_missing_required_key_says_how_to_set_it():
    with pytest.raises(ConfigError, match=r"required config key `name` is not set.*name=VALUE"):
        load_config(Outer, None, [])


def test_loop_config_validation_is_reported_as_config_error():
    with pytest.raises(ConfigError, match="loop.total_steps must be >= 1"):
        load_config(PretrainConfig, TINY_PRESET, ["loop.total_steps=0"])
    with pytest.raises(ConfigError, match="one of 'radam', 'adamw'"):
        load_config(PretrainConfig, TINY_PRESET, ["loop.optimizer=sgd"])


def test_saved_resolved_config_loads_back_equal(tmp_path):
    cfg = load_config(
        PretrainConfig, DIGITS_PRESET, ["loop.lr=3e-4", "model.block_out_channels=[16,32]", "image_size=8",
                                        "loop.grad_clip=none"]
    )
    path = save_resolved(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(PretrainConfig, path) == cfg
    assert isinstance(cfg.loop, LoopConfig) and cfg.loop.grad_clip is None


def test_presets_resolve_and_dashes_equal_underscores():
    for preset in (DIGITS_PRESET, TINY_PRESET):
        cfg = load_config(PretrainConfig, preset)
        assert cfg.dataset == "digits" and cfg.loop.total_steps > 0
    dashed = load_config(PretrainConfig, TINY_PRESET, ["--loop.total-steps", "11", "--batch-per-process=4"])
    assert dashed.loop.total_steps == 11 and dashed.batch_per_process == 4


def test_stage_args_split_config_dry_run_and_overrides():
    args = parse_stage_args(["--config", "a.yaml", "loop.lr=1", "--dry-run", "--loop.seed", "3"])
    assert args.config_path == "a.yaml" and args.dry_run
    assert args.overrides == ("loop.lr=1", "--loop.seed", "3")
    assert parse_stage_args(["--config=b.yaml"]).config_path == "b.yaml"


@dataclass(frozen=True, kw_only=True)
class WithMapping:
    """A config with a free-form mapping field and an optional string, as the generation config has."""

    name: str
    note: str | None = None
    extra: dict | None = None


def test_mapping_fields_come_from_the_preset_or_an_override(tmp_path):
    preset = write_preset(tmp_path, {"name": "x", "extra": {"peak": {"fp32": 1.5}, "utilization": 0.4}})
    assert load_config(WithMapping, preset).extra == {"peak": {"fp32": 1.5}, "utilization": 0.4}
    assert load_config(WithMapping, preset, ["extra={a: 1}"]).extra == {"a": 1}
    with pytest.raises(ConfigError, match="`extra` must be a mapping"):
        load_config(WithMapping, preset, ["extra=3"])


def test_values_a_cli_parser_already_typed_are_taken_as_they_are_and_overrides_follow_them():
    cfg = load_config(WithMapping, None, parsed_values={"name": "none", "note": "null"})
    assert (cfg.name, cfg.note) == ("none", "null"), "no none-word parsing of values a CLI's own parser typed"
    assert load_config(WithMapping, None, ["note=none"], parsed_values={"name": "x", "note": "y"}).note is None


def test_unknown_and_missing_keys_carry_the_key_for_a_cli_to_reword(tmp_path):
    preset = write_preset(tmp_path, {"nmae": "x"})
    with pytest.raises(UnknownKeyError) as unknown:
        load_config(WithMapping, preset)
    assert (unknown.value.key, unknown.value.suggestion, unknown.value.in_preset) == ("nmae", "name", True)
    assert set(unknown.value.valid_keys) == {"name", "note", "extra"}
    with pytest.raises(UnknownKeyError) as override:
        load_config(WithMapping, None, ["nmae=x"])
    assert not override.value.in_preset
    with pytest.raises(MissingKeyError) as missing:
        load_config(WithMapping, None, [])
    assert missing.value.key == "name"


@pytest.mark.parametrize("stage", ["pretrain", "mid", "post"])
def test_stage_help_lists_every_key_with_its_default_and_starts_nothing(stage, capsys, tmp_path):
    """`python trainer/<stage>.py --help`: usage and every key (required ones marked), exit 0, no run directory."""
    import importlib

    from pipeline.config_loader import describe_keys

    module = importlib.import_module(f"trainer.{stage}")
    config_type = getattr(module, {"pretrain": "PretrainConfig", "mid": "MidConfig", "post": "PostConfig"}[stage])
    assert module.main(["--help", f"loop.output_dir={tmp_path / 'run'}"]) == 0
    shown = capsys.readouterr().out
    assert f"trainer/{stage}.py --config" in shown
    usage = [line for line in shown.splitlines() if line.startswith("    ")]
    assert all(len(line) <= 120 for line in usage), "a usage line ran on: keep its shell continuation (\\\\)"
    keys = describe_keys(config_type)
    for key, _, default in keys:
        assert f"  {key} " in shown
    assert dict((key, default) for key, _, default in keys)["loop.total_steps"] == "required"
    assert not (tmp_path / "run").exists()
