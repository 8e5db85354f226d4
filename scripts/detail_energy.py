"""Fine detail per image folder: is "smooth = FAKE" a shortcut your training set teaches?

    python scripts/detail_energy.py data/zoo/nngan/test/REAL data/zoo/nngan/test/FAKE ...

Prints, per folder, the mean absolute 3x3 Laplacian and the mean absolute NPR residual (the
image minus its nearest 2x down-up-sampled copy, what ``model.input_filter=npr`` feeds the
network), in grey levels out of 255, over the first ``--limit`` images by name. When every
FAKE source of a training set is smoother than its REAL images, a detector can learn
smoothness instead of generator traces, and calls a sharp generator's images REAL
(docs/zoo.md, "Pseudo-fakes").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from detector.data.decode import IMAGE_EXTENSIONS, open_image, to_rgb
from detector.model import upsampling_residual

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def detail_energy(images: list[torch.Tensor]) -> tuple[float, float]:
    """(Laplacian, NPR residual) means over float (3, H, W) images in [0, 1], in grey levels."""
    laplacian = LAPLACIAN.view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    lap = [F.conv2d(x[None], laplacian, groups=3).abs().mean() for x in images]
    npr = [upsampling_residual(x[None]).abs().mean() for x in images]
    return 255 * float(torch.stack(lap).mean()), 255 * float(torch.stack(npr).mean())


def native_pixels(path: Path) -> torch.Tensor:
    """(3, H, W) floats in [0, 1] at the file's own size: a resize would change its detail."""
    with open_image(str(path)) as img:
        return torch.from_numpy(np.array(to_rgb(img))).permute(2, 0, 1).float() / 255


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--limit", type=int, default=300, help="images per folder (by name)")
    args = parser.parse_args(argv)
    print(f"{'folder':50s} {'images':>6s} {'laplacian':>9s} {'npr':>6s}")
    for folder in args.folders:
        if not folder.is_dir():
            print(f"error: {folder}: not a folder", file=sys.stderr)
            return 2
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            print(f"error: {folder}: no images ({', '.join(IMAGE_EXTENSIONS)})", file=sys.stderr)
            return 2
        images = [native_pixels(p) for p in files[: args.limit]]
        lap, npr = detail_energy(images)
        print(f"{str(folder):50s} {len(images):6d} {lap:9.2f} {npr:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
