"""The out-of-domain model: fitted after training, stored in the checkpoint, on every output.

Noise, flat colours and 1x1 images must come out ``in_domain=false``; the model's own test
images mostly in domain; eval, predict and the API give the same ``ood_score`` for a file.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector import Detector
from detector.checkpoint import load_checkpoint, load_checkpoint_file
from detector.evaluation.image_statistics import image_statistics, pixel_statistics
from detector.evaluation.ood import NO_OOD_MODEL, OODModel, fit_ood
from detector.tasks.evaluate import evaluate
from detector.tasks.predict import predict
from tests.conftest import compose_config


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def synthetic_images(folder: Path) -> list[Path]:
    """8 random-noise PNGs (several sizes), 4 flat colours and a 1x1 image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, side in enumerate((32, 64, 256, 32, 48, 32, 100, 32)):
        paths.append(folder / f"noise{i}.png")
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(paths[-1])
    for i, colour in enumerate([(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 30)]):
        paths.append(folder / f"flat{i}.png")
        Image.new("RGB", (32, 32), colour).save(paths[-1])
    paths.append(folder / "one_pixel.png")
    Image.new("RGB", (1, 1), (90, 120, 30)).save(paths[-1])
    return paths


def test_fit_scores_far_points_higher_and_sets_the_threshold_at_the_quantile():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0, 0.0], [-3.0, 0.0, 0.0]])

    def sample(n: int) -> dict[str, torch.Tensor]:
        y = torch.arange(n) % 2
        stages = 1.0 + 0.1 * torch.randn(n, 2, generator=gen)  # statistics of ReLU maps: > 0
        return {
            "features": centres[y] + torch.randn(n, 3, generator=gen),
            "stages": stages,
            "image": torch.randn(n, 2, generator=gen),
        }

    labels = torch.arange(2000) % 2
    train, val = sample(2000), sample(1000)
    model = fit_ood(train, labels, val, "hidden", 0.95)
    assert list(model.models) == ["features", "stages_nn", "log_stages", "image_nn"]
    assert torch.allclose(model.models["features"].means.float(), centres, atol=0.1)
    # log_stages, derived from the stages at fit time, is the Gaussian of their logarithms
    logs = torch.log(train["stages"].double() + 1e-3)
    assert torch.allclose(model.models["log_stages"].means, logs.mean(0).expand(2, 2), atol=0.02)
    assert model.info["val_flagged"] == pytest.approx(0.05, abs=0.002)
    assert model.info["dims"] == {"features": 3, "stages_nn": 2, "log_stages": 2, "image_nn": 2}
    typical = {"features": centres, "stages": torch.ones(2, 2), "image": torch.zeros(2, 2)}
    assert model.score(typical).max() < model.threshold
    # one component far off is enough, the others at a class mean (floored)
    for part, far in (
        ("features", [0.0, 400.0, 0.0]),
        ("stages", [400.0, 1.0]),
        ("image", [0, 400.0]),
    ):
        odd = {k: v[:1] for k, v in typical.items()} | {part: torch.tensor([far])}
        assert not model.in_domain(model.score(odd)).item(), part
    # one component beyond what 99.5% of validation images reach on any scores at least at
    # the geometric mean's threshold, in proportion: the mean of four cannot dilute it
    extreme, anchor = model.extreme
    assert extreme > 1.0 and anchor <= model.threshold
    odd = {k: v[:1] for k, v in typical.items()} | {"image": torch.tensor([[0.0, 12.0]])}
    scaled = float(model.models["image_nn"].distance(odd["image"])) / model.scales["image_nn"]
    assert scaled > 2 * extreme
    geometric = OODModel(**{**model.__dict__, "extreme": None}).score(odd).item()
    assert geometric < anchor * scaled / extreme
    assert model.score(odd).item() == pytest.approx(anchor * scaled / extreme, rel=1e-5)
    # the nearest-neighbour components: the squared distance to the nearest standardised
    # training row (a training row itself is at 0)
    neighbours = model.models["image_nn"]
    spread = train["image"].double().std(0)
    odd = torch.tensor([[0.0, 400.0]])
    expected = (((odd.double() - train["image"].double()) / spread) ** 2).sum(1).min()
    assert neighbours.distance(odd).item() == pytest.approx(float(expected), rel=1e-2)
    assert neighbours.distance(train["image"][:5]).max() < 1e-9
    # the geometric mean of the scaled distances: one component's distance 4x as large makes
    # the score 4 ** (1/4) as large (four components; the others alike)
    near, far = (
        {k: v[:1] for k, v in typical.items()} | {"features": torch.tensor([[3.0, y, 0.0]])}
        for y in (1.5, 3.0)
    )
    gaussians = model.models["features"]
    ratio = gaussians.distance(far["features"]) / gaussians.distance(near["features"])
    assert float(ratio) == pytest.approx(4.0, rel=0.1)
    assert model.score(far).item() / model.score(near).item() == pytest.approx(
        float(ratio) ** (1 / 4), rel=1e-4
    )
    again = OODModel.from_state(model.state())
    assert torch.equal(again.score(val), model.score(val)) and again.threshold == model.threshold


