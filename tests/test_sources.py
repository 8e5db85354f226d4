"""Class maps (GenImage and ForenSynths layouts as they are), several training sources with
per-source validation metrics, and the sampler that weighs sources."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detector.data.datamodule import ImageFolderDataModule
from detector.data.sources import SourceWeightedSampler, class_folders
from detector.errors import ConfigError, DataError
from detector.evaluation.per_source import source_metrics
from detector.evaluation.plots import plot_history
from detector.tasks.evaluate import evaluate
from detector.tasks.train import train
from tests import (
    test_ddp as ddp,  # its launch helpers (a module: its tests are not collected twice)
)
from tests.conftest import ROOT, TINY, compose_config, make_image_folder


def _relabel(src: Path, dst: Path, names: dict[str, str]) -> Path:
    """Copy the class folders of ``src`` (FAKE, REAL) to ``dst/<names[class]>``."""
    for cls, target in names.items():
        shutil.copytree(src / cls, dst / target)
    return dst


@pytest.fixture(scope="module")
def genimage(tmp_path_factory) -> Path:
    """GenImage's layout: ROOT/train/{ai,nature}, ROOT/val/{ai,nature}."""
    base = make_image_folder(tmp_path_factory.mktemp("cifake_like"), n_train=16, n_test=6)
    root = tmp_path_factory.mktemp("genimage") / "sdv14"
    names = {"FAKE": "ai", "REAL": "nature"}
    _relabel(base / "train", root / "train", names)
    _relabel(base / "test", root / "val", names)
    return root


@pytest.fixture(scope="module")
def forensynths(tmp_path_factory) -> Path:
    """ForenSynths' layout: train/<category>/{0_real,1_fake}, test/<gen>/[<category>/]..."""
    names = {"FAKE": "1_fake", "REAL": "0_real"}
    root = tmp_path_factory.mktemp("forensynths")
    for k, category in enumerate(("airplane", "bird")):
        base = make_image_folder(tmp_path_factory.mktemp(category), 10, 4, seed=k)
        _relabel(base / "train", root / "train" / category, names)
        _relabel(base / "test", root / "test" / "progan" / category, names)
    _relabel(base / "test", root / "test" / "deepfake", names)
    return root


def found_map() -> dict[str, str]:
    return {"ai": "FAKE", "nature": "REAL"}


