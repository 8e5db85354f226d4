"""predict.py and the Detector API: same numbers as eval, every input form, errors as rows."""

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector import Detector
from detector.checkpoint import load_checkpoint
from detector.data.decode import load_image
from detector.errors import CheckpointError, ConfigError, DataError
from detector.tasks.evaluate import evaluate
from detector.tasks.inputs import resolve_inputs
from detector.tasks.predict import predict
from tests.conftest import compose_config, run_script


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@pytest.fixture(scope="module")
def eval_predictions(trained_run, tmp_path_factory) -> tuple[list[str], torch.Tensor, list[int]]:
    """eval.py's per-image predictions.csv for the test folder: paths, P(REAL), class index."""
    out = tmp_path_factory.mktemp("eval")
    cfg = compose_config(
        "eval",
        out,
        [
            f"ckpt={trained_run['ckpt']}",
            "data=imagefolder",
            f"data.root={trained_run['data']}",
            "data.num_workers=0",
            "trainer.accelerator=cpu",
        ],
    )
    evaluate(cfg)
    rows = _rows(out / "predictions.csv")
    paths = [str(Path(r["path"]).resolve()) for r in rows]
    probs = torch.tensor([float(r["probability"]) for r in rows])
    return paths, probs, [int(r["prediction_index"]) for r in rows]


def test_predict_matches_eval_per_image(trained_run, eval_predictions, tmp_path):
    eval_paths, eval_probs, eval_classes = eval_predictions
    threshold = load_checkpoint(trained_run["ckpt"]).threshold
    cfg = compose_config(
        "predict",
        tmp_path,
        [
            f"ckpt={trained_run['ckpt']}",
            f"input={trained_run['data'] / 'test'}",
            "batch_size=5",  # eval used 8: batching must not change a number
            "num_workers=0",
            "device=cpu",
            "progress=false",
        ],
    )
    result = predict(cfg)
    rows = _rows(tmp_path / "predictions.csv")
    assert result["scored"] == len(rows) == len(eval_paths) == 16
    assert [str(Path(r["path"]).resolve()) for r in rows] == eval_paths
    probs = torch.tensor([float(r["prob_REAL"]) for r in rows])
    assert (probs - eval_probs).abs().max().item() <= 1e-5
    fake = torch.tensor([float(r["prob_FAKE"]) for r in rows])
    assert torch.allclose(fake + probs, torch.ones(16), atol=1e-6)
    assert [r["label"] for r in rows] == [["FAKE", "REAL"][c] for c in eval_classes]
    assert {r["threshold"] for r in rows} == {str(threshold)}
    assert {r["model_id"] for r in rows} == {_sha(trained_run["ckpt"])}
    assert {r["error"] for r in rows} == {""}


def test_api_gives_the_same_probability_for_every_input_form(trained_run, eval_predictions):
    eval_paths, eval_probs, _ = eval_predictions
    d = Detector.from_checkpoint(trained_run["ckpt"], device="cpu")
    path = eval_paths[3]
    with Image.open(path) as img:
        pil = img.copy()
    tensor = load_image(path, 32)
    array = np.asarray(pil)
    big = torch.from_numpy(np.array(pil.resize((64, 64), Image.NEAREST))).permute(2, 0, 1)
    preds = d.predict([path, Path(path), pil, tensor, array])
    assert len(preds) == 5
    for p in preds:
        assert abs(p.probability - float(eval_probs[3])) <= 1e-5
        assert p.label == preds[0].label and p.label in ("FAKE", "REAL")
        assert abs(sum(p.probabilities.values()) - 1.0) < 1e-6
    # A tensor of another size is resized exactly as the same picture in a file would be.
    as_file = pil.resize((64, 64), Image.NEAREST)
    assert abs(d.predict(big)[0].probability - d.predict(as_file)[0].probability) < 1e-6
    proba = d.predict_proba(torch.stack([tensor, tensor]))
    assert proba.shape == (2, 2)
    assert torch.allclose(proba.sum(1), torch.ones(2))
    assert d.model_id == _sha(trained_run["ckpt"])
    with pytest.raises(DataError, match="missing.jpg"):
        d.predict(["missing.jpg"])
    with pytest.raises(TypeError, match="uint8"):
        d.predict(tensor.float())


