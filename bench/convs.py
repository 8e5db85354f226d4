"""Training-step time of ResNet50-SE with ordinary convolutions vs ``model.matmul_convs``.

Both variants run interleaved in one process on synthetic images (bf16 autocast where the CPU
has it, channels_last, fused AdamW, as experiment=cifake_cpu trains), and the result is their
ratio, which survives this machine's noise better than either time alone.

    python bench/convs.py [--size 32] [--batch 256] [--steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from run import sync, synthetic  # bench/run.py: make bench's device, batches and sync

from detector.hardware import cpu_has_bf16
from detector.matmul_conv import set_matmul_convs
from detector.model import SEClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--backbone", default="resnet50")
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = synthetic(args.batch, args.size, channels_last=True)  # on make bench's device
    net = SEClassifier(args.backbone).to(x.device, memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    bf16 = cpu_has_bf16()

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.binary_cross_entropy_with_logits(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
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
