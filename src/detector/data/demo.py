"""Embedded demo data set: a CIFAKE-shaped REAL/FAKE set built offline in about half a minute.

Why it exists: a fresh machine (CI, a laptop on a train) should be able to run the whole
training workflow without downloading CIFAKE. Everything needed ships inside installed
wheels: the REAL photographs come with scikit-image, and the FAKE images come from a small
convolutional autoencoder that is trained here, on those photographs, for a few seconds.

Why an autoencoder rather than a hand-written filter: the FAKE class must carry the kind of
traces a real generator leaves (blur from a bottleneck, periodic patterns from stride-2
transposed convolutions), so that what a detector learns on the demo set is the same kind of
thing it has to learn on real data. Colour statistics of each FAKE are matched to the crop it
was decoded from, so the classes cannot be told apart by colour alone.

The set is a stand-in for learning the workflow, not a benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from detector.data.synthesis import (
    DECODERS,
    GEN_TRAIN_CROPS,
    IMAGE_SIZE,
    TRAIN_STEPS,
    generate_fakes,
    load_sources,
    native_crops,
    random_crops,
    train_generator,
)

# Bump whenever anything that changes the output bytes changes (sources, crops, generator,
# training schedule, post-processing, JPEG settings): existing demo folders are then rebuilt.
GENERATOR_VERSION: int = 1

CLASSES: tuple[str, str] = ("FAKE", "REAL")
SPLITS: tuple[str, str] = ("train", "test")
JPEG_QUALITY: int = 75
DEFAULT_TRAIN_PER_CLASS: int = 2000
DEFAULT_TEST_PER_CLASS: int = 500
STAMP_NAME: str = ".demo.json"
MAX_HR_SIZE: int = 400  # the smallest photographs drawn are 400 px on their short side


_GENERATOR_NAME = "detector.demo"  # stamp marker; not __name__, which is __main__ in the CLI
# One intra-op thread, whatever the machine has: results can depend on the thread count (how
# reductions are split), and spinning OpenMP workers on a busy machine ran far slower than one
# thread (docs/speed.md, "Measurements behind choices in the code").
_THREADS = 1
# Leftover build folders (a SIGKILLed build cannot clean up after itself) are removed once
# they are this old; a live build never takes anywhere near as long.
STALE_SECONDS = 3600.0


# --------------------------------------------------------------------------- sources / crops


# --------------------------------------------------------------------------- generator


# --------------------------------------------------------------------------- writing / stamp


def save_jpeg(arr: np.ndarray, path: Path) -> None:
    # One code path and one set of encoder settings (quality, tables, chroma subsampling) for
    # both classes, so the container itself carries no label; sizes differ only by content.
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    path.write_bytes(buf.getvalue())


def read_stamp(out: str | Path) -> dict[str, Any] | None:
    """Return the stamp of a complete demo folder, or None when there is no readable stamp."""
    try:
        stamp = json.loads((Path(out) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("generator") != _GENERATOR_NAME:
        return None
    return stamp


def _wanted_stamp(
    seed: int,
    train_per_class: int,
    test_per_class: int,
    image_size: int = IMAGE_SIZE,
    decoder: str = "transposed",
) -> dict[str, Any]:
    return {
        "decoder": decoder,
        "generator": _GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "counts": {"train": train_per_class, "test": test_per_class},
        "classes": list(CLASSES),
        "image_size": image_size,
        "jpeg_quality": JPEG_QUALITY,
    }


def _is_current(stamp: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    if stamp is None:
        return False
    stamp = {"decoder": "transposed", **stamp}  # sets made before there was a second decoder
    return all(stamp.get(k) == v for k, v in wanted.items())


class _Stages:
    """Rich progress bar when asked for, silence otherwise; stage names match the docs.

    Refreshed from the calling thread only, so no extra thread competes with torch's for a
    core during training.
    """

    _REFRESH_S = 0.2

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._last = 0.0

    def __enter__(self) -> _Stages:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]demo[/bold] {task.description:<20}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                auto_refresh=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.__exit__(*exc)

    @contextlib.contextmanager
    def stage(self, name: str, total: int) -> Iterator[Callable[[], None]]:
        progress = self._progress
        if progress is None:
            yield lambda: None
            return
        task = progress.add_task(name, total=total)
        progress.refresh()

        def tick() -> None:
            progress.advance(task)
            now = time.monotonic()
            if now - self._last >= self._REFRESH_S:
                self._last = now
                progress.refresh()

        yield tick
        progress.update(task, completed=total)
        progress.refresh()


@contextlib.contextmanager
def pinned_torch(seed: int) -> Iterator[torch.Generator]:
    """Fixed threads and seeds for the build, without leaking them into the caller's process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield torch.Generator().manual_seed(seed)
    finally:
        torch.set_num_threads(threads)


