"""What the out-of-domain score costs: images/s of Detector scoring with and without it, in one
run, each batch timed both ways back to back (the median over repeats of the summed ratio), on
decoded batches (decoding is the same either way).

    python bench/ood.py CKPT FOLDER [--batch 64] [--images 512] [--repeats 5] [--size PX]

``--size`` scores the images resized to another input size than the model's (the network and
the score take any size): what the score costs there; its values mean nothing for a model
trained at another size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from detector.api import Detector
from detector.data.decode import load_image
from detector.errors import DetectorError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("folder")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    args = parser.parse_args()
    try:
        detector = Detector.from_checkpoint(args.ckpt)
    except DetectorError as e:
        raise SystemExit(f"error: {e}") from None
    if detector.ood is None:
        raise SystemExit(f"error: {args.ckpt} has no out-of-domain model")
    files = sorted(Path(args.folder).rglob("*.jpg"))[: args.images]
    size = args.size or detector.image_size
    images = torch.stack([load_image(str(f), size) for f in files])
    batches = list(images.split(args.batch))

    def timed(fn, batch: torch.Tensor) -> float:
        start = time.perf_counter()
        fn(batch)
        return time.perf_counter() - start

    for b in batches:  # warm-up
        detector.score(b), detector.score_with_ood(b)
    times: dict[str, list[float]] = {"plain": [], "ood": []}
    pair = [("plain", detector.score), ("ood", detector.score_with_ood)]
    for repeat in range(args.repeats):
        total = {"plain": 0.0, "ood": 0.0}
        for i, b in enumerate(batches):
            # Each batch timed both ways back to back, which one first alternating: the
            # machine's drift (seconds) and a warm cache cancel within a pair.
            for name, fn in pair if (repeat + i) % 2 == 0 else pair[::-1]:
                total[name] += timed(fn, b)
        for name, seconds in total.items():
            times[name].append(seconds)
    rate = {k: len(images) / statistics.median(v) for k, v in times.items()}
    paired = statistics.median(o / p for p, o in zip(times["plain"], times["ood"], strict=True))
    print(f"{len(images)} images at {size} px, batch {args.batch}, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    print(f"  without ood_score: {rate['plain']:8.1f} images/s")
    print(f"  with ood_score:    {rate['ood']:8.1f} images/s")
    print(f"  slow-down: {paired - 1:+.1%} (median of {args.repeats} paired runs; want <= +10%)")


if __name__ == "__main__":
    main()
