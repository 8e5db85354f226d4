"""A wrong folder layout or setting stops the run at once with one line naming the culprit.

Each case goes through ``detector.cli.run`` (what train.py calls): exit code 2, ``error: ...``
on stderr, no traceback, and no work done (no scan cache, no checkpoint). One case also runs
the real command line.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest

from detector.cli import run
from detector.config import check_train_settings
from detector.tasks.evaluate import evaluate
from detector.tasks.train import train
from tests.conftest import TINY, compose_config, run_script


def _fails(cfg, capsys, task=train) -> str:
    with pytest.raises(SystemExit) as stop:
        run(task, cfg)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def _train_cfg(out: Path, root: Path, *overrides: str):
    return compose_config(
        "train", out, [*TINY, "data=imagefolder", f"data.root={root}", *overrides]
    )


@pytest.fixture
def data(image_folder, tmp_path) -> Path:
    root = tmp_path / "data"
    # Without scan caches that other tests may have left in the shared folder, so that a cache
    # here proves this test's run started scanning.
    shutil.copytree(image_folder, root, ignore=shutil.ignore_patterns(".detector-scan.json"))
    return root


def _no_work_done(out: Path, root: Path) -> None:
    assert not list(root.rglob(".detector-scan.json")), "the scan started"
    assert not list(out.rglob("*.ckpt")), "training started"


LAYOUTS = {
    # name: (change to the data folder, expected message as a regex; {root} is filled in)
    "missing train": (lambda r: shutil.rmtree(r / "train"), r"no train folder {root}/train does"),
    "missing class": (
        lambda r: shutil.rmtree(r / "train" / "FAKE"),
        r"{root}/train must hold exactly two class folders .* found 1: \['REAL'\] "
        r"\(a class folder is missing\)",
    ),
    "third class": (
        lambda r: (r / "train" / "OTHER").mkdir(),
        r"{root}/train must hold exactly two class folders .* found 3: "
        r"\['FAKE', 'OTHER', 'REAL'\] \(move the extra folders out\)",
    ),
    "case twins": (
        lambda r: shutil.copytree(r / "train" / "REAL", r / "train" / "real"),
        r"found 3: \['FAKE', 'REAL', 'real'\] \(REAL and real differ only in case",
    ),
    "case variants": (
        lambda r: [(r / "test" / c).rename(r / "test" / c.lower()) for c in ("FAKE", "REAL")],
        r"class folders differ only in case: test folder {root}/test has \['fake', 'real'\] "
        r"but train folder {root}/train has \['FAKE', 'REAL'\]",
    ),
    "other classes": (
        lambda r: (r / "test" / "REAL").rename(r / "test" / "PHOTO"),
        r"test folder {root}/test has classes \['FAKE', 'PHOTO'\] but train folder "
        r"{root}/train has \['FAKE', 'REAL'\]",
    ),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_bad_layout_is_one_clear_error_before_any_work(case, data, tmp_path, capsys):
    change, expected = LAYOUTS[case]
    change(data)
    out = tmp_path / "run"
    err = _fails(_train_cfg(out, data), capsys)
    assert re.search(expected.format(root=re.escape(str(data))), err), err
    _no_work_done(out, data)


def test_empty_class_folder_is_named(data, tmp_path, capsys):
    for f in (data / "train" / "FAKE").iterdir():
        f.unlink()
    out = tmp_path / "run"
    err = _fails(_train_cfg(out, data), capsys)
    assert f"class folder {data}/train/FAKE has no usable images (readable: .jpg" in err
    assert not list(out.rglob("*.ckpt"))


def test_missing_data_root_names_it(tmp_path, capsys):
    out = tmp_path / "run"
    err = _fails(_train_cfg(out, tmp_path / "nowhere"), capsys)
    assert f"data.root={tmp_path / 'nowhere'} does not exist" in err


def test_missing_test_folder_trains_and_says_so_but_eval_refuses(data, tmp_path, caplog, capsys):
    shutil.rmtree(data / "test")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="detector"):
        metrics = run(train, _train_cfg(out, data, "+trainer.limit_train_batches=2"))
    assert f"no test folder {data}/test" in caplog.text
    assert "test/acc" not in metrics and (out / "checkpoints" / "last.ckpt").is_file()
    cfg = compose_config(
        "eval",
        tmp_path / "eval",
        [f"ckpt={out / 'checkpoints' / 'last.ckpt'}", f"data.root={data}"],
    )
    err = _fails(cfg, capsys, task=evaluate)
    assert "nothing to evaluate: set data.root (holding test/)" in err


def test_missing_explicit_test_dir_is_named(data, tmp_path, capsys):
    out = tmp_path / "run"
    err = _fails(_train_cfg(out, data, f"data.test_dir={tmp_path / 'no-test'}"), capsys)
    assert f"data.test_dir={tmp_path / 'no-test'} does not exist" in err
    _no_work_done(out, data)


SETTINGS = {
    "zero lr": ("model.optimizer.lr=0", "model.optimizer.lr=0 must be > 0"),
    "negative lr": ("model.optimizer.lr=-0.001", "model.optimizer.lr=-0.001 must be > 0"),
    "zero image size": ("data.image_size=0", "data.image_size=0 must be a positive integer"),
    "negative image size": ("data.image_size=-32", "data.image_size=-32 must be a positive"),
    "zero batch": ("data.batch_size=0", "data.batch_size=0 must be a positive integer"),
    "negative batch": ("data.batch_size=-8", "data.batch_size=-8 must be a positive integer"),
    "unknown backbone": (
        "model.backbone=resnet5000",
        "model.backbone='resnet5000' is not a timm model (similar: resnet",
    ),
    "zero max_pixels": ("data.max_pixels=0", "data.max_pixels=0 must be a positive integer"),
    "never validated": (
        "trainer.check_val_every_n_epoch=3",  # _train_cfg trains 1 epoch
        "trainer.max_epochs=1 is less than trainer.check_val_every_n_epoch=3",
    ),
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_bad_setting_is_one_clear_error_before_any_work(case, data, tmp_path, capsys):
    override, expected = SETTINGS[case]
    out = tmp_path / "run"
    err = _fails(_train_cfg(out, data, override), capsys)
    assert expected in err, err
    _no_work_done(out, data)


def test_batch_that_devices_do_not_divide(data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _train_cfg(out, data, "data.batch_size=8", "trainer.devices=3", "trainer.strategy=ddp")
    err = _fails(cfg, capsys)
    assert "data.batch_size=8 is the global batch and must be divisible by the 3 devices" in err
    _no_work_done(out, data)


def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
    result = run_script(
        "train.py",
        *TINY,
        "data=imagefolder",
        f"data.root={tmp_path / 'nowhere'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: data.root={tmp_path / 'nowhere'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def test_unvalidated_last_epochs_are_warned_about(data, tmp_path, caplog):
    cfg = _train_cfg(
        tmp_path / "run", data, "trainer.max_epochs=5", "trainer.check_val_every_n_epoch=2"
    )
    with caplog.at_level(logging.WARNING, logger="detector.config"):
        check_train_settings(cfg)
    assert "the last 1 epoch(s) are trained but never validated" in caplog.text
    caplog.clear()
    cfg = _train_cfg(
        tmp_path / "run", data, "trainer.max_epochs=6", "trainer.check_val_every_n_epoch=2"
    )
    with caplog.at_level(logging.WARNING, logger="detector.config"):
        check_train_settings(cfg)
    assert "never validated" not in caplog.text
