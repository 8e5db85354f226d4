"""The fast paths give the same numbers as the plain ones: on-device batch resizing, the batched
JPEG loader, the memory-mapped image cache, the precision default. No timings are asserted."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from detector import hardware
from detector.data import cache as cache_mod
from detector.data import decode
from detector.data.cache import CachedImageDataset
from detector.data.datamodule import ImageFolderDataModule
from detector.data.datasets import BatchedImageDataset, ImageDataset, collate
from detector.data.decode import jpeg_header, pil_to_input
from detector.data.preprocess import PIL_TOLERANCE, prepare_batch, resize_batch
from detector.errors import ConfigError
from detector.module import DetectorModule
from tests.conftest import TINY, compose_config

RNG = np.random.default_rng(0)


def _photo(size: int, seed: int = 0) -> np.ndarray:
    """Smooth colour field plus noise: compresses like a photo, not like pure noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(30, 225, (4, 4, 3))
    img = np.kron(base, np.ones((size // 4 + 1, size // 4 + 1, 1)))[:size, :size]
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def _pil_batch(arrays, size: int) -> torch.Tensor:
    return torch.stack([pil_to_input(Image.fromarray(a), size) for a in arrays])


def _nchw(arrays) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- on-device resize


@pytest.mark.parametrize("src,dst", [(32, 224), (24, 32), (17, 40), (64, 32), (50, 224)])
def test_batch_resize_matches_pil_per_image_within_tolerance(src, dst):
    arrays = [RNG.integers(0, 256, (src, src, 3), dtype=np.uint8) for _ in range(3)]
    arrays.append(_photo(src))
    reference = _pil_batch(arrays, dst).int()
    x = _nchw(arrays)
    out = resize_batch(x, dst)  # uint8 on the CPU: PyTorch's uint8 kernel
    assert out.dtype == torch.uint8 and out.shape == (4, 3, dst, dst)
    assert (out.int() - reference).abs().max().item() <= PIL_TOLERANCE
    # The float path (what a GPU runs), checked on the CPU: within rounding of the same.
    out_f = resize_batch(x.float() / 255, dst) * 255
    assert out_f.dtype == torch.float32
    assert (out_f - reference).abs().max().item() <= PIL_TOLERANCE + 0.05


def test_upscaling_cifake_to_224_is_pil_exactly():
    arrays = [_photo(32, seed) for seed in range(4)]
    assert torch.equal(resize_batch(_nchw(arrays), 224), _pil_batch(arrays, 224))


def test_prepare_batch_keeps_labels_layout_and_same_size_inputs():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1])
    images, labels = prepare_batch((x, y), 32, channels_last=True)
    assert images.shape == (2, 3, 32, 32) and labels is y
    assert images.is_contiguous(memory_format=torch.channels_last)
    images, labels = prepare_batch([x, y], 32, channels_last=False)
    assert images.is_contiguous() and images.shape[-1] == 32
    assert prepare_batch(x, 16) is x  # already at size: untouched, still uint8
    assert prepare_batch({"not": "a batch"}, 16) == {"not": "a batch"}


def test_module_resizes_batches_on_the_device():
    model = DetectorModule(backbone="test_resnet", image_size=32)
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    images = model.prepare(x)
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(images, resize_batch(x, 32))
    seen = []
    model.net.forward = lambda batch: seen.append(batch.shape) or torch.zeros(len(batch))
    model.validation_step((x, torch.tensor([0, 1])), 0)
    model.training_step((x, torch.tensor([0, 1])), 0)
    assert seen == [(2, 3, 32, 32)] * 2


def test_channels_last_changes_layout_not_results():
    torch.manual_seed(0)
    plain = DetectorModule(backbone="test_resnet", image_size=32).eval()
    fast = DetectorModule(backbone="test_resnet", image_size=32, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    conv = next(m for m in fast.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.allclose(plain(x), fast(x), atol=1e-5)


def test_compile_flag_compiles_the_network_for_fit_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append(self))
    model = DetectorModule(backbone="test_resnet", image_size=32, compile=True)
    model.setup("test")
    assert calls == []
    model.setup("fit")
    model.setup("fit")
    assert calls == [model.net]
    assert "net._orig_mod" not in " ".join(model.state_dict())  # checkpoints keep their keys


# --------------------------------------------------------------------------- batched loader


def _save(array: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _with_orientation(array: np.ndarray, path: Path, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(array, path, quality=90, exif=exif.tobytes())


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> list[tuple[str, int]]:
    """Every kind of file the fast decoder must either decode like PIL or hand back to PIL."""
    root = tmp_path_factory.mktemp("mixed")
    files = []
    for i in range(6):
        files.append(_save(_photo(32, i), root / f"plain{i}.jpg", quality=75))
    files.append(_save(_photo(32, 9), root / "q100_444.jpg", quality=100, subsampling=0))
    files.append(_save(_photo(32, 9), root / "progressive.jpg", quality=80, progressive=True))
    files.append(_save(_photo(32, 10)[..., 0], root / "grey.jpg", quality=85))
    files.append(_save(_photo(32, 11), root / "png.png"))
    files.append(_save(_photo(48, 12), root / "larger.jpg", quality=85))
    files.append(_with_orientation(_photo(32, 13)[:, :24], root / "rotated.jpg", 6))
    cmyk = Image.fromarray(_photo(32, 14)).convert("CMYK")
    cmyk.save(root / "cmyk.jpg", quality=90)
    files.append(root / "cmyk.jpg")
    return [(str(p), i % 2) for i, p in enumerate(files)]


def test_jpeg_header_reads_size_components_and_exif(mixed_folder):
    by_name = {Path(p).name: Path(p).read_bytes() for p, _ in mixed_folder}
    assert jpeg_header(by_name["plain0.jpg"]) == (32, 32, 3, False)
    assert jpeg_header(by_name["progressive.jpg"]) == (32, 32, 3, False)
    assert jpeg_header(by_name["grey.jpg"]) == (32, 32, 1, False)
    assert jpeg_header(by_name["larger.jpg"]) == (48, 48, 3, False)
    assert jpeg_header(by_name["rotated.jpg"])[3] is True
    assert jpeg_header(by_name["cmyk.jpg"])[2] == 4
    assert jpeg_header(by_name["png.png"]) is None
    assert jpeg_header(b"\xff\xd8\xff") is None
    assert jpeg_header(b"<html>not an image</html>") is None


def test_batched_loader_gives_the_pil_paths_pixels_for_every_kind_of_file(mixed_folder):
    plain = ImageDataset(mixed_folder, 32)
    fast = BatchedImageDataset(mixed_folder, 32)
    images, labels = collate(fast.__getitems__(list(range(len(mixed_folder)))))
    assert images.dtype == torch.uint8 and images.shape == (len(mixed_folder), 3, 32, 32)
    assert images.is_contiguous(memory_format=torch.channels_last)  # made in the worker
    for i in range(len(mixed_folder)):
        expected, label = plain[i]
        assert torch.equal(images[i], expected), mixed_folder[i][0]
        assert labels[i].item() == label
    # The fast decoder did take the plain JPEGs, and checked itself against PIL once.
    assert decode._FAST_DECODE_OK is True
    assert decode.fast_decode(mixed_folder[0][0], 32, 10**8) is not None
    for name in ("png.png", "larger.jpg", "rotated.jpg", "cmyk.jpg"):
        path = next(p for p, _ in mixed_folder if p.endswith(name))
        assert decode.fast_decode(path, 32, 10**8) is None, name


def test_a_decoder_that_disagrees_with_pil_is_dropped(mixed_folder, monkeypatch, caplog):
    monkeypatch.setattr(decode, "_FAST_DECODE_OK", None)
    real = decode._decode_jpeg
    monkeypatch.setattr(decode, "_decode_jpeg", lambda data, mode: real(data, mode=mode) // 2)
    with caplog.at_level(logging.WARNING, logger="detector.data.decode"):
        assert decode.fast_decode(mixed_folder[0][0], 32, 10**8) is None
    assert "disagree" in caplog.text and decode._FAST_DECODE_OK is False
    images, _ = collate(BatchedImageDataset(mixed_folder[:3], 32).__getitems__([0, 1, 2]))
    assert torch.equal(images[0], ImageDataset(mixed_folder, 32)[0][0])


def test_batched_loader_through_workers_and_flips(mixed_folder):
    samples = mixed_folder[:6]
    plain = ImageDataset(samples, 32)
    dataset = BatchedImageDataset(samples, 32, hflip=True)
    loader = DataLoader(dataset, batch_size=6, num_workers=1, collate_fn=dataset.collate_fn)
    flipped = []
    for _ in range(4):
        images, labels = next(iter(loader))
        for i in range(6):
            original = plain[i][0]
            assert torch.equal(images[i], original) or torch.equal(images[i], original.flip(-1))
            flipped.append(not torch.equal(images[i], original))
        assert labels.tolist() == [label for _, label in samples]
    assert any(flipped) and not all(flipped)


def test_a_file_broken_after_the_scan_is_replaced_by_the_next(mixed_folder, tmp_path, caplog):
    samples = []
    for i, (path, label) in enumerate(mixed_folder[:4]):
        copy = tmp_path / f"{i}.jpg"
        shutil.copy(path, copy)
        samples.append((str(copy), label))
    Path(samples[1][0]).write_bytes(Path(samples[1][0]).read_bytes()[:40])  # truncated
    with caplog.at_level(logging.WARNING):
        images, labels = collate(BatchedImageDataset(samples, 32).__getitems__([0, 1, 2, 3]))
    assert torch.equal(images[1], ImageDataset(samples, 32)[2][0])
    assert labels[1].item() == samples[2][1]
    assert "skipping" in caplog.text and "1.jpg" in caplog.text


# --------------------------------------------------------------------------- cache


def test_cache_is_built_once_and_gives_the_same_pixels(mixed_folder, tmp_path, monkeypatch):
    built = []
    real_build = cache_mod._build
    monkeypatch.setattr(
        cache_mod, "_build", lambda *a, **k: built.append(a[0]) or real_build(*a, **k)
    )
    cached = CachedImageDataset(mixed_folder, 32, cache_dir=tmp_path, max_pixels=10**8)
    assert len(built) == 1 and built[0].parent == tmp_path
    array = np.load(built[0], mmap_mode="r")
    assert array.shape == (len(mixed_folder), 32, 32, 3) and array.dtype == np.uint8
    plain = ImageDataset(mixed_folder, 32)
    images, labels = collate(cached.__getitems__(list(range(len(mixed_folder)))))
    assert images.is_contiguous(memory_format=torch.channels_last)
    for i in range(len(mixed_folder)):
        assert torch.equal(images[i], plain[i][0]), mixed_folder[i][0]
        assert torch.equal(cached[i][0], plain[i][0])
    assert labels.tolist() == [label for _, label in mixed_folder]
    again = CachedImageDataset(mixed_folder, 32, cache_dir=tmp_path, max_pixels=10**8)
    assert len(built) == 1  # reused
    assert isinstance(again.images, np.memmap) and not again.images.flags.writeable


def test_cache_key_follows_the_files(mixed_folder, tmp_path):
    samples = []
    for i, (path, label) in enumerate(mixed_folder[:3]):
        shutil.copy(path, tmp_path / f"{i}.jpg")
        samples.append((str(tmp_path / f"{i}.jpg"), label))
    key = cache_mod.cache_key(samples, 32, 10**8)
    assert cache_mod.cache_key(samples, 32, 10**8) == key
    assert cache_mod.cache_key(samples, 16, 10**8) != key
    assert cache_mod.cache_key(samples[::-1], 32, 10**8) != key
    _save(_photo(32, 99), Path(samples[0][0]), quality=50)
    assert cache_mod.cache_key(samples, 32, 10**8) != key


def test_cache_substitutes_undecodable_rows_and_refuses_pil_augmentation(mixed_folder, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    samples = [mixed_folder[0], (str(bad), 1), mixed_folder[1]]
    cached = CachedImageDataset(samples, 32, cache_dir=tmp_path / "c", max_pixels=10**8)
    images, labels = collate(cached.__getitems__([0, 1, 2]))
    assert torch.equal(images[1], images[2]) and labels[1] == labels[2] == samples[2][1]
    assert cache_mod.substitutes(5, np.array([1, 4])).tolist() == [0, 2, 2, 3, 0]
    with pytest.raises(ConfigError, match="data.cache=true.*blur_prob"):
        CachedImageDataset(samples, 32, transform=lambda im: im, cache_dir=tmp_path / "c")
    # Through the data module: an augmented training split just goes uncached.
    augmented = cache_mod.make_dataset(
        samples, 32, transform=lambda im: im, max_pixels=10**8, cache=True, cache_dir=tmp_path
    )
    assert type(augmented) is BatchedImageDataset


def test_cache_through_the_data_module_and_loader_workers(image_folder, tmp_path):
    dm = ImageFolderDataModule(
        root=str(image_folder),
        image_size=32,
        batch_size=8,
        num_workers=1,
        cache=True,
        cache_dir=str(tmp_path),
        hflip=False,
    )
    dm.setup("fit")
    dm.setup("test")
    assert isinstance(dm.train_set, CachedImageDataset)
    # By default beside train/ and test/, not inside (where it would look like a class).
    default = cache_mod._candidate_dirs(None, image_folder / "train")[0]
    assert default == image_folder / ".detector-cache"
    assert len(list(tmp_path.glob("images-*.npy"))) == 3  # train, val and test splits
    plain = ImageDataset(dm.val_set.samples, 32)
    images, labels = next(iter(dm.val_dataloader()))
    assert torch.equal(images, torch.stack([plain[i][0] for i in range(len(images))]))


# --------------------------------------------------------------------------- data module + eval


def test_decode_size_makes_loaders_decode_small_and_is_checked(image_folder):
    dm = ImageFolderDataModule(
        root=str(image_folder), image_size=64, decode_size=16, batch_size=8, num_workers=0
    )
    dm.setup("fit")
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (3, 16, 16)
    assert ImageFolderDataModule(root=str(image_folder), image_size=40).decode_size == 40
    with pytest.raises(ConfigError, match="data.decode_size=-3"):
        ImageFolderDataModule(root=str(image_folder), decode_size=-3)


@pytest.fixture(scope="module")
def folder_24px(tmp_path_factory) -> Path:
    from tests.conftest import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("px24"), n_train=4, n_test=8, size=24)


def _key(path: str) -> str:
    return "/".join(Path(path).parts[-2:])


def test_eval_resizing_on_the_device_gives_predicts_probabilities(
    trained_run, folder_24px, tmp_path
):
    """Checkpoint at 32 px, images of 24 px: eval decodes at 24 and resizes batches on the
    device; predict resizes each image with PIL. Same probabilities (docs/hardware.md)."""
    from detector.tasks.evaluate import evaluate
    from detector.tasks.predict import predict

    common = [f"ckpt={trained_run['ckpt']}", "trainer.accelerator=cpu"]
    eval_cfg = compose_config(
        "eval",
        tmp_path / "eval",
        [
            *common,
            "data=imagefolder",
            f"data.root={folder_24px}",
            "data.num_workers=0",
            "data.decode_size=24",
            "trainer.precision=32-true",
        ],
    )
    evaluate(eval_cfg)
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        rows = {_key(r["path"]): float(r["probability"]) for r in csv.DictReader(f)}
    pred_cfg = compose_config(
        "predict",
        tmp_path / "pred",
        [
            *common[:1],
            f"input={folder_24px / 'test'}",
            "device=cpu",
            "progress=false",
            "num_workers=0",
        ],
    )
    predict(pred_cfg)
    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        predicted = {_key(r["path"]): float(r["prob_REAL"]) for r in csv.DictReader(f)}
    assert len(rows) == len(predicted) == 16
    assert max(abs(rows[k] - predicted[k]) for k in rows) <= 1e-5


def test_training_with_device_resizing_channels_last_and_bf16_runs(image_folder, tmp_path):
    from detector.tasks.train import train

    cfg = compose_config(
        "train",
        tmp_path,
        [
            *TINY,
            "data=imagefolder",
            f"data.root={image_folder}",
            "data.image_size=40",
            "data.decode_size=32",
            "model.channels_last=true",
            "trainer.precision=bf16-mixed",  # the default on bf16 hardware
            "test=false",
            "debug=limit",
        ],
    )
    metrics = train(cfg)
    assert Path(metrics["best_model_path"]).is_file()
    assert np.isfinite(metrics["train/loss"])


# --------------------------------------------------------------------------- precision


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    assert hardware.resolve_precision("auto", "cpu") == "bf16-mixed"
    assert hardware.resolve_precision(None, "auto") == "bf16-mixed"
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert hardware.resolve_precision("auto", "cpu") == "32-true"
    assert hardware.resolve_precision("auto", "mps") == "32-true"
    assert hardware.resolve_precision("16-mixed", "cpu") == "16-mixed"
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware, "cuda_has_bf16", lambda: False)
    assert hardware.resolve_precision("AUTO", "gpu") == "32-true"
    monkeypatch.setattr(hardware, "cuda_has_bf16", lambda: True)
    assert hardware.resolve_precision("auto", "auto") == "bf16-mixed"
    with pytest.raises(ConfigError, match="trainer.precision"):
        hardware.resolve_precision(" ", "cpu")


def test_config_default_precision_is_resolved_from_the_hardware(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    for has_bf16, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(hardware, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert compose_config("train", tmp_path).trainer.precision == expected
        assert compose_config("eval", tmp_path).trainer.precision == "32-true"  # = predict


def test_loader_workers_default_to_none_on_the_cpu_and_some_per_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    assert compose_config("train", tmp_path).data.num_workers == 0
    assert compose_config("train", tmp_path, ["data.num_workers=3"]).data.num_workers == 3
    assert hardware.auto_workers("cpu") == hardware.auto_workers("auto") == 0
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(hardware, "cpu_cores", lambda: 32)
    assert hardware.auto_workers("auto") == hardware.auto_workers("gpu") == 8
    assert hardware.auto_workers("cpu") == 0
    monkeypatch.setattr(hardware, "cpu_cores", lambda: 6)
    assert hardware.auto_workers("gpu") == 3
    assert compose_config("train", tmp_path, ["trainer=gpu"]).data.num_workers == 3


def test_scoring_beside_loader_workers_takes_the_cores_they_leave(monkeypatch):
    """predict.py: a model thread waiting for a core stalls its whole OpenMP team."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for cores, workers, expected in ((2, 2, 1), (8, 2, 4), (6, 2, 4), (3, 1, 2), (2, 0, 4)):
            monkeypatch.setattr(hardware, "cpu_cores", lambda cores=cores: cores)
            with hardware.threads_beside_workers(workers, "cpu") as threads:
                assert threads == torch.get_num_threads() == expected, (cores, workers)
            assert torch.get_num_threads() == 4  # restored
        with hardware.threads_beside_workers(2, torch.device("cuda")) as threads:
            assert threads == 4  # a GPU model's host threads are not the contended ones
    finally:
        torch.set_num_threads(before)
    assert hardware.cpu_cores() >= 1


def test_trainer_gets_the_resolved_precision(tmp_path, monkeypatch):
    from detector.tasks.trainer import build_trainer

    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    cfg = compose_config("train", tmp_path, [*TINY, "trainer.precision=auto"])
    trainer = build_trainer(cfg, tmp_path, logger=False, callbacks=[])
    assert trainer.precision == "32-true"
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    trainer = build_trainer(cfg, tmp_path, logger=False, callbacks=[])
    assert trainer.precision == "bf16-mixed"


# --------------------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_bench_runs_and_writes_every_number(image_folder, tmp_path):
    """`make bench` end to end on the tiny folder with a tiny network (numbers meaningless)."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--repeats=1",
            f"--data={image_folder}",
            "--override=model.backbone=test_resnet",
            "--override=data.batch_size=8",
            "--override=data.num_workers=0",
            "--means",
            f"--out={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    assert [s["image_size"] for s in result["sizes"]] == [32, 224]
    for size in result["sizes"]:
        assert set(size["img_per_s"]) == {
            "a_bare_train",
            "b_train_path",
            "c_eval_path",
            "d_bare_infer",
            "e_loader",
            "f_torchvision_loader",
        }
        assert all(v > 0 for v in size["img_per_s"].values())
        assert set(size["ratios"]) == {"b/a", "c/d", "e/a", "e/f"}
    assert result["sizes"][1]["decode_size"] == 32  # decoded small, resized on the device
    assert result["startup"][-1]["train"] + result["startup"][-1]["val"] == 48
    assert result["memory"]["images"] > 0
    assert {"torch", "lightning"} <= set(result["machine"]["versions"])
    assert {m["what"] for m in result["means"]} == {"bare train", "loader"}
    assert "| **b/a** |" in done.stdout and "targets" in done.stdout
    assert {t["what"] for t in result["targets"]} >= {"b/a", "c/d", "e/a", "e/f", "e_loader"}
    # the recipe's step, its callbacks on, its checkpoints timed and spread over a validation
    recipe = result["recipe"]
    assert recipe["overrides"][0] == "experiment=cifake_cpu" and recipe["batch_size"] == 8
    assert recipe["img_per_s"]["a_bare_train"] > 0 and recipe["img_per_s"]["b_train_path"] > 0
    assert recipe["checkpoint_s"]["complete_mb"] > recipe["checkpoint_s"]["lean_mb"] > 0
    assert recipe["b_with_checkpoints"] <= recipe["img_per_s"]["b_train_path"]
    assert "b/a experiment=cifake_cpu" in {t["what"] for t in result["targets"]}
    assert "| `experiment=cifake_cpu`, 32 px |" in done.stdout
