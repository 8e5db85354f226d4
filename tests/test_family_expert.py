"""The family expert (detector.family_expert): fitted after training on its sources, stored in
the checkpoint, the minimum of both logits everywhere a checkpoint scores, fitted onto an older
checkpoint by eval.py."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from detector.checkpoint import load_checkpoint, load_checkpoint_file
from detector.errors import ConfigError
from detector.family_expert import NEVER, FamilyExpert
from detector.tasks.expert import expert_settings
from tests.conftest import ROOT, TINY, compose_config, make_image_folder, run_script


def test_an_unfitted_expert_changes_no_logit_and_a_fitted_one_is_the_minimum():
    torch.manual_seed(0)
    expert = FamilyExpert().eval()
    x = torch.randn(5, 3, 32, 32)  # odd: median() is the middle one
    logits = torch.linspace(-30, 30, 5)
    assert not expert.fitted
    assert torch.equal(expert.combine(logits, x), logits)
    with torch.no_grad():
        raw = expert.raw(x)
        info = expert.calibrate(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), raw, margin=0.0)
        mapped = expert(x)
    assert expert.fitted and info["scale"] > 0
    # medians matched: the expert's median REAL image maps onto the detector's median, 3.0
    assert float(mapped.median()) == pytest.approx(3.0, abs=1e-4)
    assert torch.equal(expert.combine(logits, x), torch.minimum(logits, mapped))
    with torch.no_grad():  # a margin moves the expert towards REAL by spreads of the detector
        expert.calibrate(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), raw, margin=1.0)
        assert float(expert(x).median()) > 3.0 + 1.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"sources": []}, "expert.sources: a list of source names"),
        ({"sources": "dcgan"}, "expert.sources: a list of source names"),
        ({"sources": ["a"], "stpes": 3}, "expert.stpes is not a setting"),
        ({"sources": ["a"], "steps": 0}, "expert.steps, expert.batch_size and expert.lr"),
        ({"sources": ["a"], "quantile": 0.7}, r"expert.quantile=0.7 must be in \(0, 0.5\)"),
    ],
)
def test_bad_expert_settings_are_named(spec, message):
    with pytest.raises(ConfigError, match=message):
        expert_settings(spec)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Two training sources: "photos" and "gan", the expert's family (16 + 16 images each)."""
    base = tmp_path_factory.mktemp("family")
    seeds = {"photos": 1, "gan": 2}
    return {name: make_image_folder(base / name, 16, 6, seed=s) for name, s in seeds.items()}


def _train_dirs(family) -> str:
    return "data.train_dirs={" + ",".join(f"{k}:{v / 'train'}" for k, v in family.items()) + "}"


def test_training_fits_the_expert_into_the_best_checkpoint(family, tmp_path):
    from detector.tasks.train import train

    overrides = [
        *TINY,
        "data=imagefolder",
        _train_dirs(family),
        "test=false",
        "expert=gans",
        "expert.sources=[gan,absent]",
        "expert.steps=30",
        "expert.batch_size=16",
    ]
    cfg = compose_config("train", tmp_path, overrides)
    best = train(cfg)["best_model_path"]
    checkpoint = load_checkpoint_file(best)
    info = checkpoint["family_expert"]
    assert info["sources"] == ["gan"]  # the absent one skipped, as in a leave-one-out run
    assert info["train_images"] == 2 * 13  # the gan source's training split, both classes
    assert 0.0 <= info["val_auroc_after"] <= 1.0
    assert checkpoint["hyper_parameters"]["family_expert"] is True
    assert checkpoint["threshold_fit"]["with"] == "family expert"

    model = load_checkpoint(best).eval()  # load_from_checkpoint rebuilds and loads the expert
    assert model.net.expert.fitted
    assert float(model.net.expert.shift) == pytest.approx(info["shift"])
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        both = model.net(x)
        detector = model.net._logits(x)
        expert = model.net.expert(model.net.normalize(x))
        embedded = model.net.embed(x).logits
    assert torch.allclose(both, torch.minimum(detector, expert))
    assert torch.allclose(embedded, both, atol=1e-5)
    # the scoring path of predict.py, the API and the service (no Lightning) reads it too
    from detector.api import Detector

    scorer = Detector.from_checkpoint(best)
    pixels = (x * 255).round().to(torch.uint8)
    with torch.no_grad():
        expected = torch.sigmoid(model.net(pixels))
    assert torch.allclose(scorer.score_with_ood(pixels)[0], expected, atol=1e-5)
    assert scorer.threshold == pytest.approx(checkpoint["hyper_parameters"]["threshold"])
    from detector.serve.card import model_card  # the service's GET /info says it is there

    assert "family of generators" in model_card(scorer, best, {})["family_expert"]["meaning"]


