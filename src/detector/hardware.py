"""Defaults that depend on the machine: numeric precision and the number of loader workers.

bf16 mixed precision halves the bytes every layer moves and runs matrix products on bf16 units
(tensor cores; AMX / AVX512-BF16 on recent Xeons), with float32 master weights, so no loss
scaling is needed. Hardware without bf16 arithmetic emulates it, which is slower than float32:
there ``auto`` keeps float32. docs/speed.md has the measurements behind the choice.

Loader worker processes overlap decoding with a GPU's work. When the model runs on the CPU, they
take the very cores the model's threads use: the measured train path lost 12-15% to two mostly
idle workers on a 2-core machine. There, decoding in the main process (cheap with the batched
JPEG path and the image cache) gives more images per second.

Where workers do pay on the CPU (predict.py decoding large JPEGs), the model gets the cores the
workers leave (:func:`threads_beside_workers`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from detector.errors import ConfigError
from detector.launch_env import cpu_cores

AUTO = "auto"


def cpu_has_bf16() -> bool:
    """AVX512-BF16 (or AMX): the instructions oneDNN needs for fast bf16 convolutions."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def cuda_has_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def auto_precision(accelerator: str | None = AUTO) -> str:
    """``bf16-mixed`` when the device that will run the model does bf16 in hardware, else
    ``32-true``. ``accelerator`` as for the Lightning Trainer (auto, cpu, gpu, cuda, ...)."""
    accelerator = (accelerator or AUTO).lower()
    if accelerator in (AUTO, "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if cuda_has_bf16() else "32-true"
    if accelerator in (AUTO, "cpu"):
        return "bf16-mixed" if cpu_has_bf16() else "32-true"
    return "32-true"  # mps, tpu, ...: Lightning's own default


def resolve_precision(value, accelerator: str | None = AUTO):
    """``trainer.precision`` with ``auto`` (or null) replaced by :func:`auto_precision`."""
    if value is None or (isinstance(value, str) and value.lower() == AUTO):
        return auto_precision(accelerator)
    if isinstance(value, str) and not value.strip():
        raise ConfigError("trainer.precision is empty: use auto, 32-true, bf16-mixed or 16-mixed")
    return value


def runs_on_cpu(accelerator: str | None = AUTO) -> bool:
    accelerator = (accelerator or AUTO).lower()
    return accelerator == "cpu" or (accelerator == AUTO and not torch.cuda.is_available())


def auto_workers(accelerator: str | None = AUTO) -> int:
    """0 when the model runs on the CPU (see above); else up to 8 per GPU, as cores allow."""
    if runs_on_cpu(accelerator):
        return 0
    gpus = max(1, torch.cuda.device_count())
    return max(1, min(8, cpu_cores() // gpus))


@contextlib.contextmanager
def threads_beside_workers(workers: int, device: torch.device | str) -> Iterator[int]:
    """Run the model with the cores the loader's ``workers`` leave, when it runs on the CPU.

    A model thread that waits for a core holds up its whole OpenMP team at every barrier:
    scoring 64 images at 32 px took 0.1 s alone and ~2 s while two workers decoded, on 2 cores
    (one thread beside the two workers: 2.3x the images/s of predict.py; docs/speed.md). Never
    more threads than torch already uses; restored afterwards.
    """
    before = torch.get_num_threads()
    if workers > 0 and torch.device(device).type == "cpu":
        torch.set_num_threads(max(1, min(before, cpu_cores() - workers)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
