"""Serve a checkpoint over HTTP: ``python serve.py ckpt=PATH`` (see conf/serve.yaml)."""

import hydra
from omegaconf import DictConfig

from detector.cli import preflight, run


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    from detector.tasks.serve import serve  # heavy (torch, LitServe): not for --help

    run(serve, cfg)


if __name__ == "__main__":
    preflight("serve")  # --help, and a key this command does not read: one error line
    from detector.config import register_resolvers  # imports torch: not for --help

    register_resolvers()  # before Hydra resolves the run folder (${run_id:...})
    main()
