"""What a new user hits (issue #19): typos caught, --help that describes keys, TensorBoard that
compares train with val and runs with runs, results and progress where the user looks, and a
run that stops cleanly on Ctrl-C / SIGTERM."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, make_image_folder, run_script
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from detector.checkpoint import load_checkpoint_file
from detector.cli import preflight
from detector.evaluation.plots import plot_history

NOISE = ("GPU available", "TPU available", "Tip:", "LeafSpec", "litlogger", "sync_dist=True")


def _preflight_error(capsys, entry: str, *args: str) -> str:
    with pytest.raises(SystemExit) as stop:
        preflight(entry, [str(ROOT / f"{entry}.py"), *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    return err


def test_a_typo_is_one_error_line_naming_the_closest_key(tmp_path, capsys):
    result = run_script("predict.py", "ckpt=x.ckpt", "input=x.png", "treshold=0.9", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: predict.py has no setting 'treshold' (did you mean threshold?); "
        "python predict.py --help lists its settings"
    ]
    # Hydra's own advice, +treshold=0.9, must not run with the threshold unchanged.
    err = _preflight_error(capsys, "predict", "+treshold=0.9")
    assert "+treshold=0.9 adds a setting that predict.py never reads" in err
    assert "did you mean threshold?" in err
    assert "did you mean trainer.max_epochs" in _preflight_error(
        capsys, "eval", "trainer.max_epoch=1"
    )
    assert "did you mean batch_size?" in _preflight_error(capsys, "predict", "data.batchsize=3")
    assert "did you mean data.root?" in _preflight_error(capsys, "train", "+data.rot=x")
    assert "add it with +trainer.max_steps=60" in _preflight_error(
        capsys, "train", "trainer.max_steps=60"
    )


def test_overrides_that_are_read_pass_the_check(capsys):
    for entry, args in [
        ("train", ["data=demo_hr", "data.input=crop", "trainer.max_epochs=2", "seed=1"]),
        ("train", ["+model.scheduler._target_=torch.optim.lr_scheduler.StepLR"]),
        ("train", ["+callbacks.extra={_target_: detector.callbacks.History}", "-m", "seed=1,2"]),
        ("train", ["experiment=cifake_cpu", "hydra.run.dir=/tmp/x", "hydra.job.name=t_1"]),
        ("train", ["+trainer.max_steps=60", "+trainer.profiler=simple"]),
        ("eval", ["ckpt=a.ckpt", "data.test_dirs={a: x}", "robustness=default"]),
        ("predict", ["ckpt=a.ckpt", "input=x", "max_pixels=100", "~format"]),
    ]:
        preflight(entry, [str(ROOT / f"{entry}.py"), *args])  # returns: no SystemExit
    assert capsys.readouterr().err == ""


def test_help_shows_the_keys_that_command_reads_with_their_meaning(tmp_path):
    result = run_script("predict.py", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "threshold=null" in out and "the threshold stored in the checkpoint" in out
    assert "max_pixels=89478485" in out and "refused from their header" in out
    assert "Groups" not in out and "data." not in out and "trainer" not in out
    train = run_script("train.py", "data=demo_hr", "--help", cwd=tmp_path).stdout
    assert "data        cifake, demo, demo_b, demo_hr*, forensynths, genimage, imagefolder" in train
    assert "data.input=crop" in train and "native resolution" in train
    assert "trainer.max_epochs=" in train and "callbacks.ema=null" in train


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> dict:
    """``python train.py ... > run.log``: the default callbacks and logger, stdout a file."""
    data = make_image_folder(tmp_path_factory.mktemp("data"), n_train=24, n_test=8)
    out = tmp_path_factory.mktemp("two_epochs")
    result = run_script(
        "train.py",
        *[a for a in TINY if not a.startswith("trainer.max_epochs")],
        "data=imagefolder",
        f"data.root={data}",
        "trainer.max_epochs=2",
        f"hydra.run.dir={out}",
        cwd=out,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"dir": out, "data": data, "stdout": result.stdout, "stderr": result.stderr}


def test_tensorboard_overlays_train_and_val_and_lists_the_run_in_hparams(two_epochs):
    events = EventAccumulator(str(two_epochs["dir"] / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert "epoch" not in scalars and "lr" in scalars
    assert not any(t.startswith("lr-") for t in scalars)
    for tag in ("train/loss", "val/loss", "val/auroc", "lr"):
        assert [e.step for e in events.Scalars(tag)] == [0, 1], tag  # epochs, as in ckpt names
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    for metric in ("loss", "acc", "precision", "recall", "f1", "auroc"):
        assert charts[metric] == [f"train/{metric}", f"val/{metric}"]
        assert f"train/{metric}" in scalars and f"val/{metric}" in scalars
    hparams = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"])
    metric_tags = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"hp/val_auroc", "hp/best_val_auroc", "hp/val_loss"} <= metric_tags
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert values["model.backbone"].string_value == "test_resnet"
    assert values["trainer.max_epochs"].number_value == 2
    best = events.Scalars("hp/best_val_auroc")[0].value
    assert best == pytest.approx(max(e.value for e in events.Scalars("val/auroc")))


def test_progress_lines_reach_a_redirected_stdout_and_noise_does_not(two_epochs):
    lines = [x for x in two_epochs["stdout"].splitlines() if x.startswith("[train] ")]
    assert [x.split("  ")[0] for x in lines] == ["[train] epoch 1/2", "[train] epoch 2/2"]
    assert all("img/s" in x and "loss " in x for x in lines) and "ETA" in lines[0]
    for noise in NOISE:
        assert noise not in two_epochs["stdout"] + two_epochs["stderr"], noise
    log = (two_epochs["dir"] / "train.log").read_text()
    assert "Best checkpoint:" in log and "[train] epoch 2/2" in log


def test_history_figure_marks_the_best_epoch_and_plots_auroc():
    history = [
        {"epoch": 0, "train/auroc": 0.6, "val/auroc": 0.7, "train/loss": 0.7, "val/loss": 0.6},
        {"epoch": 1, "train/auroc": 0.8, "val/auroc": 0.9, "train/loss": 0.5, "val/loss": 0.4},
        {"epoch": 2, "train/auroc": 0.9, "val/auroc": 0.8, "train/loss": 0.3, "val/loss": 0.5},
    ]
    fig = plot_history(history, best_epoch=1)
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert {"acc", "precision", "recall", "f1", "auroc", "loss"} == set(axes)
    auroc = axes["auroc"]
    assert "AUROC" in auroc.get_ylabel() and auroc.get_xlabel().startswith("epoch")
    lines = {line.get_label(): line for line in auroc.get_lines()}
    assert list(lines["val"].get_xdata()) == [0, 1, 2]  # numbered like epoch000.ckpt
    assert list(lines["best (epoch001)"].get_xdata()) == [1, 1]


def test_predict_prints_each_verdict_names_skipped_files_and_logs_it(trained_run, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for src in sorted((trained_run["data"] / "test" / "REAL").glob("*.jpg"))[:2]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "phone.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "notes.md").write_text("hello")
    result = run_script(
        "predict.py",
        f"ckpt={trained_run['ckpt']}",
        f"input={folder}",
        "output=p.csv",
        "num_workers=0",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        line = f"{row['path']}: {row['label']} (P(REAL)={float(row['prob_REAL']):.4f}, threshold"
        assert line in result.stdout
    assert "2 other files skipped" in result.stdout
    shown = result.stdout + result.stderr  # the warning goes where Hydra's log console is
    assert "skipped 2 files of input=" in shown
    assert "phone.HEIC (.heic images are not supported: convert to JPEG or PNG)" in shown
    assert "notes.md (not an image file name" in shown
    (log,) = (tmp_path / "logs" / "predict" / "runs").glob("*/predict.log")
    text = log.read_text()
    assert "Scored 2 of 2 images" in text and "phone.HEIC" in text and rows[0]["path"] in text


def test_prose_is_not_a_list_of_paths_and_limits_are_named_as_settable(trained_run, tmp_path):
    (tmp_path / "story.txt").write_text("Once upon a time\nthere was a detector.\n")
    result = run_script(
        "predict.py", f"ckpt={trained_run['ckpt']}", "input=story.txt", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "input=story.txt: not an image and not a list of paths" in result.stderr
    image = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    result = run_script(
        "predict.py",
        f"ckpt={trained_run['ckpt']}",
        f"input={image}",
        "max_pixels=1000",
        "output=p.jsonl",
        "num_workers=0",
        cwd=tmp_path,
    )
    assert result.returncode == 2  # nothing could be read
    (row,) = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert "over max_pixels=1,000" in row["error"] and "data.max_pixels" not in row["error"]


def test_eval_says_where_it_wrote_and_export_stores_an_absolute_checkpoint(trained_run, tmp_path):
    out = tmp_path / "ev"
    overrides = [f"ckpt={trained_run['ckpt']}", "data=imagefolder", "data.num_workers=0"]
    overrides += [f"data.root={trained_run['data']}", "trainer.accelerator=cpu"]
    result = run_script("eval.py", *overrides, f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Written to {out}:" in result.stdout
    assert "metrics.json, predictions.csv, sets.csv, sets.json" in result.stdout
    assert "confusion_matrix.png" in result.stdout
    assert "Written to" in (out / "eval.log").read_text()
    ckpt = trained_run["ckpt"]
    relative = os.path.relpath(ckpt, tmp_path)
    result = run_script(
        "export.py", f"ckpt={relative}", "format=torchscript", "output=m.pt", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads((tmp_path / "m.pt.json").read_text())
    assert info["checkpoint"] == str(ckpt.resolve())


def _processes_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _interrupt_training(tmp_path: Path, data: Path, sig: int, extra: list[str]) -> tuple:
    out = tmp_path / "run"
    args = [a for a in TINY if not a.startswith(("trainer.max_epochs", "data.batch_size"))]
    command = [sys.executable, str(ROOT / "train.py"), *args, "data=imagefolder"]
    command += [f"data.root={data}", "trainer.max_epochs=500", "data.batch_size=4"]
    command += [f"hydra.run.dir={out}", "callbacks.progress_log.every_s=0", *extra]
    log = open(tmp_path / "stdout.log", "w")  # noqa: SIM115 - read while the run goes on
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while "[train] epoch 2/500" not in (tmp_path / "stdout.log").read_text():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no progress line within 240 s"
        time.sleep(0.5)
    proc.send_signal(sig)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    while _processes_with(f"hydra.run.dir={out}") and time.monotonic() - start < 30:
        time.sleep(0.2)
    elapsed = time.monotonic() - start
    log.close()
    return out, stderr, elapsed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_stopped_run_saves_last_ckpt_and_prints_how_to_resume(tmp_path, sig):
    data = make_image_folder(tmp_path / "data", n_train=16, n_test=4)
    out, stderr, elapsed = _interrupt_training(tmp_path, data, sig, [])
    assert elapsed < 30 and not _processes_with(f"hydra.run.dir={out}")
    assert "resume with: python train.py " in stderr and stderr.rstrip().endswith("ckpt_path=last")
    checkpoint = load_checkpoint_file(out / "checkpoints" / "last.ckpt", setting="last.ckpt")
    assert checkpoint["global_step"] > 0 and checkpoint["state_dict"]


def test_sigterm_stops_every_rank_of_a_ddp_run(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=16, n_test=4)
    ddp = ["trainer=ddp_cpu", "trainer.devices=2", "ddp_timeout=60"]
    out, stderr, elapsed = _interrupt_training(tmp_path, data, signal.SIGTERM, ddp)
    assert elapsed < 30 and not _processes_with(f"hydra.run.dir={out}")
    assert "resume with:" in stderr
    assert load_checkpoint_file(out / "checkpoints" / "last.ckpt", setting="x")["global_step"]
