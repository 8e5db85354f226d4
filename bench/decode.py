"""Large images and checkpoint files (issue #20, parts 3 and 4): each figure a row with its
target, measured as ratios in one run.

    python bench/decode.py [--ckpt CKPT] [--full-ckpt LAST_CKPT] [--repeats 3]

Rows:
  1. predict's loader (2 workers, batch 64) + scoring of 1024x1536 JPEGs by a 32 px ResNet50
     resize model, images/s now (``jpeg_draft``, the model on the cores the workers leave) vs as
     predict.py ran when issue #20 was filed (full decode, every thread; target >= 4x), and vs
     full decode alone;
  2. the largest probability difference, draft vs full decode, over real photographs
     (bench/photos.py: the demo's sources at their own size and as 1024x1536 JPEGs) scored by
     ``--ckpt`` (a trained 32 px checkpoint; default: the newest under logs/train);
  3. a 64 px ResNet50 crop model scoring one 1024x1536 JPEG at the default tile count (<= 1 s);
  4. checkpoint files of ResNet50 with EMA and Adam state (``--full-ckpt``, a complete
     last.ckpt; default: a two-step run made here): complete vs lean size and save time, and
     the safetensors export.
Untrained weights where only time is measured: it does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.photos import make_photos  # noqa: E402
from detector.api import Detector  # noqa: E402
from detector.checkpoint import (  # noqa: E402
    AtomicCheckpointIO,
    lean_checkpoint,
    load_checkpoint_file,
    save_safetensors,
)
from detector.hardware import threads_beside_workers  # noqa: E402
from detector.module import DetectorModule  # noqa: E402
from detector.tasks.predict import _collate, _Files  # noqa: E402

DRAFT_TARGET = 4.0
TOLERANCE = 0.02  # largest |P difference| allowed, draft vs full decode
CROP_TARGET_S = 1.0
LEAN_TARGET = 0.3  # lean size / complete size


def predict_rate(
    detector: Detector, paths: list[Path], workers: int = 2, share_cores: bool = True
) -> float:
    """Images/s of predict.py's scoring loop: its dataset, loader and batches. ``share_cores``:
    the model takes the cores the workers leave, as predict.py does since issue #20 (False: all
    of torch's threads beside the workers, as it did before)."""
    loader = DataLoader(
        _Files([str(p) for p in paths], detector.preprocessing, detector.max_pixels),
        batch_size=64,
        num_workers=workers,
        collate_fn=_collate,
    )
    threads = threads_beside_workers(workers if share_cores else 0, detector.device)
    with threads:
        start = time.perf_counter()
        n = 0
        for _, items, _ in loader:
            detector.score_prepared(items)
            n += len(items)
        return n / (time.perf_counter() - start)


def draft_speed(paths: list[Path], repeats: int) -> dict:
    module = DetectorModule(image_size=32)  # the default ResNet50-SE, at CIFAKE's size
    fast, full = Detector(module), Detector(module, jpeg_draft=False)
    # warm-up with a whole batch: the page cache, and oneDNN's kernels for the batch's shape
    # (a first batch of a new shape costs as much as several: with few images it would dominate)
    predict_rate(fast, paths[:64], workers=0)
    rates = {"before": [], "full": [], "draft": []}
    for _ in range(repeats):  # alternated, so all see the same machine state
        rates["before"].append(predict_rate(full, paths, share_cores=False))
        rates["full"].append(predict_rate(full, paths))
        rates["draft"].append(predict_rate(fast, paths))
    med = {k: statistics.median(v) for k, v in rates.items()}
    decode = {"draft": [], "full": []}
    for _ in range(repeats):  # decoding alone, one process: what jpeg_draft changes
        for name, d in (("full", full), ("draft", fast)):
            start = time.perf_counter()
            for p in paths:
                d.prepare(str(p))
            decode[name].append(len(paths) / (time.perf_counter() - start))
    dec = {k: statistics.median(v) for k, v in decode.items()}
    ratio = med["draft"] / med["before"]
    return {**med, "ratio": ratio, "ratio_full": med["draft"] / med["full"], "runs": rates,
            "decode": dec}  # fmt: skip


def tolerance(ckpt: Path, photos: dict[str, list[Path]]) -> dict:
    fast = Detector.from_checkpoint(ckpt)
    full = Detector.from_checkpoint(ckpt, jpeg_draft=False)
    out = {}
    for kind, paths in photos.items():
        p_fast, p_full = fast.predict_proba(paths)[:, 1], full.predict_proba(paths)[:, 1]
        pixels = [
            (fast.preprocess(str(p)).float() - full.preprocess(str(p)).float()).abs().mean()
            for p in paths
        ]
        out[kind] = {
            "n": len(paths),
            "max_abs_diff": float((p_fast - p_full).abs().max()),
            "mean_abs_diff": float((p_fast - p_full).abs().mean()),
            "mean_grey_diff": float(torch.stack(pixels).mean()),
        }
    return out


