"""The stages' data keys (trainer/data_keys.py): `data`, `stores`, `dataset` spelled the same in mid- and
post-training, the `--data store:…` / `--data dataset:…` short form, and the errors for kinds a stage does not take."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from pipeline.config_loader import ConfigError, config_to_dict, load_config
from trainer.config import save_resolved
from trainer.mid import MidConfig
from trainer.post import PostConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
MID_PRESET = REPO_ROOT / "jobs" / "digits" / "mid.yaml"
POST_PRESET = REPO_ROOT / "jobs" / "digits" / "post.yaml"


def test_both_stages_name_their_data_with_the_same_keys_and_types():
    mid = {f.name: typing.get_type_hints(MidConfig)[f.name] for f in dataclasses.fields(MidConfig)}
    post = {f.name: typing.get_type_hints(PostConfig)[f.name] for f in dataclasses.fields(PostConfig)}
    for key in ("data", "stores"):
        assert mid[key] == post[key], key
    assert post["dataset"] == str | None


@pytest.mark.parametrize("config_cls, preset", [(MidConfig, MID_PRESET), (PostConfig, POST_PRESET)])
def test_short_form_resolves_to_the_keys_and_replaces_the_presets_stores(config_cls, preset, tmp_path):
    cfg = load_config(config_cls, preset, ["--data", "store:/a.zarr, s3://b/c.zarr"])
    assert (cfg.data, cfg.stores) == ("stores", ("/a.zarr", "s3://b/c.zarr"))
    assert config_to_dict(cfg)["data"] == "stores" and config_to_dict(cfg)["stores"] == ["/a.zarr", "s3://b/c.zarr"]
    reloaded = load_config(config_cls, save_resolved(cfg, tmp_path))
    assert reloaded == cfg


def test_presets_list_their_stores_under_the_same_key():
    mid, post = load_config(MidConfig, MID_PRESET), load_config(PostConfig, POST_PRESET)
    assert mid.data == "stores" and post.data == "dataset"  # the digits post preset trains on real images
    assert mid.stores == post.stores == ("runs/digits/store_heun_k8.zarr",)
    assert load_config(PostConfig, POST_PRESET, ["data=stores"]).stores == mid.stores


def test_dataset_short_form_and_long_form_agree():
    short = load_config(PostConfig, POST_PRESET, ["--data", "dataset:digits"])
    long = load_config(PostConfig, POST_PRESET, ["data=dataset", "dataset=digits"])
    assert short == long and (short.data, short.dataset) == ("dataset", "digits")
    assert short.data_flag == "--data dataset:digits"


@pytest.mark.parametrize("config_cls, preset, value, named", [
    (MidConfig, MID_PRESET, "dataset:digits", "data=stores | online"),
    (PostConfig, POST_PRESET, "online", "data=stores | dataset"),
    (PostConfig, POST_PRESET, "digits", "dataset:<name>"),
    (PostConfig, POST_PRESET, "store:", "names no stores"),
])
def test_a_data_kind_the_stage_does_not_take_is_refused_with_the_kinds_it_takes(config_cls, preset, value, named):
    with pytest.raises(ConfigError, match=named.replace("|", r"\|")):
        load_config(config_cls, preset, [f"data={value}"])


def test_empty_stores_and_unnamed_dataset_name_the_flag_to_type():
    with pytest.raises(ConfigError, match="stores is empty.*--data store:<url>"):
        load_config(PostConfig, POST_PRESET, ["data=stores", "stores=[]"])
    with pytest.raises(ConfigError, match="--data dataset:<name>"):
        load_config(PostConfig, POST_PRESET, ["data=dataset", "dataset=none"])
