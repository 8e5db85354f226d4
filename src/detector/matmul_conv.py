"""Convolutions as matrix products, for the shapes where oneDNN's CPU kernels are slow.

At CIFAKE's 32 px a ResNet50's last stages run on 2x2 and 1x1 feature maps. There oneDNN's
convolution (above all its weight gradient) is an order of magnitude slower than the same
arithmetic as one bf16 matrix product. So 1x1 convolutions, and every convolution on a map of
at most ``SMALL_MAP`` pixels, are computed as ``F.linear`` over NHWC patches (measured in
docs/speed.md; ``python bench/convs.py``). The parameters and state-dict keys stay those of
``nn.Conv2d``, so checkpoints load either way; other devices, and larger maps of larger
kernels (where im2col would copy each pixel k*k times), keep the ordinary convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_MAP = 4  # pixels (H*W) up to which a k x k convolution runs as im2col + matmul


class MatmulConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes on the CPU as a matrix product where that is faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.is_cpu and x.dim() == 4 and _eligible(self, x.shape[2] * x.shape[3])):
            return super().forward(x)
        return matmul_conv2d(x, self.weight, self.bias, self.stride, self.padding)


def _eligible(conv: nn.Conv2d, pixels: int) -> bool:
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):  # "same" / "valid": leave to the library
        return False
    pointwise = conv.kernel_size == (1, 1) and conv.padding == (0, 0)
    return pointwise or pixels <= SMALL_MAP


def matmul_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """``F.conv2d`` (zero padding, no dilation, one group) as ``F.linear`` over NHWC patches.

    The result is an NCHW view in channels_last memory order, the layout the next layers of a
    channels_last network expect.
    """
    n, c, h, w = x.shape
    out_ch, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    nhwc = x.permute(0, 2, 3, 1)
    if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):
        cols, mat = nhwc[:, ::sh, ::sw], weight.flatten(1)
    elif (h, w) == (1, 1) and (oh, ow) == (1, 1) and ph < kh and pw < kw:
        # One input pixel amid zero padding: only the kernel tap that lands on it counts.
        cols, mat = nhwc, weight[:, :, ph, pw]
    else:
        padded = F.pad(nhwc, (0, 0, pw, pw, ph, ph))
        taps = [
            padded[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
            for i in range(kh)
            for j in range(kw)
        ]
        cols, mat = torch.cat(taps, dim=3), weight.permute(0, 2, 3, 1).reshape(out_ch, -1)
    # As a 2-D product: given 4-D operands, torch.matmul may choose a batched product and copy
    # the weight once per image (it did so under no_grad; docs/speed.md).
    out = F.linear(cols.reshape(-1, cols.shape[-1]), mat, bias)
    return out.view(n, oh, ow, out_ch).permute(0, 3, 1, 2)


def set_matmul_convs(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every plain ``nn.Conv2d`` in ``module`` to :class:`MatmulConv2d` (or back).

    The class is swapped in place: a MatmulConv2d has no state of its own, so weights, hooks
    and state-dict keys are untouched. Exporters switch back, so that ONNX and TorchScript
    files hold ordinary convolutions for their runtimes to optimise.
    """
    for m in module.modules():
        if enabled and type(m) is nn.Conv2d:
            m.__class__ = MatmulConv2d
        elif not enabled and type(m) is MatmulConv2d:
            m.__class__ = nn.Conv2d
    return module
