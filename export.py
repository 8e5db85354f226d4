"""Export a checkpoint: ``python export.py ckpt=PATH format=onnx|torchscript``."""

import hydra
from omegaconf import DictConfig

from detector.cli import preflight, run
from detector.config import register_resolvers

register_resolvers()  # before Hydra composes the config


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from detector.tasks.export import export  # heavy (Lightning): not for --help

    run(export, cfg)


if __name__ == "__main__":
    preflight("export")  # --help, and a key this command does not read: one error line
    main()
