"""``--help`` of an entry point: the keys it reads, their values, and what each means.

Hydra's own help lists every config group on the search path (predict would offer ``data``
and ``trainer``, which it never reads) and describes no key. Here the text is built from the
command's composed config (so ``train.py data=demo_hr --help`` shows demo_hr's values) and the
comments beside or above each key in the YAML files, which are the settings' documentation.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Sections whose new entries are read (detector.overrides), as the help names them.
ADDABLE = ("callbacks", "logger", "trainer")
# Groups that are plumbing, not choices a user makes.
HIDDEN_GROUPS = {"hydra", "paths"}
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w-]*):(.*)$")


def yaml_comments(path: Path, prefix: str = "") -> dict[str, str]:
    """Dotted key -> its comment: the inline one, else the comment block just above it."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    block: list[str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if not match:
            block = []
            continue
        indent, key, rest = len(match[1]), match[2], match[3]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([s for _, s in stack] + [key])
        stack.append((indent, key))
        inline = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        text = inline or " ".join(block)
        if text and key != "defaults":
            out[prefix + dotted] = text
        block = []
    return out


def _comments(conf_dir: Path, config_name: str, choices: dict[str, str]) -> dict[str, str]:
    comments = yaml_comments(conf_dir / f"{config_name}.yaml")
    for group, choice in choices.items():
        files = sorted((conf_dir / group).glob("*.yaml"))
        # the chosen file last, so its comments win over its siblings' (demo over imagefolder)
        files.sort(key=lambda p: p.stem == choice)
        for f in files:
            for key, text in yaml_comments(f, f"{group}.").items():
                if f.stem == choice or key not in comments:
                    comments[key] = text
    return comments


def _leaves(node: Any, prefix: str = ""):
    """(dotted key, shown value); a block with ``_target_`` is one entry (what it builds)."""
    if isinstance(node, dict):
        if "_target_" in node and prefix.count(".") >= 2:  # callbacks.x, logger.x
            yield prefix[:-1], f"<{node['_target_']}>"
            return
        for key, value in node.items():
            if key in ("defaults", "_target_"):
                continue
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], "null" if node is None else str(node)


def help_text(
    command: str, conf_dir: Path, config_name: str, cfg: DictConfig, chosen: dict[str, str]
) -> str:
    """The whole ``--help`` page for ``command`` with its composed config ``cfg``; ``chosen``:
    the group options given on the command line (``data=demo_hr``)."""
    width = min(shutil.get_terminal_size((100, 20)).columns, 120)
    header = (conf_dir / f"{config_name}.yaml").read_text().splitlines()
    lines = [h.lstrip("#").strip() for h in header[:4] if h.startswith("#")] + [""]
    choices = _group_choices(conf_dir, config_name) | {
        g: o for g, o in chosen.items() if g not in HIDDEN_GROUPS
    }
    if choices:
        lines.append("Groups (group=option; * marks the current choice):")
        for group in sorted(choices):
            options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
            shown = ", ".join(o + "*" if o == choices[group] else o for o in options)
            lines.append(f"  {group:<12}{shown}")
        lines.append("")
    comments = _comments(conf_dir, config_name, choices)
    container = OmegaConf.to_container(cfg, resolve=False)
    addable = [f"+{k}.{'ARG' if k == 'trainer' else 'NAME'}" for k in ADDABLE if k in container]
    lines.append(
        "Settings (key=value; every key is checked against this list"
        + (f"; new keys only as {', '.join(addable)}):" if addable else "):")
    )
    shown = {k: v for k, v in container.items() if k not in HIDDEN_GROUPS and k != "task_name"}
    pad = 36
    for key, value in _leaves(shown):
        entry = f"  {key}={value}"
        text = comments.get(key, "")
        if not text:
            lines.append(entry)
            continue
        first = entry.ljust(pad) if len(entry) < pad else entry + "\n" + " " * pad
        wrapped = textwrap.wrap(text, max(40, width - pad)) or [""]
        lines.append(first + wrapped[0])
        lines += [" " * pad + w for w in wrapped[1:]]
    lines += ["", f"Hydra's own options: python {command} --hydra-help"]
    return "\n".join(lines)


def _group_choices(conf_dir: Path, config_name: str) -> dict[str, str]:
    """group -> the option the command's defaults list picks (``null``: none)."""
    text = (conf_dir / f"{config_name}.yaml").read_text()
    pairs = re.findall(r"^\s*-\s*(\w+):\s*(\w+)", text, re.M)
    return {g: o for g, o in pairs if g not in HIDDEN_GROUPS and (conf_dir / g).is_dir()}
