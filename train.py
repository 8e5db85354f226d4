"""Train the detector: ``python train.py [overrides]`` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from detector.cli import run
from detector.tasks import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run(train, cfg)


if __name__ == "__main__":
    main()