def test_a_fit_in_chunks_is_the_fit_in_one_piece_and_log_stages_are_not_collected():
    """Fits accumulate a chunk of rows at a time and derive ``log_stages`` from ``stages``
    (memory of a fit on 80,000 images); the numbers are those of a fit on all rows at once."""
    from detector.evaluation.ood import Gaussians, collect_features, log_scale
    from detector.model import Embedding

    gen = torch.Generator().manual_seed(2)
    values = torch.rand(101, 6, generator=gen) * torch.arange(1, 7)
    labels = (torch.arange(101) % 3 == 0).long()
    whole = Gaussians.fit(values, labels, chunk=1000)
    for chunked in (Gaussians.fit(values, labels, chunk=7), Gaussians.fit(values, labels)):
        assert torch.allclose(chunked.means, whole.means, rtol=1e-10)
        assert torch.allclose(chunked.precision, whole.precision, rtol=1e-8)
    direct = values.double()[labels == 1].mean(0)
    assert torch.allclose(whole.means[1], direct, rtol=1e-10)
    logged = Gaussians.fit(values, labels, log_scale, chunk=10)
    reference = Gaussians.fit(log_scale(values), labels)
    assert torch.allclose(logged.precision, reference.precision, rtol=1e-8)

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen)
    embedding = Embedding(torch.zeros(4), torch.ones(4, 4), torch.ones(4, 4), torch.rand(4, 8))
    parts, targets = collect_features(
        [(images, torch.tensor([0, 1, 0, 1]))], lambda x: x, lambda x: embedding, "none"
    )
    assert set(parts) == {"stages", "image"} and parts["stages"].shape == (4, 8)
    assert targets.tolist() == [0, 1, 0, 1]
    # scoring tiles (a crop model) derives log_stages from each image's mean stages, as a fit
    from detector.evaluation.ood import components

    tiles = components(images, embedding, ["stages", "log_stages"], torch.tensor([1, 3]))
    mean_of_three = embedding.stages[1:].mean(0)
    assert torch.allclose(tiles["stages"][1], mean_of_three)
    assert torch.allclose(tiles["log_stages"][1], log_scale(mean_of_three))