def _setup(**kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(image_size=32, batch_size=8, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


def test_genimage_folders_load_through_the_map(genimage):
    found = class_folders(genimage / "train", {"ai": "FAKE", "nature": "REAL"})
    assert found.classes == ["FAKE", "REAL"]
    assert found.folders == {"ai": 0, "nature": 1}
    dm = _setup(root=str(genimage), test_dir=str(genimage / "val"), class_map=found_map())
    samples = dm.train_set.samples + dm.val_set.samples
    assert len(samples) == 32
    assert {label for path, label in samples if "/ai/" in path} == {0}
    assert {label for path, label in samples if "/nature/" in path} == {1}


def test_forensynths_class_folders_are_found_at_any_depth(forensynths):
    found = class_folders(forensynths / "test", {"0_real": "REAL", "1_fake": "FAKE"})
    assert found.classes == ["FAKE", "REAL"]
    assert found.folders == {
        "deepfake/0_real": 1,
        "deepfake/1_fake": 0,
        "progan/airplane/0_real": 1,
        "progan/airplane/1_fake": 0,
        "progan/bird/0_real": 1,
        "progan/bird/1_fake": 0,
    }


def test_a_folder_the_map_does_not_cover_is_named(genimage, tmp_path):
    root = tmp_path / "g"
    shutil.copytree(genimage, root)
    shutil.copytree(root / "train" / "ai", root / "train" / "midjourney")
    with pytest.raises(
        ConfigError, match=r"train/midjourney holds images.*add \+data.class_map.midjourney="
    ):
        _setup(root=str(root), class_map=found_map())
    shutil.copytree(root / "train" / "ai", tmp_path / "only_ai" / "ai")
    with pytest.raises(DataError, match="no folder of class REAL.*named nature"):
        class_folders(tmp_path / "only_ai", found_map())
    with pytest.raises(ConfigError, match="exactly two classes"):
        _setup(root=str(root), class_map={"ai": "FAKE", "nature": "REAL", "midjourney": "MJ"})


@pytest.mark.parametrize("layout", ["genimage", "forensynths"])
def test_train_runs_on_public_layouts_as_they_are(layout, request, tmp_path):
    root = request.getfixturevalue(layout)
    cfg = compose_config("train", tmp_path, [*TINY, f"data={layout}", f"data.root={root}"])
    metrics = train(cfg)
    assert Path(metrics["best_model_path"]).is_file()
    # tested on GenImage's val/ (12 images) or every ForenSynths test generator (24)
    assert metrics["test/auroc"] >= 0.0
    report = (tmp_path / "metrics.json").read_text()
    assert f'"n": {12 if layout == "genimage" else 24}' in report


def test_each_source_is_split_with_the_seed_rule(tmp_path):
    a = make_image_folder(tmp_path / "a", n_train=20, n_test=2, seed=1)
    b = make_image_folder(tmp_path / "b", n_train=10, n_test=2, seed=2)
    dm = _setup(train_dirs={"a": str(a / "train"), "b": str(b / "train")})
    alone = {name: _setup(train_dir=str(f / "train")) for name, f in (("a", a), ("b", b))}
    val = [p for p, _ in dm.val_set.samples]
    assert val == [p for n in "ab" for p, _ in alone[n].val_set.samples]
    assert dm.val_sources.tolist() == [0] * 8 + [1] * 4
    assert len(dm.train_set) == 32 + 16 and dm.source_names == ["a", "b"]
    assert dm.train_source_index == [0] * 32 + [1] * 16
    # a list is named after the folders (their parent for .../train)
    assert _setup(train_dirs=[str(a / "train"), str(b / "train")]).source_names == ["a", "b"]


def test_source_settings_mistakes_are_named(tmp_path):
    a = make_image_folder(tmp_path / "a", n_train=4, n_test=1)
    with pytest.raises(ConfigError, match="data.train_dirs .*or data.train_dir, not both"):
        _setup(train_dirs=[str(a / "train")], train_dir=str(a / "train"))
    with pytest.raises(ConfigError, match="data.source_weights.c: no such source"):
        _setup(train_dirs={"a": str(a / "train")}, source_weights={"c": 2})
    with pytest.raises(
        ConfigError, match="data.source_weights weighs the sources of data.train_dirs"
    ):
        _setup(train_dir=str(a / "train"), source_weights="equal")
    with pytest.raises(DataError, match=r"data.train_dirs.b=\S*nowhere does not exist"):
        _setup(train_dirs={"a": str(a / "train"), "b": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="source name 'a b'"):
        _setup(train_dirs={"a b": str(a / "train")})


def test_weighted_sampler_gives_each_source_its_share_on_every_rank():
    sources = [0] * 900 + [1] * 100
    one = SourceWeightedSampler(sources, [1.0, 1.0], seed=5)
    drawn = torch.tensor(sources)[list(one)]
    assert len(drawn) == 1000 and 0.45 < drawn.float().mean() < 0.55  # equal: half from b
    assert list(one) == list(SourceWeightedSampler(sources, [1.0, 1.0], seed=5))
    one.set_epoch(1)
    assert list(one) != list(SourceWeightedSampler(sources, [1.0, 1.0], seed=5))
    heavy = torch.tensor(sources)[list(SourceWeightedSampler(sources, [1.0, 3.0], seed=5))]
    assert 0.70 < heavy.float().mean() < 0.80
    ranks = [
        SourceWeightedSampler(sources, [1, 1], 5, world=3, rank=r, drop_last=True) for r in range(3)
    ]
    assert [len(list(r)) for r in ranks] == [333] * 3


def test_source_metrics_match_their_definition():
    probs = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.8, 0.7])
    targets = torch.tensor([1, 0, 0, 1, 1, 1])
    sources = torch.tensor([0, 0, 0, 0, 1, 1])
    m = source_metrics(probs, targets, sources, ["a", "b"])
    assert m["val/a/acc"] == pytest.approx(0.5)
    assert m["val/a/auroc"] == pytest.approx(0.75)  # 3 of the 4 (REAL, FAKE) pairs in order
    assert m["val/a/recall"] == pytest.approx(0.5) and m["val/a/precision"] == pytest.approx(0.5)
    assert m["val/b/acc"] == 1.0 and m["val/b/auroc"] != m["val/b/auroc"]  # one class: NaN
    flipped = source_metrics(probs, targets, sources, ["a", "b"], positive_class=0)
    assert flipped["val/a/auroc"] == pytest.approx(0.75) and flipped["val/b/recall"] == 0.0


def test_two_sources_log_per_source_validation_to_tensorboard(tmp_path):
    a = make_image_folder(tmp_path / "a", n_train=16, n_test=2, seed=1)
    b = make_image_folder(tmp_path / "b", n_train=12, n_test=2, seed=2)
    out = tmp_path / "run"
    dirs = f"data.train_dirs={{a: {a / 'train'}, b: {b / 'train'}}}"
    overrides = [*TINY, "data=imagefolder", dirs, "data.source_weights=equal", "test=false"]
    metrics = train(compose_config("train", out, overrides))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("a", "b"):
        assert {f"val/{name}/{k}" for k in ("acc", "auroc", "f1", "loss")} <= tags
    assert "val/auroc" in tags
    assert "| a |" in (out / "val_sources.md").read_text()
    # val/a/auroc is the AUROC of source a's own validation split: eval split=val on it agrees
    ev = evaluate(
        compose_config(
            "eval",
            tmp_path / "eval",
            [
                f"ckpt={metrics['best_model_path']}",
                "data=imagefolder",
                f"data.train_dir={a / 'train'}",
                "split=val",
                "trainer.accelerator=cpu",
                "data.num_workers=0",
                "data.batch_size=8",
            ],
        )
    )
    assert ev["n"] == 6
    assert ev["auroc"] == pytest.approx(metrics["val/a/auroc"], abs=1e-5)


def test_history_figure_draws_each_source_dotted():
    history = [
        {"epoch": e, "train/acc": 0.6, "val/acc": 0.7, "val/a/acc": 0.8, "val/b/acc": 0.5}
        for e in range(2)
    ]
    ax = plot_history(history).axes[0]
    assert [line.get_label() for line in ax.lines] == ["train", "val", "val a", "val b"]
    assert [line.get_linestyle() for line in ax.lines] == ["-", "-", ":", ":"]
    assert list(ax.lines[2].get_ydata()) == [0.8, 0.8]


def test_per_source_metrics_under_ddp_equal_one_device(tmp_path):
    """Two CPU ranks (uneven shards, weighted sampler): the gathered per-source numbers are
    those of one device scoring the source's validation split, and the run does not hang."""
    a = make_image_folder(tmp_path / "a", n_train=13, n_test=2, seed=1)
    b = make_image_folder(tmp_path / "b", n_train=9, n_test=2, seed=2)
    command = [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *TINY]
    command += ["data=imagefolder", f"data.train_dirs={{a: {a / 'train'}, b: {b / 'train'}}}"]
    command += ["data.source_weights={a: 1, b: 2}", "test=false", f"ddp_timeout={ddp.DDP_TIMEOUT}"]
    code, _, err = ddp.launch(command, tmp_path, tty=False)
    assert code == 0, err[-3000:]
    run = ddp.the_run(tmp_path)
    logged = ddp.scalars(run / "tensorboard")
    ckpt = ddp.best_checkpoint(run)
    for name, folder in (("a", a), ("b", b)):
        overrides = [f"ckpt={ckpt}", "data=imagefolder", f"data.train_dir={folder / 'train'}"]
        overrides += ["split=val", "trainer.accelerator=cpu", "data.num_workers=0"]
        ev = evaluate(compose_config("eval", tmp_path / f"eval_{name}", overrides))
        assert logged[f"val/{name}/auroc"][-1] == pytest.approx(ev["auroc"], abs=1e-5)
        assert logged[f"val/{name}/acc"][-1] == pytest.approx(
            ev["table"][0]["accuracy_at_0.5"], abs=1e-6
        )
