import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detector import matmul_conv
from detector.matmul_conv import MatmulConv2d, matmul_conv2d, set_matmul_convs
from detector.model import SEClassifier

# (in, out, kernel, stride, padding, map size): ResNet50's shapes at 32 px and their edges
SHAPES = [
    (8, 16, 1, 1, 0, 8),  # pointwise
    (8, 16, 1, 2, 0, 8),  # strided pointwise (timm's downsample)
    (8, 16, 1, 2, 0, 1),
    (6, 5, 3, 1, 1, 1),  # one pixel amid padding: the centre tap only
    (6, 5, 3, 2, 1, 1),
    (6, 5, 3, 2, 1, 2),  # layer4's first 3x3 at 32 px
    (6, 5, 3, 1, 1, 2),
    (6, 5, 5, 1, 2, 2),
    (3, 4, 7, 2, 3, 2),  # a stem-like kernel on a tiny image
    (6, 5, 3, 1, 0, 3),  # no padding, odd map: one output pixel from nine taps
]


@pytest.mark.parametrize("cin,cout,k,stride,pad,size", SHAPES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_matmul_conv_matches_conv2d_values_and_gradients(
    cin, cout, k, stride, pad, size, channels_last
):
    torch.manual_seed(0)
    x = torch.randn(3, cin, size, size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = F.conv2d(xa, w, b, stride, pad)
    got = matmul_conv2d(xb, w, b, (stride, stride), (pad, pad))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)
    grad_out = torch.randn_like(expected)
    ga = torch.autograd.grad(expected, (xa, w, b), grad_out)
    gb = torch.autograd.grad(got, (xb, w, b), grad_out)
    for a, g in zip(ga, gb, strict=True):
        torch.testing.assert_close(g, a)


def test_matmul_conv_output_is_channels_last():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    y = matmul_conv2d(x, torch.randn(16, 8, 1, 1), None, (1, 1), (0, 0))
    assert y.shape == (2, 16, 4, 4)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_matmul_path_taken_only_where_it_is_faster(monkeypatch):
    calls = []
    real = matmul_conv.matmul_conv2d

    def spy(x, *args):
        calls.append(tuple(x.shape[2:]))
        return real(x, *args)

    monkeypatch.setattr(matmul_conv, "matmul_conv2d", spy)
    three = set_matmul_convs(nn.Conv2d(4, 4, 3, padding=1))
    one = set_matmul_convs(nn.Conv2d(4, 4, 1))
    three(torch.randn(1, 4, 8, 8))  # 64 pixels: im2col would copy each one 9 times
    assert calls == []
    three(torch.randn(1, 4, 2, 2))
    one(torch.randn(1, 4, 8, 8))  # pointwise: always a matrix product
    assert calls == [(2, 2), (8, 8)]
    grouped = set_matmul_convs(nn.Conv2d(4, 4, 1, groups=2))
    dilated = set_matmul_convs(nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    grouped(torch.randn(1, 4, 2, 2))
    dilated(torch.randn(1, 4, 2, 2))
    assert len(calls) == 2


def test_set_matmul_convs_swaps_class_and_back_keeping_weights():
    net = SEClassifier("test_resnet", matmul_convs=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and not any(isinstance(m, MatmulConv2d) for m in convs)
    set_matmul_convs(net)
    assert all(type(m) is MatmulConv2d for m in convs)
    assert net.state_dict().keys() == before.keys()
    set_matmul_convs(net, enabled=False)
    assert all(type(m) is nn.Conv2d for m in convs)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_classifier_gives_the_same_logits_with_and_without_matmul_convs():
    torch.manual_seed(0)
    net = SEClassifier("test_resnet").eval()
    assert any(isinstance(m, MatmulConv2d) for m in net.modules())  # the default
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        fast = net(x)
        set_matmul_convs(net, enabled=False)
        plain = net(x)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
