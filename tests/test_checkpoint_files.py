"""Checkpoints that fit their use: lean best checkpoints, complete last.ckpt, resume and
weights-only starts, and export.py format=safetensors loaded by the Detector API."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from detector import Detector
from detector.checkpoint import LEAN_MARK, load_checkpoint, load_initial_weights
from detector.cli import run
from detector.errors import CheckpointError
from detector.module import DetectorModule
from detector.tasks.train import train
from tests.conftest import TINY, compose_config, run_script

TRAINING_STATE = {"optimizer_states", "loops", "callbacks", "lr_schedulers"}


def _train_cfg(out, root, *overrides):
    return compose_config(
        "train", out, [*TINY, "data=imagefolder", f"data.root={root}", *overrides]
    )


def test_best_checkpoint_is_lean_and_last_is_complete(trained_run):
    best = torch.load(trained_run["ckpt"], weights_only=True)
    last = torch.load(trained_run["dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(last) >= TRAINING_STATE and LEAN_MARK not in last
    assert not TRAINING_STATE & set(best)
    assert set(best[LEAN_MARK]) >= TRAINING_STATE
    assert {"state_dict", "hyper_parameters", "threshold_fit", "ood"} <= set(best)
    assert best["hyper_parameters"]["class_names"] == ["FAKE", "REAL"]
    assert best["ood"] is not None and best["threshold_fit"]["split"] == "val"
    size_best = trained_run["ckpt"].stat().st_size
    assert size_best < 0.6 * (trained_run["dir"] / "checkpoints" / "last.ckpt").stat().st_size
    detector = Detector.from_checkpoint(trained_run["ckpt"])
    assert detector.threshold == pytest.approx(best["hyper_parameters"]["threshold"])
    assert detector.ood is not None


def test_ema_best_checkpoint_keeps_the_average_not_the_raw_weights(image_folder, tmp_path):
    ema = "callbacks.ema={_target_: detector.callbacks.EMA, decay: 0.5}"
    metrics = train(_train_cfg(tmp_path, image_folder, ema, "test=false", "ood=null"))
    best = torch.load(metrics["best_model_path"], weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert {"current_model_state", "averaging_state"} <= set(last)  # resume needs the raw ones
    assert "current_model_state" not in best and "averaging_state" not in best
    key = "net.head.0.weight"
    assert torch.equal(best["state_dict"][key], last["state_dict"][key])  # the average
    assert not torch.equal(best["state_dict"][key], last["current_model_state"][key])


def test_resume_from_a_best_checkpoint_says_what_to_do(trained_run, image_folder, tmp_path, capsys):
    best = trained_run["ckpt"]
    with pytest.raises(SystemExit) as stop:
        run(train, _train_cfg(tmp_path, image_folder, f"ckpt_path={best}"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: ckpt_path={best}: a best checkpoint, written without")
    assert f"resume from {best.parent / 'last.ckpt'}, or" in err and f"init_ckpt={best}" in err
    with pytest.raises(SystemExit):
        run(train, _train_cfg(tmp_path, image_folder, "ckpt_path=last", f"init_ckpt={best}"))
    assert "ckpt_path resumes a run and init_ckpt starts a new one" in capsys.readouterr().err


def test_init_ckpt_starts_a_new_run_from_the_weights(trained_run, image_folder, tmp_path):
    model = DetectorModule(backbone="test_resnet", image_size=32)
    load_initial_weights(model, trained_run["ckpt"])
    saved = torch.load(trained_run["ckpt"], weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="init_ckpt=.*of another shape"):
        load_initial_weights(
            DetectorModule(backbone="test_resnet", hidden_dim=64), trained_run["ckpt"]
        )
    # lr ~0: the new run's weights stay those it started from (BatchNorm statistics aside)
    start = f"init_ckpt={trained_run['ckpt']}"
    metrics = train(
        _train_cfg(tmp_path, image_folder, start, "model.optimizer.lr=1e-12", "test=false")
    )
    new = torch.load(metrics["best_model_path"], weights_only=True)
    assert "optimizer_states" not in new and new["epoch"] == 0  # a new run, not a resumed one
    conv = "net.backbone.conv1.0.weight"
    torch.testing.assert_close(new["state_dict"][conv], saved[conv], rtol=0, atol=1e-8)


def test_safetensors_export_scores_like_the_checkpoint(trained_run, tmp_path):
    result = run_script(
        "export.py", f"ckpt={trained_run['ckpt']}", "format=safetensors", "output=out", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    path = tmp_path / "out" / "model.safetensors"
    info = json.loads((tmp_path / "out" / "model.safetensors.json").read_text())
    assert info["format"] == "safetensors" and info["check"]["max_abs_diff_probability"] <= 1e-6
    original = Detector.from_checkpoint(trained_run["ckpt"])
    exported = Detector.from_checkpoint(path)
    assert exported.model_id == original.model_id == info["model_id"]
    assert exported.threshold == original.threshold and exported.class_names == ["FAKE", "REAL"]
    assert exported.preprocessing == original.preprocessing
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    p0, s0 = original.score_with_ood(images)
    p1, s1 = exported.score_with_ood(images)
    assert torch.equal(p0, p1) and torch.allclose(s0, s1, rtol=0, atol=1e-9)
    assert path.stat().st_size < trained_run["ckpt"].stat().st_size
    # predict.py takes the file as its ckpt
    images_dir = trained_run["data"] / "test" / "REAL"
    out = run_script(
        "predict.py", f"ckpt={path}", f"input={images_dir}", "output=p.csv", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert f"with model {original.model_id}" in out.stdout


def test_foreign_safetensors_files_get_one_line(tmp_path):
    bare = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(CheckpointError, match="without the detector's metadata"):
        load_checkpoint(bare)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=f"ckpt={junk}: not a readable .safetensors file"):
        load_checkpoint(junk)
