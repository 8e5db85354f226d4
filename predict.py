"""Score images: ``python predict.py ckpt=PATH input=PATH`` (see conf/predict.yaml)."""

import hydra
from omegaconf import DictConfig

from detector.cli import preflight, run
from detector.config import register_resolvers

register_resolvers()  # before Hydra composes the config


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from detector.tasks.predict import predict  # heavy (Lightning): not for --help

    run(predict, cfg)


if __name__ == "__main__":
    preflight("predict")  # --help, and a key this command does not read: one error line
    main()