def test_pixel_statistics_tell_noise_and_flat_colour_from_photographs():
    photo = torch.from_numpy(np.asarray(a_photograph())).permute(2, 0, 1).contiguous()
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8))
    flat = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    stats = pixel_statistics(torch.stack([photo, noise, flat]))
    assert stats.shape == (3, 13) and torch.isfinite(stats).all()
    neighbour = stats[:, -1]  # atanh of the vertical neighbour correlation
    assert neighbour[0] > 1.0 and abs(neighbour[1]) < 0.3 and neighbour[2] == 0.0
    assert torch.allclose(stats[:1], pixel_statistics(photo[None].float() / 255), atol=1e-4)
    rich = image_statistics(torch.stack([photo, noise, flat]))
    assert rich.shape == (3, 24) and torch.isfinite(rich).all()
    assert torch.equal(rich[:, :13], stats)  # the pixel statistics lead
    assert torch.allclose(rich[:1], image_statistics(photo[None].float() / 255), atol=1e-4)
    fine, fine_over_coarse = rich[:, 13], rich[:, 15]  # log Laplacian energy, and its ratio
    assert fine[1] > fine[0] > fine[2]  # noise >> photograph > flat
    assert fine_over_coarse[1] > fine_over_coarse[0] + 0.5  # noise loses its detail when pooled
    colourful, dark, bright = rich[:, 16], rich[:, 18], rich[:, 19]
    assert colourful[1] > colourful[0] > colourful[2] == 0.0 and dark[2] == bright[2] == 0.0
    bands = rich[:, 20:]  # a photograph's power falls with frequency, white noise's does not
    assert bands[0, 0] > bands[0, -1] + 2.0 and abs(bands[1, 0] - bands[1, -1]) < 1.0
    odd = torch.randint(0, 256, (2, 3, 45, 38), dtype=torch.uint8)  # any size, odd too
    assert image_statistics(odd).shape == (2, 24) and torch.isfinite(image_statistics(odd)).all()


def test_a_checkpoint_from_before_the_image_statistics_scores_as_it_did():
    """Older states hold ``stages`` and ``pixels`` (13 statistics), no ``combine``: the
    arithmetic mean of the scaled distances, as they were saved with."""
    from detector.evaluation.ood import Gaussians, components
    from detector.model import Embedding

    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen)
    embedding = Embedding(torch.zeros(6), torch.ones(6, 4), torch.ones(6, 4), torch.rand(6, 8))
    labels = torch.arange(6) % 2
    old = {"stages": embedding.stages, "pixels": pixel_statistics(images)}
    models = {k: Gaussians.fit(v, labels) for k, v in old.items()}
    state = {
        "feature": "none",
        "means": {k: g.means for k, g in models.items()},
        "precisions": {k: g.precision for k, g in models.items()},
        "scales": {"stages": 2.0, "pixels": 4.0},
        "threshold": 1.0,
        "quantile": 0.95,
    }
    loaded = OODModel.from_state(state)
    assert loaded.combine == "mean" and list(loaded.models) == ["stages", "pixels"]
    expected = (models["stages"].distance(old["stages"]) / 2.0) / 2 + (
        models["pixels"].distance(old["pixels"]) / 4.0
    ) / 2
    assert torch.allclose(loaded.score_batch(images, embedding).double(), expected, rtol=1e-5)
    assert set(components(images, embedding, ["stages", "pixels"])) == {"stages", "pixels"}


def a_photograph() -> Image.Image:
    """A photograph at 32x32, as CIFAKE's are (scikit-image ships it)."""
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).resize((32, 32), Image.BILINEAR)


