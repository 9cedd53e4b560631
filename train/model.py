"""Build a classifier by name and wrap it for fast DDP training."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import ConfigError


def build_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """A torchvision classification model by name (random init), or `package.module:factory`,
    called as factory(num_classes=...)."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError("model", f"cannot load factory {name!r}: {e}") from None
        return factory(num_classes=num_classes)
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ConfigError("model", f"unknown torchvision classification model {name!r}; e.g. "
                          + ", ".join(n for n in known if n.startswith(("resnet", "vit_b")))
                          + " or package.module:factory")
    # ViTs fix their input size at construction; convnets take any size.
    extra = {"image_size": image_size} if name.startswith("vit_") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """A two-conv network for tests and smoke runs: `model=train.model:tiny_cnn`."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


class SpaceToDepthStemConv(nn.Module):
    """ResNet's stem, a 7x7 stride-2 padding-3 convolution on 3 channels, computed as a 4x4
    stride-1 convolution on the 2x2 space-to-depth of the padded input (12 channels, padded to 16).

    The same function of the same parameter (`weight`, 64x3x7x7, so state dicts and checkpoints
    are unchanged): the 7x7 kernel is zero-padded to 8x8 and rearranged like the input. cuDNN
    runs the 3-channel 7x7 stride-2 convolution with generic Ampere-style kernels (on an H200 at
    batch 512: 3.2 ms forward, 1.8 ms weight gradient per ResNet-50 step); 16 channels at stride 1
    take its Hopper kernels, and all convolutions together fell from 29.4 to 25.6 ms per step
    (bench/README.md). Inputs of odd height or width fall back to the plain convolution."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = conv.weight
        self.out_channels = conv.out_channels

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        return (type(conv) is nn.Conv2d and conv.in_channels == 3 and conv.kernel_size == (7, 7)
                and conv.stride == (2, 2) and conv.padding == (3, 3) and conv.dilation == (1, 1)
                and conv.groups == 1 and conv.bias is None and conv.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            return F.conv2d(x, self.weight, stride=2, padding=3)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        hp, wp = (h + 6) // 2, (w + 6) // 2
        # input: pad 3, then (c, 2a+p, 2b+q) -> channel (c, p, q) at (a, b); 12 channels -> 16
        xs = F.pad(x, (3, 3, 3, 3)).view(n, c, hp, 2, wp, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, hp, wp)
        xs = F.pad(xs, (0, 0, 0, 0, 0, 16 - 4 * c))
        # weight: 7x7 -> 8x8 (zero row and column at the end), rearranged the same way
        k = self.out_channels
        ws = F.pad(self.weight, (0, 1, 0, 1)).view(k, c, 4, 2, 4, 2).permute(0, 1, 3, 5, 2, 4).reshape(k, 4 * c, 4, 4)
        ws = F.pad(ws, (0, 0, 0, 0, 0, 16 - 4 * c))
        if channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
            ws = ws.contiguous(memory_format=torch.channels_last)
        return F.conv2d(xs, ws)  # (h+6)/2 - 3 = h/2 rows, as the stride-2 convolution


class _MaxPool3x3s2(torch.autograd.Function):
    """max_pool2d(kernel 3, stride 2, padding 1) that saves the argmax as a uint8 (0..8) and
    computes the input gradient with pointwise operations that the compiler fuses into one kernel.
    The same results as F.max_pool2d, ties and NaNs included (first maximum in row-major window
    order wins, NaN propagates). On CUDA with Triton, the backward is one hand-written kernel
    (`_maxpool_bwd_kernel`): Inductor's kernel, made from these pointwise operations or from
    max_pool2d's own backward, took 3.0-3.1 ms per ResNet-50 step of 512 on an H200, about 10x
    what its bytes need (bench/README.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        best, idx = _maxpool_forward(x)
        ctx.save_for_backward(idx)
        ctx.hw = tuple(x.shape[-2:])
        ctx.channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous()
        return best

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (idx,) = ctx.saved_tensors
        h, w = ctx.hw
        op = _maxpool_bwd_op() if grad.is_cuda and grad.dim() == 4 else None
        if op is not None:
            out = op(grad, idx, h, w)
            return out if ctx.channels_last else out.contiguous()
        return _maxpool_bwd_pointwise(grad, idx, h, w, ctx.channels_last)


def _maxpool_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """max_pool2d(3, 2, 1) and its argmax within each window (uint8, dy * 3 + dx)."""
    h, w = x.shape[-2:]
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = F.pad(x, (1, 2 * wo + 1 - w, 1, 2 * ho + 1 - h), value=float("-inf"))
    best = idx = None
    for k in range(9):
        dy, dx = divmod(k, 3)
        s = xp[..., dy:dy + 2 * ho:2, dx:dx + 2 * wo:2]
        if best is None:
            best, idx = s, torch.zeros(s.shape, dtype=torch.uint8, device=s.device)
        else:
            take = (s > best) | torch.isnan(s)
            best = torch.where(take, s, best)
            idx = torch.where(take, torch.full_like(idx, k), idx)
    return best, idx


def _maxpool_bwd_pointwise(grad: torch.Tensor, idx: torch.Tensor, h: int, w: int,
                           channels_last: bool) -> torch.Tensor:
    # Padded input row 2r+pr gets window row dy (pr = dy % 2) of output row r (dy < 2) or r-1
    # (dy = 2); the same for columns. Build the four parity sub-grids, then interleave them.
    def shifted(k: int) -> torch.Tensor:
        dy, dx = divmod(k, 3)
        g = torch.where(idx == k, grad, torch.zeros_like(grad))
        return F.pad(g, (1 if dx == 2 else 0, 0 if dx == 2 else 1, 1 if dy == 2 else 0, 0 if dy == 2 else 1))

    sub = [[None, None], [None, None]]
    for k in range(9):
        dy, dx = divmod(k, 3)
        part = shifted(k)
        cur = sub[dy % 2][dx % 2]
        sub[dy % 2][dx % 2] = part if cur is None else cur + part
    grid = torch.stack([torch.stack([sub[pr][0], sub[pr][1]], dim=-1) for pr in (0, 1)], dim=-3)
    *lead, hh, _, ww, _ = grid.shape
    full = grid.reshape(*lead, 2 * hh, 2 * ww)[..., 1:1 + h, 1:1 + w]
    return full.contiguous(memory_format=torch.channels_last) if channels_last else full.contiguous()


# The backward as one Triton kernel (CUDA): one program element per window (n, k, l, c), in
# channels-last order (c fastest, so loads and stores are coalesced). Input row 2k gets window row
# k at dy = 1; row 2k+1 gets window k at dy = 2 and window k+1 at dy = 0; columns the same. So an
# element reads the argmax and gradient of windows (k, l), (k, l+1), (k+1, l), (k+1, l+1) and
# writes input pixels (2k, 2l), (2k, 2l+1), (2k+1, 2l), (2k+1, 2l+1). Set USE_TRITON_MAXPOOL =
# False for Inductor's kernel instead (bench/step_variants.py compares the two).
USE_TRITON_MAXPOOL = True
_maxpool_op: list = []


def _maxpool_bwd_op():
    if not USE_TRITON_MAXPOOL:
        return None
    if not _maxpool_op:
        _maxpool_op.append(_build_maxpool_bwd_op())
    return _maxpool_op[0]


def _build_maxpool_bwd_op():
    try:
        import triton
        import triton.language as tl
        from torch.library import triton_op, wrap_triton
    except ImportError:
        return None

    @triton.jit
    def _maxpool_bwd_kernel(grad_ptr, idx_ptr, out_ptr, total, C, HO, WO, H, W, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        c = offs % C
        t = offs // C
        l = t % WO
        t = t // WO
        k = t % HO
        n = t // HO
        base = n * HO
        right = mask & (l + 1 < WO)
        down = mask & (k + 1 < HO)
        p00 = ((base + k) * WO + l) * C + c
        p01 = p00 + C
        p10 = p00 + WO * C
        p11 = p10 + C
        i00 = tl.load(idx_ptr + p00, mask=mask, other=9).to(tl.int32)
        i01 = tl.load(idx_ptr + p01, mask=right, other=9).to(tl.int32)
        i10 = tl.load(idx_ptr + p10, mask=down, other=9).to(tl.int32)
        i11 = tl.load(idx_ptr + p11, mask=right & down, other=9).to(tl.int32)
        g00 = tl.load(grad_ptr + p00, mask=mask, other=0.0).to(tl.float32)
        g01 = tl.load(grad_ptr + p01, mask=right, other=0.0).to(tl.float32)
        g10 = tl.load(grad_ptr + p10, mask=down, other=0.0).to(tl.float32)
        g11 = tl.load(grad_ptr + p11, mask=right & down, other=0.0).to(tl.float32)
        zero = tl.zeros_like(g00)
        # window position code dy * 3 + dx
        o00 = tl.where(i00 == 4, g00, zero)
        o01 = tl.where(i00 == 5, g00, zero) + tl.where(i01 == 3, g01, zero)
        o10 = tl.where(i00 == 7, g00, zero) + tl.where(i10 == 1, g10, zero)
        o11 = (tl.where(i00 == 8, g00, zero) + tl.where(i01 == 6, g01, zero)
               + tl.where(i10 == 2, g10, zero) + tl.where(i11 == 0, g11, zero))
        # window k covers input rows 2k-1 .. 2k+1 (padding 1), so its dy = 1 row is input row 2k;
        # the input is (n, h, w, c) in memory (channels-last)
        h0 = 2 * k
        w0 = 2 * l
        q00 = ((n * H + h0) * W + w0) * C + c
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + q00, o00.to(dtype), mask=mask)
        tl.store(out_ptr + q00 + C, o01.to(dtype), mask=mask & (w0 + 1 < W))
        tl.store(out_ptr + q00 + W * C, o10.to(dtype), mask=mask & (h0 + 1 < H))
        tl.store(out_ptr + q00 + W * C + C, o11.to(dtype), mask=mask & (h0 + 1 < H) & (w0 + 1 < W))

    @triton_op("train::maxpool3x3s2_bwd", mutates_args=())
    def maxpool3x3s2_bwd(grad: torch.Tensor, idx: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n, c, ho, wo = grad.shape
        grad = grad.contiguous(memory_format=torch.channels_last)
        idx = idx.contiguous(memory_format=torch.channels_last)
        out = torch.empty((n, c, h, w), dtype=grad.dtype, device=grad.device,
                          memory_format=torch.channels_last)
        total = n * ho * wo * c
        block = 1024

        def grid(meta):
            return (triton.cdiv(total, meta["BLOCK"]),)

        wrap_triton(_maxpool_bwd_kernel)[grid](grad, idx, out, total, c, ho, wo, h, w, BLOCK=block)
        return out

    return maxpool3x3s2_bwd


class MaxPool3x3s2(nn.Module):
    """nn.MaxPool2d(3, 2, 1) with the backward of _MaxPool3x3s2."""

    @staticmethod
    def fits(pool: nn.Module) -> bool:
        def pair(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        return (type(pool) is nn.MaxPool2d and pair(pool.kernel_size) == (3, 3) and pair(pool.stride) == (2, 2)
                and pair(pool.padding) == (1, 1) and pair(pool.dilation) == (1, 1) and not pool.ceil_mode
                and not pool.return_indices)

    def __init__(self):
        super().__init__()
        if torch.cuda.is_available():
            _maxpool_bwd_op()  # built here, not while torch.compile traces the backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaxPool3x3s2.apply(x)


def fast_stem(model: nn.Module) -> list[str]:
    """Swap a ResNet-style stem (model.conv1, model.maxpool) for the modules above, in place;
    return the names of what was swapped (none for other models). Parameters and state-dict keys
    stay the same."""
    swapped = []
    if SpaceToDepthStemConv.fits(getattr(model, "conv1", None)):
        model.conv1 = SpaceToDepthStemConv(model.conv1)
        swapped.append("conv1")
    if MaxPool3x3s2.fits(getattr(model, "maxpool", None)):
        model.maxpool = MaxPool3x3s2()
        swapped.append("maxpool")
    return swapped


def wrap(model: nn.Module, device: torch.device, *, distributed: bool, channels_last: bool,
         compile: bool, compile_mode: str, bucket_cap_mb: int) -> tuple[nn.Module, DDP | None]:
    """Move to device, wrap in DDP, then compile: (the module to train, the DDP wrapper or None).

    DDP goes inside torch.compile so that Dynamo's DDPOptimizer can split the graph at bucket
    boundaries and all-reduce overlaps the backward pass."""
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ddp = None
    net: nn.Module = model
    if distributed:
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  bucket_cap_mb=bucket_cap_mb,
                  # gradients live in the all-reduce buckets: no copy, less memory
                  gradient_as_bucket_view=True)
        net = ddp
    if compile:
        net = torch.compile(net, mode=None if compile_mode == "default" else compile_mode)
    return net, ddp


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    # Fused kernels update all parameters in a few launches; they exist for CUDA tensors.
    fused = {"fused": True} if device.type == "cuda" else {}
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, **fused)
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, **fused)
