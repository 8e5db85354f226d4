"""The zoo of small local generators (python -m detector.zoo): its folder layout, JPEGs,
member.json, determinism, cache and the errors on bad input, on a tiny zoo (a few dozen
generated real images, a handful of training steps)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.errors import ConfigError, DataError
from detector.zoo import build
from detector.zoo.__main__ import main
from detector.zoo.build import ZooSettings, build_zoo
from detector.zoo.nets import BY_NAME, MEMBERS, Generator, build_network
from detector.zoo.rest import write_rest

MEMBERS_USED = "tconv,dcgan"  # an autoencoder (samples + reconstructions) and the GAN
PER_CLASS, TEST_PER_CLASS, TRAIN_IMAGES = 6, 2, 16
# tconv is member 0 and dcgan member 5: their held-out slices end at 16 + 6 * 16 files
N_REAL = TRAIN_IMAGES + len(MEMBERS) * 2 * (PER_CLASS + TEST_PER_CLASS)


def make_real_dir(folder: Path, n: int, seed: int = 0) -> Path:
    """Smooth random colour fields; every tenth one a 40x48 PNG (the zoo resizes to 32)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        h, w = (40, 48) if i % 10 == 9 else (32, 32)
        img = np.kron(rng.uniform(30, 225, (4, 4, 3)), np.ones((h // 4, w // 4, 1)))
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        name = f"{i:04d}.png" if i % 10 == 9 else f"{i:04d}.jpg"
        Image.fromarray(img).save(folder / name, quality=90)
    return folder


def settings(real_dir: Path, **changes) -> ZooSettings:
    base = {
        "real_dir": str(real_dir),
        "train_images": TRAIN_IMAGES,
        "steps": 4,
        "per_class": PER_CLASS,
        "test_per_class": TEST_PER_CLASS,
    }
    return ZooSettings(**{**base, **changes})


def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    return make_real_dir(tmp_path_factory.mktemp("real") / "REAL", N_REAL)


@pytest.fixture(scope="module")
def zoo(real_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("zoo") / "zoo"
    lines: list[str] = []
    built = build_zoo(out, MEMBERS_USED, settings(real_dir), log=lines.append)
    return {"out": out, "built": built, "log": lines}


def test_layout_jpegs_and_member_json(zoo, real_dir):
    out = zoo["out"]
    assert sorted(p.name for p in out.iterdir()) == ["dcgan", "tconv"]  # no temp folder left
    reference = Image.new("RGB", (32, 32))
    reference.save(out / "q75.jpeg", quality=75)
    with Image.open(out / "q75.jpeg") as ref:
        q75 = ref.quantization
    expected = {  # (split, class) -> file name prefixes and their counts
        "tconv": {
            ("train", "FAKE"): {"sample": 3, "recon": 3},
            ("test", "FAKE"): {"sample": 1, "recon": 1},
        },
        "dcgan": {("train", "FAKE"): {"sample": 6}, ("test", "FAKE"): {"sample": 2}},
    }
    for name, fakes in expected.items():
        member = out / name
        assert sorted(p.name for p in member.iterdir()) == ["member.json", "test", "train"]
        for split, n in (("train", PER_CLASS), ("test", TEST_PER_CLASS)):
            assert sorted(p.name for p in (member / split).iterdir()) == ["FAKE", "REAL"]
            real = sorted(p.name for p in (member / split / "REAL").iterdir())
            assert real == [f"real_{i:05d}.jpg" for i in range(n)]
            prefixes = {}
            for p in (member / split / "FAKE").iterdir():
                prefixes[p.name.split("_")[0]] = prefixes.get(p.name.split("_")[0], 0) + 1
            assert prefixes == fakes[(split, "FAKE")]
        for path in member.rglob("*.jpg"):
            with Image.open(path) as img:
                assert (img.format, img.size, img.mode) == ("JPEG", (32, 32), "RGB")
                assert img.quantization == q75, path  # quality 75 in both classes

    info = json.loads((out / "tconv" / "member.json").read_text())
    assert info == zoo["built"]["tconv"]
    assert info["member"] == "tconv" and info["kind"] == "ae" and info["decoder"] == "transposed"
    assert info["seed"] == 0 and info["threads"] == 1
    s = info["settings"]
    assert s["real_dir"] == str(real_dir.absolute()) and s["steps"] == 4 and s["mode"] == "mixed"
    assert (s["train_images"], s["per_class"], s["test_per_class"]) == (16, 6, 2)
    assert (s["image_size"], s["jpeg_quality"]) == (32, 75)
    assert info["counts"]["train"] == {"FAKE": {"samples": 3, "reconstructions": 3}, "REAL": 6}
    assert info["counts"]["test"] == {"FAKE": {"samples": 1, "reconstructions": 1}, "REAL": 2}
    assert info["train_seconds"] >= 0 and info["build_seconds"] >= info["train_seconds"]
    assert set(info["final_loss"]) == {"mse"} and info["final_loss"]["mse"] > 0
    # training files first, then the member's own REAL and reconstructed ones: disjoint
    assert info["real_files"] == {
        "train": ["0000.jpg", "0015.jpg"],
        "real": ["0016.jpg", "0023.jpg"],
        "reconstructed": ["0024.jpg", "0031.jpg"],
    }
    gan = zoo["built"]["dcgan"]
    assert set(gan["final_loss"]) == {"generator", "discriminator"}
    assert gan["real_files"]["real"] == ["0096.jpg", "0103.jpg"]  # member 5's slice
    assert gan["counts"]["train"]["FAKE"] == {"samples": 6, "reconstructions": 0}


def test_same_seed_same_bytes_and_another_seed_differs(zoo, real_dir, tmp_path):
    again = tmp_path / "again"
    build_zoo(again, MEMBERS_USED, settings(real_dir), log=lambda s: None)
    assert files_of(again) == files_of(zoo["out"])
    other = tmp_path / "other"
    build_zoo(other, "tconv", settings(real_dir, seed=1), log=lambda s: None)
    mine, theirs = files_of(zoo["out"]), files_of(other)
    sample = "tconv/train/FAKE/sample_00000.jpg"
    assert theirs[sample] != mine[sample]
    assert theirs["tconv/train/REAL/real_00000.jpg"] == mine["tconv/train/REAL/real_00000.jpg"]


def test_a_built_member_is_skipped_and_a_changed_one_rebuilt(zoo, real_dir, tmp_path):
    out = tmp_path / "zoo"
    build_zoo(out, "tconv", settings(real_dir), log=lambda s: None)
    stamp = out / "tconv" / "member.json"
    mtime = stamp.stat().st_mtime_ns
    lines: list[str] = []
    build_zoo(out, "tconv", settings(real_dir), log=lines.append)
    assert lines == [f"zoo: tconv: up to date ({stamp}), skipped"]
    assert stamp.stat().st_mtime_ns == mtime
    lines.clear()
    (out / "tconv" / ".detector-cache").mkdir()  # what training with data.cache=true leaves
    build_zoo(out, "tconv", settings(real_dir, steps=5), log=lines.append)
    assert lines[0] == "zoo: tconv: training 5 steps on 16 images"
    assert json.loads(stamp.read_text())["settings"]["steps"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["tconv"]  # the old one is gone


def test_an_interrupted_build_leaves_no_member(real_dir, tmp_path, monkeypatch):
    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "save_jpeg", fail)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "zoo", "tconv", settings(real_dir), log=lambda s: None)
    assert list((tmp_path / "zoo").iterdir()) == []


def test_bad_inputs_name_the_folder_or_setting(real_dir, tmp_path):
    missing = tmp_path / "nosuch"
    with pytest.raises(DataError, match=f"--real-dir {missing} is not a folder"):
        build_zoo(tmp_path / "z", "tconv", settings(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"--real-dir {empty} holds no images"):
        build_zoo(tmp_path / "z", "tconv", settings(empty))
    few = make_real_dir(tmp_path / "few", 20)
    with pytest.raises(DataError, match=f"--real-dir {few} holds 20 images; 32 are needed"):
        build_zoo(tmp_path / "z", "tconv", settings(few))
    known = ", ".join(m.name for m in MEMBERS)
    with pytest.raises(ConfigError, match=f"unknown member 'gpt'; known: {known}"):
        build_zoo(tmp_path / "z", "tconv,gpt", settings(real_dir))
    with pytest.raises(ConfigError, match="dcgan has no encoder.*--members tconv"):
        build_zoo(tmp_path / "z", MEMBERS_USED, settings(real_dir, mode="reconstructions"))
    with pytest.raises(ConfigError, match="--per-class must be at least 1"):
        build_zoo(tmp_path / "z", "tconv", settings(real_dir, per_class=0))
    foreign = tmp_path / "z" / "tconv"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("someone's files")
    with pytest.raises(DataError, match=f"{foreign} exists and is not a zoo member"):
        build_zoo(tmp_path / "z", "tconv", settings(real_dir))
    assert (foreign / "mine.txt").exists()


def test_command_line(real_dir, tmp_path, capsys):
    assert main([str(tmp_path / "z"), "--members", "vae", "--real-dir", str(tmp_path)]) == 2
    assert f"error: --real-dir {tmp_path} holds no images" in capsys.readouterr().err
    assert main([str(tmp_path / "z"), "--members", "gan", "--real-dir", str(real_dir)]) == 2
    assert "error: --members: unknown member 'gan'; known: tconv," in capsys.readouterr().err
    args = ["--train-images", "16", "--steps", "2", "--per-class", "2", "--test-per-class", "1"]
    out = tmp_path / "cli"
    common = [str(out), "--members", "vae", "--real-dir", str(real_dir), "--mode", "samples"]
    assert main([*common, *args]) == 0
    info = json.loads((out / "vae" / "member.json").read_text())
    assert info["counts"]["test"] == {"FAKE": {"samples": 1, "reconstructions": 0}, "REAL": 1}
    assert "zoo: vae: done in" in capsys.readouterr().out
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert os.path.isfile(out / "vae" / "train" / "FAKE" / "sample_00001.jpg")


def test_rest_links_only_files_no_member_used(tmp_path):
    """OUT/rest: the real files after all six members' slices (built or not) and as many FAKE
    files, linked, first ones to test/; up to date when unchanged; skipped without FAKE."""
    real = make_real_dir(tmp_path / "cifake" / "REAL", N_REAL + 7)
    fake = make_real_dir(tmp_path / "cifake" / "FAKE", 20, seed=1)
    out, lines = tmp_path / "zoo", []
    files = build.list_real(real)
    info = write_rest(out, files, settings(real), test_per_class=3, log=lines.append)
    rest = out / "rest"
    linked = {
        (split, cls): sorted(p.name for p in (rest / split / cls).iterdir())
        for split in ("train", "test")
        for cls in ("FAKE", "REAL")
    }
    unused = [p.name for p in files[N_REAL:]]  # 7 files after the members' 112
    assert linked[("test", "REAL")] == unused[:3] and linked[("train", "REAL")] == unused[3:]
    fakes = [p.name for p in build.list_real(fake)][:7]
    assert linked[("test", "FAKE")] == fakes[:3] and linked[("train", "FAKE")] == fakes[3:]
    target = rest / "train" / "REAL" / unused[3]
    assert target.is_symlink() and target.resolve() == (real / unused[3]).resolve()
    assert info["counts"] == {"train": 4, "test": 3} and info["real_files"] == [
        unused[0],
        unused[-1],
    ]
    assert lines == [
        f"zoo: rest: 4 + 3 images per class linked in {rest} (real files from {unused[0]})"
    ]
    lines.clear()
    write_rest(out, files, settings(real), test_per_class=3, log=lines.append)
    assert lines == [f"zoo: rest: up to date ({rest / 'member.json'}), skipped"]
    write_rest(out, files, settings(real), test_per_class=7, log=lines.append)
    assert (
        lines[-1].startswith("zoo: rest: skipped: ")
        and "more than --rest-test-per-class 7" in lines[-1]
    )
    lonely = make_real_dir(tmp_path / "lonely" / "REAL", N_REAL + 4)
    lines.clear()
    assert (
        write_rest(tmp_path / "z2", build.list_real(lonely), settings(lonely), 1, lines.append)
        is None
    )
    assert lines == [
        f"zoo: rest: no {tmp_path / 'lonely' / 'FAKE'} beside the real folder, skipped"
    ]
    assert main([str(tmp_path / "z3"), "--rest-test-per-class", "0"]) == 2


@pytest.mark.parametrize("name", ["dcgan", "nngan", "blgan"])
def test_each_gan_upsamples_its_own_way(name):
    """The three GANs share one generator and differ only in how each 2x step upsamples."""
    member = BY_NAME[name]
    assert member.kind == "gan" and not member.reconstructs
    torch.manual_seed(0)
    generator = build_network(member)
    images = generator(torch.randn(2, generator.latent))
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1
    modes = [m.mode for m in generator.modules() if isinstance(m, torch.nn.Upsample)]
    transposed = [m for m in generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    if member.decoder == "transposed":
        assert modes == [] and len(transposed) == 4  # the 4x4 stem and three 2x steps
    else:
        assert modes == [member.decoder] * 3 and len(transposed) == 1


def test_a_new_member_goes_last_and_a_gan_refuses_other_upsampling():
    # a member's real images are the slice at its position: blgan, added last, moved none
    assert [m.name for m in MEMBERS][-3:] == ["dcgan", "nngan", "blgan"]
    with pytest.raises(ValueError, match="'pixelshuffle' must be one of transposed, nearest"):
        Generator(decoder="pixelshuffle")
