"""The cross-generator protocol: train one model per source (or, ``--mode leave-one-out``, one
on all sources but each one in turn), test every model on every source's test set, and write
the train x test matrix of AUROC, accuracy and AP: matrix.md, matrix.csv, matrix.png.

    python scripts/cross_generator.py --sources demo,demo_b [--out logs/cross/demo] \\
        [--mode per-source|leave-one-out] [--always NAME[,NAME]] [--held-out-only] \\
        [--eval KEY=VALUE ...] [TRAIN_OVERRIDE ...]

A source is a conf/data option (``demo``, ``demo_b``, named after it), ``NAME=OPTION``,
``NAME=FOLDER`` (``data=imagefolder data.root=FOLDER``) or ``NAME=OPTION:FOLDER`` (e.g.
``sdv14=genimage:/data/GenImage/sdv14``). ``--always NAME[,NAME]`` (leave-one-out): those
sources are in every model's training and never left out, e.g. CIFAKE beside a zoo of
generators each left out in turn (docs/zoo.md); ``--held-out-only`` tests each such model only
on the source it never saw and the ``--always`` ones, and matrix.md's "Left out" table and
held_out.json give each left-out source's numbers with their mean and worst AUROC.
Overrides go to every training run; those of ``trainer.*``, ``paths.*``, ``data.batch_size``
and ``data.num_workers`` to every evaluation too, and ``--eval`` adds evaluation-only ones.
Resumable: a model whose ``models/<row>/done.json`` exists is not trained again, an interrupted
one continues from its ``last.ckpt``, a cell whose ``cells/<row>__<test>.json`` exists is not
evaluated again; rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from detector.cli import user_error
from detector.config import register_resolvers
from detector.errors import ConfigError
from detector.evaluation.matrix import write_matrix
from detector.files import atomic_write_text
from detector.tasks.evaluate import evaluate
from detector.tasks.train import train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EVAL_KEYS = re.compile(r"^\+*(trainer\.|paths\.|data\.batch_size=|data\.num_workers=)")
CELL_KEYS = ("auroc", "accuracy", "average_precision", "n")


@dataclass
class Source:
    name: str
    option: str  # the conf/data option
    root: str | None = None

    def overrides(self) -> list[str]:
        return [f"data={self.option}"] + ([f"data.root={self.root}"] if self.root else [])


@dataclass
class Row:
    """One model of the matrix: its name, the sources it trains on, and its data settings."""

    name: str
    seen: list[str]
    overrides: list[str]
    settings: dict = field(default_factory=dict)  # set on the composed config (train_dirs)


def parse_sources(text: str) -> list[Source]:
    options = {p.stem for p in (CONF / "data").glob("*.yaml")}
    sources = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, spec = item.partition("=") if "=" in item else (item, "", item)
        option, _, root = spec.partition(":")
        if option not in options:
            option, root = "imagefolder", spec
        if option == "imagefolder" and (not root or "=" not in item):
            raise ConfigError(f"--sources: {item!r} is neither a conf/data option nor NAME=FOLDER")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or "__" in name:
            raise ConfigError(f"--sources: name {name!r} must be letters, digits, '_', '-', '.'")
        sources.append(Source(name, option, root or None))
    if len(sources) < 2 or len({s.name for s in sources}) < len(sources):
        raise ConfigError("--sources needs at least two sources with different names")
    return sources


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """What ``train.py`` / ``eval.py`` would see, writing into ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def _train_folder(source: Source, overrides: list[str], out: Path) -> tuple[str, dict]:
    """A source's training folder (a demo set is made here) and its class map."""
    cfg = compose_config("train", [*source.overrides(), *overrides], out / "models")
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    found = datamodule.class_folders(datamodule.train_dir)
    leaves = {rel.split("/")[-1]: found.classes[label] for rel, label in found.folders.items()}
    return str(datamodule.train_dir), leaves


