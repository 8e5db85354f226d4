"""Score images: ``python predict.py ckpt=PATH input=PATH`` (see conf/predict.yaml)."""

import hydra
from omegaconf import DictConfig

from detector.cli import run
from detector.config import register_resolvers
from detector.tasks.predict import predict

register_resolvers()  # before Hydra composes the config


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    run(predict, cfg)


if __name__ == "__main__":
    main()
