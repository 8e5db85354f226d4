"""Serve a checkpoint over HTTP: ``python serve.py ckpt=PATH`` (see conf/serve.yaml)."""

import hydra
from omegaconf import DictConfig

from detector.cli import run
from detector.config import register_resolvers
from detector.tasks.serve import serve

register_resolvers()  # before Hydra composes the config


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    run(serve, cfg)


if __name__ == "__main__":
    main()
