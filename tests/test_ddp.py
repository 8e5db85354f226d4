"""DDP with CPU processes (gloo) through the real command line: one machine with two ranks,
two torchrun "nodes" on 127.0.0.1, an emulated two-node SLURM step, and Hydra multirun.

Every multi-process run checks the same facts: one run folder, one set of checkpoints, one
TensorBoard stream (written by global rank 0 only), each log line once, a history figure, the
global batch, and validation/test numbers equal to a one-device evaluation of the checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf

from detector.data.datamodule import ImageFolderDataModule
from detector.data.datasets import ShardSampler
from detector.distributed import check_launch, launcher_rank_is_zero, launcher_run_id
from detector.errors import ConfigError, DataError
from tests.conftest import ROOT, TINY, compose_config, make_image_folder, run_script

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


# A collective that one rank enters and another never reaches fails the run after this many
# seconds (with its stack) instead of hanging the test suite; real runs wait 1800 s.
DDP_TIMEOUT = 60


def run_args(data_root: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    """The tests' fast settings with every default callback on (the progress bar too)."""
    return [
        *TINY,
        "data=imagefolder",
        f"data.root={data_root}",
        f"data.val_fraction={VAL_FRACTION}",
        f"trainer.max_epochs={epochs}",
        f"ddp_timeout={DDP_TIMEOUT}",
        *extra,
    ]


