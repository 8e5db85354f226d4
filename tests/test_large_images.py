"""Large JPEGs for resize models: decoded at reduced size (libjpeg's DCT scaling) before the
exact resize, the same way in eval's loaders, predict, the API; never for crop models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from detector import Detector
from detector.data.contract import Preprocessing
from detector.data.datasets import BatchedImageDataset
from detector.data.decode import draft_jpeg, load_image, open_image, pil_to_input, to_rgb
from detector.data.tiles import cut_tiles
from detector.errors import ConfigError
from detector.tasks.inputs import load_detector
from tests.conftest import compose_config


def _photo(path: Path, width: int = 1024, height: int = 1536, exif_rotated: bool = False) -> Path:
    """A smooth colour field with a dark left half, so orientation mistakes show."""
    rng = np.random.default_rng(0)
    base = np.kron(rng.uniform(60, 230, (height // 64, width // 64, 3)), np.ones((64, 64, 1)))
    base[:, : width // 2] *= 0.2
    img = Image.fromarray(np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8))
    if exif_rotated:  # stored turned a quarter; orientation 6 turns it back upright
        exif = Image.Exif()
        exif[0x0112] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif.tobytes())
    else:
        img.save(path, quality=90)
    return path


def _full_decode(path: Path, size: int) -> torch.Tensor:
    """Today's exact path: every pixel decoded, then the bilinear resize."""
    with Image.open(path) as img:
        return pil_to_tensor(to_rgb(img).resize((size, size), Image.BILINEAR))


def test_draft_scale_keeps_eight_times_the_target_size(tmp_path):
    path = _photo(tmp_path / "big.jpg")
    with Image.open(path) as img:
        assert draft_jpeg(img, 32) == 4 and img.size == (256, 384)  # 1024x1536 / 4
    with Image.open(path) as img:
        assert draft_jpeg(img, 16) == 8 and img.size == (128, 192)  # libjpeg's smallest scale
    with Image.open(path) as img:
        assert draft_jpeg(img, 128) == 1 and img.size == (1024, 1536)  # 1/2 would leave 512 px
    with Image.open(path) as img:
        assert draft_jpeg(img, 64) == 2 and img.size == (512, 768)
    png = tmp_path / "big.png"
    Image.open(path).save(png)
    with Image.open(png) as img:
        assert draft_jpeg(img, 32) == 1 and img.size == (1024, 1536)  # JPEGs only
    with Image.open(path) as img:
        img.load()  # already decoded: nothing to gain, nothing changed
        assert draft_jpeg(img, 32) == 1 and img.size == (1024, 1536)


def test_reduced_decode_is_close_to_the_exact_one_and_can_be_turned_off(tmp_path):
    path = _photo(tmp_path / "big.jpg")
    exact = _full_decode(path, 32)
    fast = load_image(str(path), 32)
    assert not torch.equal(fast, exact)  # the rule is on by default
    diff = (fast.int() - exact.int()).abs()
    assert diff.float().mean() < 1.0 and diff.max() <= 8, (diff.float().mean(), diff.max())
    assert torch.equal(load_image(str(path), 32, draft=False), exact)
    off = Preprocessing(input="resize", image_size=32, jpeg_draft=False)
    assert torch.equal(off.prepare_file(str(path)).pixels, exact)
    with pytest.raises(ConfigError, match="jpeg_draft='yes' must be true or false"):
        Preprocessing(jpeg_draft="yes")


def test_exif_orientation_is_applied_to_the_reduced_image(tmp_path):
    upright = _photo(tmp_path / "upright.jpg")
    rotated = _photo(tmp_path / "rotated.jpg", exif_rotated=True)
    contract = Preprocessing(input="resize", image_size=32)
    a = contract.prepare_file(str(upright))
    b = contract.prepare_file(str(rotated))
    assert a.resized_from == "1024x1536" and b.resized_from is not None
    assert b.pixels[:, :, :14].float().mean() < 0.5 * b.pixels[:, :, 18:].float().mean()
    assert (a.pixels.int() - b.pixels.int()).abs().float().mean() < 2.0  # JPEG noise only
    assert (b.pixels.int() - _full_decode(rotated, 32).int()).abs().float().mean() < 1.0


def test_crop_models_never_take_the_reduced_decode(tmp_path):
    path = _photo(tmp_path / "big.jpg")
    with Image.open(path) as img:
        native = pil_to_tensor(to_rgb(img))
    contract = Preprocessing(input="crop", image_size=64, max_tiles=4)
    tiles = contract.prepare_file(str(path)).pixels
    assert tiles.shape == (4, 3, 64, 64)
    assert torch.equal(tiles, cut_tiles(native, 64, 4))  # the file's own pixels


def test_eval_loader_predict_and_api_decode_large_jpegs_alike(trained_run, tmp_path):
    paths = [_photo(tmp_path / "a.jpg"), _photo(tmp_path / "b.jpg", 1536, 1024, True)]
    loader_set = BatchedImageDataset([(str(p), 0) for p in paths], 32)  # eval's test set
    from_loader = loader_set.__getitems__([0, 1]).images
    detector = Detector.from_checkpoint(trained_run["ckpt"])
    for i, path in enumerate(paths):
        assert torch.equal(detector.preprocess(str(path)), from_loader[i])
        with open_image(str(path)) as img:  # an opened file, as the service passes it
            assert torch.equal(detector.preprocess(img), from_loader[i])
        with Image.open(path) as img:  # a PIL image already loaded: every pixel, no draft
            img.load()
            assert torch.equal(detector.preprocess(img), pil_to_input(img, 32))
    exact = Detector.from_checkpoint(trained_run["ckpt"], jpeg_draft=False)
    assert torch.equal(exact.preprocess(str(paths[0])), _full_decode(paths[0], 32))
    p_fast, p_exact = detector.predict_proba(paths)[:, 1], exact.predict_proba(paths)[:, 1]
    assert (p_fast - p_exact).abs().max() < 0.02


def test_predict_setting_reaches_the_detector(trained_run, tmp_path):
    for value, expected in (("false", False), ("true", True)):
        cfg = compose_config(
            "predict", tmp_path, [f"ckpt={trained_run['ckpt']}", "input=x", f"jpeg_draft={value}"]
        )
        assert load_detector(cfg).preprocessing.jpeg_draft is expected
