"""train.model.fast_stem: the swapped ResNet stem computes what torchvision's does, gradients too."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from train.model import MaxPool3x3s2, SpaceToDepthStemConv, fast_stem


@pytest.mark.parametrize("hw", [(32, 32), (30, 46), (31, 32)])  # 31: odd, the plain-convolution fallback
@pytest.mark.parametrize("channels_last", [False, True])
def test_space_to_depth_stem_conv_matches_the_strided_convolution(hw, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False).double()
    fast = SpaceToDepthStemConv(conv)
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, conv.weight, stride=2, padding=3)
    out = fast(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    (gw_ref,) = torch.autograd.grad(ref, conv.weight, g)
    (gw,) = torch.autograd.grad(out, fast.weight, g)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hw", [(16, 16), (15, 17), (2, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_matches_torch_values_ties_and_gradients(hw, channels_last):
    torch.manual_seed(1)
    # after a ReLU: many exact ties at zero, where the gradient must go to the first maximum
    x = torch.randn(2, 5, *hw).relu().round(decimals=1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = F.max_pool2d(a, 3, 2, 1)
    out = MaxPool3x3s2()(b)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6)
    assert b.grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_max_pool_propagates_nan_like_torch():
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 2, 3] = float("nan")
    assert torch.equal(torch.isnan(MaxPool3x3s2()(x)), torch.isnan(F.max_pool2d(x, 3, 2, 1)))


def test_fast_stem_swaps_a_resnet_stem_and_keeps_its_state_dict():
    torch.manual_seed(2)
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ref = model(x)
    assert fast_stem(model) == ["conv1", "maxpool"]
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), ref, rtol=1e-9, atol=1e-9)
    assert fast_stem(nn.Sequential(nn.Linear(2, 2))) == []


def test_fast_stem_traces_under_torch_compile():
    """Dynamo and AOTAutograd take the custom backward (aot_eager: no C++ compiler needed)."""
    torch.manual_seed(3)
    stem = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    fast = nn.Sequential(SpaceToDepthStemConv(stem[0]), nn.ReLU(), MaxPool3x3s2())
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    ref = stem(x).square().sum()
    (g_ref,) = torch.autograd.grad(ref, stem[0].weight)
    out = torch.compile(fast, backend="aot_eager", fullgraph=True)(x).square().sum()
    (g,) = torch.autograd.grad(out, fast[0].weight)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


_TRITON_CHECK = r"""
import torch, torch.nn.functional as F
from train import model as m
op = m._maxpool_bwd_op()
assert op is not None, "no Triton"
torch.manual_seed(3)
for shape in [(2, 5, 16, 16), (2, 3, 15, 17), (1, 4, 2, 3), (3, 8, 7, 7), (1, 2, 1, 1)]:
    x = torch.randn(*shape).relu().round(decimals=1).contiguous(memory_format=torch.channels_last)
    a = x.clone().requires_grad_()
    ref = F.max_pool2d(a, 3, 2, 1)
    g = torch.randn_like(ref)
    ref.backward(g)
    got = op(g, m._maxpool_forward(x)[1], *shape[-2:])
    assert got.is_contiguous(memory_format=torch.channels_last), shape
    assert torch.equal(got, a.grad), (shape, (got - a.grad).abs().max())
print("ok")
"""


def test_max_pool_triton_backward_kernel_matches_torch(tmp_path):
    """The CUDA backward kernel, run by Triton's interpreter on the CPU (the GPU run is in
    bench/step_variants.py's maxpool-micro): every input pixel, ties at zero, odd sizes, 1x1."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _TRITON_CHECK], capture_output=True, text=True, timeout=300,
                         cwd=repo, env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo)))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
