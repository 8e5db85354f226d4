"""Tiled scoring of one large JPEG by a crop model (issue #15's speed target: a 1024x1536 JPEG
with a 64 px ResNet50 crop model in <= 1 s on the CPU at the default max_tiles).

    python bench/tiles.py [--size 64] [--max-tiles 64] [--repeats 5]

Untrained weights: the cost does not depend on them. Prints the median seconds per image,
split into decoding + tiling and scoring, and the ratio to the target.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image

from detector.api import Detector
from detector.module import DetectorModule

TARGET_S = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-tiles", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.uniform(0, 255, (48, 32, 3)), np.ones((32, 32, 1)))
    photo = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=90)  # 1024 wide, 1536 high
    path = "/tmp/bench_tiles_1024x1536.jpg"
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    module = DetectorModule(image_size=args.size, input="crop", max_tiles=args.max_tiles)
    detector = Detector(module, device="cpu")
    detector.predict([path])  # warm-up
    prep, score = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        item = detector.prepare(path)
        middle = time.perf_counter()
        with torch.inference_mode():
            detector.score_prepared([item])
        prep.append(middle - start)
        score.append(time.perf_counter() - middle)
    total = statistics.median(p + s for p, s in zip(prep, score, strict=True))
    print(
        f"1024x1536 JPEG, {item.n_tiles} tiles of {args.size} px (max_tiles={args.max_tiles}), "
        f"{torch.get_num_threads()} threads: decode+tile {statistics.median(prep):.3f} s, score "
        f"{statistics.median(score):.3f} s, total {total:.3f} s (target <= {TARGET_S} s: "
        f"{'met' if total <= TARGET_S else 'NOT met'}, {total / TARGET_S:.2f}x)"
    )


if __name__ == "__main__":
    main()
