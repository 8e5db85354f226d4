"""DDP with CPU processes (gloo) through the real command line: one machine with two ranks,
two torchrun "nodes" on 127.0.0.1, an emulated two-node SLURM step, and Hydra multirun.

Every multi-process run checks the same facts: one run folder, one set of checkpoints, one
TensorBoard stream (written by global rank 0 only), each log line once, a history figure, the
global batch, and validation/test numbers equal to a one-device evaluation of the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf

from detector.data import ImageFolderDataModule, ShardSampler
from detector.errors import ConfigError, DataError
from detector.launch import check_launch, launcher_rank_is_zero, launcher_run_id
from tests.conftest import ROOT, TINY, compose_config, run_script

VAL_FRACTION = 0.23  # 48 train images -> 11 for validation: odd, so 2 ranks cannot split it evenly
BATCH = 8
EPOCHS = 2
LAUNCH_VARIABLES = (
    "DETECTOR_RUN_ID",
    "TORCHELASTIC_RUN_ID",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "WORLD_SIZE",
    "SLURM_NTASKS",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_STEPID",
    "SLURM_PROCID",
    "SLURM_JOB_NAME",
)


@pytest.fixture(scope="module")
def odd_folder(image_folder, tmp_path_factory) -> Path:
    """The shared images with one test image fewer (15): a padding sampler would repeat one."""
    root = tmp_path_factory.mktemp("odd") / "images"
    shutil.copytree(image_folder, root)
    sorted((root / "test" / "FAKE").iterdir())[-1].unlink()
    return root


def run_args(data_root: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return [
        *TINY,
        "data=imagefolder",
        f"data.root={data_root}",
        f"data.val_fraction={VAL_FRACTION}",
        f"trainer.max_epochs={epochs}",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """The test process's environment without any launcher's variables."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    env.pop("PROJECT_ROOT", None)
    return env


def n_train(data_root: Path) -> int:
    dm = ImageFolderDataModule(root=str(data_root), val_fraction=VAL_FRACTION, image_size=32)
    dm.setup("fit")
    return len(dm.train_set)


def scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float, float]]] = {}
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.wall_time, e.value) for e in acc.Scalars(tag))
    return {tag: [v for _, _, v in sorted(rows)] for tag, rows in out.items()}


def one_device_validate(ckpt: Path, data_root: Path) -> dict[str, float]:
    """val/* of a checkpoint on one device, on the same seeded split."""
    from detector.tasks import load_checkpoint

    model = load_checkpoint(ckpt)
    dm = ImageFolderDataModule(
        root=str(data_root),
        val_fraction=VAL_FRACTION,
        image_size=32,
        batch_size=BATCH,
        num_workers=0,
        hflip=False,
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    (result,) = trainer.validate(model, datamodule=dm, verbose=False)
    return result


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict | list):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        return {k: v for key, sub in items for k, v in _flat(sub, f"{prefix}/{key}").items()}
    return {prefix: tree}


def assert_same_report(ours: dict, reference: dict) -> None:
    """The metrics.json of a DDP run against a one-device evaluation of the same checkpoint."""
    keys = ["n", "threshold", "accuracy", "precision", "recall", "f1", "auroc", "loss"]
    keys += ["confusion_matrix", "per_class", "macro_avg", "weighted_avg"]
    a, b = _flat({k: ours[k] for k in keys}), _flat({k: reference[k] for k in keys})
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, a[key], b[key])
        else:
            assert a[key] == b[key], (key, a[key], b[key])


def assert_same_predictions(ours: Path, reference: Path) -> None:
    """predictions.csv: the same images in the same order (gathered shards in dataset order),
    each once, with the same probabilities."""
    import csv

    a = list(csv.DictReader(ours.open()))
    b = list(csv.DictReader(reference.open()))
    assert [(r["path"], r["label"]) for r in a] == [(r["path"], r["label"]) for r in b]
    assert len({r["path"] for r in a}) == len(a)
    for x, y in zip(a, b, strict=True):
        assert math.isclose(float(x["probability"]), float(y["probability"]), abs_tol=1e-6)


