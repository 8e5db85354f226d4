"""Find the files of an image folder that would stop or poison training, before training starts.

Folders scraped from the web hold empty files, truncated downloads, HTML error pages saved as
``.jpg``, formats PIL cannot read, decompression bombs, tracking pixels and symlink loops. Every
file is opened and decoded once (JPEGs at reduced scale, so a 12 MP photo costs about as much as a
thumbnail), in parallel, and the verdicts are cached next to the data keyed by (size, mtime,
ctime), so later runs only re-check files that changed. The scan decodes through
:mod:`detector.data.decode`, as the loaders do, so they never disagree about what a readable
image is. Workers are forked, so they start in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from detector.data.decode import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    pixel_limit_reason,
    reason_from_exception,
    to_rgb,
)
from detector.files import atomic_write_text, display
from detector.launch_env import cpu_cores

log = logging.getLogger(__name__)

# Operating-system litter that is never data and never reported.
IGNORED_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", "__macosx"})
CACHE_NAME = ".detector-scan.json"
CACHE_VERSION = 1
# Below this many files to check, forking workers costs more than it saves.
PARALLEL_THRESHOLD = 512


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"path": display(self.path), "reason": self.reason}


@dataclass
class ScanResult:
    """Good images per class (sorted paths) and every bad file with its reason."""

    folder: Path
    classes: list[str]
    good: dict[str, list[str]] = field(default_factory=dict)
    bad: list[BadFile] = field(default_factory=list)
    checked: int = 0  # files decoded by this scan
    cached: int = 0  # files whose verdict came from the cache
    seconds: float = 0.0
    cache_path: Path | None = None

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.good.values()) + len(self.bad)


def is_ignored(name: str) -> bool:
    """Hidden files (.DS_Store, ._name AppleDouble files, .git) and Windows/macOS litter."""
    return name.startswith(".") or name.lower() in IGNORED_NAMES


# ---------------------------------------------------------------------------------------------
# Decoding: shared by the scan and by training, evaluation and prediction.


def _describe_non_image(head: bytes) -> str:
    start = head.lstrip().lower()
    if start.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in start:
        return "an HTML page, not an image (a failed download?)"
    if start.startswith(b"<svg") or (start.startswith(b"<?xml") and b"<svg" in start):
        return "an SVG drawing, not a bitmap image (unsupported format)"
    if start.startswith((b"<?xml", b"{", b"[")):
        return "a text (XML/JSON) file, not an image"
    if head and b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "a text file, not an image"
        except UnicodeDecodeError:
            pass
    return "not an image PIL can identify"


# ---------------------------------------------------------------------------------------------
# Checking one file.


def check_file(
    path: str, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = DEFAULT_MIN_SIZE
) -> str | None:
    """None for a usable image, else why it is not one (one short line)."""
    try:
        st = os.stat(path)
        if st.st_size == 0:
            return "empty file (0 bytes)"
        ext = os.path.splitext(path)[1].lower()
        if ext not in IMAGE_EXTENSIONS:
            return (
                f"unsupported format {ext or '(no extension)'!r} "
                f"(readable: {', '.join(IMAGE_EXTENSIONS)})"
            )
        with open(path, "rb") as f:
            head = f.read(512)
            f.seek(0)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    img = Image.open(f)
            except Image.DecompressionBombError as e:
                return f"refused without decoding ({e})"
            except UnidentifiedImageError:
                return _describe_non_image(head)
            with img:
                if img.format not in IMAGE_FORMATS:
                    return f"unsupported format {img.format} inside a {ext} file"
                width, height = img.size
                too_big = pixel_limit_reason(width, height, max_pixels)
                if too_big:
                    return too_big
                if min(width, height) < min_size:
                    return f"{width}x{height} pixels is smaller than data.min_size={min_size}"
                # JPEG only: decode at 1/8 scale; a truncated file still fails.
                img.draft("RGB", (min_size, min_size))
                img.load()
                to_rgb(img)
        return None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, MemoryError) as e:
        return reason_from_exception(e)
    except Exception as e:  # any other decoder failure is a bad file, not a crashed scan
        return f"cannot decode it ({type(e).__name__}: {e})"


def _check_many(args: tuple[list[str], int, int]) -> list[str | None]:
    paths, max_pixels, min_size = args
    return [check_file(p, max_pixels, min_size) for p in paths]


# ---------------------------------------------------------------------------------------------
# Listing.


def walk_class_folder(class_dir: Path) -> tuple[list[str], list[BadFile]]:
    """Every non-hidden file below ``class_dir`` (symlinked folders followed once) and the folders
    that could not be listed or loop back on themselves."""
    files: list[str] = []
    bad: list[BadFile] = []
    seen: dict[tuple[int, int], str] = {}

    def onerror(e: OSError) -> None:
        bad.append(BadFile(e.filename or str(class_dir), reason_from_exception(e)))

    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True, onerror=onerror):
        try:
            st = os.stat(dirpath)
        except OSError as e:
            bad.append(BadFile(dirpath, reason_from_exception(e)))
            dirnames[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            bad.append(BadFile(dirpath, f"symlink loop (leads back to {display(seen[key])})"))
            dirnames[:] = []
            continue
        seen[key] = dirpath
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(d))
        files.extend(os.path.join(dirpath, f) for f in filenames if not is_ignored(f))
    return sorted(files), bad


# ---------------------------------------------------------------------------------------------
# Cache.


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "detector" / "scans"


def cache_paths(folder: Path) -> tuple[Path, Path]:
    """In the data folder itself, and a per-user fallback for read-only folders."""
    digest = hashlib.sha1(os.fsencode(os.path.abspath(folder))).hexdigest()[:16]
    return folder / CACHE_NAME, _cache_dir() / f"{digest}.json"


def _read_cache(folder: Path, settings: dict) -> dict[str, list]:
    candidates = [p for p in cache_paths(folder) if p.is_file()]
    candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable scan cache %s (%s)", display(path), e)
            continue
        if data.get("version") == CACHE_VERSION and data.get("settings") == settings:
            return data.get("files", {})
    return {}


def _write_cache(folder: Path, settings: dict, files: dict[str, list]) -> Path | None:
    text = json.dumps({"version": CACHE_VERSION, "settings": settings, "files": files})
    for path in cache_paths(folder):
        try:
            atomic_write_text(path, text)
            return path
        except OSError as e:
            log.debug("cannot write scan cache %s (%s)", display(path), e)
    log.warning("could not write the scan cache of %s: the next run scans again", display(folder))
    return None


# ---------------------------------------------------------------------------------------------
# The scan.


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _check_parallel(
    paths: list[str], max_pixels: int, min_size: int, workers: int
) -> list[str | None]:
    if len(paths) < PARALLEL_THRESHOLD or workers <= 1:
        return _check_many((paths, max_pixels, min_size))
    size = max(64, min(2000, len(paths) // (workers * 8) or 1))
    jobs = [(chunk, max_pixels, min_size) for chunk in _chunks(paths, size)]
    try:
        # fork: children need only PIL and this module, and start in milliseconds (spawn would
        # re-import the entry point, torch included, in every worker).
        ctx = multiprocessing.get_context("fork")
        pool: ProcessPoolExecutor | ThreadPoolExecutor = ProcessPoolExecutor(workers, ctx)
    except (ValueError, OSError):
        pool = ThreadPoolExecutor(workers)  # no fork on this system; PIL decodes without the GIL
    with pool:
        return [reason for part in pool.map(_check_many, jobs) for reason in part]


def _cached_verdicts(
    listed: dict[str, list[str]], cache: dict[str, list], cut: int, result: ScanResult
) -> tuple[dict[str, str | None], dict[str, list], list[str]]:
    """Verdicts of files unchanged since the cache was written (same size, mtime and ctime),
    each file's cache key, and the files that must be checked again."""
    verdicts: dict[str, str | None] = {}
    keys: dict[str, list] = {}
    to_check: list[str] = []
    for files in listed.values():
        for path in files:
            try:
                st = os.stat(path)
            except OSError as e:
                verdicts[path] = reason_from_exception(e)
                continue
            key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
            keys[path] = key
            hit = cache.get(path[cut:])
            if hit is not None and hit[:3] == key:
                verdicts[path] = hit[3]
                result.cached += 1
            else:
                to_check.append(path)
    return verdicts, keys, to_check


