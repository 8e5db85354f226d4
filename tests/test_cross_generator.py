"""The cross-generator protocol (scripts/cross_generator.py): a 2x2 train x test matrix as
Markdown, CSV and PNG, resumed cell by cell."""

import csv
import importlib.util
import json
import sys

import pytest

from tests.conftest import ROOT, TINY, make_image_folder, run_script

SCRIPT = "scripts/cross_generator.py"


def _script():
    spec = importlib.util.spec_from_file_location("cross_generator", ROOT / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("sources")
    return {
        "a": make_image_folder(base / "a", n_train=12, n_test=6, seed=1),
        "b": make_image_folder(base / "b", n_train=12, n_test=5, seed=2),
    }


def test_matrix_is_written_and_resumed_cell_by_cell(two_sources, tmp_path):
    out = tmp_path / "cross"
    args = [
        "--sources",
        ",".join(f"{name}={folder}" for name, folder in two_sources.items()),
        "--out",
        str(out),
        "--eval",
        "report.bootstrap_resamples=20",
        *TINY,
    ]
    first = run_script(SCRIPT, *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("cross: train") == 4  # two models: start and end lines
    assert first.stdout.count("cross: eval") == 4
    with (out / "matrix.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["train"], r["test"]) for r in rows] == [
        ("a", "a"),
        ("a", "b"),
        ("b", "a"),
        ("b", "b"),
    ]
    assert [r["n"] for r in rows] == ["12", "10", "12", "10"]
    assert [r["seen"] for r in rows] == ["True", "False", "False", "True"]
    for r in rows:  # each cell is eval.py's report of that model on that test set
        report = json.loads(
            (out / "evals" / f"{r['train']}__{r['test']}" / "metrics.json").read_text()
        )
        assert float(r["auroc"]) == pytest.approx(report["auroc"])
        assert float(r["average_precision"]) == pytest.approx(report["average_precision"])
        assert float(r["ood_flagged"]) == pytest.approx(report["ood"]["flagged"])
    md = (out / "matrix.md").read_text()
    assert "## AUROC" in md and "## AP" in md and "--sources a=" in md
    aa = float(rows[0]["auroc"])
    assert f"| a | **{aa:.4f}** |" in md
    assert (out / "matrix.png").stat().st_size > 5000
    assert "## Left out" not in md and not (out / "held_out.json").exists()  # per-source
    assert "scripts/cross_generator.py --sources" in (out / "command.txt").read_text()

    again = run_script(SCRIPT, *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cross: train" not in again.stdout and "cross: eval" not in again.stdout
    assert (out / "matrix.md").read_text() == md

    (out / "cells" / "b__a.json").unlink()
    third = run_script(SCRIPT, *args, cwd=tmp_path)
    assert "cross: train" not in third.stdout
    assert third.stdout.count("cross: eval") == 1 and "cross: eval b -> a" in third.stdout
    assert (out / "matrix.md").read_text() == md

    # a model stopped after its last epoch (before done.json): resumed from its last.ckpt, not
    # trained from scratch; the same weights give the same cell
    last = out / "models" / "b" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    (out / "models" / "b" / "done.json").unlink()
    (out / "cells" / "b__a.json").unlink()
    fourth = run_script(SCRIPT, *args, cwd=tmp_path)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert f"cross: train b on b (resuming {last})" in fourth.stdout
    assert "cross: train a" not in fourth.stdout
    cell = json.loads((out / "cells" / "b__a.json").read_text())
    assert cell["auroc"] == pytest.approx(float(rows[2]["auroc"]), abs=1e-4)


def test_leave_one_out_trains_on_the_other_sources(two_sources, tmp_path):
    module = _script()
    sources = module.parse_sources(",".join(f"{n}={f}" for n, f in two_sources.items()))
    rows = module.plan_rows(sources, "leave-one-out", [], tmp_path)
    assert [r.name for r in rows] == ["all-but-a", "all-but-b"]
    assert rows[0].seen == ["b"]
    assert rows[0].settings["train_dirs"] == {"b": str(two_sources["b"] / "train")}
    assert rows[0].settings["class_map"] == {"FAKE": "FAKE", "REAL": "REAL"}


def test_sources_are_checked(tmp_path):
    module = _script()
    assert [(s.name, s.option, s.root) for s in module.parse_sources("demo,x=genimage:/d")] == [
        ("demo", "demo", None),
        ("x", "genimage", "/d"),
    ]
    done = run_script(SCRIPT, "--sources", "demo,nosuch", cwd=tmp_path)
    assert done.returncode == 2
    assert "error: --sources: 'nosuch' is neither a conf/data option nor NAME=FOLDER" in done.stderr


def test_always_sources_are_trained_on_and_never_left_out(two_sources, tmp_path):
    module = _script()
    third = make_image_folder(tmp_path / "c", n_train=4, n_test=2, seed=3)
    folders = {**two_sources, "c": third}
    sources = module.parse_sources(",".join(f"{n}={f}" for n, f in folders.items()))
    always = module.parse_always("a", sources, "leave-one-out")
    rows = module.plan_rows(sources, "leave-one-out", [], tmp_path, always)
    assert [r.name for r in rows] == ["all-but-b", "all-but-c"]
    assert [r.seen for r in rows] == [["a", "c"], ["a", "b"]]
    assert rows[0].settings["train_dirs"] == {
        "a": str(folders["a"] / "train"),
        "c": str(third / "train"),
    }
    assert module.parse_always("", sources, "per-source") == []
    for text, mode, message in (
        ("a", "per-source", "--always applies to --mode leave-one-out only"),
        ("a,nosuch", "leave-one-out", "--always: nosuch is not a source; sources: a, b, c"),
        ("a,b,c", "leave-one-out", "--always names every source"),
    ):
        with pytest.raises(module.ConfigError, match=message):
            module.parse_always(text, sources, mode)
    done = run_script(SCRIPT, "--sources", "demo,demo_b", "--always", "demo", cwd=tmp_path)
    assert done.returncode == 2
    assert "error: --always applies to --mode leave-one-out only" in done.stderr


def test_leave_one_out_summary_gives_each_left_out_source_and_the_mean_and_worst(tmp_path):
    from detector.evaluation.matrix import write_matrix

    cols = ["cifake", "tconv", "vae"]
    aurocs = {"tconv": 0.9, "vae": 0.7}
    cells = {
        (f"all-but-{held}", col): {
            "auroc": aurocs[held] if col == held else 0.99,
            "accuracy": 0.8,
            "average_precision": 0.85,
            "n": 10,
            "ood_flagged": 0.25 if col == held else 0.05,
        }
        for held in aurocs
        for col in cols
    }
    rows = ["all-but-tconv", "all-but-vae"]
    seen = {"all-but-tconv": ["cifake", "vae"], "all-but-vae": ["cifake", "tconv"]}
    paths = write_matrix(cells, rows, cols, seen, tmp_path, "python scripts/x.py", True)
    summary = json.loads(paths["held_out"].read_text())
    assert summary["mean_auroc"] == pytest.approx(0.8) and summary["worst_auroc"] == 0.7
    assert summary["worst"] == "vae" and summary["members"]["tconv"]["row"] == "all-but-tconv"
    assert summary["members"]["vae"]["ood_flagged"] == 0.25
    md = paths["md"].read_text()
    assert "| vae | 0.7000 | 0.8000 | 0.8500 | 25.0% |" in md
    assert "Mean AUROC **0.8000**, worst **0.7000** (vae)." in md
    with paths["csv"].open() as f:
        assert [r["ood_flagged"] for r in csv.DictReader(f)][:2] == ["0.05", "0.25"]


def test_leave_one_out_held_out_only_tests_the_left_out_and_always_sources(two_sources, tmp_path):
    third = make_image_folder(tmp_path / "c", n_train=12, n_test=4, seed=3)
    folders = {**two_sources, "c": third}
    out = tmp_path / "loo"
    sources = ",".join(f"{name}={folder}" for name, folder in folders.items())
    args = ["--sources", sources, "--mode", "leave-one-out", "--always", "a", "--held-out-only"]
    args += ["--out", str(out), "--eval", "report.bootstrap_resamples=20", *TINY]
    done = run_script(SCRIPT, *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    cells = sorted(p.stem for p in (out / "cells").glob("*.json"))
    assert cells == ["all-but-b__a", "all-but-b__b", "all-but-c__a", "all-but-c__c"]
    summary = json.loads((out / "held_out.json").read_text())
    held = {
        name: json.loads((out / "cells" / f"all-but-{name}__{name}.json").read_text())
        for name in ("b", "c")
    }
    assert summary["members"]["b"]["auroc"] == pytest.approx(held["b"]["auroc"])
    mean = (held["b"]["auroc"] + held["c"]["auroc"]) / 2
    assert summary["mean_auroc"] == pytest.approx(mean)
    assert summary["worst_auroc"] == pytest.approx(min(held["b"]["auroc"], held["c"]["auroc"]))
    md = (out / "matrix.md").read_text()
    assert "## Left out" in md and f"Mean AUROC **{mean:.4f}**" in md
    assert md.count("| all-but-b | ") == 3 and "| **-** |" in md  # c: skipped, seen (bold)
    wrong = run_script(SCRIPT, "--sources", sources, "--held-out-only", cwd=tmp_path)
    assert wrong.returncode == 2
    assert "error: --held-out-only applies to --mode leave-one-out only" in wrong.stderr


def test_a_resume_override_is_refused_before_any_training(two_sources, tmp_path):
    """ckpt_path=last (what an interrupted train prints) would resume the newest run of
    logs/train, not the protocol's model: refused, with what to do instead."""
    args = ["--sources", ",".join(f"{n}={f}" for n, f in two_sources.items()),
            "--out", str(tmp_path / "cross"), *TINY, "ckpt_path=last"]  # fmt: skip
    refused = run_script(SCRIPT, *args, cwd=tmp_path)
    assert refused.returncode == 2
    assert "rerun the same command without it" in refused.stderr
    assert not (tmp_path / "cross" / "models").exists()


def test_an_interrupted_model_prints_the_protocol_command_to_resume(capsys, tmp_path):
    """Ctrl-C inside the protocol: the resume line is the script's own command (which resumes
    the model from its last.ckpt), not train.py's ckpt_path=last."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from detector.callbacks import SaveOnInterrupt

    saved = []
    trainer = SimpleNamespace(
        is_global_zero=True,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        default_root_dir=str(tmp_path),
        _checkpoint_connector=SimpleNamespace(dump_checkpoint=lambda weights_only: {"x": 1}),
        strategy=SimpleNamespace(
            checkpoint_io=SimpleNamespace(save_checkpoint=lambda c, p: saved.append(p))
        ),
        current_epoch=2,
        max_epochs=12,
        global_step=900,
    )
    command = "python scripts/cross_generator.py --sources a,b"
    SaveOnInterrupt(resume_command=command).on_exception(trainer, None, KeyboardInterrupt())
    err = capsys.readouterr().err
    assert saved == [tmp_path / "checkpoints" / "last.ckpt"]
    assert "in epoch 3/12 (step 900)" in err
    assert err.rstrip().endswith(f"resume with: {command}") and "ckpt_path" not in err