def _crops(sources: list[Image.Image], n: int, image_size: int, rng: np.random.Generator):
    """32 px: CIFAKE-like thumbnails at many scales; larger: the photographs' own pixels (the
    high-resolution demo, for crop models: no resizing anywhere, in either class)."""
    if image_size == IMAGE_SIZE:
        return random_crops(sources, n, rng)
    return native_crops(sources, n, image_size, rng)


def _build(
    tmp: Path,
    seed: int,
    train_per_class: int,
    test_per_class: int,
    progress: bool,
    image_size: int = IMAGE_SIZE,
    decoder: str = "transposed",
) -> None:
    """One piece: crops, the generator trained on 32 px crops (native ones for the
    high-resolution set; it is fully convolutional, so it decodes any size), then the files."""
    per_class = train_per_class + test_per_class
    rng = np.random.default_rng(seed)
    with _Stages(progress) as stages, pinned_torch(seed) as gen:
        with stages.stage("crops", 3) as tick:
            sources = [Image.fromarray(img) for img in load_sources()]
            tick()
            if image_size == IMAGE_SIZE:
                gen_crops = random_crops(sources, GEN_TRAIN_CROPS, rng)
            else:
                gen_crops = native_crops(sources, GEN_TRAIN_CROPS, IMAGE_SIZE, rng)
            real = _crops(sources, per_class, image_size, rng)
            tick()
            fake_src = _crops(sources, per_class, image_size, rng)
            tick()
        with stages.stage("training generator", TRAIN_STEPS) as tick:
            model = train_generator(gen_crops, TRAIN_STEPS, gen, tick, decoder)
        fake = generate_fakes(model, fake_src, gen)
        with stages.stage("writing", 2 * per_class) as tick:
            for cls, arrs in (("FAKE", fake), ("REAL", real)):
                for split, lo, hi in (
                    ("train", 0, train_per_class),
                    ("test", train_per_class, per_class),
                ):
                    folder = tmp / split / cls
                    folder.mkdir(parents=True, exist_ok=True)
                    for i in range(lo, hi):
                        save_jpeg(arrs[i], folder / f"{i - lo:05d}.jpg")
                        tick()
    # Written last: a folder without a stamp is never mistaken for a complete demo set.
    stamp = _wanted_stamp(seed, train_per_class, test_per_class, image_size, decoder)
    (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")


def _check_replaceable(out: Path) -> None:
    """Refuse anything but a missing/empty folder or one holding exactly a stamped demo set.

    Deleting is only safe when every top-level entry is one a build writes itself; a stamp
    alone is not enough (someone may have dropped their own files next to it).
    """
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; refusing to replace it")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    if read_stamp(out) is None:
        raise FileExistsError(
            f"{out} is not empty and has no valid {STAMP_NAME} stamp, so it is not a demo "
            "folder; refusing to overwrite it. Choose another path or empty it yourself."
        )
    extra = sorted(entries - {STAMP_NAME, *SPLITS})
    if extra:
        raise FileExistsError(
            f"{out} is a demo folder but also holds {', '.join(extra)}; refusing to delete "
            "it. Move those files away or choose another path."
        )


def remove_stale_builds(out: Path) -> None:
    """Delete our own leftovers from killed builds: hidden `.NAME.tmp-*`/`.NAME.old-*` siblings.

    Only names that mkdtemp gave our own builds are touched, and only when old enough that
    no live build (another process) can still be writing into them.
    """
    now = time.time()
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for path in out.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if (
                    path.is_dir()
                    and not path.is_symlink()
                    and now - path.stat().st_mtime > STALE_SECONDS
                ):
                    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- public API


def make_demo(
    out: str | Path,
    seed: int = 0,
    progress: bool = True,
    *,
    train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
    test_per_class: int = DEFAULT_TEST_PER_CLASS,
    image_size: int = IMAGE_SIZE,
    decoder: str = "transposed",
) -> Path:
    """(Re)build the demo set at `out`, replacing only a folder that is itself a demo set.

    ``image_size`` 32: the CIFAKE-shaped set; larger (e.g. 256): the high-resolution set, REAL
    native crops of the photographs and FAKE decoded at that size.

    The set is built in a hidden sibling folder and moved into place when complete, so an
    interrupted build never leaves a half-written folder that looks usable. A non-empty `out`
    without a demo stamp is refused rather than deleted: it may be the user's data.
    """
    out = Path(out).expanduser().absolute()
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError("train_per_class and test_per_class must be >= 1")
    if image_size != IMAGE_SIZE and not 64 <= image_size <= MAX_HR_SIZE:
        raise ValueError(f"image_size={image_size}: 32, or 64 to {MAX_HR_SIZE} (native crops)")
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r} must be one of {', '.join(DECODERS)}")
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Path | None = None
    try:
        _build(tmp, seed, train_per_class, test_per_class, progress, image_size, decoder)
        if out.exists():
            _check_replaceable(out)  # again: someone may have put data there meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "demo")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def ensure_demo(
    out: str | Path,
    seed: int = 0,
    progress: bool = True,
    *,
    train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
    test_per_class: int = DEFAULT_TEST_PER_CLASS,
    image_size: int = IMAGE_SIZE,
    decoder: str = "transposed",
) -> Path:
    """Return `out`, building it only when missing or stamped by another version, seed or size.

    Cheap when up to date (one small JSON read), so training entry points can call it on
    every start. Rank gating in distributed runs is the caller's job.
    """
    out = Path(out).expanduser().absolute()
    wanted = _wanted_stamp(seed, train_per_class, test_per_class, image_size, decoder)
    if _is_current(read_stamp(out), wanted):
        return out
    return make_demo(
        out,
        seed,
        progress,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        image_size=image_size,
        decoder=decoder,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m detector.data.demo",
        description="Build the offline CIFAKE-shaped demo set (REAL/FAKE, 32x32 JPEG).",
    )
    parser.add_argument("out", type=Path, help="folder to create (e.g. data/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--train-per-class", type=int, default=DEFAULT_TRAIN_PER_CLASS)
    parser.add_argument("--test-per-class", type=int, default=DEFAULT_TEST_PER_CLASS)
    parser.add_argument(
        "--image-size", type=int, default=IMAGE_SIZE, help="32, or 64-1024 for native crops"
    )
    parser.add_argument("--decoder", choices=DECODERS, default="transposed", help="the generator")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = make_demo(
        args.out,
        args.seed,
        not args.quiet,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        image_size=args.image_size,
        decoder=args.decoder,
    )
    print(
        f"demo set v{GENERATOR_VERSION} (seed {args.seed}) written to {out} in "
        f"{time.perf_counter() - start:.1f}s: train {args.train_per_class} + test "
        f"{args.test_per_class} images per class ({', '.join(CLASSES)}), "
        f"{args.image_size}x{args.image_size} JPEG q{JPEG_QUALITY}"
    )


if __name__ == "__main__":
    main()