def parse_always(text: str, sources: list[Source], mode: str) -> list[str]:
    """``--always``: sources in every leave-one-out model's training, never left out."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        return []
    if mode != "leave-one-out":
        raise ConfigError("--always applies to --mode leave-one-out only")
    known = [s.name for s in sources]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"--always: {', '.join(unknown)} is not a source; sources: {', '.join(known)}"
        )
    if len(set(names)) >= len(known):
        raise ConfigError("--always names every source: at least one must be left out in turn")
    return names


def plan_rows(
    sources: list[Source], mode: str, overrides: list[str], out: Path, always: Sequence[str] = ()
) -> list[Row]:
    if mode == "per-source":
        return [Row(s.name, [s.name], s.overrides()) for s in sources]
    rows = []
    for held in (s for s in sources if s.name not in always):
        others = [s for s in sources if s is not held]
        folders, class_map = {}, {}
        for s in others:
            folders[s.name], leaves = _train_folder(s, overrides, out)
            class_map.update(leaves)
        settings = {"train_dirs": folders, "class_map": class_map}
        rows.append(
            Row(f"all-but-{held.name}", [s.name for s in others], others[0].overrides(), settings)
        )
    return rows


def train_row(row: Row, overrides: list[str], out: Path, command: str) -> str:
    """The row's best checkpoint, trained unless ``models/<row>/done.json`` says it was. An
    interrupted model resumes from its ``last.ckpt`` (written after every epoch and on Ctrl-C /
    SIGTERM), so a rerun of ``command`` loses at most the epoch under way."""
    folder = out / "models" / row.name
    done = folder / "done.json"
    if done.is_file():
        return json.loads(done.read_text())["best"]
    last = folder / "checkpoints" / "last.ckpt"
    resume = last.is_file()
    if folder.exists() and not resume:  # stopped before its first epoch ended
        shutil.rmtree(folder)
    cfg = compose_config("train", [*row.overrides, "test=false", *overrides], folder)
    with open_dict(cfg):
        for key, value in row.settings.items():
            cfg.data[key] = value
        cfg.resume_command = command  # what SaveOnInterrupt prints: this script, not train.py
        if resume:
            cfg.ckpt_path = str(last)
    resumed = f" (resuming {last})" if resume else ""
    print(f"cross: train {row.name} on {', '.join(row.seen)}{resumed}", flush=True)
    start = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - start
    best = metrics.get("best_model_path")
    if not best:
        raise SystemExit(f"error: training {row.name} wrote no checkpoint (see {folder})")
    auroc = metrics.get("val/auroc")  # none when the resumed run had no epoch left to train
    info = {"best": best, "seconds": round(seconds, 1), "last_val_auroc": auroc}
    atomic_write_text(done, json.dumps(info, indent=2) + "\n")
    shown = "no epoch left" if auroc is None else f"last val AUROC {auroc:.4f}"
    print(f"cross: train {row.name}: {seconds:.0f} s, {shown}", flush=True)
    return best


def eval_cell(row: Row, test: Source, ckpt: str, overrides: list[str], out: Path) -> dict:
    path = out / "cells" / f"{row.name}__{test.name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    folder = out / "evals" / f"{row.name}__{test.name}"
    cfg = compose_config("eval", [*test.overrides(), f"ckpt={ckpt}", *overrides], folder)
    report = evaluate(cfg)
    cell = {k: report[k] for k in CELL_KEYS} | {"ckpt": ckpt}
    cell["ood_flagged"] = report["ood"]["flagged"] if "ood" in report else None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(cell, indent=2) + "\n")
    print(f"cross: eval {row.name} -> {test.name}: AUROC {cell['auroc']:.4f}", flush=True)
    return cell


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", required=True, help="comma-separated sources (see above)")
    parser.add_argument("--mode", choices=("per-source", "leave-one-out"), default="per-source")
    parser.add_argument("--out", type=Path, default=None, help="default: logs/cross/<sources>")
    parser.add_argument(
        "--always", default="", metavar="NAME[,NAME]", help="leave-one-out: always trained on"
    )
    parser.add_argument(
        "--held-out-only",
        action="store_true",
        help="leave-one-out: test each model only on the source left out and the --always ones "
        "(the other cells stay empty; a model's evaluations take 2 test sets, not all)",
    )
    parser.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "overrides", nargs="*", help="training overrides, e.g. trainer.max_epochs=3"
    )
    args = parser.parse_args(argv)
    command = shlex.join(["python", "scripts/cross_generator.py", *(argv or sys.argv[1:])])
    register_resolvers()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sources = parse_sources(args.sources)
    always = parse_always(args.always, sources, args.mode)
    if args.held_out_only and args.mode != "leave-one-out":
        raise ConfigError("--held-out-only applies to --mode leave-one-out only")
    if any(o.split("=")[0].lstrip("+~") in ("ckpt_path", "init_ckpt") for o in args.overrides):
        # ckpt_path=last would resume the newest run of logs/train, another run altogether
        raise ConfigError(
            "ckpt_path / init_ckpt: the protocol trains its own models; rerun the same command "
            "without it (finished models are kept, an interrupted one resumes from its "
            "last.ckpt)"
        )
    out = args.out or Path("logs/cross") / "_".join(s.name for s in sources)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "command.txt", command + "\n")
    eval_overrides = [o for o in args.overrides if EVAL_KEYS.match(o)] + args.eval
    rows = plan_rows(sources, args.mode, args.overrides, out, always)
    cells = {}
    for row in rows:
        tests = [s for s in sources if s.name in always or s.name not in row.seen]
        tests = tests if args.held_out_only else sources
        done = all((out / "cells" / f"{row.name}__{t.name}.json").is_file() for t in tests)
        ckpt = "" if done else train_row(row, args.overrides, out, command)
        for test in tests:
            cells[(row.name, test.name)] = eval_cell(row, test, ckpt, eval_overrides, out)
    seen = {row.name: row.seen for row in rows}
    names = [s.name for s in sources]
    loo = args.mode == "leave-one-out"
    paths = write_matrix(cells, [r.name for r in rows], names, seen, out, command, loo)
    print((out / "matrix.md").read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return {"cells": cells, "paths": paths}


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a user error, also one wrapped by instantiate: one line, exit 2
        cause = user_error(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
