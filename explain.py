"""Explain predictions: ``python explain.py ckpt=PATH input=PATH`` (see conf/explain.yaml)."""

import hydra
from omegaconf import DictConfig

from detector.cli import preflight, run
from detector.config import register_resolvers

register_resolvers()  # before Hydra composes the config


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    from detector.tasks.explain import explain  # heavy (Lightning): not for --help

    run(explain, cfg)


if __name__ == "__main__":
    preflight("explain")  # --help, and a key this command does not read: one error line
    main()
