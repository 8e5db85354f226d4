"""Training-step time of ResNet50-SE with ordinary convolutions vs ``model.matmul_convs``.

Both variants run interleaved in one process on synthetic images (bf16 autocast where the CPU
has it, channels_last, fused AdamW, as experiment=cifake_cpu trains), and the result is their
ratio, which survives this machine's noise better than either time alone.

    python bench/convs.py [--size 32] [--batch 256] [--steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from detector.matmul_conv import set_matmul_convs  # noqa: E402
from detector.model import SEClassifier  # noqa: E402
from detector.speed import cpu_has_bf16  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--backbone", default="resnet50")
    args = parser.parse_args()

    torch.manual_seed(0)
    net = SEClassifier(args.backbone).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    shape = (args.batch, 3, args.size, args.size)
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch,)).float()
    bf16 = cpu_has_bf16()

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.binary_cross_entropy_with_logits(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    for enabled in (False, True):  # warm-up: oneDNN builds its kernels on first use
        set_matmul_convs(net, enabled)
        for _ in range(3):
            step()
    for _ in range(args.steps):  # interleaved, so drifts in machine speed hit both alike
        for enabled in (False, True):
            set_matmul_convs(net, enabled)
            times[enabled].append(step())
    plain, fast = (statistics.median(times[k]) * 1000 for k in (False, True))
    print(
        f"{args.backbone} {args.size} px, batch {args.batch}, bf16={bf16}: "
        f"conv2d {plain:.0f} ms/step, matmul_convs {fast:.0f} ms/step, "
        f"speed-up {plain / fast:.2f}x"
    )


if __name__ == "__main__":
    main()
