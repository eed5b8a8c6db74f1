"""The stages' data keys, spelled the same in mid-training and post-training.

    data: stores | online | dataset     where the batches come from (each stage names the kinds it takes)
    stores: [<url>, ...]                the trajectory stores of pipeline/generate.py (data=stores)
    dataset: <name>                     real images: digits, mnist, folder:<path> (data=dataset, post-training)

Presets and the `config.yaml` a run writes use these three keys. On the command line `--data store:<url>[,<url>...]`
and `--data dataset:<name>` remain the short form of `data=stores stores=[...]` and `data=dataset dataset=<name>`; the
short form replaces the preset's `stores` / `dataset`, so `--data store:other.zarr` with a preset that lists a store
trains on other.zarr only. A stage resolves the short form in its config's `__post_init__` (`resolve_onto`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.config import ConfigError

STORE_PREFIX, DATASET_PREFIX = "store:", "dataset:"
SHORT_FORMS = {STORE_PREFIX: "stores", DATASET_PREFIX: "dataset"}
SHORT_FORM_VALUES = {"stores": "<url>[,<url>...]", "dataset": "<name>"}


@dataclass(frozen=True)
class DataKeys:
    """The resolved `data`, `stores` and `dataset` of one stage config."""

    data: str
    stores: tuple[str, ...]
    dataset: str | None


def _split_urls(text: str) -> tuple[str, ...]:
    return tuple(url.strip() for url in text.split(",") if url.strip())


def resolve_data_keys(data: str, stores: Sequence[str], dataset: str | None, *, kinds: Sequence[str],
                      stage: str) -> DataKeys:
    """Expand the short form of `data` and check the kinds `stage` takes; a ConfigError names the fix.

    `kinds` lists the values of `data` the stage accepts (mid: stores, online; post: stores, dataset)."""
    stores = tuple(stores)
    for prefix, kind in SHORT_FORMS.items():
        if data.startswith(prefix):
            if kind not in kinds:
                break
            value = data[len(prefix):].strip()
            if not value:
                raise ConfigError(f"data={data!r} names no {kind}: write `{prefix}{SHORT_FORM_VALUES[kind]}`")
            if kind == "stores":
                return DataKeys("stores", _split_urls(value), dataset)
            return DataKeys("dataset", stores, value)
    if data not in kinds:
        short = [f"{prefix}{SHORT_FORM_VALUES[kind]}" for prefix, kind in SHORT_FORMS.items() if kind in kinds]
        raise ConfigError(f"{stage} takes data={' | '.join(kinds)} (or {' | '.join(short)}), not data={data!r}")
    if data == "stores" and not stores:
        raise ConfigError("stores is empty: list at least one trajectory store (pipeline/generate.py prints it), e.g. "
                          "`--data store:<url>`" + (", or train on freshly solved trajectories with data=online"
                                                    if "online" in kinds else ""))
    if data == "dataset" and not (dataset and dataset.strip()):
        raise ConfigError("data=dataset needs the dataset's name: `--data dataset:<name>` (digits, mnist, "
                          "folder:<path>)")
    return DataKeys(data, stores, dataset.strip() if dataset else dataset)


def resolve_onto(config: Any, *, kinds: Sequence[str], stage: str) -> None:
    """Resolve a frozen stage config's data keys in place (from its `__post_init__`); a config without a `dataset`
    key (mid-training) is resolved as if it were none."""
    keys = resolve_data_keys(config.data, config.stores, getattr(config, "dataset", None), kinds=kinds, stage=stage)
    object.__setattr__(config, "data", keys.data)
    object.__setattr__(config, "stores", keys.stores)
    if hasattr(config, "dataset"):
        object.__setattr__(config, "dataset", keys.dataset)


def describe_data(keys: Any) -> str:
    """The data keys (a DataKeys or a stage config) as the user can type them back, for error messages:
    `--data store:a,b` or `--data dataset:x`."""
    if keys.data == "stores":
        return f"--data {STORE_PREFIX}{','.join(keys.stores)}"
    if keys.data == "dataset":
        return f"--data {DATASET_PREFIX}{keys.dataset}"
    return f"data={keys.data}"
