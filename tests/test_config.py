"""Every file in conf/ composes, and what it describes can be built."""

from pathlib import Path

import hydra
import lightning as L
import pytest
from omegaconf import OmegaConf

from detector.data.datamodule import ImageFolderDataModule
from detector.module import DetectorModule
from tests.conftest import CONF, compose_config

GROUP_OPTIONS = sorted(
    (path.parent.name, path.stem)
    for path in CONF.glob("*/*.yaml")
    if path.parent.name not in ("hydra", "paths", "robustness")
)
ENTRY_CONFIGS = sorted(path.stem for path in CONF.glob("*.yaml"))


def _build(cfg, tmp_path):
    data = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c]
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values() if c]
    trainer_cfg = OmegaConf.to_container(cfg.trainer)
    # Devices a test machine has: one CPU process, whatever the group asks for.
    trainer_cfg.update(accelerator="cpu", devices=1, strategy="auto", num_nodes=1)
    trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers)
    return data, model, trainer


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_config_composes_and_instantiates(group, option, tmp_path, image_folder):
    overrides = [
        f"{group}={option}",
        "model.backbone=test_resnet",
        "model.pretrained=false",
        f"data.root={image_folder}",
    ]
    cfg = compose_config("train", tmp_path, overrides)
    data, model, trainer = _build(cfg, tmp_path)
    assert isinstance(data, ImageFolderDataModule)
    assert isinstance(model, DetectorModule)
    assert isinstance(trainer, L.Trainer)
    assert model.hparams.image_size == cfg.data.image_size


@pytest.mark.parametrize("name", ENTRY_CONFIGS)
def test_every_entry_point_config_composes(name, tmp_path):
    cfg = compose_config(name, tmp_path, ["+ckpt=x.ckpt"] if name == "train" else ["ckpt=x.ckpt"])
    assert cfg.task_name == name


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "robustness").glob("*.yaml")))
def test_robustness_options_compose_with_eval(option, tmp_path):
    cfg = compose_config("eval", tmp_path, ["ckpt=x.ckpt", f"robustness={option}"])
    assert cfg.robustness


def test_eval_config_composes():
    cfg = compose_config("eval", Path("/tmp/x"), ["ckpt=some.ckpt"])
    assert cfg.ckpt == "some.ckpt"
    assert cfg.data.image_size is None  # taken from the checkpoint
    assert cfg.data.hflip is False


def test_paper_experiment_is_the_seed_recipe(tmp_path):
    cfg = compose_config("train", tmp_path, ["experiment=paper"])
    assert cfg.data.image_size == 224
    assert cfg.data.batch_size == 32
    assert cfg.data.val_fraction == 0.2 and cfg.data.seed == 123
    assert cfg.model.backbone == "resnet50" and cfg.model.se_reduction == 16
    assert cfg.model.hidden_dim == 128 and cfg.model.dropout == 0.5
    assert cfg.model.pretrained is True
    assert cfg.model.optimizer._target_ == "torch.optim.Adam" and cfg.model.optimizer.lr == 1e-3
    assert cfg.trainer.max_epochs == 10


def test_optimizer_is_partial_and_scheduler_optional(tmp_path):
    cfg = compose_config(
        "train",
        tmp_path,
        [
            "model.backbone=test_resnet",
            "+model.scheduler._target_=torch.optim.lr_scheduler.CosineAnnealingLR",
            "+model.scheduler._partial_=true",
            "+model.scheduler.T_max=3",
        ],
    )
    model = hydra.utils.instantiate(cfg.model)
    conf = model.configure_optimizers()
    assert conf["optimizer"].defaults["lr"] == 1e-3
    assert conf["lr_scheduler"]["scheduler"].T_max == 3
