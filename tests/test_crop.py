"""Real-size images (issue #15): the preprocessing contract in the checkpoint, crop training,
tiled scoring that eval, predict and the API agree on, and resize models that say they resized."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, make_image_folder, run_script
from PIL import Image

from detector.api import Detector
from detector.checkpoint import load_checkpoint
from detector.data.contract import Preprocessing
from detector.data.tiles import aggregate_logits, cut_tiles, grid_shape, pad_to, tile_origins


@pytest.mark.parametrize(
    ("height", "width", "size", "max_tiles"),
    [(256, 256, 64, 64), (100, 150, 32, 64), (1536, 1024, 64, 64), (64, 5000, 64, 16)],
)
def test_tiles_cover_small_images_and_spread_over_large_ones(height, width, size, max_tiles):
    origins = tile_origins(height, width, size, max_tiles)
    assert 1 <= len(origins) <= max_tiles
    tops, lefts = sorted({t for t, _ in origins}), sorted({x for _, x in origins})
    # Edge to edge, inside the image, and evenly spaced (steps differ by at most a pixel).
    assert tops[0] == 0 and tops[-1] == height - size
    assert lefts[0] == 0 and lefts[-1] == width - size
    for positions in (tops, lefts):
        steps = np.diff(positions)
        assert len(steps) == 0 or steps.max() - steps.min() <= 1
    rows, cols = grid_shape(height, width, size, max_tiles)
    if -(-height // size) * -(-width // size) <= max_tiles:  # every pixel in some tile
        covered = np.zeros((height, width), bool)
        for t, x in origins:
            covered[t : t + size, x : x + size] = True
        assert covered.all()
    else:
        assert rows * cols > max_tiles // 2  # no needlessly sparse grid


def test_tiles_are_native_pixels_and_small_images_are_mirrored():
    image = torch.arange(3 * 100 * 150, dtype=torch.int64).remainder(251).to(torch.uint8)
    image = image.view(3, 100, 150)
    tiles = cut_tiles(image, 32, 64)
    t, x = tile_origins(100, 150, 32, 64)[5]
    assert torch.equal(tiles[5], image[:, t : t + 32, x : x + 32])  # never resampled
    tiny = torch.tensor([[[7]], [[8]], [[9]]], dtype=torch.uint8)  # 1x1
    padded = pad_to(tiny, 32)
    assert padded.shape == (3, 32, 32) and bool((padded[:, :, :] == tiny).all())
    strip = torch.randint(0, 255, (3, 10, 40), dtype=torch.uint8)
    mirrored = pad_to(strip, 32)
    assert mirrored.shape == (3, 32, 40)
    assert torch.equal(mirrored[:, 10:20], strip.flip(1))  # symmetric: the edge row repeats


def test_aggregate_mean_and_max_of_tile_logits():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0, 5.0])
    counts = torch.tensor([2, 3])
    assert aggregate_logits(logits, counts, "mean").tolist() == [1.0, pytest.approx(7 / 3)]
    assert aggregate_logits(logits, counts, "max").tolist() == [2.0, 5.0]
    with pytest.raises(ValueError, match="aggregate='median'"):
        aggregate_logits(logits, counts, "median")


def test_resize_models_say_when_they_squash():
    contract = Preprocessing(input="resize", image_size=32)
    assert contract.resized_from(1024, 1536) == "1024x1536"
    assert contract.resized_from(64, 64) is None  # 2x: within the rule
    assert contract.resized_from(60, 40) == "60x40"  # another aspect ratio
    assert Preprocessing(input="crop", image_size=32).resized_from(1024, 1536) is None


@pytest.fixture(scope="module")
def large_images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("large"), n_train=16, n_test=6, size=96)


@pytest.fixture(scope="module")
def crop_run(large_images, tmp_path_factory) -> dict:
    """A crop model trained through the real CLI on 96 px images with 32 px crops."""
    out = tmp_path_factory.mktemp("crop_run")
    result = run_script(
        "train.py",
        *TINY,
        "data=imagefolder",
        f"data.root={large_images}",
        "data.input=crop",
        "data.max_tiles=6",
        "trainer.max_epochs=2",
        f"hydra.run.dir={out}",
        cwd=out,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = next((out / "checkpoints").glob("epoch*.ckpt"))
    return {"dir": out, "ckpt": ckpt, "data": large_images, "stdout": result.stdout}


def test_crop_checkpoint_records_its_contract(crop_run):
    module = load_checkpoint(crop_run["ckpt"])
    contract = Preprocessing.from_hparams(module.hparams)
    assert contract == Preprocessing(input="crop", image_size=32, max_tiles=6, aggregate="mean")
    detector = Detector(module)
    image = Image.open(next((crop_run["data"] / "test" / "REAL").glob("*.jpg")))
    assert detector.preprocess(image).shape == (6, 3, 32, 32)  # 96x96 -> 3x3 grid, capped at 6


def test_eval_predict_and_api_agree_on_tiled_scores(crop_run, tmp_path):
    test_dir = crop_run["data"] / "test"
    ev = run_script(
        "eval.py",
        f"ckpt={crop_run['ckpt']}",
        f"data.root={crop_run['data']}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={tmp_path / 'ev'}",
        cwd=tmp_path,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    with open(tmp_path / "ev" / "predictions.csv") as f:
        evaluated = {Path(r["path"]).resolve(): r for r in csv.DictReader(f)}
    pr = run_script(
        "predict.py",
        f"ckpt={crop_run['ckpt']}",
        f"input={test_dir}",
        f"output={tmp_path / 'p.jsonl'}",
        "num_workers=0",
        "device=cpu",
        cwd=tmp_path,
    )
    assert pr.returncode == 0, pr.stderr[-3000:]
    predicted = {
        Path(r["path"]).resolve(): r
        for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())
    }
    detector = Detector.from_checkpoint(crop_run["ckpt"])
    paths = sorted(predicted)
    api = {p: x for p, x in zip(paths, detector.predict(paths, batch_size=5), strict=True)}
    assert set(evaluated) == set(predicted) and len(paths) == 12
    for path in paths:
        p1 = predicted[path]["prob_REAL"]
        assert abs(float(evaluated[path]["probability"]) - p1) <= 1e-5
        assert abs(api[path].probability - p1) <= 1e-5
        assert predicted[path]["n_tiles"] == api[path].n_tiles == 6
        assert int(evaluated[path]["n_tiles"]) == 6
        assert predicted[path]["resized_from"] is None


def test_crop_model_scores_any_size_by_tiles(crop_run, tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"big.jpg": (300, 200), "small.png": (20, 12), "one.png": (1, 1)}
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    detector = Detector.from_checkpoint(crop_run["ckpt"], max_tiles=40)
    preds = detector.predict([tmp_path / n for n in sizes])
    assert [p.n_tiles for p in preds] == [40, 1, 1]  # 10x7 tiles cover 300x200: capped at 40
    assert all(0.0 <= p.probability <= 1.0 for p in preds)


def test_resize_model_rows_name_the_size_they_squashed(trained_run, tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (150, 100, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "b.jpg")
    out = tmp_path / "p.csv"
    result = run_script(
        "predict.py",
        f"ckpt={trained_run['ckpt']}",
        f"input={tmp_path}",
        f"output={out}",
        "num_workers=0",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert rows["a.jpg"]["resized_from"] == "100x150" and rows["b.jpg"]["resized_from"] == ""
    assert rows["a.jpg"]["n_tiles"] == "1"
    assert (
        "1 of 2 images were resized from up to 100x150 to 32x32; this model was trained on "
        "32x32 images" in result.stdout
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.input=tiles"], "data.input='tiles' must be one of resize, crop"),
        (["data.input=crop", "data.cache=true"], "data.input=crop never resizes"),
        (["data.input=crop", "data.max_tiles=0"], "data.max_tiles=0 must be a positive integer"),
        (["model.aggregate=median"], "model.aggregate='median' must be one of mean, max"),
    ],
)
def test_bad_crop_settings_stop_with_one_line(image_folder, tmp_path, overrides, message):
    result = run_script(
        "train.py",
        *TINY,
        "data=imagefolder",
        f"data.root={image_folder}",
        *overrides,
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_eval_follows_the_checkpoint_contract(crop_run, tmp_path):
    result = run_script(
        "eval.py",
        f"ckpt={crop_run['ckpt']}",
        f"data.root={crop_run['data']}",
        "data.input=resize",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "the checkpoint was trained with data.input=crop" in result.stderr


def test_training_prints_no_contract_surprises(crop_run):
    cfg = compose_config("train", crop_run["dir"], ["data.input=crop"])
    assert cfg.model.input == "crop" and cfg.model.max_tiles == cfg.data.max_tiles


def test_explain_draws_the_tile_map_with_predicts_probability(crop_run, tmp_path):
    rng = np.random.default_rng(2)
    photo = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 255, (70, 130, 3), dtype=np.uint8)).save(photo)
    result = run_script(
        "explain.py", f"ckpt={crop_run['ckpt']}", f"input={photo}", "output=maps", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "maps" / "explanations.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    expected = Detector.from_checkpoint(crop_run["ckpt"]).predict(photo)[0]
    assert 1 < int(row["n_tiles"]) == expected.n_tiles <= 6  # 15 would cover it: max_tiles=6
    assert abs(float(row["prob_REAL"]) - expected.probability) <= 1e-5
    assert float(row["tile_min"]) <= expected.probability <= float(row["tile_max"])
    assert row["explained"] == "tiles" and row["figure"] == "0000_wide_tiles.png"
    with Image.open(tmp_path / "maps" / row["figure"]) as png:
        pixels = np.asarray(png.convert("L"), dtype=float)
    assert pixels.std() > 10  # the image and its tiles, not a blank canvas
