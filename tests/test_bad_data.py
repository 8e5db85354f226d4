"""Broken files in an image folder are found at start-up, reported, skipped, and never crash a run.

One fixture folder holds every kind of bad and odd file the issue names; each test asserts the
verdict (the reason text) and that training completes or stops cleanly.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.ImageFile
import pytest
from PIL import Image

import detector.data.scan as scan
from detector.data.datamodule import ImageFolderDataModule
from detector.data.decode import DEFAULT_MAX_PIXELS, load_image, open_image, to_rgb
from detector.data.scan import check_file, scan_folder
from detector.errors import DataError
from tests.conftest import TINY, compose_config, make_image_folder

BOMB_SIDE = (10_000, 9_000)  # 90 M pixels: just over PIL's limit, where PIL only warns


def _png(path: Path, width: int, height: int, rows, bit_depth: int = 8, colour: int = 0) -> Path:
    """A PNG written chunk by chunk: 16-bit colour and bombs that PIL will not write for us.
    ``rows``: bytes of each scanline, or an int (that many zero bytes, streamed)."""
    compressor = zlib.compressobj(9)
    parts = []
    for y in range(height):
        row = rows[y] if not isinstance(rows, int) else bytes(rows)
        parts.append(compressor.compress(b"\x00" + row))
    parts.append(compressor.flush())

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )
    return path


def _noise_jpeg(path: Path, size: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


# name -> the reason the scan must give (a substring); files that must be accepted are in ODD.
BAD = {
    "zero.jpg": "empty file (0 bytes)",
    "truncated.jpg": "truncated file",
    "page.jpg": "an HTML page, not an image",
    "notes.jpg": "a text file, not an image",
    "drawing.svg": "unsupported format '.svg'",
    "icon.jpg": "unsupported format ICO inside a .jpg file",
    "pixel.gif": "1x1 pixels is smaller than data.min_size=8",
    "bomb.png": "90,000,000 pixels is over data.max_pixels=89,478,485; refused without decoding",
    "locked.jpg": "cannot read it (Permission denied)",
    "loop.jpg": "symlink loop",
    "again": "symlink loop (leads back to",
}
ODD = [
    "gray16.png",
    "rgb16.png",
    "cmyk.jpg",
    "rgba.png",
    "la.png",
    "palette.png",
    "gray.jpg",
    "rotated.jpg",
    os.fsdecode(b"caf\xe9-latin1.jpg"),
]
HIDDEN = [".DS_Store", "._0001.jpg", "Thumbs.db", ".cache/x.jpg"]


def make_bad_files(folder: Path) -> Path:
    """Every kind of bad, odd and hidden file of the issue, in ``folder`` (a class folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    data = _noise_jpeg(folder / "truncated.jpg", seed=1)
    (folder / "truncated.jpg").write_bytes(data[: int(len(data) * 0.6)])
    (folder / "page.jpg").write_text(
        "<!DOCTYPE html><html><body>403 Forbidden</body></html>\n", encoding="utf-8"
    )
    (folder / "notes.jpg").write_text("not a picture, just notes\n", encoding="utf-8")
    (folder / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "icon.jpg", format="ICO")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "pixel.gif")
    _png(folder / "bomb.png", *BOMB_SIDE, rows=BOMB_SIDE[0])
    _noise_jpeg(folder / "locked.jpg", size=32, seed=2)
    os.chmod(folder / "locked.jpg", 0)
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink(".", folder / "again")  # a folder that contains itself

    gray16 = np.full((32, 32), 32768, np.uint16)
    gray16[0, 0] = 65535
    Image.fromarray(gray16).save(folder / "gray16.png")
    rgb16 = np.zeros((32, 32, 3), np.uint16)
    rgb16[..., 0] = 65535
    rgb16[..., 1] = 32768
    _png(folder / "rgb16.png", 32, 32, [r.astype(">u2").tobytes() for r in rgb16], 16, 2)
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:16] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    la = np.zeros((32, 32, 2), np.uint8)
    la[:16] = (40, 255)
    Image.fromarray(la, "LA").save(folder / "la.png")
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    palette.paste(1, (0, 16, 32, 32))
    palette.save(folder / "palette.png", transparency=1)  # bottom half transparent
    Image.new("L", (32, 32), 77).save(folder / "gray.jpg")
    rotated = Image.new("RGB", (40, 20), (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated.save(folder / "rotated.jpg", exif=exif, quality=95)
    _noise_jpeg(Path(os.fsdecode(os.path.join(os.fsencode(folder), b"caf\xe9-latin1.jpg"))))

    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._0001.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.jpg").write_bytes(b"")
    return folder


@pytest.fixture
def deny_locked(monkeypatch):
    """``chmod 0`` does not stop root: make opening ``locked.jpg`` fail as it does for others."""
    if os.geteuid() != 0:
        return
    real_open = open

    def guarded(file, *args, **kwargs):
        if os.fspath(file).endswith("locked.jpg"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(scan, "open", guarded, raising=False)


@pytest.fixture
def bad_root(tmp_path, deny_locked) -> Path:
    root = make_image_folder(tmp_path / "data", n_train=12, n_test=4)
    make_bad_files(root / "train" / "REAL")
    return root


def _reasons(result) -> dict[str, str]:
    return {Path(b.path).name: b.reason for b in result.bad}


def test_scan_names_every_bad_file_with_its_reason(bad_root):
    result = scan_folder(bad_root / "train", ["FAKE", "REAL"])
    reasons = _reasons(result)
    assert set(reasons) == set(BAD), reasons
    for name, expected in BAD.items():
        assert expected in reasons[name], (name, reasons[name])
    good = {Path(p).name for p in result.good["REAL"]}
    assert set(ODD) <= good  # odd but valid images are kept
    assert len(result.good["REAL"]) == 12 + len(ODD) and len(result.good["FAKE"]) == 12
    listed = {Path(b.path).name for b in result.bad} | good
    assert not {Path(h).name for h in HIDDEN} & listed  # hidden files: neither bad nor data


def decode_image(path: Path):
    """A file as the RGB image the loaders start from: opened and checked, then converted."""
    with open_image(path, DEFAULT_MAX_PIXELS) as img:
        img.load()
        return to_rgb(img)


def test_odd_images_become_the_rgb_a_viewer_shows(bad_root):
    folder = bad_root / "train" / "REAL"
    gray16 = decode_image(folder / "gray16.png")
    assert gray16.getpixel((5, 5)) == (128, 128, 128)  # scaled, not clipped to white
    assert gray16.getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(folder / "rgb16.png").getpixel((3, 3)) == (255, 128, 0)
    r, g, b = decode_image(folder / "cmyk.jpg").getpixel((16, 16))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    rgba = decode_image(folder / "rgba.png")
    assert rgba.getpixel((5, 5)) == (255, 0, 0)
    assert rgba.getpixel((5, 25)) == (255, 255, 255)  # transparent -> white background
    la = decode_image(folder / "la.png")
    assert la.getpixel((5, 5)) == (40, 40, 40) and la.getpixel((5, 25)) == (255, 255, 255)
    palette = decode_image(folder / "palette.png")
    assert palette.getpixel((5, 5)) == (0, 0, 255) and palette.getpixel((5, 25)) == (255,) * 3
    assert decode_image(folder / "gray.jpg").getpixel((3, 3)) == (77, 77, 77)
    rotated = decode_image(folder / "rotated.jpg")
    assert rotated.size == (20, 40)  # stored 40x20, shown upright
    r, g, b = rotated.getpixel((15, 4))  # the stored top-left corner is now top-right
    assert r > 200 and b < 60
    for name in ODD:
        tensor = load_image(str(folder / name), 32)
        assert tensor.shape == (3, 32, 32) and tensor.dtype.is_floating_point is False


def test_decompression_bomb_is_refused_from_its_header(bad_root, monkeypatch):
    bomb = bad_root / "train" / "REAL" / "bomb.png"
    assert bomb.stat().st_size < 200_000  # a small file that would need 90 MB decoded

    def no_decoding(self):
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", no_decoding)
    assert "refused without decoding" in check_file(str(bomb))
    with pytest.raises(DataError, match=r"bomb\.png: 10000x9000 = 90,000,000 pixels is over"):
        load_image(str(bomb), 32)
    # the limit is a setting: raised above the image, the header passes and decoding starts
    assert "the bomb was decoded" in check_file(str(bomb), max_pixels=100_000_000)


def test_training_skips_bad_files_reports_them_and_completes(bad_root, tmp_path, caplog):
    from detector.tasks.train import train

    out = tmp_path / "run"
    cfg = compose_config("train", out, [*TINY, "data=imagefolder", f"data.root={bad_root}"])
    with caplog.at_level(logging.WARNING, logger="detector"):
        metrics = train(cfg)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert 0.0 <= metrics["test/acc"] <= 1.0
    report = json.loads((out / "bad_files.json").read_text(encoding="utf-8"))
    reported = {Path(b["path"]).name: b["reason"] for b in report["bad_files"]}
    assert set(reported) == set(BAD)
    assert report["folders"][0]["bad"] == len(BAD)
    assert report["folders"][0]["good"] == 24 + len(ODD)
    log_text = caplog.text
    assert f"skipping {len(BAD)} bad file(s)" in log_text
    for name, reason in BAD.items():
        assert name in log_text and reason in log_text, name


def test_strict_turns_bad_files_into_an_error_before_training(bad_root, tmp_path):
    from detector.tasks.train import train

    out = tmp_path / "run"
    cfg = compose_config(
        "train", out, [*TINY, "data=imagefolder", f"data.root={bad_root}", "data.strict=true"]
    )
    with pytest.raises(
        DataError, match=rf"data.strict=true and {len(BAD)} bad file\(s\) in .*train"
    ):
        train(cfg)
    assert not list(out.glob("checkpoints/*.ckpt"))  # not one epoch trained
    assert len(json.loads((out / "bad_files.json").read_text())["bad_files"]) == len(BAD)


def test_a_class_with_only_bad_files_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=4, n_test=2)
    for f in (root / "train" / "FAKE").iterdir():
        f.write_bytes(b"<html>gone</html>")
    dm = ImageFolderDataModule(root=str(root), image_size=32, batch_size=4, num_workers=0)
    with pytest.raises(DataError, match=r"class folder .*FAKE has no usable images: all 4"):
        dm.setup("fit")


def test_scan_cache_is_reused_and_invalidated_per_file(bad_root):
    first = scan_folder(bad_root / "train", ["FAKE", "REAL"])
    assert first.cache_path == bad_root / "train" / ".detector-scan.json"
    second = scan_folder(bad_root / "train", ["FAKE", "REAL"])
    assert second.checked == 0 and second.cached == first.checked
    assert _reasons(second) == _reasons(first)
    # one file replaced by a broken one, one deleted, one added
    victim = bad_root / "train" / "FAKE" / "0000.jpg"
    victim.write_bytes(victim.read_bytes()[:100])
    (bad_root / "train" / "FAKE" / "0001.jpg").unlink()
    shutil.copy(bad_root / "train" / "FAKE" / "0002.jpg", bad_root / "train" / "FAKE" / "new.jpg")
    third = scan_folder(bad_root / "train", ["FAKE", "REAL"])
    assert third.checked == 2  # the replaced file and the new one
    assert "0000.jpg" in _reasons(third)
    names = {Path(p).name for p in third.good["FAKE"]}
    assert "0001.jpg" not in names and "new.jpg" in names
    # a different limit is a different verdict: the whole cache is invalid
    assert scan_folder(bad_root / "train", ["FAKE", "REAL"], min_size=2).cached == 0


def test_read_only_data_folder_caches_in_the_user_cache(bad_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    real_write = scan.atomic_write_text

    def read_only(path, text):
        if Path(path).parent == bad_root / "train":
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        real_write(path, text)

    monkeypatch.setattr(scan, "atomic_write_text", read_only)
    first = scan_folder(bad_root / "train", ["FAKE", "REAL"])
    assert first.cache_path.is_relative_to(tmp_path / "home-cache")
    assert not (bad_root / "train" / ".detector-scan.json").exists()
    assert scan_folder(bad_root / "train", ["FAKE", "REAL"]).checked == 0


def test_parallel_scan_gives_the_serial_verdicts(bad_root, monkeypatch):
    serial = scan_folder(bad_root / "train", ["FAKE", "REAL"], use_cache=False, workers=1)
    monkeypatch.setattr(scan, "PARALLEL_THRESHOLD", 1)
    parallel = scan_folder(bad_root / "train", ["FAKE", "REAL"], use_cache=False, workers=2)
    assert _reasons(parallel) == _reasons(serial) and parallel.good == serial.good


def test_a_file_that_goes_bad_after_the_scan_is_skipped_with_a_warning(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", n_train=6, n_test=2)
    dm = ImageFolderDataModule(
        root=str(root), image_size=32, batch_size=4, num_workers=0, hflip=False, val_fraction=0.0
    )
    dm.setup("fit")
    samples = dm.train_set.samples
    Path(samples[0][0]).unlink()  # deleted
    Path(samples[1][0]).write_bytes(b"replaced by a text file")  # replaced
    with caplog.at_level(logging.WARNING, logger="detector"):
        image, label = dm.train_set[0]
        again = dm.train_set[0]
        batches = list(dm.train_dataloader())
    assert image.shape == (3, 32, 32)
    assert label == samples[2][1]  # the next readable sample takes the place of both
    assert again[1] == label
    assert sum(len(b[1]) for b in batches) == 12
    warnings = [r.getMessage() for r in caplog.records if "changed after the scan" in r.message]
    assert len(warnings) == 2  # one per file, not one per read
    assert Path(samples[0][0]).name in warnings[0] and "FileNotFoundError" in warnings[0]


def test_non_utf8_names_are_reported_readably(tmp_path):
    folder = tmp_path / "train"
    make_image_folder(tmp_path, n_train=2, n_test=0)
    name = os.path.join(os.fsencode(folder / "REAL"), b"broken-\xff.jpg")
    Path(os.fsdecode(name)).write_bytes(b"")
    result = scan_folder(folder, ["FAKE", "REAL"])
    assert [Path(b.path).name for b in result.bad] == [os.fsdecode(b"broken-\xff.jpg")]
    path = scan.write_report([result], tmp_path / "bad_files.json")  # strict UTF-8 text
    entry = json.loads(path.read_text(encoding="utf-8"))["bad_files"][0]
    assert entry["path"].endswith("broken-\\xff.jpg") and entry["reason"].startswith("empty")
    assert {Path(p).name for p in result.good["REAL"]} == {"0000.jpg", "0001.jpg"}
