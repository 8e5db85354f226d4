"""Train the detector: ``python train.py [overrides]`` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from detector.cli import preflight, run
from detector.config import register_resolvers

register_resolvers()  # before Hydra composes the config


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from detector.tasks.train import train  # heavy (Lightning): not for --help

    run(train, cfg)


if __name__ == "__main__":
    preflight("train")  # --help, and a key this command does not read: one error line
    main()
