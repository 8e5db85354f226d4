"""The CIFAKE recipe's pieces: random shift augmentation, EMA weights, the experiment configs."""

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from detector.callbacks import EMA
from detector.data.augment import random_shift
from detector.data.datamodule import ImageFolderDataModule
from detector.errors import ConfigError
from detector.tasks.evaluate import evaluate
from detector.tasks.train import train
from detector.zoo.nets import MEMBERS
from tests.conftest import TINY, compose_config, make_image_folder


def test_random_shift_moves_whole_images_without_new_values():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    shifted = random_shift(images, 3)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    padded = F.pad(images, (3, 3, 3, 3), mode="reflect")
    offsets = set()
    for i in range(len(images)):
        # exactly one offset reproduces the image: it is a crop of the reflected padding
        hits = [
            (dy, dx)
            for dy in range(7)
            for dx in range(7)
            if torch.equal(shifted[i], padded[i, :, dy : dy + 16, dx : dx + 16])
        ]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 10  # each image draws its own offset
    assert torch.equal(random_shift(images, 0), images)
    with pytest.raises(ConfigError, match="data.shift=16"):
        random_shift(images, 16)


def test_shift_applies_to_training_batches_only(image_folder):
    with pytest.raises(ConfigError, match="data.shift=-1"):
        ImageFolderDataModule(root=str(image_folder), shift=-1)
    with pytest.raises(ConfigError, match="data.shift=32 must be smaller.*32 px"):
        ImageFolderDataModule(root=str(image_folder), image_size=64, decode_size=32, shift=32)
    data = ImageFolderDataModule(root=str(image_folder), image_size=32, shift=4)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(8)
    data.trainer = SimpleNamespace(training=False)
    out = data.on_after_batch_transfer([images, labels], 0)
    assert out[0] is images
    data.trainer = SimpleNamespace(training=True)
    torch.manual_seed(1)
    out = data.on_after_batch_transfer([images, labels], 0)
    assert out[0].shape == images.shape and not torch.equal(out[0], images)
    assert out[1] is labels


def test_cifake_cpu_recipe_composes_and_its_ema_checkpoint_evaluates_alike(image_folder, tmp_path):
    cfg = compose_config("train", tmp_path, ["experiment=cifake_cpu", "data.root=x"])
    assert cfg.data.image_size == 32 and cfg.model.pretrained is False
    assert cfg.callbacks.ema.decay == pytest.approx(0.996)
    assert cfg.model.flip_average is True and cfg.model.optimizer.fused is True
    # The same recipe, a few steps on a tiny folder: the best checkpoint holds the averaged
    # weights, and testing it reproduces the test numbers printed at the end of training.
    overrides = [
        "experiment=cifake_cpu",
        *TINY,
        f"data.root={image_folder}",
        "trainer.max_epochs=2",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.ema.decay=0.5",
    ]
    metrics = train(compose_config("train", tmp_path / "a", overrides))
    best = metrics["best_model_path"]
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    # The best checkpoint is lean: the EMA weights in state_dict, the raw ones only in last.ckpt
    # (what resuming needs).
    assert "current_model_state" not in checkpoint
    assert "current_model_state" in checkpoint["lean"]
    last = torch.load(Path(best).parent / "last.ckpt", map_location="cpu", weights_only=True)
    raw, ema = last["current_model_state"], last["state_dict"]
    assert any(not torch.equal(raw[k], ema[k]) for k in ema if ema[k].is_floating_point())
    eval_overrides = [
        f"ckpt={best}",
        "data=imagefolder",
        f"data.root={image_folder}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
    ]
    report = evaluate(compose_config("eval", tmp_path / "b", eval_overrides))
    assert report["auroc"] == pytest.approx(metrics["test/auroc"], abs=1e-5)
    assert report["loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)


def test_eval_on_the_validation_split(trained_run, tmp_path):
    data = ImageFolderDataModule(root=str(trained_run["data"]), image_size=32)
    data.setup("fit")
    val_paths = sorted(p for p, _ in data.val_set.samples)
    overrides = [
        f"ckpt={trained_run['ckpt']}",
        "data=imagefolder",
        f"data.root={trained_run['data']}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "split=val",
    ]
    report = evaluate(compose_config("eval", tmp_path, overrides))
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == val_paths
    assert report["table"][0]["set"] == "val" and report["table"][0]["n"] == len(val_paths)
    with pytest.raises(ConfigError, match="split=val"):
        evaluate(compose_config("eval", tmp_path / "x", [*overrides, "data.test_dir=elsewhere"]))
    with pytest.raises(ConfigError, match="split='train'"):
        evaluate(compose_config("eval", tmp_path / "y", [*overrides, "split=train"]))


def test_ema_callback_averages_with_one_fused_update_per_step():
    """The fused update must be the same exponential average as Lightning's per-tensor one."""
    from torch.optim.swa_utils import AveragedModel

    callback = EMA(decay=0.9)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = AveragedModel(model, use_buffers=True, **callback._kwargs)
    average.update_parameters(model)  # the first update copies the weights
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update_parameters(model)
    weight = average.module[0].weight
    assert callback._kwargs["avg_fn"] is None and callback._kwargs["multi_avg_fn"] is not None
    assert torch.allclose(weight, 0.9 * start["0.weight"] + 0.1 * (start["0.weight"] + 1.0))


def test_general_cpu_trains_on_cifake_and_the_zoo_with_a_gan_expert(image_folder, tmp_path):
    """experiment=general_cpu: cifake_cpu with every zoo member as a further training source
    (paths.zoo_dir), the image beside its NPR residual, 12 epochs, and after training the
    expert of the three GANs (expert=gans); each source gets its own validation numbers."""
    members = [m.name for m in MEMBERS]
    assert len(members) == 8 and {"dcgan", "nngan", "blgan"} <= set(members)
    zoo = tmp_path / "zoo"
    for i, name in enumerate(members):
        make_image_folder(zoo / name, n_train=6, n_test=2, seed=10 + i)
    overrides = ["experiment=general_cpu", f"data.root={image_folder}", f"paths.zoo_dir={zoo}"]
    cfg = compose_config("train", tmp_path / "a", overrides)
    assert cfg.model.input_filter == "image_and_npr" and cfg.data.image_size == 32
    assert cfg.trainer.max_epochs == 12 and 12 % cfg.trainer.check_val_every_n_epoch == 0
    assert dict(cfg.data.train_dirs) == {
        "cifake": f"{image_folder}/train",
        **{name: f"{zoo}/{name}/train" for name in members},
    }
    assert list(cfg.expert.sources) == ["dcgan", "nngan", "blgan"]
    tiny = [*TINY, "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1"]
    metrics = train(compose_config("train", tmp_path / "b", [*overrides, *tiny]))
    for source in ("cifake", *members):
        assert 0.0 <= metrics[f"val/{source}/auroc"] <= 1.0, source
    module = torch.load(metrics["best_model_path"], map_location="cpu", weights_only=True)
    assert module["hyper_parameters"]["input_filter"] == "image_and_npr"
    weights = module["state_dict"].items()
    stem = next(v for k, v in weights if "backbone" in k and v.ndim == 4)  # the first conv
    assert stem.shape[1] == 6  # RGB and its residual
    assert module["family_expert"]["sources"] == ["dcgan", "nngan", "blgan"]
    assert module["family_expert"]["train_images"] == 3 * 2 * 5  # 5 of 6 per class train
    assert any(k.startswith("net.expert.") for k in module["state_dict"])
