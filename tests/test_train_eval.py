"""Train -> checkpoint -> eval, through the Python tasks and through the real command line."""

import json
import re
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detector.module import DetectorModule
from detector.tasks.evaluate import evaluate
from tests.conftest import ROOT, TINY, compose_config, run_script


def _events(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_training_writes_checkpoints_figures_and_report(trained_run):
    run = trained_run["dir"]
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and len(ckpts) == 2
    assert trained_run["ckpt"].name.startswith("epoch")
    for name in ("history.png", "metrics.json", "confusion_matrix.png", "roc_curve.png"):
        assert (run / name).stat().st_size > 500, name
    report = json.loads((run / "metrics.json").read_text())
    assert report["positive_class"] == "REAL"
    assert report["n"] == 16
    assert sum(map(sum, report["confusion_matrix"])) == 16
    # The shared fixture's data are learnable: two epochs of a tiny CNN get most of it right.
    assert trained_run["metrics"]["test/auroc"] > 0.8


def test_checkpoint_holds_everything_needed_to_rebuild(trained_run):
    model = DetectorModule.load_from_checkpoint(trained_run["ckpt"], map_location="cpu")
    assert model.hparams.backbone == "test_resnet"
    assert model.hparams.image_size == 32
    assert list(model.hparams.class_names) == ["FAKE", "REAL"]
    last = torch.load(trained_run["dir"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 3  # four epochs: last.ckpt is refreshed every epoch


def test_tensorboard_holds_the_expected_tags(trained_run):
    acc = _events(trained_run["dir"] / "tensorboard")
    scalars = set(acc.Tags()["scalars"])
    for stage in ("train", "val"):
        for metric in ("loss", "acc", "precision", "recall", "f1", "auroc"):
            assert f"{stage}/{metric}" in scalars
    assert {"test/acc", "test/auroc", "test/loss"} <= scalars
    assert len(acc.Scalars("val/auroc")) == 4  # one point per epoch
    images = set(acc.Tags()["images"])
    assert {"history", "test/confusion_matrix", "test/roc_curve"} <= images


def test_eval_reproduces_the_test_metrics_of_training(trained_run, tmp_path):
    cfg = compose_config(
        "eval",
        tmp_path,
        [
            f"ckpt={trained_run['ckpt']}",
            "data=imagefolder",
            f"data.root={trained_run['data']}",
            "data.num_workers=0",
            "trainer.accelerator=cpu",
        ],
    )
    report = evaluate(cfg)
    trained = trained_run["metrics"]
    for key, name in (
        ("accuracy", "acc"),
        ("auroc", "auroc"),
        ("f1", "f1"),
        ("loss", "loss"),
        ("precision", "precision"),
        ("recall", "recall"),
    ):
        assert report[key] == pytest.approx(trained[f"test/{name}"], abs=1e-5), key
    for name in ("metrics.json", "confusion_matrix.png", "roc_curve.png"):
        assert (tmp_path / name).is_file()
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["accuracy"] == pytest.approx(report["accuracy"])
    # The confusion matrix and per-class rows agree with the headline numbers.
    (tn, fp), (fn, tp) = written["confusion_matrix"]
    assert written["accuracy"] == pytest.approx((tp + tn) / (tn + fp + fn + tp))
    assert written["per_class"]["REAL"]["recall"] == pytest.approx(tp / (tp + fn))
    assert written["per_class"]["FAKE"]["support"] == tn + fp
    assert _events(tmp_path / "tensorboard").Tags()["images"]


def test_cli_train_then_eval_from_another_folder(image_folder, tmp_path):
    train = run_script(
        "train.py", "data=imagefolder", f"data.root={image_folder}", *TINY, cwd=tmp_path
    )
    assert train.returncode == 0, train.stderr[-3000:]
    best = re.search(r"Best checkpoint: (\S+)", train.stdout).group(1)
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1 and best.startswith(str(runs[0]))
    assert "python eval.py ckpt=" in train.stdout and "tensorboard --logdir logs" in train.stdout

    ev = run_script(
        "eval.py",
        f"ckpt={best}",
        "data=imagefolder",
        f"data.root={image_folder}",
        "data.num_workers=0",
        cwd=tmp_path,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "Confusion matrix" in ev.stdout and "Classification report" in ev.stdout
    assert "weighted avg" in ev.stdout and "positive class REAL" in ev.stdout
    eval_runs = list((tmp_path / "logs" / "eval" / "runs").iterdir())
    assert len(eval_runs) == 1
    assert {"metrics.json", "confusion_matrix.png", "roc_curve.png"} <= {
        p.name for p in eval_runs[0].iterdir()
    }


@pytest.mark.parametrize(
    "ckpt,message",
    [("missing.ckpt", "no such file"), ("notackpt.ckpt", "not a checkpoint of this detector")],
)
def test_eval_bad_checkpoint_is_one_line_without_traceback(tmp_path, image_folder, ckpt, message):
    (tmp_path / "notackpt.ckpt").write_text("hello")
    ev = run_script("eval.py", f"ckpt={tmp_path / ckpt}", f"data.root={image_folder}", cwd=tmp_path)
    assert ev.returncode == 2
    assert message in ev.stderr
    assert "Traceback" not in ev.stderr
    assert len(ev.stderr.strip().splitlines()) == 1


def test_runs_started_together_get_their_own_folders(tmp_path):
    # Hydra makes the run folder before the task runs, so two runs that stop at once on a bad
    # data root still show where each would have written.
    cmd = [sys.executable, str(ROOT / "train.py"), "data=imagefolder", "data.root=/nonexistent"]
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and "/nonexistent" in err
    assert len(list((tmp_path / "logs" / "train" / "runs").iterdir())) == 2
