"""explain.py: Grad-CAM and Integrated Gradients maps that follow their definitions."""

import csv

import pytest
import torch
from PIL import Image

from detector.checkpoint import load_checkpoint
from detector.data.decode import load_image
from detector.errors import ConfigError
from detector.tasks.explain import draw_explanations, explain_maps, gradcam_layer
from tests.conftest import run_script


@pytest.fixture(scope="module")
def module_and_images(trained_run):
    module = load_checkpoint(trained_run["ckpt"])
    paths = sorted((trained_run["data"] / "test" / "FAKE").glob("*.jpg"))[:2]
    paths += sorted((trained_run["data"] / "test" / "REAL").glob("*.jpg"))[:2]
    return module, torch.stack([load_image(str(p), 32) for p in paths])


def test_maps_follow_their_definitions_and_leave_the_model_alone(module_and_images):
    module, images = module_and_images
    module.train()  # explaining must switch to eval and back
    before = {k: v.clone() for k, v in module.state_dict().items()}
    result = explain_maps(module, images, n_steps=48)

    assert module.training and all(p.requires_grad for p in module.parameters())
    assert all(p.grad is None for p in module.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    module.eval()
    with torch.no_grad():
        logit = module.net(images)
        logit0 = module.net(torch.zeros_like(images))
    assert torch.allclose(result.probability, torch.sigmoid(logit), atol=1e-6)
    assert torch.equal(result.target, (result.probability >= module.threshold).long())
    # 32 px through a stride-32 backbone is one cell: the automatic layer is finer than that.
    assert result.layer == "backbone.layer2" and result.cam_size == (4, 4)
    assert result.gradcam.shape == (4, 32, 32)
    assert result.gradcam.min() >= 0.0 and result.gradcam.max() <= 1.0 + 1e-6
    # Integrated Gradients is complete: the attributions add up to the change of the explained
    # class's score between the black baseline and the image (up to the integral's error,
    # about 0.01 here at 48 steps, for changes of 0.06 to 0.13).
    sign = result.target.float() * 2 - 1
    change = sign * (logit - logit0)
    assert result.ig.shape == (4, 32, 32)
    total = result.ig.sum(dim=(1, 2))
    assert (total - change).abs().max() <= 0.015
    assert torch.allclose(total - change, result.ig_delta, atol=1e-4)
    # The other class's map is the exact opposite (its score is minus the logit).
    one = explain_maps(module, images[:2], target=1, n_steps=4)
    other = explain_maps(module, images[:2], target=0, n_steps=4)
    assert one.ig.abs().max() > 0
    assert torch.allclose(other.ig, -one.ig, atol=1e-6)


def test_flip_averaged_model_is_explained_one_map_per_image(module_and_images):
    module, images = module_and_images
    module.net.flip_average = True
    try:
        result = explain_maps(module, images, n_steps=4)
        assert module.net.flip_average is True  # switched off for Grad-CAM only
        module.eval()
        with torch.no_grad():
            averaged = torch.sigmoid(module.net(images))
    finally:
        module.net.flip_average = False
    assert torch.allclose(result.probability, averaged, atol=1e-6)  # the score predict gives
    assert result.gradcam.shape == (4, 32, 32) and result.ig.shape == (4, 32, 32)
    assert torch.isfinite(result.gradcam).all()


def test_figure_for_tensorboard_and_layer_choice(module_and_images):
    module, images = module_and_images
    result = explain_maps(module, images[:2], n_steps=4)
    names = list(module.hparams.class_names)
    fig = draw_explanations(images[:2], result, names, titles=["a", "b"], display_size=64)
    assert len(fig.axes) == 6
    assert fig.axes[0].get_title().startswith("a\n")
    assert "Grad-CAM for" in fig.axes[1].get_title()
    name, layer = gradcam_layer(module, 224)
    assert name == "backbone.layer4" and layer is module.net.backbone.layer4
    with pytest.raises(ConfigError, match="gradcam_layer=backbone.nope"):
        gradcam_layer(module, 32, "backbone.nope")


def test_cli_writes_one_figure_per_image_and_error_rows(trained_run, tmp_path):
    good = sorted((trained_run["data"] / "test" / "FAKE").glob("*.jpg"))[:2]
    (tmp_path / "broken.png").write_bytes(b"nope")
    listing = tmp_path / "some.txt"
    listing.write_text("\n".join([*map(str, good), "broken.png"]) + "\n")
    result = run_script(
        "explain.py",
        f"ckpt={trained_run['ckpt']}",
        f"input={listing}",
        "output=maps",
        "n_steps=4",
        "display_size=96",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Explained 2 of 3 images (1 unreadable)" in result.stdout
    with open(tmp_path / "maps" / "explanations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["figure"] for r in rows] == ["0000_0000.png", "0001_0001.png", ""]
    assert "cannot identify image file" in rows[2]["error"]
    for row in rows[:2]:
        assert row["explained"] == row["label"] and row["gradcam_layer"] == "backbone.layer2"
        with Image.open(tmp_path / "maps" / row["figure"]) as png:
            assert png.width > 3 * 96 and png.height > 96


def test_the_progress_bar_moves_per_image(trained_run, tmp_path):
    """write_rows advances the bar by each chunk's rows: one image per chunk."""
    from omegaconf import OmegaConf

    from detector.api import Detector
    from detector.tasks.explain import explained_rows

    paths = [str(p) for p in sorted((trained_run["data"] / "test" / "FAKE").glob("*.jpg"))[:3]]
    cfg = OmegaConf.create(
        {"gradcam_layer": "auto", "n_steps": 2, "batch_size": 16, "display_size": 64, "dpi": 40}
    )
    detector = Detector.from_checkpoint(trained_run["ckpt"])
    chunks = list(explained_rows(detector, paths, tmp_path, None, cfg, []))
    assert [sorted(c) for c in chunks] == [[0], [1], [2]]
    assert all((tmp_path / c[i]["figure"]).is_file() for i, c in enumerate(chunks))
