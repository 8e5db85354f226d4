"""Short CIFAKE runs that change one thing of ``experiment=cifake_cpu`` at a time: the README's
ablation table. Each row trains with ``train.py``, then scores its best checkpoint on the
validation split with ``eval.py split=val`` (never on a test set) and prints the commands.

    python scripts/ablate.py --data data/cifake [--only no_se,px64] [--out logs/ablations]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]

# One epoch is 80,000 images; a short run sees two quarters of it (312 steps of 128), validates
# once, at the end, and averages weights over a horizon as short as its own (~50 steps). Batch,
# learning rate and test-time flip averaging are pinned to the base every row was measured on,
# so rows stay comparable when the full recipe's speed settings change.
SHORT = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=0.25",
    "trainer.check_val_every_n_epoch=2",
    "callbacks.ema.decay=0.98",
    "data.batch_size=128",
    "model.optimizer.lr=2e-3",
    "model.flip_average=false",
]
ROWS = {
    "recipe": ("experiment=cifake_cpu, short", []),
    "no_se": ("without the SE block", ["model.se_reduction=0"]),
    "px64": ("64 px (upsampled on the device)", ["data.image_size=64"]),
    "adam": (
        "the seed's Adam 1e-3, constant",
        [
            "model.optimizer._target_=torch.optim.Adam",
            "model.optimizer.lr=1e-3",
            "model.optimizer.weight_decay=0",
            "model.scheduler=null",
        ],
    ),
    "shift2": ("+ random shift (crop) of up to 2 px", ["data.shift=2"]),
    "shift4": ("+ random shift (crop) of up to 4 px", ["data.shift=4"]),
    "no_flip": ("without horizontal flip", ["data.hflip=false"]),
    "blur_jpeg": (
        "+ blur/JPEG augmentation (p=0.1 each)",
        ["data.blur_prob=0.1", "data.jpeg_prob=0.1"],
    ),
    "no_ema": ("without weight EMA", ["callbacks.ema=null"]),
    "flip_average": ("+ flip averaging at test time", ["model.flip_average=true"]),
}


def run(cmd: list[str], log: Path) -> str:
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)
    text = log.read_text()
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {shlex.join(cmd)}\n  see {log}")
    return text


def table(results: Path) -> str:
    """The README table: one row per ablation (the newest run of each), in ROWS order."""
    rows = {}
    for line in results.read_text().splitlines():
        row = json.loads(line)
        rows[row["row"]] = row
    lines = [
        "| change | override | time | train acc | val acc | val AUC | val F1 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in ROWS:
        if name not in rows:
            continue
        r, (what, overrides) = rows[name], ROWS[name]
        # A row's own overrides: what it ran with, should the recipe have changed since.
        overrides = r.get("overrides", overrides)
        train_acc = r.get("train_accuracy")
        lines.append(
            f"| {what} | {'`' + ' '.join(overrides) + '`' if overrides else ''} "
            f"| {f'{minutes:.1f} min' if (minutes := r.get('train_minutes')) else 'n/a'} "
            f"| {f'{train_acc:.2%}' if train_acc is not None else 'n/a'} "
            f"| {r['val_accuracy']:.2%} | {r['val_auroc']:.4f} | {r['val_f1']:.2%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/cifake", help="folder holding train/{FAKE,REAL}")
    parser.add_argument("--only", help="comma-separated row names (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "ablations")
    parser.add_argument("--table", action="store_true", help="only print the README table")
    args = parser.parse_args()
    if args.table:
        print(table(args.out / "results.jsonl"))
        return
    names = args.only.split(",") if args.only else list(ROWS)
    unknown = set(names) - set(ROWS)
    if unknown:
        sys.exit(f"--only: unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    for name in names:
        what, overrides = ROWS[name]
        run_dir = args.out / name
        train_cmd = [
            sys.executable,
            "train.py",
            "experiment=cifake_cpu",
            f"data.root={args.data}",
            *SHORT,
            *overrides,
            f"hydra.run.dir={run_dir}/train",
            "callbacks.progress_bar=null",
        ]
        start = time.perf_counter()
        out = run(train_cmd, args.out / f"{name}.train.log")
        minutes = (time.perf_counter() - start) / 60
        ckpt = re.search(r"Best checkpoint: (\S+)", out).group(1)
        eval_cmd = [
            sys.executable,
            "eval.py",
            f"ckpt={ckpt}",
            "data=cifake",
            f"data.root={args.data}",
            "split=val",
            f"hydra.run.dir={run_dir}/val",
        ]
        run(eval_cmd, args.out / f"{name}.val.log")
        report = json.loads((run_dir / "val" / "metrics.json").read_text())
        # Training accuracy of the last epoch: next to val, it tells under- from over-fitting.
        events = EventAccumulator(str(run_dir / "train" / "tensorboard"))
        events.Reload()
        row = {
            "row": name,
            "what": what,
            "command": shlex.join(["python", *train_cmd[1:-2]]),
            "overrides": overrides,
            "train_minutes": round(minutes, 1),
            "train_accuracy": events.Scalars("train/acc")[-1].value,
            "val_accuracy": report["accuracy"],
            "val_auroc": report["auroc"],
            "val_f1": report["f1"],
            "threshold": report["threshold"],
        }
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{name:10s} {minutes:5.1f} min  train acc {row['train_accuracy']:.4f}  "
            f"val acc {row['val_accuracy']:.4f}  "
            f"auroc {row['val_auroc']:.4f}  f1 {row['val_f1']:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