def test_training_stores_the_model_in_the_best_checkpoint(trained_run):
    checkpoint = load_checkpoint_file(trained_run["ckpt"])
    state = checkpoint["ood"]
    # the default (ood.feature=none): early stages (also as logs) and the image statistics, no
    # network-feature component, combined by the geometric mean
    assert state["feature"] == "none" and state["combine"] == "geometric"
    assert set(state["scales"]) == {"stages_nn", "log_stages", "image_nn"}
    # test_resnet's layer1 and layer2: 2 * (32 + 48) statistics; the 38 training images' rows
    # are the banks, the stages' in their 32 principal directions
    assert state["means"]["log_stages"].shape == (2, 2 * (32 + 48))
    stages = state["neighbours"]["stages_nn"]
    assert stages["projection"].shape == (2 * (32 + 48), 32) and stages["bank"].shape == (38, 32)
    assert state["neighbours"]["image_nn"]["bank"].shape == (38, 24)
    assert state["neighbours"]["image_nn"]["projection"] is None
    assert state["info"]["train_images"] == 38 and state["info"]["val_images"] == 10
    assert 0.0 <= state["info"]["val_flagged"] <= 0.1 + 1e-6  # 1 of 10 at most
    assert load_checkpoint(trained_run["ckpt"]).ood.threshold == state["threshold"]
    # the run's own test report counts the flagged images and scores the in-domain ones
    report = trained_run["metrics"]
    assert "best_model_path" in report
    rows = _rows(trained_run["dir"] / "predictions.csv")
    assert {r["in_domain"] for r in rows} <= {"True", "False"} and all(r["ood_score"] for r in rows)
    # ... and logs the flagged share to TensorBoard (read with TensorBoard's own reader)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flagged = sum(r["in_domain"] == "False" for r in rows) / len(rows)
    logged = []
    for events in (trained_run["dir"] / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "test/ood_flagged" in acc.Tags()["scalars"]:
            logged += [e.value for e in acc.Scalars("test/ood_flagged")]
    assert logged == [pytest.approx(flagged)]


def test_api_flags_noise_flat_colours_and_tiny_images(trained_run, tmp_path):
    detector = Detector.from_checkpoint(trained_run["ckpt"])
    synthetic = detector.predict(synthetic_images(tmp_path))
    assert [p.in_domain for p in synthetic] == [False] * 13, [p.ood_score for p in synthetic]
    assert all(p.ood_score > detector.ood.threshold for p in synthetic)
    test_images = sorted((trained_run["data"] / "test").rglob("*.jpg"))
    own = detector.predict(test_images)
    assert sum(p.in_domain is False for p in own) <= 0.1 * len(own)


def test_predict_and_eval_agree_on_ood_score(trained_run, tmp_path, capsys):
    folder = tmp_path / "mixed"
    synthetic_images(folder)
    test_images = sorted((trained_run["data"] / "test").rglob("*.jpg"))
    for p in test_images:
        (folder / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    cfg = compose_config(
        "predict",
        tmp_path / "p",
        [f"ckpt={trained_run['ckpt']}", f"input={folder}", "num_workers=0", "progress=false"],
    )
    result = predict(cfg)
    out = capsys.readouterr().out
    rows = {Path(r["path"]).name: r for r in _rows(Path(result["output"]))}
    synthetic = [r for n, r in rows.items() if not n.startswith(("FAKE_", "REAL_"))]
    own = [r for n, r in rows.items() if n.startswith(("FAKE_", "REAL_"))]
    assert len(synthetic) == 13 and {r["in_domain"] for r in synthetic} == {"False"}
    assert sum(r["in_domain"] == "False" for r in own) <= 0.1 * len(own)
    assert result["flagged"] == sum(r["in_domain"] == "False" for r in rows.values())
    assert f"{result['flagged']} of {len(rows)} images are unlike the training data" in out

    ev = compose_config(
        "eval",
        tmp_path / "e",
        [f"ckpt={trained_run['ckpt']}", "data=imagefolder", f"data.root={trained_run['data']}",
         "data.num_workers=0", "trainer.accelerator=cpu"],
    )  # fmt: skip
    report = evaluate(ev)
    printed = capsys.readouterr().out
    assert f"{report['ood']['n_flagged']} of {report['n']} images" in printed
    assert report["ood"]["in_domain"]["n"] == report["n"] - report["ood"]["n_flagged"]
    for r in _rows(tmp_path / "e" / "predictions.csv"):
        mine = rows[f"{Path(r['path']).parent.name}_{Path(r['path']).name}"]
        assert float(r["ood_score"]) == pytest.approx(float(mine["ood_score"]), rel=1e-5)
        assert r["in_domain"] == mine["in_domain"]


def test_eval_separates_an_unfamiliar_set_from_the_reference(trained_run, tmp_path):
    noise = tmp_path / "noise"
    for label in ("FAKE", "REAL"):
        synthetic_images(noise / label)
    cfg = compose_config(
        "eval",
        tmp_path / "e",
        [f"ckpt={trained_run['ckpt']}", "data=imagefolder", "data.num_workers=0",
         "trainer.accelerator=cpu", f"data.test_dirs={{own: {trained_run['data'] / 'test'}, "
         f"noise: {noise}}}", "ood.reference=own"],
    )  # fmt: skip
    report = evaluate(cfg)
    assert report["ood_reference"] == {"reference": "own", "auroc": {"noise": 1.0}}
    flagged = {row["set"]: row.get("ood_flagged") for row in report["table"]}
    assert flagged["noise"] == 1.0 and flagged["own"] <= 0.1


def test_a_checkpoint_without_the_model_says_so_and_eval_can_refit_it(trained_run, tmp_path):
    checkpoint = load_checkpoint_file(trained_run["ckpt"])
    del checkpoint["ood"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    assert load_checkpoint(old).ood is None
    (p,) = Detector.from_checkpoint(old).predict(synthetic_images(tmp_path / "img")[:1])
    assert p.ood_score is None and p.in_domain is None

    run = tmp_path / "e"
    base = [f"ckpt={old}", "data=imagefolder", f"data.root={trained_run['data']}",
            "data.num_workers=0", "trainer.accelerator=cpu"]  # fmt: skip
    report = evaluate(compose_config("eval", tmp_path / "plain", base))
    assert "ood" not in report and NO_OOD_MODEL.startswith("this checkpoint has no")
    report = evaluate(compose_config("eval", run, [*base, "ood.refit=true"]))
    refit = load_checkpoint_file(run / "checkpoint-ood.ckpt")["ood"]
    fitted = load_checkpoint_file(trained_run["ckpt"])["ood"]
    assert refit["threshold"] == pytest.approx(fitted["threshold"], rel=1e-4)
    assert torch.allclose(refit["means"]["log_stages"], fitted["means"]["log_stages"], atol=1e-4)
    for part in ("stages_nn", "image_nn"):
        new, old_bank = refit["neighbours"][part]["bank"], fitted["neighbours"][part]["bank"]
        # principal directions are defined up to their sign
        assert torch.allclose(new.abs(), old_bank.abs(), rtol=1e-3, atol=1e-3), part
    assert report["ood"]["n_flagged"] == int(
        sum(r["in_domain"] == "False" for r in _rows(run / "predictions.csv"))
    )
    assert "ood" not in load_checkpoint_file(old)  # the original is left as it was


@pytest.mark.parametrize(
    ("override", "message"),
    [("ood.feature=logits", "ood.feature='logits' must be one of none, hidden, pooled"),
     ("ood.quantile=1.5", "ood.quantile=1.5 must be in [0.5, 1)")],
)  # fmt: skip
def test_bad_ood_settings_stop_training_before_it_starts(image_folder, tmp_path, override, message):
    from detector.errors import ConfigError
    from detector.tasks.train import train
    from tests.conftest import TINY

    cfg = compose_config(
        "train", tmp_path, [*TINY, "data=imagefolder", f"data.root={image_folder}", override]
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_network_features_are_a_component_only_when_asked_for():
    from detector.evaluation.ood import components
    from detector.model import Embedding

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    embedding = Embedding(
        torch.zeros(4), torch.ones(4, 6), torch.full((4, 5), 2.0), torch.ones(4, 8)
    )
    from detector.evaluation.ood import fitted_components

    assert fitted_components("none") == ("stages_nn", "log_stages", "image_nn")
    assert fitted_components("hidden") == ("features", "stages_nn", "log_stages", "image_nn")
    parts = components(images, embedding, fitted_components("none"))
    assert set(parts) == {"stages_nn", "log_stages", "image_nn"}
    assert torch.equal(parts["stages_nn"], embedding.stages)
    assert torch.equal(parts["log_stages"], torch.log(embedding.stages + 1e-3))
    hidden = components(images, embedding, ["features"], feature="hidden")["features"]
    assert torch.equal(hidden, embedding.hidden)
    pooled = components(images, embedding, ["features"], feature="pooled")["features"]
    assert torch.equal(pooled, embedding.pooled)


def test_nearest_neighbours_see_the_gap_between_clumps_that_a_gaussian_fills():
    """Why the early stages and the image statistics are scored by the nearest training row: a
    training set of a few clumps (crops of a dozen photographs) leaves a gap that one Gaussian
    counts as familiar; the distance to the nearest row does not. It is exact, independent of
    the batch, and the bank is a seeded sample of at most ``rows`` rows."""
    from detector.evaluation.gaussians import Gaussians
    from detector.evaluation.neighbours import NearestNeighbours

    gen = torch.Generator().manual_seed(3)
    clumps = torch.tensor([[-5.0, 0.0], [5.0, 0.0]])
    train = clumps[torch.arange(4000) % 2] + 0.3 * torch.randn(4000, 2, generator=gen)
    gap, member = torch.tensor([[0.0, 0.0]]), torch.tensor([[5.0, 0.2]])
    neighbours = NearestNeighbours.fit(train, rows=1000)
    gaussian = Gaussians.fit(
        train, torch.zeros(4000, dtype=torch.long).index_fill(0, torch.tensor([0]), 1)
    )
    assert neighbours.distance(gap) > 50 * neighbours.distance(member)
    assert gaussian.distance(gap) < 2 * gaussian.distance(member)
    assert neighbours.bank.shape == (1000, 2) and neighbours.projection is None
    assert torch.equal(NearestNeighbours.fit(train, rows=1000).bank, neighbours.bank)

    wide = torch.randn(3000, 80, generator=gen) * torch.linspace(0.1, 3, 80)
    reduced = NearestNeighbours.fit(wide, rows=500, dims=16)
    assert reduced.projection.shape == (80, 16) and reduced.bank.shape == (500, 16)
    queries = torch.randn(70, 80, generator=gen)
    together = reduced.distance(queries)
    alone = torch.cat([reduced.distance(q[None]) for q in queries])
    assert torch.allclose(together, alone, rtol=1e-6)
    brute = torch.cdist(reduced.embed(queries).double(), reduced.bank.double()).pow(2).min(1)
    assert torch.allclose(together, brute.values, rtol=1e-9)
    again = NearestNeighbours.from_state(reduced.state())
    assert torch.equal(again.distance(queries), together)
    with pytest.raises(ValueError, match="at least two training rows"):
        NearestNeighbours.fit(wide[:1])


def test_a_checkpoint_with_the_gaussians_of_stages_and_image_scores_as_it_did():
    """The default before the nearest-neighbour densities: Gaussians of ``stages``,
    ``log_stages`` and ``image``, geometric mean; such states have no ``neighbours``."""
    from detector.evaluation.ood import FLOOR, Gaussians, log_scale
    from detector.model import Embedding

    gen = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen)
    embedding = Embedding(torch.zeros(6), torch.ones(6, 4), torch.ones(6, 4), torch.rand(6, 8))
    labels = torch.arange(6) % 2
    values = {
        "stages": embedding.stages,
        "log_stages": log_scale(embedding.stages),
        "image": image_statistics(images),
    }
    models = {k: Gaussians.fit(v, labels) for k, v in values.items()}
    scales = {"stages": 2.0, "log_stages": 3.0, "image": 5.0}
    state = {
        "feature": "none",
        "combine": "geometric",
        "means": {k: g.means for k, g in models.items()},
        "precisions": {k: g.precision for k, g in models.items()},
        "scales": scales,
        "threshold": 1.0,
        "quantile": 0.95,
    }
    loaded = OODModel.from_state(state)
    assert list(loaded.models) == ["stages", "log_stages", "image"]
    logs = [(g.distance(values[k]) / scales[k]).clamp_min(FLOOR).log() for k, g in models.items()]
    expected = torch.stack(logs).mean(0).exp()
    assert torch.allclose(loaded.score_batch(images, embedding).double(), expected, rtol=1e-5)
