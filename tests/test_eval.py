"""Evaluation end to end: the threshold fitted on validation, per-image predictions, several test
sets, the robustness sweep, training-time augmentation and TensorBoard."""

import csv
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.data.augment import Degradation, RandomBlurJPEG, blur, jpeg, noise, resize
from detector.data.datamodule import ImageFolderDataModule
from detector.errors import ConfigError, DataError
from detector.evaluation.metrics import fit_threshold
from detector.module import DetectorModule
from detector.tasks.evaluate import evaluate
from detector.tasks.train import train
from tests.conftest import TINY, compose_config, make_image_folder, run_script

EVAL = ["data=imagefolder", "data.num_workers=0", "trainer.accelerator=cpu"]


def _probs_on(model: DetectorModule, samples, image_size: int) -> torch.Tensor:
    from detector.data.decode import load_image

    model.eval()
    with torch.inference_mode():
        images = torch.stack([load_image(p, image_size) for p, _ in samples])
        return torch.sigmoid(model(images).float())


def test_threshold_is_fitted_on_validation_stored_and_reused(trained_run, tmp_path):
    best = torch.load(trained_run["ckpt"], map_location="cpu", weights_only=False)
    stored = best["hyper_parameters"]["threshold"]
    fit = best["threshold_fit"]
    assert fit["split"] == "val" and fit["rule"] == "balanced_accuracy"
    model = DetectorModule.load_from_checkpoint(trained_run["ckpt"], map_location="cpu")
    assert model.threshold == stored and model.threshold_fit == fit

    # Refitting on the validation split with the best weights gives the stored threshold.
    data = ImageFolderDataModule(root=str(trained_run["data"]), image_size=32, num_workers=0)
    data.setup("fit")
    val = data.val_set.samples
    assert fit["n"] == len(val)
    targets = torch.tensor([y for _, y in val])
    refit, _ = fit_threshold(_probs_on(model, val, 32), targets, "balanced_accuracy")
    assert refit == pytest.approx(stored, abs=1e-5)

    # Training's test report and eval both decide at the stored threshold.
    trained = json.loads((trained_run["dir"] / "metrics.json").read_text())
    assert trained["threshold"] == pytest.approx(stored)
    report = evaluate(
        compose_config(
            "eval",
            tmp_path,
            [f"ckpt={trained_run['ckpt']}", *EVAL, f"data.root={trained_run['data']}"],
        )
    )
    assert report["threshold"] == pytest.approx(stored)
    assert report["threshold_source"].startswith("fitted on the validation split")
    rows = {r["name"]: r for r in report["thresholds"]}
    assert rows["default"]["threshold"] == 0.5 and rows["fitted"]["threshold"] == stored
    last = torch.load(trained_run["dir"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["threshold_fit"]["epoch"] == 3  # every checkpoint carries its own fit


def test_threshold_rules_from_config(image_folder, tmp_path):
    base = [*TINY, "data=imagefolder", f"data.root={image_folder}", "test=false"]
    fixed = train(
        compose_config(
            "train",
            tmp_path / "fixed",
            [*base, "model.threshold_rule=fixed", "model.threshold=0.3"],
        )
    )
    model = DetectorModule.load_from_checkpoint(fixed["best_model_path"], map_location="cpu")
    assert model.threshold == 0.3 and model.threshold_fit is None

    fpr = train(
        compose_config(
            "train",
            tmp_path / "fpr",
            [*base, "model.threshold_rule=target_fpr", "model.target_fpr=0.0"],
        )
    )
    model = DetectorModule.load_from_checkpoint(fpr["best_model_path"], map_location="cpu")
    assert model.threshold_fit["rule"] == "target_fpr"
    data = ImageFolderDataModule(root=str(image_folder), image_size=32, num_workers=0)
    data.setup("fit")
    probs = _probs_on(model, data.val_set.samples, 32)
    fake = torch.tensor([y == 0 for _, y in data.val_set.samples])
    assert not bool((probs[fake] >= model.threshold).any())  # no FAKE passes as REAL on val

    with pytest.raises(ConfigError, match="model.threshold_rule"):
        DetectorModule(backbone="test_resnet", threshold_rule="best")


def test_predictions_csv_recomputes_the_report(trained_run, tmp_path):
    report = evaluate(
        compose_config(
            "eval",
            tmp_path,
            [f"ckpt={trained_run['ckpt']}", *EVAL, f"data.root={trained_run['data']}"],
        )
    )
    with (tmp_path / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["n"] == 16
    assert set(rows[0]) == {
        "path",
        "label",
        "probability",
        "prediction",
        "label_index",
        "prediction_index",
        "ood_score",
        "in_domain",
        "n_tiles",
    }
    assert {r["n_tiles"] for r in rows} == {"1"}  # a resize model scores each image once
    assert report["ood"]["n_flagged"] == sum(r["in_domain"] == "False" for r in rows)
    labels = np.array([int(r["label_index"]) for r in rows])
    probs = np.array([float(r["probability"]) for r in rows])
    preds = np.array([int(r["prediction_index"]) for r in rows])
    for r in rows:
        assert Path(r["path"]).parent.name == r["label"] == ["FAKE", "REAL"][int(r["label_index"])]
        assert r["prediction"] == ["FAKE", "REAL"][int(r["prediction_index"])]
    assert (preds == (probs >= report["threshold"])).all()
    assert (preds == labels).mean() == pytest.approx(report["accuracy"], abs=1e-9)
    # AUROC as the probability that a REAL image scores above a FAKE one (ties count half).
    real, fake = probs[labels == 1], probs[labels == 0]
    pairs = (real[:, None] > fake[None, :]) + 0.5 * (real[:, None] == fake[None, :])
    assert pairs.mean() == pytest.approx(report["auroc"], abs=1e-6)
    tn_fp, fn_tp = report["confusion_matrix"]
    assert fn_tp[1] == int(((preds == 1) & (labels == 1)).sum())
    # Training wrote the same file for its test report.
    with (trained_run["dir"] / "predictions.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 16


@pytest.fixture(scope="module")
def second_set(tmp_path_factory) -> Path:
    """Another 'generator': the same kind of images from a different seed."""
    return make_image_folder(tmp_path_factory.mktemp("other"), n_train=1, n_test=6, seed=7) / "test"


def test_cli_eval_two_test_sets_with_robustness(trained_run, second_set, tmp_path):
    first = trained_run["data"] / "test"
    ev = run_script(
        "eval.py",
        f"ckpt={trained_run['ckpt']}",
        "data=imagefolder",
        "data.num_workers=0",
        f"data.test_dirs={{cifake: {first}, other: {second_set}}}",
        "robustness=default",
        cwd=tmp_path,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    out = ev.stdout
    assert "== cifake:" in out and "== other:" in out and "Per test set" in out
    assert "| set | n | accuracy |" in out and "| all | 28 |" in out
    assert "Robustness" in out and "| cifake | jpeg | 30 |" in out
    run = next((tmp_path / "logs" / "eval" / "runs").iterdir())

    with (run / "sets.csv").open() as f:
        table = {r["set"]: r for r in csv.DictReader(f)}
    assert list(table) == ["cifake", "other", "all"]
    assert [int(table[s]["n"]) for s in table] == [16, 12, 28]
    for name, n in (("cifake", 16), ("other", 12)):
        per_set = json.loads((run / name / "metrics.json").read_text())
        assert per_set["n"] == n
        assert float(table[name]["accuracy"]) == pytest.approx(per_set["accuracy"])
        for fig in ("confusion_matrix", "roc_curve", "pr_curve", "reliability", "confident"):
            assert (run / name / f"{fig}.png").stat().st_size > 1000, fig
    combined = json.loads((run / "metrics.json").read_text())
    assert combined["n"] == 16 and len(combined["table"]) == 3  # primary set on top
    assert json.loads((run / "sets.json").read_text())["rows"][2]["set"] == "all"
    with (run / "predictions.csv").open() as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == 28 and {p["set"] for p in preds} == {"cifake", "other"}

    with (run / "robustness.csv").open() as f:
        rob = list(csv.DictReader(f))
    # Per set: clean, 4 JPEG, 3 blur, 2 resize, 2 noise.
    assert len(rob) == 2 * 12
    kinds = [(r["degradation"], r["strength"]) for r in rob if r["set"] == "other"]
    assert kinds[:5] == [
        ("none", "0"),
        ("jpeg", "95"),
        ("jpeg", "75"),
        ("jpeg", "50"),
        ("jpeg", "30"),
    ]
    clean = next(r for r in rob if r["set"] == "cifake" and r["degradation"] == "none")
    assert float(clean["accuracy"]) == pytest.approx(float(table["cifake"]["accuracy"]))
    degraded = [r for r in rob if r["set"] == "cifake" and r["degradation"] != "none"]
    assert any((r["accuracy"], r["auroc"]) != (clean["accuracy"], clean["auroc"]) for r in degraded)
    assert (run / "robustness.png").stat().st_size > 5000


def test_eval_input_errors_name_the_setting(trained_run, tmp_path):
    ckpt = f"ckpt={trained_run['ckpt']}"
    test = trained_run["data"] / "test"
    cases = [
        ([f"data.test_dirs={{a: {tmp_path / 'missing'}}}"], DataError, "missing"),
        ([f"data.test_dirs={{all: {test}}}"], ConfigError, "data.test_dirs"),
        ([f"data.test_dirs=[{test}]", f"data.test_dir={test}"], ConfigError, "not both"),
        (
            [f"data.root={trained_run['data']}", "robustness=default", "robustness.jpeg=[0]"],
            ConfigError,
            "robustness.jpeg",
        ),
        (
            [f"data.root={trained_run['data']}", "+robustness.sharpen=[1]"],
            ConfigError,
            "robustness.sharpen",
        ),
        (
            [f"data.root={trained_run['data']}", "report.calibration_bins=0"],
            ConfigError,
            "report.calibration_bins",
        ),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message.replace(".", r"\.")):
            evaluate(compose_config("eval", tmp_path, [ckpt, *EVAL, *overrides]))


def test_a_list_of_test_dirs_is_named_after_the_folders(trained_run, second_set, tmp_path):
    report = evaluate(
        compose_config(
            "eval",
            tmp_path,
            [
                f"ckpt={trained_run['ckpt']}",
                *EVAL,
                f"data.test_dirs=[{trained_run['data'] / 'test'},{second_set}]",
                "report.bootstrap_resamples=100",
                "report.confident_images=2",
            ],
        )
    )
    names = [r["set"] for r in report["table"]]
    # Folders called "test" are named after their parent.
    assert names == [trained_run["data"].name, second_set.parent.name, "all"]
    assert report["bootstrap"]["resamples"] == 100


def _image(seed: int = 0, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.kron(rng.uniform(30, 220, (6, 6, 3)), np.ones((size // 6, size // 6, 1)))
    checker = 20.0 * ((np.add.outer(np.arange(size), np.arange(size)) % 2) * 2 - 1)[..., None]
    return Image.fromarray(np.clip(base + checker, 0, 255).astype(np.uint8))


def _checker_energy(img: Image.Image) -> float:
    """Strength of the 2-pixel checkerboard (the highest spatial frequency)."""
    a = np.asarray(img, dtype=np.float64).mean(axis=2)
    sign = (np.add.outer(np.arange(a.shape[0]), np.arange(a.shape[1])) % 2) * 2 - 1
    return abs(float((a * sign).mean()))


def test_degradations_do_what_their_names_say():
    img = _image()
    energy = _checker_energy(img)
    assert energy > 15
    # Blur and down-up-scaling remove the checkerboard, more with more strength.
    blurred = [_checker_energy(blur(img, s)) for s in (1, 2, 3)]
    assert max(blurred) < energy / 10
    assert _checker_energy(resize(img, 0.5)) < energy / 10
    assert resize(img, 0.25).size == img.size
    # Lower JPEG quality, larger error.
    err = [
        np.abs(np.asarray(jpeg(img, q), float) - np.asarray(img, float)).mean() for q in (95, 30)
    ]
    assert 0 < err[0] < err[1]
    # Noise: the requested sigma (0.05 of 255), and the same noise for the same image.
    diff = np.asarray(noise(img, 0.05), float) - np.asarray(img, float)
    assert diff.std() == pytest.approx(0.05 * 255, rel=0.15)
    assert np.array_equal(np.asarray(noise(img, 0.05)), np.asarray(Degradation("noise", 0.05)(img)))
    with pytest.raises(ConfigError, match="robustness.jpeg"):
        Degradation("jpeg", 101)


def test_training_augmentation_is_for_training_images_only(image_folder):
    img = _image(1)
    same = RandomBlurJPEG(0.0, 0.0)(img)
    assert np.array_equal(np.asarray(same), np.asarray(img))
    torch.manual_seed(0)
    changed = RandomBlurJPEG(1.0, 1.0)(img)
    assert not np.array_equal(np.asarray(changed), np.asarray(img))
    with pytest.raises(ConfigError, match="data.jpeg_prob"):
        RandomBlurJPEG(0.0, 1.5)
    # a boolean is not read as 1, a string does not fail later inside a worker
    with pytest.raises(ConfigError, match=r"data.blur_prob=True must be a probability in \[0, 1\]"):
        RandomBlurJPEG(True, 0.0)
    with pytest.raises(ConfigError, match="data.jpeg_prob='0.3' must be a probability"):
        RandomBlurJPEG(0.0, "0.3")

    data = ImageFolderDataModule(
        root=str(image_folder), image_size=32, num_workers=0, blur_prob=1.0, jpeg_prob=0.5
    )
    data.setup("fit")
    data.setup("test")
    assert isinstance(data.train_set.transform, RandomBlurJPEG)
    assert data.val_set.transform is None and data.test_set.transform is None
    image, _ = data.train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8


def test_augmentation_settings_in_configs(tmp_path):
    cfg = compose_config("train", tmp_path, ["data=imagefolder", "data.root=x"])
    assert cfg.data.blur_prob == 0.0 and cfg.data.jpeg_prob == 0.0
    paper = compose_config("train", tmp_path, ["experiment=paper"])
    assert paper.data.blur_prob == 0.0 and paper.data.jpeg_prob == 0.0
    cfg = compose_config(
        "train", tmp_path, ["data=imagefolder", "data.root=x", "data.blur_prob=0.1"]
    )
    assert cfg.data.blur_prob == 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, route: str, **params):
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{route}{query}", timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_tensorboard_server_serves_scalars_images_and_pr_curves(trained_run):
    port = _free_port()
    tensorboard = Path(sys.executable).parent / "tensorboard"
    server = subprocess.Popen(
        [
            str(tensorboard),
            "--logdir",
            str(trained_run["dir"]),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                scalars = _get(port, "data/plugin/scalars/tags")
                if scalars.get("tensorboard", {}).get("test/balanced_accuracy"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not serve the run in 90 s"
            time.sleep(1)
        report = json.loads((trained_run["dir"] / "metrics.json").read_text())
        tags = scalars["tensorboard"]
        for tag in (
            "test/acc",
            "test/auroc",
            "test/average_precision",
            "test/eer",
            "test/ece",
            "test/tpr_at_1pct_fpr",
            "test/accuracy_REAL",
            "val/threshold",
        ):
            assert tag in tags, tag
        points = _get(
            port, "data/plugin/scalars/scalars", run="tensorboard", tag="test/average_precision"
        )
        assert points[-1][2] == pytest.approx(report["average_precision"], abs=1e-6)

        images = _get(port, "data/plugin/images/tags")["tensorboard"]
        for tag in ("confusion_matrix", "roc_curve", "pr_curve", "reliability", "confident"):
            assert f"test/{tag}" in images, tag
        listed = _get(port, "data/plugin/images/images", run="tensorboard", tag="test/reliability")
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/data/plugin/images/individualImage?{listed[0]['query']}",
            timeout=10,
        ) as r:
            assert r.read(8) == b"\x89PNG\r\n\x1a\n"

        assert "test/precision_recall" in _get(port, "data/plugin/pr_curves/tags")["tensorboard"]
        curve = _get(
            port, "data/plugin/pr_curves/pr_curves", run="tensorboard", tag="test/precision_recall"
        )
        entry = curve["tensorboard"][0]
        assert len(entry["precision"]) == len(entry["recall"]) > 10
        # At the lowest threshold every image is called positive: recall 1, precision = prevalence.
        assert entry["recall"][0] == pytest.approx(1.0)
        assert entry["precision"][0] == pytest.approx(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