class Launched:
    """A command started as a user starts it: stdout and stderr to files (nohup, SLURM, CI), or
    both to a pseudo-terminal of 120 columns (an interactive shell; the rich progress bar draws).

    It runs in a session of its own, so that the ranks it starts can be killed with it.
    """

    def __init__(self, command: list[str], cwd: Path, env: dict, tty: bool, name: str = "out"):
        cwd.mkdir(parents=True, exist_ok=True)
        self.tty = tty
        self._chunks: list[bytes] = []
        if tty:
            master, slave = pty.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            streams = {"stdin": slave, "stdout": slave, "stderr": slave}
        else:
            self.out_file, self.err_file = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
            streams = {
                "stdin": subprocess.DEVNULL,
                "stdout": self.out_file.open("w"),
                "stderr": self.err_file.open("w"),
            }
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True, **streams)
        if tty:
            os.close(slave)
            self._reader = threading.Thread(target=self._drain, args=(master,), daemon=True)
            self._reader.start()
        else:
            streams["stdout"].close()
            streams["stderr"].close()

    def _drain(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                break
            if not data:
                break
            self._chunks.append(data)
        os.close(fd)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float) -> tuple[int, str, str]:
        """(exit code, stdout, stderr); under a terminal both are the terminal's text. A run
        still going after ``timeout`` seconds is killed with its ranks and fails the test."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            tail = self.text()[1][-3000:]
            raise AssertionError(f"still running after {timeout} s: {tail}") from None
        if self.tty:
            self._reader.join(timeout=30)
        return self.proc.returncode, *self.text()

    def text(self) -> tuple[str, str]:
        if self.tty:
            out = b"".join(self._chunks).decode(errors="replace")
            return out, out
        return self.out_file.read_text(), self.err_file.read_text()


def launch(command: list[str], cwd: Path, tty: bool, timeout: float = 300, env=None):
    """Run ``command`` to the end as :class:`Launched` does; returns (code, stdout, stderr)."""
    run = Launched(command, cwd, env or clean_env(), tty)
    try:
        return run.wait(timeout)
    finally:
        run.kill()  # any rank left behind


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
    from detector.checkpoint import load_checkpoint

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


def check_run(
    run: Path, data_root: Path, world: int, accumulate: int = 1, batch: int = BATCH
) -> dict:
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
    # as on one device (drop_last: 37 // 8 = 4 batches per epoch; a training set smaller than
    # one batch is one short batch).
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    batches = max(n_train(data_root) // batch, 1)
    assert last["global_step"] == EPOCHS * batches // accumulate
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
    assert_same_ood_model(best_ckpt, data_root)
    assert metrics["ood"]["n"] == n_test  # every rank's scores gathered for the report
    return metrics


def assert_same_ood_model(ckpt: Path, data_root: Path) -> None:
    """The out-of-domain model fitted on the ranks' gathered features equals a one-device fit
    with the same weights on the same split (each image once)."""
    from detector.checkpoint import load_checkpoint, load_checkpoint_file
    from detector.evaluation.ood import fit_on_data

    stored = load_checkpoint_file(ckpt)["ood"]
    dm = ImageFolderDataModule(
        root=str(data_root), val_fraction=VAL_FRACTION, image_size=32, batch_size=BATCH,
        num_workers=0,
    )  # fmt: skip
    dm.setup("fit")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    alone = fit_on_data(load_checkpoint(ckpt), dm, trainer, stored["feature"], 0.95).state()
    assert stored["info"] == alone["info"]
    # the default: Gaussians of log_stages, nearest neighbours of the stages and the image
    assert set(stored["means"]) == set(alone["means"]) == {"log_stages"}
    assert set(stored["neighbours"]) == set(alone["neighbours"]) == {"stages_nn", "image_nn"}
    for part in stored["means"]:
        assert torch.allclose(stored["means"][part], alone["means"][part], rtol=1e-4, atol=1e-6)
    for part, state in stored["neighbours"].items():
        # the same rows in the same order (dataset order); principal directions up to a sign
        mine, theirs = state["bank"], alone["neighbours"][part]["bank"]
        assert mine.shape == theirs.shape
        assert torch.allclose(mine.abs(), theirs.abs(), rtol=1e-3, atol=1e-3), part
    # The precision matrices are ill-conditioned (near-dead units): compared through what they
    # compute, the scales and the threshold.
    ours = [*stored["scales"].values(), stored["threshold"]]
    reference = [*alone["scales"].values(), alone["threshold"]]
    for a, b in zip(ours, reference, strict=True):
        assert math.isclose(a, b, rel_tol=1e-3), (a, b)


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


def eval_command(ckpt: Path, data_root: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "eval.py"),
        f"ckpt={ckpt}",
        "data=imagefolder",
        f"data.root={data_root}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
    ]


def the_run(cwd: Path) -> Path:
    runs = list((cwd / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def best_checkpoint(run: Path) -> Path:
    (best,) = [p for p in (run / "checkpoints").iterdir() if p.name != "last.ckpt"]
    return best


def test_headline_command_ends_and_matches_one_device_eval(tmp_path):
    """The README's ``python train.py trainer.devices=2`` as a new user runs it (issue #22):
    the default model (ResNet50), config and callbacks, stdout and stderr in files. It once
    hung for ever after the first epoch: the progress bar computed synced metrics on rank 0
    only while rank 1 waited in another collective."""
    data = make_image_folder(tmp_path / "data", n_train=64, n_test=32)
    command = [sys.executable, str(ROOT / "train.py"), f"data.root={data}"]
    command += ["data.image_size=32", "data.batch_size=32", "data.num_workers=0"]
    command += ["trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.devices=2"]
    command += ["trainer.strategy=ddp", f"ddp_timeout={DDP_TIMEOUT}"]
    code, out, err = launch(command, tmp_path, tty=False, timeout=180)
    assert code == 0, err[-3000:]
    run = the_run(tmp_path)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert out.count("Best checkpoint:") == 1
    code, _, err = launch(eval_command(best_checkpoint(run), data), tmp_path, tty=False)
    assert code == 0, err[-3000:]
    (eval_run,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert_same_report(metrics, json.loads((eval_run / "metrics.json").read_text()))
    assert_same_predictions(run / "predictions.csv", eval_run / "predictions.csv")


@pytest.mark.parametrize(
    ("tty", "batch", "accumulate"),
    [
        (False, BATCH, 2),  # 4 full batches an epoch, accumulated by 2
        (True, 48, 1),  # 37 images < one batch: each rank gets one short batch (19 of 24)
    ],
    ids=["stdout-file", "pty"],
)
def test_ddp_two_cpu_ranks_one_run(odd_folder, tmp_path, tty, batch, accumulate):
    """``python train.py trainer=ddp_cpu`` with the default callbacks (progress bar on) and
    uneven validation (6 + 5) and test (8 + 7) shards; then ``python eval.py ckpt=...`` on one
    device gives the same test numbers."""
    args = run_args(odd_folder, f"data.batch_size={batch}")
    args += [f"trainer.accumulate_grad_batches={accumulate}"]
    command = [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *args]
    code, out, err = launch(command, tmp_path, tty=tty)
    assert code == 0, err[-3000:]
    run = the_run(tmp_path)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["train"]
    # Rank 0 is the process the user started: its pid names the folder and the event files.
    pid = run.name.rsplit("_", 1)[1]
    assert {e.name.split(".")[-2] for e in (run / "tensorboard").glob("events.*")} == {pid}
    metrics = check_run(run, odd_folder, world=2, accumulate=accumulate, batch=batch)
    # Printed once: the report and the closing lines come from rank 0 only.
    assert out.count("Best checkpoint:") == 1
    assert out.count("Confusion matrix") == 1
    if tty:
        assert "Epoch 1/1" in out or "Epoch 1" in out  # the progress bar drew on the terminal

    code, _, err = launch(eval_command(best_checkpoint(run), odd_folder), tmp_path, tty=False)
    assert code == 0, err[-3000:]
    (eval_run,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    assert_same_report(metrics, json.loads((eval_run / "metrics.json").read_text()))
    assert_same_predictions(run / "predictions.csv", eval_run / "predictions.csv")


def test_a_rank_that_stops_answering_fails_the_run_within_the_timeout(odd_folder, tmp_path):
    """The guard for the next collective that only some ranks reach: rank 1 stops at the end
    of the first epoch; rank 0 gives up after ``ddp_timeout`` with the stack of the collective
    it waited in, and takes rank 1 down with it."""
    env = {**clean_env(), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu"]
    command += run_args(odd_folder, "ddp_timeout=10", "test=false")
    command += ["+callbacks.straggler._target_=tests.ddp_faults.Straggler"]
    code, out, err = launch(command, tmp_path, tty=False, timeout=240, env=env)
    assert code != 0, out[-2000:]
    assert re.search(r"[Tt]imed? ?out", err), err[-3000:]
    assert "Traceback" in err
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.slow
@pytest.mark.parametrize("tty", [False, True], ids=["stdout-file", "pty"])
def test_ddp_resume_from_last_continues_the_run(odd_folder, tmp_path, tty):
    """``ckpt_path=last`` under DDP: both ranks resolve the same last.ckpt, continue in the run
    folder that wrote it, and end with as many steps as an uninterrupted run."""
    base = [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu"]
    code, _, err = launch([*base, *run_args(odd_folder, epochs=1)], tmp_path, tty=tty)
    assert code == 0, err[-3000:]
    first = the_run(tmp_path)
    code, out, err = launch([*base, *run_args(odd_folder, "ckpt_path=last")], tmp_path, tty=tty)
    assert code == 0, err[-3000:]
    assert f"training continues in {first}" in (out + err).replace("\r\n", "")
    last = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == EPOCHS - 1
    assert last["global_step"] == EPOCHS * (n_train(odd_folder) // BATCH)
    assert len(scalars(first / "tensorboard")["val/auroc"]) == EPOCHS
    assert (first / "metrics.json").is_file()
    assert_same_ood_model(best_checkpoint(first), odd_folder)  # refitted for the resumed weights


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


def run_together(
    command: list[str], envs: list[dict], cwd: Path, tty: bool
) -> list[tuple[str, str]]:
    """Start one process per environment (each on its own terminal with ``tty``), wait for all
    (killing all on a hang or failure of the test), and check that each exited 0; returns their
    (stdout, stderr)."""
    runs = [Launched(command, cwd, env, tty, name=f"node{i}") for i, env in enumerate(envs)]
    try:
        results = [run.wait(timeout=600) for run in runs]
    finally:
        for run in runs:
            run.kill()
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return [(out, err) for _, out, err in results]


@pytest.mark.slow
@pytest.mark.parametrize("tty", [False, True], ids=["stdout-file", "pty"])
def test_torchrun_two_nodes_on_loopback(odd_folder, tmp_path, tty):
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
    outputs = run_together(command, envs, tmp_path, tty)
    assert [p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()] == ["loopback"]
    run = tmp_path / "logs" / "train" / "runs" / "loopback"
    metrics = check_run(run, odd_folder, world=2)
    assert outputs[0][0].count("Best checkpoint:") == 1
    assert "Best checkpoint:" not in outputs[1][0]  # node 1 prints nothing of its own

    from detector.tasks.evaluate import evaluate

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
@pytest.mark.parametrize("tty", [False, True], ids=["stdout-file", "pty"])
def test_slurm_two_tasks_emulated(odd_folder, tmp_path, tty):
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
    outputs = run_together(command, envs, tmp_path, tty)
    assert [p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()] == ["slurm-4242.0"]
    check_run(tmp_path / "logs" / "train" / "runs" / "slurm-4242.0", odd_folder, world=2)
    assert outputs[0][0].count("Best checkpoint:") == 1 and "Best checkpoint:" not in outputs[1][0]
