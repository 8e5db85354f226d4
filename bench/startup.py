"""Start-up of every command, as ratios to ``python -c "import torch, timm"`` in one run (#20):

    python bench/startup.py [--repeats 5] [--ckpt CKPT]

Rows: ``--help`` of each entry point (target <= 1.0x) and a one-image ``predict.py`` (target
<= 1.5x). Commands run interleaved, each from a fresh process, wall time medians. Without
``--ckpt`` an untrained ResNet50-SE checkpoint at 32 px is written to a temporary folder (the
scoring cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("train", "eval", "predict", "export", "explain", "serve")


def _checkpoint(folder: Path) -> Path:
    import numpy as np
    import torch
    from PIL import Image

    from detector.model import SEClassifier

    net = SEClassifier(backbone="resnet50")
    hparams = {"backbone": "resnet50", "image_size": 32, "class_names": ["FAKE", "REAL"]}
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    path = folder / "untrained.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(folder / "one.png")
    return path


def _wall(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ckpt", type=Path, default=None)
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = args.ckpt or _checkpoint(folder)
        image = folder / "one.png"
        if not image.exists():
            _checkpoint(folder)
        commands = {"import torch, timm": [py, "-c", "import torch, timm"]}
        commands |= {f"{e}.py --help": [py, f"{e}.py", "--help"] for e in ENTRY_POINTS}
        commands["predict.py, one image"] = [
            py, "predict.py", f"ckpt={ckpt}", f"input={image}", f"output={folder / 'p.csv'}",
            "progress=false", "device=cpu",
        ]  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(_wall(command))
    base = statistics.median(times["import torch, timm"])
    print("| command | median s | x import torch, timm | target | met |\n|---|---|---|---|---|")
    for name, values in times.items():
        ratio = statistics.median(values) / base
        target = 1.5 if "one image" in name else 1.0
        met = "" if name.startswith("import") else ("yes" if ratio <= target else "NO")
        shown = "" if name.startswith("import") else f"<= {target}x"
        print(f"| {name} | {statistics.median(values):.2f} | {ratio:.2f} | {shown} | {met} |")


if __name__ == "__main__":
    main()
