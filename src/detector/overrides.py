"""Every ``key=value`` on a command line is checked against the keys that command reads.

Hydra answers a typo (``treshold=0.9``) with "Key 'treshold' is not in struct ... use
+treshold=0.9", and following that advice runs with the threshold unchanged, silently. Here a
key the command does not have is one ``error:`` line naming it and the closest valid keys, and a
``+key`` that nothing reads is refused the same way. Keys under ``callbacks``, ``logger`` and
``hydra`` may be added (each entry there is instantiated or read whole), and so may keys inside
a block that is instantiated whole (``+model.scheduler._target_=...``); ``+trainer.X`` must be
an argument of Lightning's ``Trainer``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf

from detector.errors import ConfigError

# Whole sections whose entries are all used: a new one added with ``+`` is read.
ADDABLE = ("callbacks", "logger", "hydra")


def config_groups(conf_dir: Path) -> set[str]:
    return {p.name for p in conf_dir.iterdir() if p.is_dir()}


def setting_keys(cfg: DictConfig) -> set[str]:
    """Every dotted key of a composed config, sections included (``data``, ``data.root``)."""

    def walk(node: Any, prefix: str) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{prefix}{key}"
                yield path
                yield from walk(value, path + ".")

    container = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    return set(walk(container, ""))


def suggest(key: str, keys: set[str], n: int = 3) -> list[str]:
    """The closest valid keys, by the whole dotted name and by its last part."""
    leaf = key.rsplit(".", 1)[-1]
    by_path = difflib.get_close_matches(key, sorted(keys), n=n, cutoff=0.85)
    leaves: dict[str, list[str]] = {}
    for k in sorted(keys):
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    close = difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.75)
    by_leaf = [k for m in close for k in leaves[m]]
    out: list[str] = []
    for k in by_path + by_leaf:
        if k not in out and k != key:
            out.append(k)
    return out[:n]


def _first_value(override: Override) -> str:
    """``data=a,b`` (a sweep) composes as its first choice for the check."""
    if override.is_sweep_override():
        return str(next(iter(override.sweep_string_iterator())))
    return override.get_value_element_as_str()


def compose_for(conf_dir: Path, config_name: str, overrides: Sequence[Override]) -> DictConfig:
    """The command's config with the group choices of ``overrides`` (e.g. ``data=demo_hr``)."""
    groups = config_groups(conf_dir)
    chosen = [
        f"{o.get_key_element().lstrip('+~')}={_first_value(o)}"
        for o in overrides
        if o.key_or_group.split("/")[0] in groups and not o.is_delete()
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir), job_name="check"):
        return compose(config_name=config_name, overrides=chosen)


def _trainer_arguments() -> set[str]:
    import lightning  # seconds to import: only when a +trainer.X override needs it

    return set(inspect.signature(lightning.Trainer.__init__).parameters)


def check_overrides(command: str, conf_dir: Path, config_name: str, args: Sequence[str]) -> None:
    """Raise ConfigError for a key that ``command`` does not read (see the module docstring)."""
    candidates = [a for a in args if not a.startswith("-")]
    if not candidates:
        return
    overrides = OverridesParser.create().parse_overrides(candidates)
    groups = config_groups(conf_dir)
    cfg = compose_for(conf_dir, config_name, overrides)
    keys = setting_keys(cfg)
    for o in overrides:
        key = o.key_or_group
        top = key.split(".")[0].split("/")[0]
        if top == "hydra" or (top in groups and "." not in key) or key in keys or o.is_delete():
            continue
        hint = suggest(key, keys)
        did_you_mean = f" (did you mean {' or '.join(hint)}?)" if hint else ""
        help_line = f"; python {command} --help lists its settings"
        trainer_arg = top == "trainer" and key.count(".") == 1
        if not o.is_add() and not o.is_force_add():
            if trainer_arg and key.split(".")[1] in _trainer_arguments():
                raise ConfigError(
                    f"{key} is a Lightning Trainer argument that conf/trainer does not set: add "
                    f"it with +{key}={o.get_value_element_as_str()}"
                )
            raise ConfigError(f"{command} has no setting {key!r}{did_you_mean}{help_line}")
        parts = key.split(".")
        inside_a_block = any(".".join(parts[:i]) in keys for i in range(2, len(parts)))
        if top in ADDABLE or inside_a_block:  # e.g. +model.scheduler._target_=...
            continue
        if trainer_arg and key.split(".")[1] in _trainer_arguments():
            continue
        raise ConfigError(
            f"+{key}={o.get_value_element_as_str()} adds a setting that {command} never reads"
            f"{did_you_mean}{help_line}"
        )