def check_run(run: Path, data_root: Path, world: int, accumulate: int = 1) -> dict:
    """The facts every multi-process run must show; returns the run's metrics.json."""
    # One set of checkpoints: the best one and last.ckpt.
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    best = [n for n in ckpts if n != "last.ckpt"]
    assert "last.ckpt" in ckpts and len(best) == 1, ckpts
    # Only rank 0 logs: one log file, the start line once; no per-rank files anywhere.
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log"]
    log = (run / "train.log").read_text()
    assert log.count(f"{world} process(es)") == 1, log
    assert (run / "history.png").stat().st_size > 0
    assert (run / ".hydra" / "config.yaml").is_file()
    # One TensorBoard stream: every event file written by one process.
    events = list(run.rglob("events.out.tfevents.*"))
    assert {e.parent for e in events} == {run / "tensorboard"}
    assert len({e.name.split(".")[-2] for e in events}) == 1, [e.name for e in events]
    # The global batch is data.batch_size whatever the number of ranks: as many optimizer steps
    # as on one device (drop_last: 37 // 8 = 4 batches per epoch).
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == EPOCHS * (n_train(data_root) // BATCH) // accumulate
    # Validation: one value per epoch in the stream, equal at the best epoch to a one-device
    # validation of the best checkpoint on the same split (each image once, none padded).
    values = scalars(run / "tensorboard")
    assert len(values["val/auroc"]) == EPOCHS and len(values["val/loss"]) == EPOCHS
    best_ckpt = run / "checkpoints" / best[0]
    epoch = torch.load(best_ckpt, map_location="cpu", weights_only=False)["epoch"]
    reference = one_device_validate(best_ckpt, data_root)
    for tag in ("val/auroc", "val/loss"):
        assert math.isclose(values[tag][epoch], reference[tag], rel_tol=1e-5, abs_tol=1e-6), (
            tag,
            values[tag],
            reference[tag],
        )
    metrics = json.loads((run / "metrics.json").read_text())
    n_test = sum(1 for _ in (data_root / "test").rglob("*.jpg"))
    assert metrics["n"] == n_test == sum(map(sum, metrics["confusion_matrix"]))
    return metrics


# --- pieces, in process ---------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_sampler_reads_each_index_once_in_order(world):
    for n in range(0, 14):
        shards = [list(ShardSampler(n, world, r)) for r in range(world)]
        assert sum(shards, []) == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert [len(ShardSampler(n, world, r)) for r in range(world)] == list(map(len, shards))


def _loaders_for(dm: ImageFolderDataModule, world: int, rank: int):
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    return dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()


def test_loaders_shard_val_and_test_without_padding(odd_folder):
    dm = ImageFolderDataModule(
        root=str(odd_folder), val_fraction=VAL_FRACTION, image_size=32, batch_size=BATCH,
        num_workers=0,
    )  # fmt: skip
    dm.setup()
    seen = {"val": [], "test": []}
    train_batches, train_indices = [], []
    for rank in range(2):
        train, val, test = _loaders_for(dm, 2, rank)
        assert train.batch_size == val.batch_size == test.batch_size == BATCH // 2
        train_batches.append(len(train))
        train.sampler.set_epoch(0)
        train_indices.append(list(train.sampler))
        seen["val"] += list(val.sampler)
        seen["test"] += list(test.sampler)
    # val/test: every image exactly once over the ranks (11 and 15 are odd: nothing padded)
    assert seen["val"] == list(range(len(dm.val_set))) and len(dm.val_set) == 11
    assert seen["test"] == list(range(len(dm.test_set))) and len(dm.test_set) == 15
    # train: disjoint equal shards, as many global batches per epoch as on one device
    assert train_batches[0] == train_batches[1] == len(dm.train_set) // BATCH
    assert not set(train_indices[0]) & set(train_indices[1])
    one_device, *_ = _loaders_for(dm, 1, 0)
    assert len(one_device) == train_batches[0] and one_device.batch_size == BATCH


def test_loaders_refuse_what_ranks_cannot_share(odd_folder):
    dm = ImageFolderDataModule(root=str(odd_folder), image_size=32, batch_size=6, num_workers=0)
    dm.setup()
    with pytest.raises(ConfigError, match=r"data.batch_size=6 .* 4 devices"):
        _loaders_for(dm, 4, 0)
    dm = ImageFolderDataModule(
        root=str(odd_folder), image_size=32, batch_size=16, val_fraction=0.02, num_workers=0
    )
    dm.setup()
    assert len(dm.val_set) == 1
    with pytest.raises(DataError, match=r"validation split .* 1 images .* 2 processes"):
        _loaders_for(dm, 2, 1)


@pytest.fixture
def launch_env(monkeypatch):
    for var in LAUNCH_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_run_id_comes_from_the_launcher(launch_env):
    assert launcher_run_id() is None and launcher_rank_is_zero()
    launch_env.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's static default: no id
    assert launcher_run_id() is None
    launch_env.setenv("TORCHELASTIC_RUN_ID", "exp7")
    launch_env.setenv("RANK", "1")
    assert launcher_run_id() == "exp7" and not launcher_rank_is_zero()
    launch_env.delenv("TORCHELASTIC_RUN_ID")
    launch_env.delenv("RANK")
    launch_env.setenv("SLURM_JOB_ID", "4242")
    launch_env.setenv("SLURM_NTASKS", "1")  # a single task needs no shared name
    assert launcher_run_id() is None
    launch_env.setenv("SLURM_NTASKS", "8")
    launch_env.setenv("SLURM_STEP_ID", "3")
    launch_env.setenv("SLURM_PROCID", "5")
    assert launcher_run_id() == "slurm-4242.3" and not launcher_rank_is_zero()
    launch_env.setenv("SLURM_JOB_NAME", "interactive")  # Lightning ignores SLURM then
    assert launcher_run_id() is None
    launch_env.setenv("DETECTOR_RUN_ID", "mine")
    assert launcher_run_id() == "mine"


def test_hydra_run_dir_and_saved_config_follow_the_launcher(launch_env, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    launch_env.setenv("PROJECT_ROOT", str(tmp_path))

    def hydra_node():
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose("train", return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # for ${hydra:runtime.cwd}
        node = {"dir": cfg.hydra.run.dir, "output_subdir": cfg.hydra.output_subdir}
        HydraConfig.instance().cfg = None  # later tests run without a Hydra command line
        return node

    default = hydra_node()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+", Path(default["dir"]).name)
    assert default["output_subdir"] == ".hydra"
    launch_env.setenv("TORCHELASTIC_RUN_ID", "exp7")
    launch_env.setenv("RANK", "1")
    rank1 = hydra_node()
    assert rank1["dir"] == str(tmp_path / "logs" / "train" / "runs" / "exp7")
    assert rank1["output_subdir"] is None


def test_launch_checks_refuse_hangs_and_scattered_folders(launch_env, tmp_path):
    hydra_run = OmegaConf.create({"mode": RunMode.RUN, "overrides": {"hydra": []}})
    hydra_multi = OmegaConf.create({"mode": RunMode.MULTIRUN, "overrides": {"hydra": []}})
    kw = dict(accelerator="cpu", logger=False, default_root_dir=str(tmp_path))
    one = L.Trainer(devices=1, **kw)
    check_launch(one, hydra_multi)  # single-device sweeps are fine
    two = L.Trainer(devices=2, strategy="ddp", **kw)
    check_launch(two, hydra_run)  # Lightning launches rank 1 itself, into rank 0's folder
    check_launch(two, None)  # called from Python: no Hydra folder to share
    with pytest.raises(ConfigError, match=r"trainer.devices=2 .* multirun \(-m\)"):
        check_launch(two, hydra_multi)
    # torchrun without --rdzv-id: each process would name its own folder
    launch_env.setenv("TORCHELASTIC_RUN_ID", "none")
    for var, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "GROUP_RANK": "0",
    }.items():
        launch_env.setenv(var, value)
    launch_env.setenv("MASTER_ADDR", "127.0.0.1")
    launch_env.setenv("MASTER_PORT", "29500")
    elastic = L.Trainer(devices=1, num_nodes=2, strategy="ddp", **kw)
    with pytest.raises(ConfigError, match=r"--rdzv-id"):
        check_launch(elastic, hydra_run)
    launch_env.setenv("TORCHELASTIC_RUN_ID", "exp7")
    check_launch(elastic, hydra_run)
    launch_env.setenv("TORCHELASTIC_RUN_ID", "none")
    explicit = OmegaConf.create({"mode": RunMode.RUN, "overrides": {"hydra": ["hydra.run.dir=x"]}})
    check_launch(elastic, explicit)


def test_sync_batchnorm_on_cpu_processes_is_refused_early(tmp_path):
    two = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", sync_batchnorm=True, logger=False,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"trainer.sync_batchnorm=true .* GPUs only"):
        check_launch(two, None, sync_batchnorm=True)
    check_launch(L.Trainer(accelerator="cpu", devices=1, logger=False), None, sync_batchnorm=True)


# --- the real command line ------------------------------------------------------------------


def test_ddp_two_cpu_ranks_one_run(odd_folder, tmp_path):
    """``python train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2`` with gradient
    accumulation, then ``python eval.py ckpt=...`` on one device gives the same test numbers."""
    accumulate = 2
    result = run_script(
        "train.py",
        "trainer=ddp",
        *run_args(odd_folder, "trainer.devices=2", f"trainer.accumulate_grad_batches={accumulate}"),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["train"]
    # Rank 0 is the process the user started: its pid names the folder and the event files.
    pid = run.name.rsplit("_", 1)[1]
    assert {e.name.split(".")[-2] for e in (run / "tensorboard").glob("events.*")} == {pid}
    metrics = check_run(run, odd_folder, world=2, accumulate=accumulate)
    # Printed once: the report and the closing lines come from rank 0 only.
    assert result.stdout.count("Best checkpoint:") == 1
    assert result.stdout.count("Confusion matrix") == 1

    best = next(p for p in (run / "checkpoints").iterdir() if p.name != "last.ckpt")
    evaluated = run_script(
        "eval.py",
        f"ckpt={best}",
        "data=imagefolder",
        f"data.root={odd_folder}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        cwd=tmp_path,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (eval_run,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    assert_same_report(metrics, json.loads((eval_run / "metrics.json").read_text()))
    assert_same_predictions(run / "predictions.csv", eval_run / "predictions.csv")


def test_multirun_sweeps_single_device_runs(image_folder, tmp_path):
    result = run_script(
        "train.py", "-m", "seed=1,2", *run_args(image_folder, "test=false", epochs=1), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert OmegaConf.load(job / ".hydra" / "config.yaml").seed == int(job.name) + 1


def test_ddp_inside_multirun_fails_clearly(image_folder, tmp_path):
    result = run_script(
        "train.py",
        "-m",
        "seed=1,2",
        *run_args(image_folder, "trainer.devices=2", epochs=1),  # strategy auto: DDP
        cwd=tmp_path,
        timeout=180,
    )
    assert result.returncode == 2
    assert "error: trainer.devices=2 x trainer.num_nodes=1" in result.stderr
    assert "multirun (-m)" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def run_together(command: list[str], envs: list[dict], cwd: Path) -> list[tuple[str, str]]:
    """Start one process per environment, wait for all (killing all on a hang or failure of the
    test), and check that each exited 0; returns their (stdout, stderr)."""
    procs = [
        subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for env in envs
    ]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outputs


@pytest.mark.slow
def test_torchrun_two_nodes_on_loopback(odd_folder, tmp_path):
    """scripts/torchrun.sh on two "machines" (127.0.0.1, one CPU process each)."""
    port = free_port()
    envs = [
        {
            **clean_env(),
            "PYTHON": sys.executable,
            "NNODES": "2",
            "NODE_RANK": str(node),
            "NPROC_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RUN_ID": "loopback",
        }
        for node in (0, 1)
    ]
    command = ["bash", str(ROOT / "scripts" / "torchrun.sh"), *run_args(odd_folder)]
    outputs = run_together(command, envs, tmp_path)
    assert [p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()] == ["loopback"]
    run = tmp_path / "logs" / "train" / "runs" / "loopback"
    metrics = check_run(run, odd_folder, world=2)
    assert outputs[0][0].count("Best checkpoint:") == 1
    assert "Best checkpoint:" not in outputs[1][0]  # node 1 prints nothing of its own

    from detector.tasks import evaluate

    best = next(p for p in (run / "checkpoints").iterdir() if p.name != "last.ckpt")
    cfg = compose_config(
        "eval",
        tmp_path / "eval",
        [f"ckpt={best}", "data=imagefolder", f"data.root={odd_folder}", "data.num_workers=0",
         "trainer.accelerator=cpu"],
    )  # fmt: skip
    assert_same_report(metrics, evaluate(cfg))
    assert_same_predictions(run / "predictions.csv", tmp_path / "eval" / "predictions.csv")


@pytest.mark.slow
def test_slurm_two_tasks_emulated(odd_folder, tmp_path):
    """What srun sets for 2 nodes x 1 task (scripts/slurm.sbatch's line, on CPU): Lightning's
    SLURMEnvironment, one folder slurm-<job>.<step>."""
    port = free_port()
    envs = [
        {
            **clean_env(),
            "SLURM_JOB_ID": "4242",
            "SLURM_STEP_ID": "0",
            "SLURM_JOB_NAME": "detector",
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_NNODES": "2",
            "SLURM_PROCID": str(task),
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": str(task),
            "SLURM_NODELIST": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        for task in (0, 1)
    ]
    command = [sys.executable, str(ROOT / "train.py"), "trainer=ddp", "trainer.devices=1"]
    command += ["trainer.num_nodes=2", *run_args(odd_folder)]
    outputs = run_together(command, envs, tmp_path)
    assert [p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()] == ["slurm-4242.0"]
    check_run(tmp_path / "logs" / "train" / "runs" / "slurm-4242.0", odd_folder, world=2)
    assert outputs[0][0].count("Best checkpoint:") == 1 and "Best checkpoint:" not in outputs[1][0]
