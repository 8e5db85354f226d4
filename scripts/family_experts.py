"""Does an expert of one generator family find an unseen sibling that a detector of all misses?

    Z=data/zoo; AES=$Z/tconv,$Z/nearest,$Z/bilinear,$Z/pixelshuffle,$Z/vae
    python scripts/family_experts.py \
      --expert gans=$Z/dcgan,$Z/blgan --expert all=$Z/rest,$AES,$Z/dcgan,$Z/blgan \
      --test $Z/nngan/test --test $Z/rest/test --calibrate $Z/pixelshuffle/test/REAL

Each ``--expert NAME=ROOT,...`` is a small CNN (four 3x3 convolutions of width 32, BatchNorm,
ReLU; 66k parameters) trained from scratch to tell REAL from FAKE on the ``train/{FAKE,REAL}``
folders of its sources. One detector trained on CIFAKE and the whole zoo calls a GAN it never
saw REAL (docs/zoo.md): the other sources' easier cues win inside one network. An expert of
the GANs alone has only the GANs' cues to learn, and those carry over to the sibling left out.

The combination: each expert's REAL logit is standardised against REAL images that no expert
trained on (``--calibrate``: median 0, 10% quantile -1), and an image's combined score is the
minimum over experts: it is as FAKE as its most suspicious expert finds it. Prints, per
``--test`` folder (``{FAKE,REAL}``), the AUROC (positive class REAL) and the accuracy (each
expert at logit 0, the combination at -1) of every expert and of the combination.
``--scores NAME=CSV`` adds a trained detector as one more expert: the ``prob_REAL`` column of
``python predict.py ckpt=... input=FOLDER`` run over every ``--test`` and ``--calibrate``
folder (matched by the files' resolved paths; a file missing from the CSV is an error).
A research probe, not a detector: nothing is saved (the product's version, fitted after
training and stored in the checkpoint, is ``expert=gans``: detector.family_expert).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from detector.data.decode import IMAGE_EXTENSIONS, open_image, to_rgb
from detector.family_expert import small_cnn

CLASSES = ("FAKE", "REAL")  # label 0 / 1, as everywhere in the project


class ProbeError(Exception):
    """Bad input: the message names the folder or option at fault."""


def load_folder(folder: Path, size: int) -> tuple[torch.Tensor, list[Path]]:
    """(N, 3, size, size) floats in [0, 1] of every image in ``folder``, sorted by name, and
    the files' resolved paths."""
    if not folder.is_dir():
        raise ProbeError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ProbeError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    images = []
    for path in files:
        with open_image(str(path)) as img:
            rgb = to_rgb(img)
            if rgb.size != (size, size):
                raise ProbeError(f"{path}: {rgb.size[0]}x{rgb.size[1]}, not {size}x{size} (--size)")
            images.append(torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
    return torch.stack(images).float() / 255, [p.resolve() for p in files]


def load_labelled(root: Path, size: int) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Images, labels (FAKE 0, REAL 1) and files of ``root/{FAKE,REAL}``."""
    parts = [load_folder(root / name, size) for name in CLASSES]
    labels = torch.cat([torch.full((len(x),), float(i)) for i, (x, _) in enumerate(parts)])
    return torch.cat([x for x, _ in parts]), labels, [f for _, files in parts for f in files]


class ScoreTable:
    """A detector's REAL logits read from a predict.py CSV, looked up by file."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise ProbeError(f"--scores {path}: no such file")
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "prob_REAL" not in rows[0] or "path" not in rows[0]:
            raise ProbeError(f"--scores {path}: expected predict.py's columns path and prob_REAL")
        self.path = path
        self.logit = {}
        for line, row in enumerate(rows, start=2):
            if not row["prob_REAL"]:
                continue  # an unreadable image's row: no score, so the lookup names it
            try:
                p = min(max(float(row["prob_REAL"]), 1e-7), 1 - 1e-7)
            except ValueError:
                raise ProbeError(
                    f"--scores {path}, line {line}: prob_REAL is not a number"
                ) from None
            self.logit[Path(row["path"]).resolve()] = math.log(p / (1 - p))

    def __call__(self, files: list[Path], images: torch.Tensor | None = None) -> torch.Tensor:
        missing = [f for f in files if f not in self.logit]
        if missing:
            raise ProbeError(
                f"--scores {self.path}: no score for {missing[0]} ({len(missing)} files)"
            )
        return torch.tensor([self.logit[f] for f in files])


def train_expert(
    images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, seed: int
) -> nn.Module:
    """Adam 1e-3, random horizontal flips, batches drawn with replacement (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = small_cnn()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = images[idx]
        if torch.rand(1, generator=gen) < 0.5:
            x = x.flip(3)
        loss = F.binary_cross_entropy_with_logits(net(x).squeeze(1), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def logits(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(chunk).squeeze(1) for chunk in images.split(512)])


def parse_expert(text: str, option: str = "--expert") -> tuple[str, list[Path]]:
    name, sep, roots = text.partition("=")
    if not sep or not name or not roots:
        raise ProbeError(f"{option} {text!r}: expected NAME=ROOT[,ROOT...]")
    return name, [Path(r) for r in roots.split(",") if r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--expert", action="append", required=True, metavar="NAME=ROOT,...")
    parser.add_argument("--test", action="append", required=True, type=Path, metavar="FOLDER")
    parser.add_argument("--calibrate", required=True, type=Path, metavar="REAL_FOLDER")
    parser.add_argument("--scores", action="append", default=[], metavar="NAME=CSV")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="every image must be this size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        experts = dict(parse_expert(e) for e in args.expert)
        calibration, calibration_files = load_folder(args.calibrate, args.size)
        tests = {t: load_labelled(t, args.size) for t in args.test}
        scorers = {}
        for text in args.scores:
            name, table = parse_expert(text, "--scores")
            if name in experts or name in scorers:
                raise ProbeError(f"--scores {text!r}: the name {name!r} is taken")
            scorers[name] = ScoreTable(table[0])
            for _, _, files in tests.values():
                scorers[name](files)  # every test file scored, or the error now
        for name, roots in experts.items():
            data = [load_labelled(root / "train", args.size) for root in roots]
            images, labels = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
            print(f"expert {name}: {len(images)} images of {len(roots)} sources", flush=True)
            net = train_expert(images, labels, args.steps, args.batch, args.seed)
            scorers[name] = lambda files, x, net=net: logits(net, x)
        scales = {}
        for name, scorer in scorers.items():
            raw = scorer(calibration_files, calibration)
            low, mid = raw.quantile(torch.tensor([0.1, 0.5])).tolist()
            scales[name] = (scorer, mid, max(mid - low, 1e-6))
    except ProbeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'test':40s} {'scored by':12s} {'AUROC':>6s} {'acc':>6s}")
    for folder, (images, labels, files) in tests.items():
        standard = []
        for name, (scorer, mid, spread) in scales.items():
            raw = scorer(files, images)
            standard.append((raw - mid) / spread)
            acc = float(((raw > 0).float() == labels).float().mean())
            auroc = float(binary_auroc(raw, labels.long()))
            print(f"{str(folder):40s} {name:12s} {auroc:6.3f} {acc:6.3f}")
        combined = torch.stack(standard).min(0).values
        acc = float(((combined > -1).float() == labels).float().mean())
        auroc = float(binary_auroc(combined, labels.long()))
        print(f"{str(folder):40s} {'min':12s} {auroc:6.3f} {acc:6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