def test_a_source_list_that_matches_no_training_source_leaves_the_model_as_it_is(
    family, tmp_path, caplog
):
    from detector.tasks.train import train

    cfg = compose_config("train", tmp_path, [*TINY, "data=imagefolder", _train_dirs(family),
                                             "test=false", "expert=gans"])  # fmt: skip
    best = train(cfg)["best_model_path"]
    assert "none of expert.sources (dcgan, nngan, blgan) is a training source" in caplog.text
    assert "family_expert" not in load_checkpoint_file(best)
    assert load_checkpoint(best).net.expert.shift == NEVER


def test_eval_fits_an_expert_onto_an_older_checkpoint(family, trained_run, tmp_path):
    original = trained_run["ckpt"].read_bytes()
    common = [f"ckpt={trained_run['ckpt']}", "data=imagefolder", "report.bootstrap_resamples=10",
              f"data.test_dir={family['gan'] / 'test'}", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    refused = run_script("eval.py", *common, "expert=gans", cwd=tmp_path)
    assert refused.returncode != 0
    assert "expert=...: set data.train_dirs as the checkpoint was trained" in refused.stderr
    done = run_script(
        "eval.py", *common, "expert=gans", "expert.sources=[gan]", "expert.steps=20",
        _train_dirs(family), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "family expert on gan (26 images)" in done.stdout
    fitted = tmp_path / "checkpoint-expert.ckpt"
    assert trained_run["ckpt"].read_bytes() == original
    # what was evaluated is the checkpoint with the expert, and the report says so
    assert json.loads((tmp_path / "metrics.json").read_text())["ckpt"] == str(fitted)
    model = load_checkpoint(fitted)
    assert model.hparams.family_expert and model.net.expert.fitted


def test_ddp_ranks_fit_the_expert_a_single_device_fits(family, tmp_path):
    """``trainer=ddp_cpu`` with two ranks: every family image once (gathered in dataset order,
    none padded), rank 0's expert kept, calibrated on every rank's validation logits: the
    stored map equals a one-device fit with the same detector weights."""
    import lightning as L

    from detector.data.datamodule import ImageFolderDataModule
    from detector.tasks.expert import fit_expert_on_data
    from tests.test_ddp import clean_env, launch, the_run

    common = [*TINY, "data=imagefolder", _train_dirs(family), "data.val_fraction=0.23",
              "test=false", "expert=gans", "expert.sources=[gan]", "expert.steps=15",
              "expert.batch_size=8", "ood=null"]  # fmt: skip
    command = [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *common]
    code, _, err = launch(command, tmp_path, tty=False, env=clean_env())
    assert code == 0, err[-3000:]
    (best,) = (the_run(tmp_path) / "checkpoints").glob("epoch*.ckpt")
    stored = load_checkpoint_file(best)["family_expert"]
    assert stored["train_images"] == 25  # 32 images, 7 of them to validation; each once

    model = load_checkpoint(best)
    dirs = {name: str(folder / "train") for name, folder in family.items()}
    dm = ImageFolderDataModule(train_dirs=dirs, val_fraction=0.23, image_size=32, batch_size=8,
                               num_workers=0)  # fmt: skip
    dm.setup("fit")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    settings = expert_settings({"sources": ["gan"], "steps": 15, "batch_size": 8})
    alone = fit_expert_on_data(model, dm, trainer, settings)
    assert alone["train_images"] == stored["train_images"]
    for key in ("scale", "shift", "val_auroc_before", "val_auroc_after"):
        # the ranks run fewer threads than one process: float sums in another order, which 15
        # Adam steps carry on; a wrong image set or a rank-local calibration is far off this
        assert stored[key] == pytest.approx(alone[key], rel=1e-2, abs=1e-3), key
