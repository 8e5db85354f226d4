"""What the launcher (torchrun, srun, Lightning's own, a container or taskset) says about this
process, read from the environment alone: the config's resolvers, the start-up scan's workers
and the service need it, so it imports nothing heavy (``detector.distributed``, which uses
Lightning, re-exports it)."""

from __future__ import annotations

import os

RUN_ID_VARIABLE = "DETECTOR_RUN_ID"
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "GROUP_RANK", "NODE_RANK", "LOCAL_RANK")


def cpu_cores() -> int:
    """The cores this process may run on: its affinity mask (a container's, taskset's or
    srun's share), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def slurm_tasks() -> int:
    """Tasks of this srun step (1 outside SLURM or in an interactive allocation)."""
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return 1  # Lightning ignores SLURM then, and so do we
    return int(os.environ.get("SLURM_NTASKS", "1"))


def launcher_run_id() -> str | None:
    """The id that every process of one multi-process launch sees, or None.

    ``DETECTOR_RUN_ID`` when set; torchrun's ``--rdzv-id`` (``--standalone`` draws one; the
    static default "none" is no id); under ``srun`` with several tasks the SLURM job and step, which
    a requeued job keeps, so Lightning's auto-resume finds its checkpoint in the same folder.
    """
    if os.environ.get(RUN_ID_VARIABLE):
        return os.environ[RUN_ID_VARIABLE]
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if elastic and elastic != "none":
        return elastic
    if slurm_tasks() > 1 and os.environ.get("SLURM_JOB_ID"):
        step = os.environ.get("SLURM_STEP_ID", os.environ.get("SLURM_STEPID"))
        return f"slurm-{os.environ['SLURM_JOB_ID']}" + (f".{step}" if step else "")
    return None


def launcher_rank_is_zero() -> bool:
    """Whether the launcher (torchrun, srun, Lightning) made this the first process; read from
    the environment because the config is composed before any process group exists."""
    return all(int(os.environ.get(v) or 0) == 0 for v in _RANK_VARIABLES)
