"""export.py: ONNX and TorchScript files that score like PyTorch, with their contract beside."""

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from detector import Detector
from detector.data.decode import load_image
from detector.errors import CheckpointError, ConfigError
from detector.tasks.export import export, run_exported
from tests.conftest import compose_config, run_script


def _eight_images(data) -> torch.Tensor:
    """Four of each class, as eval decodes them: uint8 (8, 3, 32, 32)."""
    paths = sorted((data / "test" / "FAKE").glob("*.jpg"))[:4]
    paths += sorted((data / "test" / "REAL").glob("*.jpg"))[:4]
    return torch.stack([load_image(str(p), 32) for p in paths])


def _check_contract(info: dict, detector: Detector, fmt: str, file_name: str) -> None:
    assert info["format"] == fmt and info["file"] == file_name
    assert info["image_size"] == 32
    assert info["class_names"] == ["FAKE", "REAL"]
    assert info["threshold"] == pytest.approx(detector.threshold)
    assert info["mean"] == pytest.approx(detector.net.mean.flatten().tolist())
    assert info["std"] == pytest.approx(detector.net.std.flatten().tolist())
    assert info["model_id"] == detector.model_id
    assert info["input"]["shape"] == ["batch", 3, 32, 32]
    assert info["check"]["max_abs_diff_probability"] <= 1e-4


def test_onnx_matches_pytorch_on_eight_images(trained_run, tmp_path):
    result = run_script(
        "export.py", f"ckpt={trained_run['ckpt']}", "format=onnx", "output=out", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    path = tmp_path / "out" / "model.onnx"
    onnx.checker.check_model(str(path))
    detector = Detector.from_checkpoint(trained_run["ckpt"])
    _check_contract(
        json.loads((tmp_path / "out" / "model.onnx.json").read_text()),
        detector,
        "onnx",
        "model.onnx",
    )

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic batch axis
    images = _eight_images(trained_run["data"])
    with torch.inference_mode():
        logit = detector.net(images).numpy()
    expected = detector.score(images).numpy()
    got_logit, got_prob = session.run(
        ["logit", "probability"], {"image": (images.float() / 255).numpy()}
    )
    assert got_prob.shape == (8,)
    assert np.abs(got_prob - expected).max() <= 1e-4
    assert np.abs(got_logit - logit).max() <= 1e-4
    # Another batch size through the same file.
    (one,) = session.run(["probability"], {"image": (images[5:8].float() / 255).numpy()})
    assert np.abs(one - expected[5:8]).max() <= 1e-4


def test_torchscript_matches_pytorch_at_any_batch_size(trained_run, tmp_path):
    cfg = compose_config(
        "export",
        tmp_path,
        [f"ckpt={trained_run['ckpt']}", "format=torchscript", f"output={tmp_path / 'm.pt'}"],
    )
    result = export(cfg)
    assert result["output"] == str(tmp_path / "m.pt")
    detector = Detector.from_checkpoint(trained_run["ckpt"])
    _check_contract(
        json.loads((tmp_path / "m.pt.json").read_text()), detector, "torchscript", "m.pt"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(tmp_path / "m.pt"))
    images = _eight_images(trained_run["data"])
    for batch in (images, images[:1], images[2:7]):
        with torch.inference_mode():
            logit, prob = scripted(batch.float() / 255)
        assert prob.shape == (len(batch),)
        ref = detector.score(batch)
        assert (prob - ref).abs().max().item() <= 1e-4
        assert (logit.sigmoid() - ref).abs().max().item() <= 1e-4


def test_export_refuses_bad_settings(trained_run, tmp_path):
    cfg = compose_config("export", tmp_path, [f"ckpt={trained_run['ckpt']}", "format=tflite"])
    with pytest.raises(ConfigError, match="format=tflite"):
        export(cfg)
    cfg = compose_config("export", tmp_path, [f"ckpt={tmp_path / 'none.ckpt'}"])
    with pytest.raises(CheckpointError, match="none.ckpt"):
        export(cfg)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_flip_average_scores_like_pytorch_at_another_batch_size(tmp_path, fmt):
    """The mirror image is scored, and the NPR residual taken, inside the exported graph too,
    for any batch size."""
    import lightning as L

    from detector.module import DetectorModule

    torch.manual_seed(0)
    module = DetectorModule(
        backbone="test_resnet", image_size=32, flip_average=True, input_filter="npr"
    )
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    ckpt = tmp_path / "flip.ckpt"
    trainer.save_checkpoint(ckpt)
    result = export(compose_config("export", tmp_path, [f"ckpt={ckpt}", f"format={fmt}"]))
    assert result["check"]["max_abs_diff_probability"] <= 1e-4  # batch 3; traced at batch 2
    detector = Detector.from_checkpoint(ckpt)
    assert detector.net.flip_average and detector.net.input_filter == "npr"
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    got = run_exported(fmt, result["output"], images.float() / 255)
    torch.testing.assert_close(got, detector.score(images), rtol=0, atol=1e-4)
