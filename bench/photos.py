"""Real photographs as JPEG files, for timing and checking large-image decoding.

The scikit-image sample photographs the demo set is cut from (:data:`detector.data.synthesis.
SOURCES`, inside the wheel: no network) are written once at their own size and as 1024x1536
JPEGs (random crops resampled to that size, some with an EXIF orientation), at several JPEG
qualities, so :mod:`bench.decode` measures on the photographs a user would score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from detector.data.synthesis import load_sources

LARGE = (1024, 1536)  # width, height: a phone photograph's shape


def make_photos(folder: Path, per_source: int = 4, seed: int = 0) -> dict[str, list[Path]]:
    """``native``: each source at its own size; ``large``: ``per_source`` 1024x1536 JPEGs each
    (every third one stored rotated with the EXIF orientation that puts it back upright)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {"native": [], "large": []}
    for k, arr in enumerate(load_sources()):
        img = Image.fromarray(arr)
        native = folder / f"native_{k:02d}.jpg"
        img.save(native, quality=92)
        out["native"].append(native)
        w, h = img.size
        for j in range(per_source):
            side_w = int(rng.integers(w // 2, w + 1))
            side_h = min(h, int(side_w * 1.5))
            x, y = int(rng.integers(0, w - side_w + 1)), int(rng.integers(0, h - side_h + 1))
            large = img.resize(LARGE, Image.Resampling.LANCZOS, box=(x, y, x + side_w, y + side_h))
            path = folder / f"large_{k:02d}_{j}.jpg"
            quality = int(rng.choice([75, 85, 95]))
            if j % 3 == 2:  # stored as 1536x1024 rotated; orientation 6 turns it upright
                exif = Image.Exif()
                exif[0x0112] = 6
                large.transpose(Image.Transpose.ROTATE_90).save(
                    path, quality=quality, exif=exif.tobytes()
                )
            else:
                large.save(path, quality=quality)
            out["large"].append(path)
    return out
