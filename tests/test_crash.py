"""Crashes lose nothing: atomic checkpoints, resume with the same result, NaN stops, and
checkpoints that cannot run code or be mistaken for another model's."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detector.checkpoint import AtomicCheckpointIO, load_checkpoint
from detector.cli import run
from detector.errors import CheckpointError
from detector.module import DetectorModule
from detector.tasks.evaluate import evaluate
from detector.tasks.train import train
from tests.conftest import ROOT, TINY, compose_config, make_image_folder


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _train_cfg(out: Path, root: Path, *overrides: str, log_dir: Path | None = None):
    cfg = compose_config("train", out, [*TINY, "data=imagefolder", f"data.root={root}", *overrides])
    if log_dir is not None:
        cfg.paths.log_dir = str(log_dir)
    return cfg


def _fails(task, cfg, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        run(task, cfg)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------------------
# Untrusted and foreign checkpoints.


def _bad_checkpoints(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """kind -> (file, expected message) for every way a ckpt= file can be wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "PWNED"
    evil = folder / "evil.ckpt"
    torch.save({"state_dict": _RunsCode(marker), "hyper_parameters": {}}, evil)
    text = folder / "notes.ckpt"
    text.write_text("these are not weights\n")
    empty = folder / "empty.ckpt"
    empty.write_bytes(b"")
    bare = folder / "state_dict.ckpt"
    torch.save(torch.nn.Linear(3, 1).state_dict(), bare)
    other = folder / "other_model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, other)
    resized = folder / "resized.ckpt"
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["hyper_parameters"]["hidden_dim"] = 64  # the weights are for 128
    torch.save(checkpoint, resized)
    return {
        "code": (evil, "refused to load: unpickling it would call posix.system"),
        "text": (text, "not a checkpoint of this detector (not a PyTorch file, or a damaged"),
        "empty": (empty, "not a checkpoint of this detector (empty file, 0 bytes)"),
        "state dict": (bare, "not a checkpoint of this detector (a bare state dict or another"),
        "other model": (other, "a checkpoint of another model (its hyper-parameters name no"),
        "other shape": (resized, "of another shape (e.g. net.head.0.weight (128, "),
    }


@pytest.fixture(scope="module")
def bad_ckpts(trained_run, tmp_path_factory):
    return _bad_checkpoints(tmp_path_factory.mktemp("ckpts"), trained_run["ckpt"])


def test_a_real_checkpoint_loads_with_weights_only(trained_run):
    checkpoint = torch.load(
        trained_run["dir"] / "checkpoints" / "last.ckpt", weights_only=True
    )  # no extra safe globals needed
    assert {"state_dict", "optimizer_states", "loops", "callbacks"} <= set(checkpoint)
    assert "ResumeRandomState" in checkpoint["callbacks"]
    # the best one is lean (tests/test_checkpoint_files.py), and loads the same way
    assert "state_dict" in torch.load(trained_run["ckpt"], weights_only=True)
    model = load_checkpoint(trained_run["ckpt"])
    assert isinstance(model, DetectorModule) and model.hparams.backbone == "test_resnet"


@pytest.mark.parametrize(
    "kind", ["code", "text", "empty", "state dict", "other model", "other shape"]
)
def test_bad_checkpoints_get_one_clear_error(kind, bad_ckpts):
    path, expected = bad_ckpts[kind]
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(f"ckpt={path}: ") and expected in str(error.value)
    assert not (path.parent / "PWNED").exists()  # the crafted file ran nothing


@pytest.mark.parametrize("task_name", ["eval", "predict", "export"])
@pytest.mark.parametrize("kind", ["code", "text", "other shape"])
def test_eval_predict_and_export_refuse_bad_checkpoints(
    task_name, kind, bad_ckpts, trained_run, tmp_path, capsys
):
    from detector.tasks.export import export
    from detector.tasks.predict import predict

    path, expected = bad_ckpts[kind]
    image = next((trained_run["data"] / "test" / "REAL").iterdir())
    overrides = {
        "eval": [f"data.root={trained_run['data']}"],
        "predict": [f"input={image}", "num_workers=0", "progress=false"],
        "export": ["format=torchscript"],
    }[task_name]
    cfg = compose_config(task_name, tmp_path, [f"ckpt={path}", *overrides])
    task = {"eval": evaluate, "predict": predict, "export": export}[task_name]
    err = _fails(task, cfg, capsys)
    assert expected in err, err
    assert not (path.parent / "PWNED").exists()


