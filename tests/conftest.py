"""Shared fixtures: tiny generated REAL/FAKE folders, composed configs and one trained checkpoint.

Tests use timm's ``test_resnet`` (0.4M parameters) at 32 px so that whole runs take seconds;
the ResNet50 default is covered by the model tests that only build it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from PIL import Image

from detector.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_resolvers()

# Fast settings for any run in tests.
TINY = [
    "model.backbone=test_resnet",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    # float32, not the bf16 that trainer.precision=auto picks on bf16 hardware: tests compare
    # train's, eval's and predict's numbers exactly
    "trainer.precision=32-true",
]


def make_image_folder(
    root: Path, n_train: int = 24, n_test: int = 8, size: int = 32, seed: int = 0
) -> Path:
    """REAL: smooth random colour fields; FAKE: the same with a 2-pixel checkerboard, an
    upsampling-like trace that even a tiny CNN learns in one epoch."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for label in ("FAKE", "REAL"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = rng.uniform(40, 215, (4, 4, 3))
                img = np.kron(base, np.ones((size // 4, size // 4, 1)))
                img += rng.normal(0, 6, img.shape)
                if label == "FAKE":
                    yy, xx = np.mgrid[:size, :size]
                    img += 18.0 * (((yy // 1 + xx // 1) % 2) * 2 - 1)[..., None]
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    folder / f"{i:04d}.jpg", quality=75
                )
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def compose_config(name: str, output_dir: Path, overrides: list[str] | None = None) -> DictConfig:
    """The config train.py/eval.py would see, with the run folder set to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name=name, overrides=overrides or [])
    with open_dict(cfg):
        cfg.paths.root_dir = str(output_dir)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
    return cfg


@pytest.fixture(scope="session")
def trained_run(image_folder, tmp_path_factory) -> dict:
    """One short training run shared by the tests that need a checkpoint.

    Returns the run folder, the best checkpoint and the metrics ``train`` returned.
    """
    from detector.tasks.train import train

    out = tmp_path_factory.mktemp("trained")
    cfg = compose_config(
        "train",
        out,
        [*TINY, "data=imagefolder", f"data.root={image_folder}", "trainer.max_epochs=4"],
    )
    metrics = train(cfg)
    return {
        "dir": out,
        "ckpt": Path(metrics["best_model_path"]),
        "metrics": metrics,
        "data": image_folder,
    }


def run_script(
    script: str, *args: str, cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run an entry point the way a user does, from another folder, and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    env.pop("PROJECT_ROOT", None)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
