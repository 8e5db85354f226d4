"""Pseudo-fakes (data.pseudo_fake_prob): real images through random upsamplers, labelled FAKE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import detector.data.datamodule as datamodule
from detector.data.pseudo_fakes import add_pseudo_fakes, check_pseudo_fakes, random_upsample
from detector.errors import ConfigError
from tests.conftest import TINY, compose_config, run_script


def test_without_noise_the_upsampler_is_plain_nearest_or_bilinear():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    half = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)
    nearest = random_upsample(images, taps=0, mix=0, conv=0, sharpen=0, bilinear=0.0)
    assert torch.equal(nearest, F.interpolate(half, scale_factor=2, mode="nearest"))
    bilinear = random_upsample(images, taps=0, mix=0, conv=0, sharpen=0, bilinear=1.0)
    expected = F.interpolate(half, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(bilinear, expected, atol=1e-6)  # borders too: replicated, not dark


def test_random_upsamplers_differ_per_image_and_keep_any_size():
    torch.manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 8, 12), size=(31, 45), mode="bilinear")
    same = smooth.expand(4, -1, -1, -1)  # a photo-like image: smooth, with detail to lose
    out = random_upsample(same)
    assert out.shape == (4, 3, 31, 45)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 4))
    # the content stays: each output is close to its input, far closer than to noise
    assert float((out - same).abs().mean()) < 0.5 * float(
        (torch.rand_like(same) - same).abs().mean()
    )


def test_fake_images_are_replaced_by_pseudo_fakes_of_the_batch_real_ones():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    smooth = F.interpolate(torch.rand(6, 3, 4, 4) * 255, size=(32, 32), mode="bilinear")
    images[6:] = smooth.round().byte()  # photo-like REAL images: an upsampler keeps them
    targets = torch.tensor([0] * 6 + [1] * 6)  # FAKE = 0
    before = images.clone()
    out = add_pseudo_fakes(images, targets, prob=1.0, fake=0, jpeg_quality=75)
    assert torch.equal(images, before)  # the input is left alone
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out[6:], images[6:])  # every REAL image kept
    reals = images[6:].float()
    for made in out[:6].float():
        assert not any(torch.equal(made.byte(), fake) for fake in images[:6])
        # one of the batch's REAL images, upsampled: far closer to it than to the others
        nearest, second = (reals - made).abs().mean(dim=(1, 2, 3)).sort().values[:2]
        assert float(nearest) < 0.3 * float(second)
    assert torch.equal(add_pseudo_fakes(images, targets, prob=0.0, fake=0), images)


@pytest.mark.parametrize(
    ("prob", "quality", "message"),
    [
        (1.5, 75, "data.pseudo_fake_prob=1.5 must be a probability"),
        (-0.1, 75, "data.pseudo_fake_prob=-0.1"),
        (0.3, 0, "data.pseudo_fake_jpeg=0 must be a JPEG quality"),
        (0.3, 101, "data.pseudo_fake_jpeg=101"),
    ],
)
def test_bad_settings_are_one_clear_error(prob, quality, message):
    with pytest.raises(ConfigError, match=message):
        check_pseudo_fakes(prob, quality)
    check_pseudo_fakes(0.3, None)  # null: no re-encoding


def test_training_adds_pseudo_fakes_to_training_batches_only(image_folder, tmp_path, monkeypatch):
    """The default config and callbacks, with pseudo-fakes on: every training batch goes through
    them, validation and test batches never do."""
    from detector.tasks.train import train

    calls = []
    original = datamodule.pseudo_fake_batch

    def spy(batch, prob, classes, quality):
        out = original(batch, prob, classes, quality)
        changed = (out[0] != batch[0]).flatten(1).any(1)
        calls.append((len(batch[0]), int(changed.sum()), int((batch[1] == 0).sum())))
        return out

    monkeypatch.setattr(datamodule, "pseudo_fake_batch", spy)
    overrides = [*TINY, "data=imagefolder", f"data.root={image_folder}"]
    cfg = compose_config("train", tmp_path, [*overrides, "data.pseudo_fake_prob=1.0"])
    metrics = train(cfg)
    assert metrics["best_model_path"]
    # image_folder: 48 images, 38 of them train: 4 full batches of 8 (the last one dropped)
    assert [n for n, _, _ in calls] == [8, 8, 8, 8]  # training batches only, never val/test
    assert [changed for _, changed, _ in calls] == [fakes for _, _, fakes in calls]


def test_classes_without_fake_are_refused_by_name():
    from detector.data.pseudo_fakes import fake_class

    assert fake_class(["fake", "real"]) == 0
    with pytest.raises(ConfigError, match=r"classes are \['ai', 'nature'\].*data.class_map"):
        fake_class(["ai", "nature"])


def test_detail_energy_script_measures_each_folder(image_folder, tmp_path):
    """scripts/detail_energy.py: the test set's FAKE images carry a 2-pixel checkerboard, so
    their NPR residual and Laplacian are larger than the smooth REAL images'."""
    real, fake = image_folder / "train" / "REAL", image_folder / "train" / "FAKE"
    done = run_script("scripts/detail_energy.py", str(real), str(fake), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]}
    (n_real, lap_real, npr_real), (n_fake, lap_fake, npr_fake) = rows[str(real)], rows[str(fake)]
    assert n_real == n_fake == "24"
    assert float(npr_fake) > 2 * float(npr_real) and float(lap_fake) > 2 * float(lap_real)
    missing = run_script("scripts/detail_energy.py", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 2 and f"{tmp_path / 'nope'}: not a folder" in missing.stderr


def test_family_experts_script_scores_each_expert_and_their_minimum(image_folder, tmp_path):
    """scripts/family_experts.py: two experts trained on the checkerboard set, each and their
    standardised minimum rank the test split's REAL images above its FAKE ones; bad input is
    one error line naming the folder or file."""
    common = [
        "--test",
        str(image_folder / "test"),
        "--calibrate",
        str(image_folder / "test" / "REAL"),
    ]
    args = ["--expert", f"a={image_folder}", "--expert", f"b={image_folder},{image_folder}"]
    done = run_script(
        "scripts/family_experts.py", *args, *common, "--steps", "60", "--batch", "16", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "expert a: 48 images of 1 sources" in done.stdout
    assert "expert b: 96 images of 2 sources" in done.stdout
    rows = {
        line.split()[1]: line.split()[2:]
        for line in done.stdout.splitlines()
        if line.startswith(str(image_folder))
    }
    assert set(rows) == {"a", "b", "min"}
    for auroc, acc in rows.values():
        assert float(auroc) > 0.9 and 0.0 <= float(acc) <= 1.0

    missing = run_script(
        "scripts/family_experts.py", "--expert", f"a={tmp_path / 'nope'}", *common, cwd=tmp_path
    )
    assert (
        missing.returncode == 2
        and f"{tmp_path / 'nope' / 'train' / 'FAKE'}: not a folder" in missing.stderr
    )
    wrong_size = run_script(
        "scripts/family_experts.py", *args, *common, "--size", "16", cwd=tmp_path
    )
    assert wrong_size.returncode == 2 and "32x32, not 16x16 (--size)" in wrong_size.stderr
    malformed = run_script(
        "scripts/family_experts.py", "--expert", "nonsense", *common, cwd=tmp_path
    )
    assert (
        malformed.returncode == 2 and "--expert 'nonsense': expected NAME=ROOT" in malformed.stderr
    )


def test_family_experts_script_takes_a_trained_detector_as_an_expert(trained_run, tmp_path):
    """--scores: predict.py's CSV of the shared test run's checkpoint is one more expert; a
    file the CSV does not score is an error naming it."""
    data = trained_run["data"]
    scores = tmp_path / "scores.csv"
    done = run_script(
        "predict.py", f"ckpt={trained_run['ckpt']}", f"input={data / 'test'}", f"output={scores}",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    common = ["--test", str(data / "test"), "--calibrate", str(data / "test" / "REAL")]
    args = ["--expert", f"a={data}", "--scores", f"detector={scores}", "--steps", "30"]
    done = run_script("scripts/family_experts.py", *args, *common, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[1]: line.split()[2:] for line in done.stdout.splitlines()[-3:]}
    assert set(rows) == {"a", "detector", "min"}
    assert float(rows["detector"][0]) > 0.9  # the trained run separates the checkerboard

    wider = ["--test", str(data / "train"), "--calibrate", str(data / "test" / "REAL")]
    missing = run_script("scripts/family_experts.py", *args, *wider, cwd=tmp_path)
    assert missing.returncode == 2
    assert (
        f"--scores {scores}: no score for {(data / 'train' / 'FAKE' / '0000.jpg').resolve()}"
        in (missing.stderr)
    )
    lines = scores.read_text().splitlines()
    header, first = lines[0].split(","), lines[1].split(",")
    first[header.index("prob_REAL")] = "high"
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    bad = ["--expert", f"a={data}", "--scores", f"detector={broken}", "--steps", "1"]
    bad_value = run_script("scripts/family_experts.py", *bad, *common, cwd=tmp_path)
    assert bad_value.returncode == 2
    assert f"--scores {broken}, line 2: prob_REAL is not a number" in bad_value.stderr
    taken = ["--expert", f"a={data}", "--scores", f"a={scores}", "--steps", "1"]
    same_name = run_script("scripts/family_experts.py", *taken, *common, cwd=tmp_path)
    assert same_name.returncode == 2 and "the name 'a' is taken" in same_name.stderr
