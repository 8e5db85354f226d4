"""Tests for the embedded demo data set (detector.data.demo).

Fast tests shrink the generator's training schedule (a few steps instead of hundreds): they
check the folder contract (layout, format, stamp, reuse, rebuild, refusal), not image quality.
The slow test builds the real thing and checks colour statistics give the label away poorly.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from PIL import Image

from detector.data import demo, synthesis
from detector.data.demo_module import DemoDataModule
from detector.errors import ConfigError
from tests.conftest import compose_config, run_script

SMALL = {"train_per_class": 12, "test_per_class": 4}


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny generator schedule so a build takes about a second."""
    monkeypatch.setattr(demo, "TRAIN_STEPS", 8)
    monkeypatch.setattr(demo, "GEN_TRAIN_CROPS", 64)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_layout_counts_and_format(tmp_path: Path, quick: None) -> None:
    out = demo.make_demo(tmp_path / "demo", seed=3, progress=False, **SMALL)
    assert out == (tmp_path / "demo").absolute()
    assert sorted(p.name for p in out.iterdir()) == sorted([demo.STAMP_NAME, "train", "test"])
    tables = set()
    for split, n in (("train", 12), ("test", 4)):
        assert sorted(p.name for p in (out / split).iterdir()) == ["FAKE", "REAL"]
        for cls in ("FAKE", "REAL"):
            files = sorted((out / split / cls).iterdir())
            assert len(files) == n
            assert all(f.suffix == ".jpg" for f in files)
            for f in files:
                with Image.open(f) as img:
                    assert img.format == "JPEG"
                    assert img.mode == "RGB"
                    assert img.size == (32, 32)
                    tables.add(json.dumps({k: list(v) for k, v in img.quantization.items()}))
    # Same quality and subsampling for both classes: one set of quantisation tables.
    assert len(tables) == 1
    stamp = json.loads((out / demo.STAMP_NAME).read_text())
    assert stamp["version"] == demo.GENERATOR_VERSION
    assert stamp["seed"] == 3
    assert stamp["counts"] == {"train": 12, "test": 4}


def test_same_seed_same_bytes(tmp_path: Path, quick: None) -> None:
    a = _files(demo.make_demo(tmp_path / "a", seed=7, progress=False, **SMALL))
    b = _files(demo.make_demo(tmp_path / "b", seed=7, progress=False, **SMALL))
    c = _files(demo.make_demo(tmp_path / "c", seed=8, progress=False, **SMALL))
    assert a == b
    assert a.keys() == c.keys()
    assert a != c


def test_build_leaves_torch_state_alone(tmp_path: Path, quick: None) -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    demo.make_demo(tmp_path / "demo", progress=False, **SMALL)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected)


