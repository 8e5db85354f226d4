"""Evaluate a checkpoint: ``python eval.py ckpt=PATH [data.root=DIR | data.test_dir=DIR]``."""

import hydra
from omegaconf import DictConfig

from detector.cli import preflight, run
from detector.config import register_resolvers

register_resolvers()  # before Hydra composes the config


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from detector.tasks.evaluate import evaluate  # heavy (Lightning): not for --help

    run(evaluate, cfg)


if __name__ == "__main__":
    preflight("eval")  # --help, and a key this command does not read: one error line
    main()