def scan_folder(
    folder: str | Path,
    classes: Sequence[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
    workers: int | None = None,
    use_cache: bool = True,
) -> ScanResult:
    """Check every file below ``folder/<class>`` for each class, re-using cached verdicts."""
    start = time.perf_counter()
    folder = Path(folder)
    result = ScanResult(folder=folder, classes=list(classes))
    settings = {"max_pixels": int(max_pixels), "min_size": int(min_size)}
    cache = _read_cache(folder, settings) if use_cache else {}
    cut = len(os.path.join(os.fspath(folder), ""))  # walked paths start with folder + "/"

    listed: dict[str, list[str]] = {}
    for name in classes:
        files, bad = walk_class_folder(folder / name)
        listed[name] = files
        result.bad.extend(bad)

    verdicts, keys, to_check = _cached_verdicts(listed, cache, cut, result)
    if to_check:
        n_workers = workers or cpu_cores()
        if len(to_check) >= PARALLEL_THRESHOLD:
            log.info(
                "checking %d image files in %s with %d workers (verdicts are cached for later "
                "runs)",
                len(to_check),
                display(folder),
                n_workers,
            )
        for path, reason in zip(
            to_check, _check_parallel(to_check, max_pixels, min_size, n_workers), strict=True
        ):
            verdicts[path] = reason
        result.checked = len(to_check)

    new_cache: dict[str, list] = {}
    for name, files in listed.items():
        good = []
        for path in files:
            reason = verdicts[path]
            if path in keys:
                new_cache[path[cut:]] = [*keys[path], reason]
            if reason is None:
                good.append(path)
            else:
                result.bad.append(BadFile(path, reason))
        result.good[name] = good
    result.bad.sort(key=lambda b: b.path)

    if use_cache and (result.checked or set(new_cache) != set(cache)):
        result.cache_path = _write_cache(folder, settings, new_cache)
    result.seconds = time.perf_counter() - start
    return result


def log_bad_files(result: ScanResult, report: Path | None = None) -> None:
    """Every bad file, one warning line each, so the run's log holds the full list too."""
    if not result.bad:
        return
    where = f" (listed in {display(report)})" if report else ""
    log.warning(
        "skipping %d bad file(s) of %d in %s%s:",
        len(result.bad),
        result.total,
        display(result.folder),
        where,
    )
    for bad in result.bad:
        log.warning("  bad file %s: %s", display(bad.path), bad.reason)


def write_report(results: Sequence[ScanResult], path: Path) -> Path:
    """``bad_files.json``: the folders scanned, counts, and every bad file with its reason."""
    report = {
        "folders": [
            {
                "folder": display(r.folder),
                "files": r.total,
                "good": sum(len(v) for v in r.good.values()),
                "bad": len(r.bad),
            }
            for r in results
        ],
        "bad_files": [b.to_json() for r in results for b in r.bad],
    }
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path
