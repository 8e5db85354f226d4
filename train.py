"""Train the detector: ``python train.py [overrides]`` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from detector.cli import run
from detector.config import register_resolvers
from detector.tasks.train import train

register_resolvers()  # before Hydra composes the config


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run(train, cfg)


if __name__ == "__main__":
    main()