# ---------------------------------------------------------------------------------------------
# Atomic saves.


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "w": torch.arange(1000.0)}, target)
    before = target.read_bytes()

    def disk_full(checkpoint, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AtomicCheckpointIO, "_dump", staticmethod(disk_full))
    with pytest.raises(
        CheckpointError,
        match=r"could not save checkpoint .*last\.ckpt \(No space "
        r"left on device\); the previous last\.ckpt is unchanged",
    ):
        io.save_checkpoint({"epoch": 1, "w": torch.zeros(1000)}, target)
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=True)["epoch"] == 0
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temp file left


def test_disk_full_during_training_stops_cleanly_and_keeps_last_ckpt(
    image_folder, tmp_path, monkeypatch, capsys
):
    real_dump = AtomicCheckpointIO._dump

    def full_from_epoch_1(checkpoint, f):
        if checkpoint["epoch"] >= 1:
            f.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_dump(checkpoint, f)

    monkeypatch.setattr(AtomicCheckpointIO, "_dump", staticmethod(full_from_epoch_1))
    out = tmp_path / "run"
    err = _fails(train, _train_cfg(out, image_folder, "trainer.max_epochs=3"), capsys)
    assert "could not save checkpoint" in err and "No space left on device" in err
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert isinstance(load_checkpoint(last), DetectorModule)
    assert not list((out / "checkpoints").glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# Non-finite loss.


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    image_folder, tmp_path, monkeypatch, capsys
):
    real_step = DetectorModule.training_step

    def nan_in_epoch_1(self, batch, batch_idx):
        loss = real_step(self, batch, batch_idx)
        return loss * float("nan") if self.current_epoch == 1 and batch_idx == 1 else loss

    monkeypatch.setattr(DetectorModule, "training_step", nan_in_epoch_1)
    out = tmp_path / "run"
    err = _fails(train, _train_cfg(out, image_folder, "trainer.max_epochs=3"), capsys)
    last = out / "checkpoints" / "last.ckpt"
    steps_per_epoch = 38 // 8  # 48 train images, 10 for validation, full batches of 8
    expected = f"the training loss is nan at epoch 1, step {steps_per_epoch + 1}; no weight"
    assert err.startswith("error: training stopped: ") and expected in err, err
    assert f"The last good checkpoint is {last}" in err
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_weights_that_turn_non_finite_are_never_saved(image_folder, tmp_path, monkeypatch, capsys):
    def poison_after_the_last_step_of_epoch_1(self, outputs, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 3:
            with torch.no_grad():
                self.net.head[0].weight.fill_(float("inf"))

    monkeypatch.setattr(
        DetectorModule, "on_train_batch_end", poison_after_the_last_step_of_epoch_1, raising=False
    )
    out = tmp_path / "run"
    err = _fails(train, _train_cfg(out, image_folder, "trainer.max_epochs=3"), capsys)
    assert "training stopped: weights became NaN/inf at epoch 1 (net.head.0.weight" in err, err
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0


# ---------------------------------------------------------------------------------------------
# Resume.


def _numbers(report: dict) -> dict[str, float]:
    return {k: float(v) for k, v in report.items() if isinstance(v, int | float)}


def test_resume_errors_are_clear(trained_run, bad_ckpts, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    err = _fails(
        train, _train_cfg(out, image_folder, "ckpt_path=last", log_dir=tmp_path / "l"), capsys
    )
    assert f"ckpt_path=last: no earlier run to resume (no {tmp_path / 'l'}/train/runs/*" in err
    for kind in ("code", "other model"):
        path, expected = bad_ckpts[kind]
        err = _fails(train, _train_cfg(out, image_folder, f"ckpt_path={path}"), capsys)
        assert err.startswith(f"error: ckpt_path={path}: ") and expected in err, err
    err = _fails(train, _train_cfg(out, image_folder, f"ckpt_path={tmp_path / 'x.ckpt'}"), capsys)
    assert f"ckpt_path={tmp_path / 'x.ckpt'}: no such file" in err
    assert not (bad_ckpts["code"][0].parent / "PWNED").exists()


@pytest.fixture
def keep_determinism_setting():
    """trainer.deterministic=true switches torch's global flag on: put it back afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_resume_after_a_crash_ends_as_an_uninterrupted_run(
    image_folder, tmp_path, monkeypatch, keep_determinism_setting
):
    """In-process twin of the kill -9 test: a crash in epoch 1, then ``ckpt_path=last``."""
    common = ["trainer.max_epochs=2", "trainer.deterministic=true"]
    whole_dir = tmp_path / "a" / "logs" / "train" / "runs" / "whole"
    whole = train(_train_cfg(whole_dir, image_folder, *common, log_dir=tmp_path / "a" / "logs"))

    real_step = DetectorModule.training_step

    def crash_in_epoch_1(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 2:
            raise RuntimeError("power cut")
        return real_step(self, batch, batch_idx)

    logs = tmp_path / "b" / "logs"
    first_dir = logs / "train" / "runs" / "first"
    monkeypatch.setattr(DetectorModule, "training_step", crash_in_epoch_1)
    with pytest.raises(RuntimeError, match="power cut"):
        train(_train_cfg(first_dir, image_folder, *common, log_dir=logs))
    monkeypatch.setattr(DetectorModule, "training_step", real_step)
    assert torch.load(first_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0

    second_dir = logs / "train" / "runs" / "second"
    resumed = train(_train_cfg(second_dir, image_folder, *common, "ckpt_path=last", log_dir=logs))
    # the resumed run continued in the folder of the run it resumed
    assert Path(resumed["best_model_path"]).parent == first_dir / "checkpoints"
    for key, value in whole.items():
        if isinstance(value, float):
            assert resumed[key] == pytest.approx(value, abs=1e-6), key
    a = torch.load(whole_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(first_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_ends_with_the_same_metrics(tmp_path):
    """The real command line, killed with SIGKILL in the middle of epoch 1 (the second), then
    ``python train.py <same args> ckpt_path=last``. Tolerance: 1e-6 absolute on every metric
    and weight (deterministic mode on CPU reproduces them exactly; the margin is for float
    reduction order only)."""
    data = make_image_folder(tmp_path / "data", n_train=160, n_test=24, size=64)
    args = [
        *TINY,
        "data=imagefolder",
        f"data.root={data}",
        "data.image_size=64",  # epochs of several seconds: the kill lands inside one
        "trainer.max_epochs=2",
        "trainer.deterministic=true",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    env.pop("PROJECT_ROOT", None)

    def start(cwd: Path, *extra: str) -> subprocess.Popen:
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args, *extra],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    whole = start(tmp_path / "whole")
    killed = start(tmp_path / "killed")
    runs = tmp_path / "killed" / "logs" / "train" / "runs"
    deadline = time.monotonic() + 900
    while not list(runs.glob("*/checkpoints/last.ckpt")):
        assert killed.poll() is None, killed.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 15 minutes"
        time.sleep(0.05)
    time.sleep(1.0)  # about a fifth into epoch 1 on an idle machine; later when busy
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    (last,) = runs.glob("*/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["epoch"] == 0, "killed too late: epoch 1 was saved"
    assert not (last.parent.parent / "metrics.json").exists()

    resumed = start(tmp_path / "killed", "ckpt_path=last")
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()[-3000:]
    assert whole.wait(timeout=900) == 0, whole.stderr.read()[-3000:]

    (whole_run,) = (tmp_path / "whole" / "logs" / "train" / "runs").glob("*/metrics.json")
    expected = _numbers(json.loads(whole_run.read_text()))
    got = _numbers(json.loads((last.parent.parent / "metrics.json").read_text()))
    assert expected and got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    a = torch.load(whole_run.parent / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    diff = max(
        (a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"]
    )
    assert diff <= 1e-6
