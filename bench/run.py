"""``make bench``: images per second of every path, against the bare-PyTorch limit, in one run.

For each image size (32 px: CIFAKE's native size with its config; 224 px: the paper's,
``experiment=paper``) and each repeat, in turn:

  a. bare train      plain forward + backward + optimizer loop of the same network, precision,
                     memory format and batch, on batches of the same folder read beforehand
                     (the same pixel values: compute on CPUs depends on them): the limit;
  b. train path      Lightning Trainer + data module reading the JPEG folder, configured by the
                     same Hydra configs as ``train.py`` (checkpointing and validation off);
  c. eval path       ``trainer.test`` as ``eval.py`` runs it, over the same folder;
  d. bare inference  plain ``inference_mode`` forward loop: the limit of c;
  e. loader          the data module's train loader alone, batches brought to what the model's
                     forward receives (resized on the device when decoded smaller);
  f. torchvision     a plain ``ImageFolder`` + ``DataLoader(num_workers=2)`` with PIL resize,
                     ``ToTensor`` and ``Normalize``: the usual way, for comparison.

Medians over the repeats; ratios b/a, c/d, e/a and e/f (medians of each repeat's ratio),
checked against the targets. Then the
recipe (``experiment=cifake_cpu``: batch 256, fused AdamW, the EMA callback) the same way, a and
b, plus what its checkpoints cost per step (one complete and one lean save, timed, spread over
the steps between two validations). Also
start-up time (listing, split and scan of the folder, second run), resident memory over a whole
loader epoch, and (``--means``, ``--compile``) what each speed measure pays. Runs on the GPU when
there is one (the bare loops too). Writes bench/results/bench-<time>.json and
bench/results/latest.json and prints the tables (``--table FILE`` prints them again). See
docs/speed.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from detector.callbacks import training_callbacks
from detector.checkpoint import lean_checkpoint
from detector.config import register_resolvers
from detector.data.preprocess import prepare_batch
from detector.hardware import resolve_precision
from detector.tasks.trainer import build_trainer

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
register_resolvers()

# Per size: the configs a user would run, and how many timed steps each measurement takes
# (after warm-up steps that are not timed). ResNet50 at 224 px on a few CPU cores takes seconds
# per step, so those counts are small; the medians over repeats absorb the noise.
SIZES = {
    32: {"overrides": ["data=cifake"], "train_steps": 16, "infer_steps": 8, "warmup": 3},
    224: {
        "overrides": ["data=cifake", "experiment=paper", "model.pretrained=false"],
        "train_steps": 3,
        "infer_steps": 3,
        "warmup": 2,
    },
}
LOADER_IMAGES = {32: 12_800, 224: 4_096}  # images timed per loader measurement
RECIPE = {"overrides": ["experiment=cifake_cpu"], "train_steps": 12, "warmup": 3}


# ---------------------------------------------------------------------------------------------
# Configs and components


def compose_cfg(name: str, overrides: list[str], out: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out / "logs")
    return cfg


def data_overrides(args) -> list[str]:
    if args.data:
        return [f"data.root={args.data}"]
    return []


class StepTimer(L.Callback):
    """Wall-clock time at the end of every training / test batch, and the batch sizes."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.sizes: list[int] = []

    def _mark(self, batch) -> None:
        sync()
        self.times.append(time.perf_counter())
        self.sizes.append(len(batch[1]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mark(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0) -> None:
        self._mark(batch)

    def rate(self, warmup: int) -> float:
        """Images per second over the batches after the first ``warmup`` (>= 1) ones: from the
        end of batch ``warmup - 1`` to the end of the last, as the bare loops count."""
        if len(self.times) <= warmup or warmup < 1:
            raise RuntimeError(f"{len(self.times)} batches ran; need more than {warmup} (>= 1)")
        images = sum(self.sizes[warmup:])
        return images / (self.times[-1] - self.times[warmup - 1])


# The device the bare loops run on: the one Lightning's accelerator "auto" picks.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    """Wait for queued GPU work, so that wall-clock times are the work's."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def autocast(precision: str):
    if str(precision).startswith("bf16"):
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    if str(precision).startswith("16"):
        return torch.autocast(DEVICE.type, dtype=torch.float16)
    return contextlib.nullcontext()


def synthetic(batch: int, size: int, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (what the model's forward receives from a loader) and float targets, on
    the device."""
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(DEVICE), torch.randint(0, 2, (batch,)).float().to(DEVICE)


def build_model(cfg: DictConfig, **changes):
    """(DetectorModule as train.py builds it, optimizer factory)."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(changes)
    model = hydra.utils.instantiate(model_cfg)
    return model


def real_batches(cfg: DictConfig, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of the train loader (augmented as in training), on the device and as the
    model's forward receives them, read before any timing starts."""
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    channels_last = bool(cfg.model.get("channels_last", False))
    batches = []
    for images, targets, *_ in datamodule.train_dataloader():
        images = prepare_batch(images.to(DEVICE), cfg.data.image_size, channels_last)
        batches.append((images, targets.float().to(DEVICE)))
        if len(batches) == n:
            return batches
    raise RuntimeError(f"the train loader gave {len(batches)} batches; the bench needs {n}")


def bare_train(
    cfg: DictConfig, precision: str, steps: int, warmup: int, batches=None, **changes
) -> float:
    """(a) The limit: the same network, optimizer, precision and batches; nothing else.
    Without ``batches``, synthetic ones (random pixels: the speed measures' comparison)."""
    model = build_model(cfg, **changes)
    net = model.net.to(DEVICE).train()
    if changes.get("compile"):
        net.compile()
    optimizer = model.optimizer_factory(params=net.parameters())
    loss_fn = torch.nn.BCEWithLogitsLoss()
    if batches is None:
        channels_last = changes.get("channels_last", model.hparams.channels_last)
        batches = [synthetic(cfg.data.batch_size, cfg.data.image_size, channels_last)]
    start = None
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        if i == warmup:
            sync()
            start = time.perf_counter()
        with autocast(precision):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    images = sum(len(batches[i % len(batches)][1]) for i in range(warmup, warmup + steps))
    return images / (time.perf_counter() - start)


def bare_infer(cfg: DictConfig, precision: str, steps: int, warmup: int, batch: int) -> float:
    """(d) The limit of inference: forward only, no autograd."""
    model = build_model(cfg)
    net = model.net.to(DEVICE).eval()
    x, _ = synthetic(batch, cfg.data.image_size, model.hparams.channels_last)
    start = None
    with torch.inference_mode():
        for i in range(warmup + steps):
            if i == warmup:
                sync()
                start = time.perf_counter()
            with autocast(precision):
                torch.sigmoid(net(x).float())
    sync()
    return steps * len(x) / (time.perf_counter() - start)


def train_path(cfg: DictConfig, out: Path, steps: int, warmup: int, keep_trainer: bool = False):
    """(b) train.py's objects: data module, model and Trainer from the configs; the config's
    callbacks (but checkpoints), the TensorBoard logger, the NaN guard; no validation."""
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    timer = StepTimer()
    built = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    # every checkpoint callback (ModelCheckpoint and its subclasses: BestCheckpoint) is off
    callbacks = [c for c in built if not isinstance(c, ModelCheckpoint)]
    trainer = build_trainer(
        cfg,
        out,
        callbacks=[timer, *callbacks, *training_callbacks()],
        max_steps=warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=datamodule)
    return (timer.rate(warmup), trainer) if keep_trainer else timer.rate(warmup)


def eval_path(cfg_eval: DictConfig, cfg: DictConfig, out: Path, steps: int, warmup: int) -> float:
    """(c) eval.py's inference: a test data module over the folder and ``trainer.test``."""
    data_cfg = OmegaConf.to_container(cfg_eval.data, resolve=True)
    data_cfg.pop("test_dirs", None)
    # what eval.py takes from the checkpoint's preprocessing contract: the training config's
    for key in ("image_size", "input", "max_tiles"):
        data_cfg[key] = cfg.data[key]
    data_cfg["test_dir"] = str(Path(cfg.data.root) / "train")
    datamodule = hydra.utils.instantiate(data_cfg)
    datamodule.setup("test")
    model = build_model(cfg)
    timer = StepTimer()
    trainer = build_trainer(
        cfg_eval,
        out,
        devices=1,
        num_nodes=1,
        strategy="auto",
        logger=False,
        callbacks=[timer],
        limit_test_batches=warmup + steps,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.test(model, dataloaders=datamodule.test_dataloader(), verbose=False)
    return timer.rate(warmup)


def loader_rate(loader, n_images: int, to_device=None) -> float:
    """Images per second after the first batch (worker start-up excluded)."""
    it = iter(loader)
    next(it)
    seen, start = 0, time.perf_counter()
    for batch in it:
        images = batch[0]
        if to_device is not None:
            images = to_device(images)
        seen += len(images)
        if seen >= n_images:
            break
    sync()
    rate = seen / (time.perf_counter() - start)
    del it
    return rate


def our_loader(cfg: DictConfig, n_images: int, **data_changes) -> float:
    """(e) The data module's train loader; batches as the model's forward receives them."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.update(data_changes)
    datamodule = hydra.utils.instantiate(data_cfg)
    datamodule.setup("fit")
    size = cfg.data.image_size
    channels_last = bool(cfg.model.get("channels_last", False))
    return loader_rate(
        datamodule.train_dataloader(),
        n_images,
        lambda x: prepare_batch(x.to(DEVICE, non_blocking=True), size, channels_last),
    )


def torchvision_loader(cfg: DictConfig, n_images: int) -> float:
    """(f) The common recipe: per-image PIL resize, ToTensor and Normalize in 2 workers."""
    from torchvision import datasets
    from torchvision import transforms as T

    size = cfg.data.image_size
    transform = T.Compose(
        [
            T.Resize((size, size)),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    dataset = datasets.ImageFolder(str(Path(cfg.data.root) / "train"), transform=transform)
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        num_workers=2,
        pin_memory=DEVICE.type == "cuda",
    )
    return loader_rate(loader, n_images, lambda x: x.to(DEVICE, non_blocking=True))


# ---------------------------------------------------------------------------------------------
# Start-up and memory


STARTUP_CODE = """
import json, sys, time, logging
logging.disable(logging.WARNING)
sys.path.insert(0, {bench!r})
from run import compose_cfg
from pathlib import Path
import hydra
cfg = compose_cfg("train", {overrides!r}, Path({out!r}))
t = time.perf_counter()
dm = hydra.utils.instantiate(cfg.data)
dm.setup("fit")
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "train": len(dm.train_set), "val": len(dm.val_set),
                  "checked": dm.scans["train"].checked, "cached": dm.scans["train"].cached}}))
"""


def startup(overrides: list[str], out: Path) -> list[dict]:
    """Listing, split and scan of the train folder (``setup("fit")``) in a fresh process, twice:
    the first run may decode every file for the scan; the second reads the scan cache."""
    code = STARTUP_CODE.format(bench=str(ROOT / "bench"), overrides=overrides, out=str(out))
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"start-up measurement failed:\n{done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


MEMORY_CODE = """
import json, sys, logging
logging.disable(logging.WARNING)
sys.path.insert(0, {bench!r})
from run import compose_cfg, memory_epoch
from pathlib import Path
cfg = compose_cfg("train", {overrides!r}, Path({out!r}))
print(json.dumps(memory_epoch(cfg, {max_images!r})))
"""


def memory(overrides: list[str], out: Path, max_images: int | None) -> dict:
    """:func:`memory_epoch` in a fresh process, so that the numbers are the loader's own."""
    code = MEMORY_CODE.format(
        bench=str(ROOT / "bench"), overrides=overrides, out=str(out), max_images=max_images
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _pss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def memory_epoch(cfg: DictConfig, max_images: int | None = None) -> dict:
    """Proportional set size (main process + loader workers) while one loader walks the whole
    train split: does resident memory grow with the number of images read? Measured without
    the image cache, whose mapped pages would add up to its stated size."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg["cache"] = False
    datamodule = hydra.utils.instantiate(data_cfg)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    me = os.getpid()
    samples, seen = [], 0
    gc.collect()
    for i, (images, _) in enumerate(loader):
        seen += len(images)
        if i % 25 == 0:
            samples.append((seen, _pss_mb(me) + sum(_pss_mb(c) for c in _children(me))))
        if max_images and seen >= max_images:
            break
    samples.append((seen, _pss_mb(me) + sum(_pss_mb(c) for c in _children(me))))
    first = samples[1] if len(samples) > 2 else samples[0]
    quarter = next((s for s in samples if s[0] >= seen / 4), first)
    return {
        "images": seen,
        "num_workers": datamodule.num_workers,
        "pss_mb_after_first_batches": round(first[1], 1),
        "pss_mb_end": round(samples[-1][1], 1),
        "pss_mb_max": round(max(s[1] for s in samples), 1),
        "growth_mb": round(samples[-1][1] - first[1], 1),
        "growth_mb_last_three_quarters": round(samples[-1][1] - quarter[1], 1),
        "trace": [[n, round(m, 1)] for n, m in samples],
    }


# ---------------------------------------------------------------------------------------------
# Machine


def machine() -> dict:
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "cpu_amx": _cpu_flag("amx_bf16"),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    versions = {}
    for name in ("torch", "torchvision", "lightning", "timm", "numpy", "PIL", "hydra"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    info["versions"] = versions
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
        ).stdout.strip()
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _cpu_flag(flag: str) -> bool:
    with contextlib.suppress(OSError):
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    return False


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------
# Runs


def measure_size(size: int, args, out: Path) -> dict:
    spec = SIZES[size]
    overrides = [*spec["overrides"], *data_overrides(args), *args.override]
    cfg = compose_cfg("train", overrides, out / f"train{size}")
    eval_overrides = [o for o in overrides if not o.startswith(("experiment=", "model."))]
    cfg_eval = compose_cfg("eval", eval_overrides, out / f"eval{size}")
    precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
    eval_precision = resolve_precision(
        cfg_eval.trainer.get("precision"), cfg_eval.trainer.get("accelerator")
    )
    steps, infer_steps, warmup = spec["train_steps"], spec["infer_steps"], spec["warmup"]
    if args.quick:
        steps, infer_steps, warmup = 2, 2, 1
    n_loader = LOADER_IMAGES[size] // (8 if args.quick else 1)
    runs: dict[str, list[float]] = {k: [] for k in "abcdef"}
    for r in range(args.repeats):
        log.info("%d px, repeat %d/%d (load %s)", size, r + 1, args.repeats, load_average())
        batches = real_batches(cfg, warmup + steps)
        runs["a"].append(bare_train(cfg, precision, steps, warmup, batches))
        del batches
        runs["b"].append(train_path(cfg, out / f"train{size}", steps, warmup))
        runs["c"].append(eval_path(cfg_eval, cfg, out / f"eval{size}", infer_steps, warmup))
        runs["d"].append(
            bare_infer(cfg, eval_precision, infer_steps, warmup, cfg_eval.data.batch_size)
        )
        runs["e"].append(our_loader(cfg, n_loader))
        runs["f"].append(torchvision_loader(cfg, n_loader))
        log.info("  %s", {k: round(v[-1], 1) for k, v in runs.items()})
        gc.collect()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "image_size": size,
        "decode_size": cfg.data.decode_size or size,
        "batch_size": cfg.data.batch_size,
        "eval_batch_size": cfg_eval.data.batch_size,
        "num_workers": cfg.data.num_workers,
        "cache": bool(cfg.data.get("cache")),
        "precision": precision,
        "eval_precision": eval_precision,
        "channels_last": bool(cfg.model.get("channels_last", False)),
        "overrides": overrides,
        "steps": {"train": steps, "infer": infer_steps, "warmup": warmup, "loader": n_loader},
        "img_per_s": {
            "a_bare_train": med["a"],
            "b_train_path": med["b"],
            "c_eval_path": med["c"],
            "d_bare_infer": med["d"],
            "e_loader": med["e"],
            "f_torchvision_loader": med["f"],
        },
        "ratios": {k: paired_ratio(runs, *k.split("/")) for k in ("b/a", "c/d", "e/a", "e/f")},
        "repeats": {k: [round(x, 2) for x in v] for k, v in runs.items()},
    }


def checkpoint_seconds(trainer: L.Trainer, out: Path) -> dict:
    """One complete save (what ``last.ckpt`` holds) and one lean one (what BestCheckpoint
    writes), as the recipe writes them at every validation."""
    seconds = {}
    for what in ("complete", "lean"):
        path = out / f"{what}.ckpt"
        start = time.perf_counter()
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if what == "lean":
            checkpoint = lean_checkpoint(checkpoint)
        trainer.strategy.save_checkpoint(checkpoint, path)
        seconds[what] = time.perf_counter() - start
        seconds[f"{what}_mb"] = path.stat().st_size / 2**20
        path.unlink()
    return seconds


def measure_recipe(args, out: Path) -> dict:
    """a and b for ``experiment=cifake_cpu`` (its callbacks on: EMA every step; checkpoints
    timed once and spread over the steps between two validations, as the recipe writes them)."""
    overrides = [*RECIPE["overrides"], *data_overrides(args), *args.override]
    cfg = compose_cfg("train", overrides, out / "recipe")
    precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
    steps, warmup = (2, 1) if args.quick else (RECIPE["train_steps"], RECIPE["warmup"])
    runs: dict[str, list[float]] = {"a": [], "b": []}
    saves = {}
    for r in range(args.repeats):
        log.info("recipe, repeat %d/%d (load %s)", r + 1, args.repeats, load_average())
        batches = real_batches(cfg, warmup + steps)
        runs["a"].append(bare_train(cfg, precision, steps, warmup, batches))
        del batches
        rate, trainer = train_path(cfg, out / "recipe", steps, warmup, keep_trainer=True)
        runs["b"].append(rate)
        if r == 0:
            saves = checkpoint_seconds(trainer, out / "recipe")
        del trainer
        log.info("  %s", {k: round(v[-1], 1) for k, v in runs.items()})
        gc.collect()
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    steps_per_val = len(datamodule.train_dataloader()) * cfg.trainer.check_val_every_n_epoch
    per_step = (saves["complete"] + saves["lean"]) / steps_per_val
    # the train path with its checkpoints: their save time spread over the steps between two
    runs["b_ckpt"] = [  # validations (one of each is written per validation)
        cfg.data.batch_size / (cfg.data.batch_size / b + per_step) for b in runs["b"]
    ]
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "name": "experiment=cifake_cpu",
        "overrides": overrides,
        "batch_size": cfg.data.batch_size,
        "precision": precision,
        "steps": {"train": steps, "warmup": warmup, "between_validations": steps_per_val},
        "img_per_s": {"a_bare_train": med["a"], "b_train_path": med["b"]},
        "checkpoint_s": saves,
        "b_with_checkpoints": med["b_ckpt"],
        "ratios": {
            "b/a": paired_ratio(runs, "b_ckpt", "a"),
            "b/a_without_checkpoints": paired_ratio(runs, "b", "a"),
        },
        "repeats": {k: [round(x, 2) for x in v] for k, v in runs.items()},
    }


def paired_ratio(runs: dict[str, list[float]], top: str, bottom: str) -> float:
    """The median over repeats of one repeat's ratio: the two paths of a repeat run back to
    back, so they share the machine's state; medians of each path taken apart would pair a
    quiet moment of one with a busy moment of the other."""
    return statistics.median(t / b for t, b in zip(runs[top], runs[bottom], strict=True))


def measure_means(args, out: Path) -> list[dict]:
    """What each measure pays, on the bare training loop: precision x memory format (and
    torch.compile with --compile), and the loader with and without the image cache."""
    rows = []
    for size in args.sizes:
        spec = SIZES[size]
        overrides = [*spec["overrides"], *data_overrides(args), *args.override]
        cfg = compose_cfg("train", overrides, out / f"means{size}")
        steps = 2 if args.quick else spec["train_steps"]
        warmup = spec["warmup"] if not args.quick else 1
        variants = [
            ("32-true", False, False),
            ("32-true", True, False),
            ("bf16-mixed", False, False),
            ("bf16-mixed", True, False),
        ]
        if args.compile:
            best = "bf16-mixed" if torch.cpu._is_avx512_bf16_supported() else "32-true"
            variants.append((best, True, True))
        for precision, channels_last, compiled in variants:
            log.info(
                "means: %d px %s channels_last=%s compile=%s",
                size,
                precision,
                channels_last,
                compiled,
            )
            start = time.perf_counter()
            rate = bare_train(
                cfg, precision, steps, warmup, channels_last=channels_last, compile=compiled
            )
            rows.append(
                {
                    "what": "bare train",
                    "image_size": size,
                    "precision": precision,
                    "channels_last": channels_last,
                    "compile": compiled,
                    "img_per_s": rate,
                    "seconds_incl_warmup": round(time.perf_counter() - start, 1),
                }
            )
        n = LOADER_IMAGES[size] // (8 if args.quick else 1)
        loaders = [(cache, workers, None) for cache in (False, True) for workers in (0, 2)]
        if size != cfg.data.decode_size:
            loaders.append((False, 2, size))  # resized on the host, image by image (PIL)
        for cache, workers, decode_size in loaders:
            changes = {"cache": cache, "num_workers": workers, "persistent_workers": False}
            if decode_size:
                changes["decode_size"] = decode_size
            rows.append(
                {
                    "what": "loader",
                    "image_size": size,
                    "decode_size": decode_size or cfg.data.decode_size or size,
                    "cache": cache,
                    "num_workers": workers,
                    "img_per_s": our_loader(cfg, n, **changes),
                }
            )
    return rows


# Targets of the issue on the 2-core CPU: (key, image size or None for all, minimum).
TARGETS = [
    ("b/a", 32, 0.92),
    ("b/a", 224, 0.95),
    ("c/d", None, 0.9),
    ("e/a", None, 5.0),
    ("e_loader", 32, 7300.0),
    ("e_loader", 224, 2900.0),
    ("e/f", 32, 2.3),
    ("e/f", 224, 2.6),
    ("startup_s", None, 10.0),  # a maximum
]


def check_targets(result: dict) -> list[dict]:
    rows = []
    if result.get("recipe"):
        value = result["recipe"]["ratios"]["b/a"]
        rows.append(
            {"what": "b/a experiment=cifake_cpu", "value": value, "min": 0.92, "met": value >= 0.92}
        )
    for key, size, bound in TARGETS:
        if key == "startup_s":
            if result.get("startup"):
                value = result["startup"][-1]["seconds"]
                rows.append({"what": key, "value": value, "max": bound, "met": value <= bound})
            continue
        for s in result["sizes"]:
            if size is not None and s["image_size"] != size:
                continue
            value = s["ratios"][key] if "/" in key else s["img_per_s"][key]
            rows.append(
                {
                    "what": key,
                    "image_size": s["image_size"],
                    "value": value,
                    "min": bound,
                    "met": value >= bound,
                }
            )
    return rows


def markdown(result: dict) -> str:
    """The README table: images per second, ratios and targets, from one run's JSON."""
    sizes = result["sizes"]
    head = "| images/s | " + " | ".join(f"{s['image_size']} px" for s in sizes) + " | target |"
    lines = [head, "|---|" + "---:|" * len(sizes) + "---|"]
    names = [
        ("a_bare_train", "a. bare train loop (the limit)", ""),
        ("b_train_path", "b. train path (Lightning + JPEG folder)", ""),
        ("b/a", "**b/a**", ">= 0.92 / 0.95"),
        ("d_bare_infer", "d. bare inference (the limit)", ""),
        ("c_eval_path", "c. eval path (`trainer.test`)", ""),
        ("c/d", "**c/d**", ">= 0.9"),
        ("e_loader", "e. our loader", ">= 7,300 / 2,900"),
        ("f_torchvision_loader", "f. torchvision ImageFolder loader", ""),
        ("e/a", "**e/a**", ">= 5"),
        ("e/f", "**e/f**", ">= 2.3 / 2.6"),
    ]
    for key, name, target in names:
        if "/" in key:
            cells = [f"{s['ratios'][key]:.2f}" for s in sizes]
        else:
            cells = [f"{s['img_per_s'][key]:,.1f}" for s in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {target} |")
    notes = []
    first = sizes[0]
    notes.append(
        f"Medians of {result['repeats']} repeats; precision {first['precision']} for training, "
        f"{first['eval_precision']} for eval; channels_last {first['channels_last']}; batch "
        + ", ".join(
            f"{s['batch_size']} (eval {s['eval_batch_size']}) at {s['image_size']} px"
            for s in sizes
        )
        + f"; decoded at {first['decode_size']} px; image cache {first['cache']}."
    )
    if result.get("startup"):
        st = result["startup"]
        notes.append(
            f"Start-up (listing, split, scan of {st[-1]['train'] + st[-1]['val']:,} files): "
            f"{st[0]['seconds']:.1f} s, then {st[-1]['seconds']:.1f} s on a second run "
            "(target <= 10 s)."
        )
    if result.get("memory"):
        m = result["memory"]
        notes.append(
            f"Memory over a loader epoch of {m['images']:,} images (main + {m['num_workers']} "
            f"workers, PSS): {m['pss_mb_after_first_batches']:.0f} MB after the first batches, "
            f"{m['pss_mb_end']:.0f} MB at the end ({m['growth_mb_last_three_quarters']:+.1f} MB "
            "over the last three quarters)."
        )
    if result.get("cache_files_mb"):
        total = sum(result["cache_files_mb"].values())
        notes.append(f"Image cache files: {total:,.0f} MB on disk.")
    m = result["machine"]
    notes.append(
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['versions'].get('torch')}, "
        f"lightning {m['versions'].get('lightning')}; load average "
        f"{result['load_average_start']} at the start, {result['load_average_end']} at the end; "
        f"{result['seconds']:.0f} s in all."
    )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def markdown_recipe(result: dict) -> str:
    r = result.get("recipe")
    if not r:
        return ""
    saves = r["checkpoint_s"]
    rows = [
        (
            "a. bare train loop (the limit), batch " + str(r["batch_size"]),
            f"{r['img_per_s']['a_bare_train']:,.1f}",
            "",
        ),
        (
            "b. train path, callbacks on (EMA every step)",
            f"{r['img_per_s']['b_train_path']:,.1f}",
            "",
        ),
        (
            f"checkpoints per validation: complete {saves['complete']:.2f} s "
            f"({saves['complete_mb']:.0f} MB) + lean {saves['lean']:.2f} s "
            f"({saves['lean_mb']:.0f} MB), every {r['steps']['between_validations']:,} steps",
            f"{r['b_with_checkpoints']:,.1f}",
            "",
        ),
        ("**b/a** (checkpoints included)", f"{r['ratios']['b/a']:.3f}", ">= 0.92"),
    ]
    lines = ["| `experiment=cifake_cpu`, 32 px | images/s | target |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def markdown_means(result: dict) -> str:
    rows = result.get("means") or []
    if not rows:
        return ""
    lines = [
        "| measure | image size | images/s |",
        "|---|---:|---:|",
    ]
    for r in rows:
        if r["what"] == "bare train":
            what = f"bare train, {r['precision']}, " + (
                "channels_last" if r["channels_last"] else "NCHW"
            )
            if r["compile"]:
                what += f", torch.compile (first call {r['seconds_incl_warmup']:.0f} s)"
        else:
            what = (
                f"loader, decoded at {r['decode_size']} px, "
                f"{'cache' if r['cache'] else 'JPEG'}, {r['num_workers']} workers"
            )
        lines.append(f"| {what} | {r['image_size']} | {r['img_per_s']:,.1f} |")
    return "\n".join(lines) + "\n"


def print_table(result: dict) -> None:
    print("\n" + markdown(result))
    if result.get("recipe"):
        print(markdown_recipe(result))
    if result.get("means"):
        print(markdown_means(result))
    missed = [t for t in result.get("targets", []) if not t["met"]]
    print("targets: all met" if not missed else f"targets missed: {missed}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", help="a folder with train/<CLASS>/ (default: data/cifake)")
    parser.add_argument("--override", action="append", default=[], help="a Hydra override")
    parser.add_argument("--means", action="store_true", help="also measure each speed measure")
    parser.add_argument("--compile", action="store_true", help="with --means: torch.compile too")
    parser.add_argument("--no-startup", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-recipe", action="store_true", help="skip experiment=cifake_cpu")
    parser.add_argument("--quick", action="store_true", help="a smoke run, numbers meaningless")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", type=Path, help="only print the tables of a results JSON")
    args = parser.parse_args(argv)
    if args.table:
        result = json.loads(args.table.read_text())
        print(markdown(result) + "\n" + markdown_recipe(result) + "\n" + markdown_means(result))
        return result
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "detector"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.data is None and not (ROOT / "data" / "cifake" / "train").is_dir():
        from detector.data.demo import ensure_demo

        demo = ROOT / "data" / "demo"
        ensure_demo(demo)
        args.data = str(demo)
        log.info("no data/cifake/train: measuring on the demo set %s", demo)
    started = time.time()
    result = {
        "when": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "device": str(DEVICE),
        "data": args.data or str(ROOT / "data" / "cifake"),
        "load_average_start": load_average(),
        "repeats": args.repeats,
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp)
        overrides = ["data=cifake", *data_overrides(args), *args.override]
        if not args.no_startup:
            log.info("start-up: listing, split and scan of the train folder (twice)")
            result["startup"] = startup(overrides, out / "startup")
        if not args.no_memory:
            log.info("memory: one loader epoch over the train split")
            result["memory"] = memory(overrides, out / "memory", 20_000 if args.quick else None)
        result["sizes"] = [measure_size(size, args, out) for size in args.sizes]
        if not args.no_recipe:
            result["recipe"] = measure_recipe(args, out)
        if args.means:
            result["means"] = measure_means(args, out)
    cache_dir = Path(result["data"]) / ".detector-cache"
    result["cache_files_mb"] = {
        p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(cache_dir.glob("images-*.npy"))
    }
    result["load_average_end"] = load_average()
    result["seconds"] = round(time.time() - started, 1)
    result["targets"] = check_targets(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = json.dumps(result, indent=2)
    (args.out / f"bench-{stamp}.json").write_text(text)
    (args.out / "latest.json").write_text(text)
    print_table(result)
    print(f"\nwritten: {args.out / f'bench-{stamp}.json'} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
