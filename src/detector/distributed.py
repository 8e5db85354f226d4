"""Several processes, one run: the run folder, ranks and gathers under DDP, torchrun and SLURM.

Lightning's own launcher (``python train.py trainer.devices=N``) re-runs the script for ranks
1..N-1 with rank 0's ``hydra.run.dir``, so they share its folder. torchrun and ``srun`` start
every process themselves: each composes the config on its own, so the folder name must come from
something all of them see, an id in the environment. Whatever the launcher, only global rank 0
writes files.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.accelerators import CPUAccelerator

from detector.errors import ConfigError
from detector.launch_env import (  # noqa: F401 - re-exported: config and tests read them here
    RUN_ID_VARIABLE,
    launcher_rank_is_zero,
    launcher_run_id,
)


def launch_rank(trainer: L.Trainer) -> int:
    """This process's global rank, known before ``fit`` sets up the process group."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None or trainer.num_devices * trainer.num_nodes == 1:
        return 0
    if isinstance(env, LightningEnvironment):  # its global_rank() is only set inside fit
        return env.node_rank() * trainer.num_devices + env.local_rank()
    return env.global_rank()


def check_launch(trainer: L.Trainer, hydra_cfg=None, sync_batchnorm: bool = False) -> None:
    """Refuse launches that would fail late, hang or scatter one run over several folders.

    ``hydra_cfg``: the HydraConfig of a command-line run (None when called from Python).
    """
    world = trainer.num_devices * trainer.num_nodes
    if world == 1:
        return
    devices = f"trainer.devices={trainer.num_devices} x trainer.num_nodes={trainer.num_nodes}"
    if sync_batchnorm and isinstance(trainer.accelerator, CPUAccelerator):
        raise ConfigError(
            f"trainer.sync_batchnorm=true with {devices} CPU processes: torch's SyncBatchNorm "
            "runs on GPUs only; set trainer.sync_batchnorm=false on CPU"
        )
    if hydra_cfg is None:
        return
    # By name: the LightningModule imports this module, and needs no Hydra to run.
    if getattr(hydra_cfg.mode, "name", hydra_cfg.mode) == "MULTIRUN":
        raise ConfigError(
            f"{devices}: several processes per job is not supported in a Hydra multirun (-m): "
            "Lightning would re-run the whole sweep in every process. Sweep single-device runs "
            "(trainer.devices=1), or start one DDP run per setting (e.g. a shell loop)"
        )
    explicit_dir = any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra)
    env = getattr(trainer.strategy, "cluster_environment", None)
    started_outside = env is not None and env.creates_processes_externally
    external = trainer.num_nodes > 1 or (
        started_outside and not isinstance(env, LightningEnvironment)  # torchrun, srun, ...
    )
    if external and launcher_run_id() is None and not explicit_dir:
        raise ConfigError(
            f"{devices}: the processes start separately, so they need one shared run-folder "
            f"name: pass the same --rdzv-id ID to torchrun on every node (scripts/torchrun.sh "
            f"does), or set {RUN_ID_VARIABLE}=ID, or hydra.run.dir=DIR (the same on every node)"
        )


def keep_files_to_rank_zero(rank: int) -> None:
    """Other ranks stop writing the run's log file. Under torchrun and SLURM every process opened
    the shared ``train.log``; Lightning's re-launched ranks opened their own
    ``train_ddp_process_<r>.log``, which is still empty here and removed."""
    if rank == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
            path = Path(handler.baseFilename)
            if "_ddp_process_" in path.name and path.is_file() and path.stat().st_size == 0:
                path.unlink()


def gather_rows(trainer: L.Trainer, rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` (uneven lengths allowed) concatenated in rank order, on the CPU.

    With the contiguous shards of :class:`~detector.data.datasets.ShardSampler` this is dataset
    order.
    """
    if trainer.world_size == 1:
        return rows.cpu()
    strategy = trainer.strategy
    device = strategy.root_device
    length = torch.tensor([len(rows)], device=device)
    lengths = strategy.all_gather(length).flatten().tolist()
    padded = torch.zeros((max(lengths), *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: len(rows)] = rows.to(device)
    gathered = strategy.all_gather(padded)  # (world, longest, ...)
    return torch.cat([gathered[r, :n] for r, n in enumerate(lengths)]).cpu()


def set_collective_timeout(trainer: L.Trainer, seconds: float | None) -> None:
    """How long a rank waits in one collective (``ddp_timeout``) before it fails with an error.

    A rank that enters a collective its peers never reach would otherwise wait for torch's
    default of 30 minutes (gloo) or for ever; with a timeout the run stops with the stack of the
    collective that hung. DDP-style strategies read the value when ``fit`` creates the process
    group; Lightning takes it only as a constructor argument, hence the attribute.
    """
    if seconds is None:
        return
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ConfigError(f"ddp_timeout={seconds!r} must be a number of seconds > 0")
    if hasattr(trainer.strategy, "_timeout"):  # DDPStrategy, FSDPStrategy, DeepSpeedStrategy
        trainer.strategy._timeout = timedelta(seconds=float(seconds))
