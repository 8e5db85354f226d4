"""Explain predictions: ``python explain.py ckpt=PATH input=PATH`` (see conf/explain.yaml)."""

import hydra
from omegaconf import DictConfig

from detector.cli import run
from detector.config import register_resolvers
from detector.tasks.explain import explain

register_resolvers()  # before Hydra composes the config


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    run(explain, cfg)


if __name__ == "__main__":
    main()