def crop_time(path: Path, repeats: int) -> float:
    detector = Detector(DetectorModule(image_size=64, input="crop"))
    detector.predict([str(path)])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        detector.predict([str(path)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def two_step_run(folder: Path) -> Path:
    """A complete last.ckpt of ResNet50 with EMA and Adam state, from two training steps."""
    import lightning as L  # deferred: only this row trains

    from detector.callbacks import EMA

    module = DetectorModule(image_size=32)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    data = DataLoader(list(zip(images, torch.arange(16) % 2, strict=True)), batch_size=8)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[EMA(decay=0.9)],
        num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, data)
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


def file_sizes(full_ckpt: Path, folder: Path, repeats: int) -> dict:
    checkpoint = load_checkpoint_file(full_ckpt)
    lean = lean_checkpoint(checkpoint)
    times: dict[str, list[float]] = {"complete": [], "lean": [], "safetensors": []}
    io = AtomicCheckpointIO()
    for _ in range(repeats):
        for name, action in (
            ("complete", lambda: io.save_checkpoint(checkpoint, folder / "complete.ckpt")),
            ("lean", lambda: io.save_checkpoint(lean, folder / "lean.ckpt")),
            ("safetensors", lambda: save_safetensors(lean, folder / "m.safetensors", {})),
        ):
            start = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - start)
    files = {"complete": "complete.ckpt", "lean": "lean.ckpt", "safetensors": "m.safetensors"}
    return {
        name: {"mb": (folder / f).stat().st_size / 1e6, "save_s": statistics.median(times[name])}
        for name, f in files.items()
    }


def newest_best() -> Path | None:
    found = [p for p in (ROOT / "logs" / "train" / "runs").glob("*/checkpoints/*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    speed, crop, files = result["speed"], result["crop_s"], result["files"]
    what = "1024x1536 JPEGs, 32 px resize model, predict"
    met = _met(speed["ratio"] >= DRAFT_TARGET)
    out = [
        (f"{what}: as before issue #20 (full decode, all threads)", f"{speed['before']:.1f} img/s",
         "", ""),
        (f"{what}: full decode, cores shared with the workers", f"{speed['full']:.1f} img/s",
         "", ""),
        (f"{what}: now (jpeg_draft, cores shared)", f"{speed['draft']:.1f} img/s", "", ""),
        ("**now / before**", f"{speed['ratio']:.2f}", f">= {DRAFT_TARGET}", met),
        ("now / full decode (what jpeg_draft alone gives)", f"{speed['ratio_full']:.2f}", "", ""),
    ]  # fmt: skip
    dec = speed["decode"]
    ratio = dec["draft"] / dec["full"]
    out += [
        ("decoding alone (one process): full", f"{dec['full']:.1f} img/s", "", ""),
        ("decoding alone: jpeg_draft", f"{dec['draft']:.1f} img/s", "", ""),
        ("decode draft / full", f"{ratio:.2f}", "", ""),
    ]
    for kind, t in (result.get("tolerance") or {}).items():
        name = (
            f"max abs P difference, {t['n']} {kind} photographs (mean {t['mean_abs_diff']:.4f};"
            f" input {t['mean_grey_diff']:.2f} grey levels)"
        )
        ok = t["max_abs_diff"] <= TOLERANCE
        out.append((name, f"{t['max_abs_diff']:.4f}", f"<= {TOLERANCE}", _met(ok)))
    name = "crop model (64 px ResNet50), one 1024x1536 JPEG, 64 tiles"
    ok = crop <= CROP_TARGET_S
    out.append((name, f"{crop:.2f} s", f"<= {CROP_TARGET_S} s", _met(ok)))
    for name in ("complete", "lean", "safetensors"):
        f = files[name]
        out.append((f"checkpoint, {name}", f"{f['mb']:.1f} MB in {f['save_s']:.2f} s", "", ""))
    ratio = files["lean"]["mb"] / files["complete"]["mb"]
    times = files["lean"]["save_s"] / files["complete"]["save_s"]
    name = f"**lean / complete size** (save time {times:.2f}x)"
    out.append((name, f"{ratio:.2f}", f"<= {LEAN_TARGET}", _met(ratio <= LEAN_TARGET)))
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="a trained 32 px resize checkpoint")
    parser.add_argument("--full-ckpt", type=Path, help="a complete last.ckpt of ResNet50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=8, help="passes over the 48 large JPEGs")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photos = make_photos(folder / "photos")
        large = photos["large"] * args.copies
        result: dict = {"speed": draft_speed(large, args.repeats)}
        ckpt = args.ckpt or newest_best()
        result["tolerance"] = tolerance(ckpt, photos) if ckpt else None
        if ckpt is None:
            print("tolerance rows skipped: no --ckpt and no checkpoint under logs/train")
        result["crop_s"] = crop_time(photos["large"][0], args.repeats)
        full = args.full_ckpt or two_step_run(folder)
        result["files"] = file_sizes(full, folder, args.repeats)
    print(f"tolerance: {ckpt}; complete checkpoint: {args.full_ckpt or 'made here'}")
    print("| figure | measured | target | |\n| --- | ---: | --- | --- |")
    for row in rows(result):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