def test_ensure_reuses_up_to_date_folder(
    tmp_path: Path, quick: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = demo.ensure_demo(tmp_path / "demo", progress=False, **SMALL)
    before = _mtimes(out)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("an up-to-date demo folder must not be rebuilt")

    monkeypatch.setattr(demo, "_build", no_build)
    assert demo.ensure_demo(tmp_path / "demo", progress=False, **SMALL) == out
    assert _mtimes(out) == before


def test_ensure_rebuilds_on_version_seed_or_size_change(
    tmp_path: Path, quick: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = demo.ensure_demo(tmp_path / "demo", seed=0, progress=False, **SMALL)

    monkeypatch.setattr(demo, "GENERATOR_VERSION", demo.GENERATOR_VERSION + 1)
    demo.ensure_demo(out, seed=0, progress=False, **SMALL)
    assert demo.read_stamp(out)["version"] == demo.GENERATOR_VERSION

    demo.ensure_demo(out, seed=1, progress=False, **SMALL)
    assert demo.read_stamp(out)["seed"] == 1

    demo.ensure_demo(out, seed=1, progress=False, train_per_class=5, test_per_class=2)
    assert len(list((out / "train" / "REAL").iterdir())) == 5
    # No temporary or old folders left next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_refuses_to_overwrite_non_demo_folder(tmp_path: Path, quick: None) -> None:
    out = tmp_path / "mydata"
    (out / "train" / "REAL").mkdir(parents=True)
    precious = out / "train" / "REAL" / "holiday.jpg"
    precious.write_bytes(b"not a demo image")
    for fn in (demo.make_demo, demo.ensure_demo):
        with pytest.raises(FileExistsError, match="mydata"):
            fn(out, progress=False, **SMALL)
    assert precious.read_bytes() == b"not a demo image"
    # A stamp is not enough when the folder also holds things a demo build never writes.
    built = demo.make_demo(tmp_path / "demo", progress=False, **SMALL)
    (built / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        demo.make_demo(built, seed=1, progress=False, **SMALL)
    assert (built / "notes.txt").read_text() == "mine"


def test_empty_existing_folder_is_filled(tmp_path: Path, quick: None) -> None:
    (tmp_path / "demo").mkdir()
    out = demo.ensure_demo(tmp_path / "demo", progress=False, **SMALL)
    assert demo.read_stamp(out) is not None


def test_interrupted_build_leaves_nothing_usable(
    tmp_path: Path, quick: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    save = demo.save_jpeg

    def flaky_save(arr: np.ndarray, path: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        save(arr, path)

    monkeypatch.setattr(demo, "save_jpeg", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        demo.make_demo(tmp_path / "demo", progress=False, **SMALL)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(demo, "save_jpeg", save)
    out = demo.ensure_demo(tmp_path / "demo", progress=False, **SMALL)
    assert len(list((out / "test" / "FAKE").iterdir())) == 4


def test_stale_leftovers_of_killed_builds_are_removed(tmp_path: Path, quick: None) -> None:
    old_tmp, live_tmp, other = (tmp_path / n for n in (".demo.tmp-a1", ".demo.tmp-b2", ".x.tmp-c3"))
    for folder in (old_tmp, live_tmp, other):
        (folder / "train").mkdir(parents=True)
    for folder in (old_tmp, other):
        os.utime(folder, (time.time() - 2 * demo.STALE_SECONDS,) * 2)
    demo.make_demo(tmp_path / "demo", progress=False, **SMALL)
    assert not old_tmp.exists()
    assert live_tmp.exists() and other.exists()


def test_cli(tmp_path: Path, quick: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = [str(out), "--seed", "2", "--train-per-class", "3", "--test-per-class", "2", "--quiet"]
    demo.main(argv)
    printed = capsys.readouterr().out
    assert str(out) in printed and "seed 2" in printed
    assert demo.read_stamp(out)["counts"] == {"train": 3, "test": 2}


def test_sources_are_documented_and_load_offline() -> None:
    images = synthesis.load_sources()
    assert len(images) == len(synthesis.SOURCES)
    for (name, weight, licence), img in zip(synthesis.SOURCES, images, strict=True):
        assert weight > 0 and licence, name
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert min(img.shape[:2]) >= 256, name


@pytest.mark.slow
def test_full_demo_colour_statistics_are_uninformative(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    out = demo.make_demo(tmp_path / "demo", seed=0, progress=False)

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        feats, labels = [], []
        for label, cls in enumerate(demo.CLASSES):
            for f in sorted((out / split / cls).glob("*.jpg")):
                x = np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) / 255.0
                feats.append(np.concatenate([x.mean((0, 1)), x.std((0, 1))]))
                labels.append(label)
        return np.stack(feats), np.array(labels)

    x_train, y_train = load("train")
    x_test, y_test = load("test")
    assert len(y_train) == 2 * demo.DEFAULT_TRAIN_PER_CLASS
    assert len(y_test) == 2 * demo.DEFAULT_TEST_PER_CLASS
    clf = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    auc = roc_auc_score(y_test, clf.predict_proba(x_test)[:, 1])
    assert auc <= 0.75, f"colour statistics separate REAL/FAKE too well (AUC {auc:.3f})"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~5 min alone here; far longer on a loaded machine
def test_default_run_learns_the_demo_set(tmp_path: Path) -> None:
    """``python train.py`` with no arguments, as ``make train`` runs it: demo set made on first
    use, trained, best checkpoint tested; test AUC >= 0.90. Then eval.py reproduces it."""
    train = run_script("train.py", cwd=tmp_path, timeout=1200)
    assert train.returncode == 0, train.stderr[-3000:]
    runs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1
    report = json.loads((runs[0] / "metrics.json").read_text())
    assert report["auroc"] >= 0.90, report["auroc"]
    best = re.search(r"Best checkpoint: (\S+)", train.stdout).group(1)
    evaluated = run_script("eval.py", f"ckpt={best}", cwd=tmp_path, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads(
        next((tmp_path / "logs" / "eval" / "runs").iterdir()).joinpath("metrics.json").read_text()
    )
    assert again["auroc"] == pytest.approx(report["auroc"], abs=1e-6)
    assert again["accuracy"] == pytest.approx(report["accuracy"], abs=1e-6)


def test_second_generator_is_a_different_decoder(tmp_path: Path, quick: None) -> None:
    """data=demo_b: the same REAL crops for a seed, FAKE from nearest upsampling + conv."""
    nearest = synthesis.AutoEncoder(decoder="nearest")
    kinds = {type(m).__name__ for m in nearest.decoder}
    assert "Upsample" in kinds and "ConvTranspose2d" not in kinds
    assert nearest(torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    a = _files(demo.make_demo(tmp_path / "a", seed=3, progress=False, **SMALL))
    b = _files(demo.make_demo(tmp_path / "b", seed=3, progress=False, decoder="nearest", **SMALL))
    again = _files(
        demo.make_demo(tmp_path / "c", seed=3, progress=False, decoder="nearest", **SMALL)
    )
    assert b == again  # deterministic
    real = [k for k in a if "/REAL/" in k]
    fake = [k for k in a if "/FAKE/" in k]
    assert all(a[k] == b[k] for k in real)
    assert all(a[k] != b[k] for k in fake)
    assert demo.read_stamp(tmp_path / "b")["decoder"] == "nearest"
    with pytest.raises(ValueError, match="decoder='conv' must be one of transposed, nearest"):
        demo.make_demo(tmp_path / "d", progress=False, decoder="conv", **SMALL)


def test_sets_stamped_before_the_second_decoder_are_kept(tmp_path: Path, quick: None) -> None:
    out = demo.ensure_demo(tmp_path / "demo", seed=0, progress=False, **SMALL)
    stamp = json.loads((out / demo.STAMP_NAME).read_text())
    del stamp["decoder"]
    (out / demo.STAMP_NAME).write_text(json.dumps(stamp))
    before = _mtimes(out)
    demo.ensure_demo(out, seed=0, progress=False, **SMALL)
    assert _mtimes(out) == before  # read as the transposed decoder: not rebuilt
    demo.ensure_demo(out, seed=0, progress=False, decoder="nearest", **SMALL)
    assert demo.read_stamp(out)["decoder"] == "nearest"


def test_demo_b_config_selects_the_nearest_decoder(tmp_path: Path) -> None:
    cfg = compose_config("train", tmp_path, ["data=demo_b"])
    assert cfg.data.demo_generator == "nearest" and cfg.data.root.endswith("/data/demo_b")
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.demo_sizes["decoder"] == "nearest"
    with pytest.raises(ConfigError, match="data.demo_generator='x' must be one of"):
        DemoDataModule(root=str(tmp_path), demo_generator="x")