def test_inputs_from_folder_glob_and_list(tmp_path, monkeypatch):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/1.png", "a/deep/2.JPG", "a/.hidden.png", "a/notes.md", "b.webp"):
        (tmp_path / name).write_bytes(b"x")
    assert resolve_inputs(tmp_path / "a") == [
        str(tmp_path / "a/1.png"),
        str(tmp_path / "a/deep/2.JPG"),
    ]
    assert resolve_inputs(f"{tmp_path}/**/*.png") == [str(tmp_path / "a/1.png")]
    lst = tmp_path / "lists" / "files.txt"
    lst.parent.mkdir()
    lst.write_text(f"# my images\n\n{tmp_path / 'b.webp'}\n../a/1.png\nmissing.jpg\n")
    monkeypatch.chdir(tmp_path / "a")
    # Relative entries: from the current folder first, else from the list's folder.
    assert resolve_inputs(lst) == [str(tmp_path / "b.webp"), "../a/1.png", "missing.jpg"]
    monkeypatch.chdir(tmp_path)
    assert resolve_inputs(lst)[1] == str(lst.parent / "../a/1.png")
    with pytest.raises(ConfigError, match="nothing-here"):
        resolve_inputs(tmp_path / "nothing-here")
    with pytest.raises(ConfigError, match=r"\*\.gif"):
        resolve_inputs(f"{tmp_path}/*.gif")
    with pytest.raises(ConfigError, match="input is not set"):
        resolve_inputs("")


def test_cli_unreadable_files_become_rows_and_exit_codes(trained_run, tmp_path):
    good = sorted((trained_run["data"] / "test" / "REAL").glob("*.jpg"))[:2]
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join([*map(str, good), "broken.jpg", "gone.png"]) + "\n")
    ok = run_script(
        "predict.py",
        f"ckpt={trained_run['ckpt']}",
        f"input={listing}",
        "output=out/preds.jsonl",
        "num_workers=0",
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert "Scored 2 of 4 images" in ok.stdout
    rows = [json.loads(line) for line in (tmp_path / "out/preds.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == [
        good[0].name,
        good[1].name,
        "broken.jpg",
        "gone.png",
    ]
    assert all(0.0 <= r["prob_REAL"] <= 1.0 and r["error"] is None for r in rows[:2])
    assert "cannot identify image file" in rows[2]["error"] and rows[2]["prob_REAL"] is None
    assert "No such file" in rows[3]["error"] and rows[3]["label"] is None

    bad = run_script(
        "predict.py",
        f"ckpt={trained_run['ckpt']}",
        "input=broken.jpg",
        "num_workers=0",
        cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert "error: none of the 1 files from input=broken.jpg could be read" in bad.stderr
    assert "Traceback" not in bad.stderr
    # The run folder still holds the row that says why.
    written = list((tmp_path / "logs" / "predict" / "runs").glob("*/predictions.csv"))
    assert len(written) == 1 and "cannot identify" in written[0].read_text()


def test_bad_settings_name_the_setting(trained_run, tmp_path):
    base = [f"input={trained_run['data'] / 'test'}", "num_workers=0", "progress=false"]
    cfg = compose_config("predict", tmp_path, [*base, f"ckpt={tmp_path / 'nope.ckpt'}"])
    with pytest.raises(CheckpointError, match="nope.ckpt"):
        predict(cfg)
    cfg = compose_config("predict", tmp_path, [*base, f"ckpt={trained_run['ckpt']}", "format=xml"])
    with pytest.raises(ConfigError, match="format=xml"):
        predict(cfg)
    cfg = compose_config(
        "predict", tmp_path, [*base, f"ckpt={trained_run['ckpt']}", "output=p.csv", "format=jsonl"]
    )
    with pytest.raises(ConfigError, match="output=p.csv"):
        predict(cfg)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    cfg = compose_config(
        "predict", tmp_path, [f"ckpt={trained_run['ckpt']}", f"input={tmp_path / 'empty'}"]
    )
    with pytest.raises(DataError, match="empty: no images found"):
        predict(cfg)
    cfg = compose_config("predict", tmp_path, [*base, f"ckpt={trained_run['ckpt']}", "threshold=2"])
    with pytest.raises(ConfigError, match="threshold=2"):
        predict(cfg)
