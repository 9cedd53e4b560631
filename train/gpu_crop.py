"""One GPU kernel that crops, resizes, flips and normalises a whole batch of decoded images.

The decoded images (any sizes, CHW or HWC uint8) lie one after another in one flat buffer; each
output pixel reads only its own crop box, so nothing is padded to the batch's largest image and
no float copy of the full images is made. The arithmetic is roi_align's (aligned=True,
sampling_ratio=0: ceil(box/size) x ceil(box/size) bilinear samples averaged per output pixel, an
antialiased resize), which train/pipeline.py uses on the CPU and which the tests compare with PIL.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

# per image, int64: offset in the buffer, H, W, stride of channel, row and column, output index,
# flip, samples per output pixel vertically and horizontally
IMETA = tl.constexpr(10)   # a jit function may read only constexpr globals
# per image, float32: the box's top, left, height and width in the decoded image's pixels
FMETA = tl.constexpr(4)


@triton.jit
def _crop_resize(src, imeta, fmeta, out, out_sn, out_sc, out_sp, m0, m1, m2, i0, i1, i2,
                 S: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = p < S * S
    m = imeta + i * IMETA
    off, H, W = tl.load(m), tl.load(m + 1).to(tl.int32), tl.load(m + 2).to(tl.int32)
    sc, sy, sx = tl.load(m + 3), tl.load(m + 4), tl.load(m + 5)
    o, flip, gh, gw = tl.load(m + 6), tl.load(m + 7), tl.load(m + 8).to(tl.int32), tl.load(m + 9).to(tl.int32)
    f = fmeta + i * FMETA
    top, left, bh, bw = tl.load(f), tl.load(f + 1), tl.load(f + 2) / S, tl.load(f + 3) / S
    oy = p // S
    ox = p % S
    ox = tl.where(flip != 0, S - 1 - ox, ox)
    y0 = top - 0.5 + oy.to(tl.float32) * bh
    x0 = left - 0.5 + ox.to(tl.float32) * bw
    base = src + off
    a0 = tl.zeros([BLOCK], tl.float32)
    a1 = tl.zeros([BLOCK], tl.float32)
    a2 = tl.zeros([BLOCK], tl.float32)
    for iy in range(gh):
        y = tl.maximum(y0 + (iy + 0.5) * bh / gh, 0.0)
        yl = tl.minimum(y.to(tl.int32), H - 1)           # floor: y >= 0
        edge_y = yl >= H - 1
        yh = tl.where(edge_y, yl, yl + 1)
        ly = tl.where(edge_y, 0.0, y - yl.to(tl.float32))
        for ix in range(gw):
            x = tl.maximum(x0 + (ix + 0.5) * bw / gw, 0.0)
            xl = tl.minimum(x.to(tl.int32), W - 1)
            edge_x = xl >= W - 1
            xh = tl.where(edge_x, xl, xl + 1)
            lx = tl.where(edge_x, 0.0, x - xl.to(tl.float32))
            w00, w01 = (1 - ly) * (1 - lx), (1 - ly) * lx
            w10, w11 = ly * (1 - lx), ly * lx
            r0, r1 = yl.to(tl.int64) * sy, yh.to(tl.int64) * sy
            c0, c1 = xl.to(tl.int64) * sx, xh.to(tl.int64) * sx
            for c in tl.static_range(3):
                q = base + c * sc
                v = (w00 * tl.load(q + r0 + c0, mask=live, other=0).to(tl.float32)
                     + w01 * tl.load(q + r0 + c1, mask=live, other=0).to(tl.float32)
                     + w10 * tl.load(q + r1 + c0, mask=live, other=0).to(tl.float32)
                     + w11 * tl.load(q + r1 + c1, mask=live, other=0).to(tl.float32))
                if c == 0:
                    a0 += v
                elif c == 1:
                    a1 += v
                else:
                    a2 += v
    n = (gh * gw).to(tl.float32)
    dst = out + o * out_sn + p.to(tl.int64) * out_sp
    tl.store(dst, (a0 / n - m0) * i0, mask=live)
    tl.store(dst + out_sc, (a1 / n - m1) * i1, mask=live)
    tl.store(dst + out_sc * 2, (a2 / n - m2) * i2, mask=live)


def launch(buf: torch.Tensor, im: list, fm: list, n: int, size: int, mean, inv_std, channels_last: bool) -> torch.Tensor:
    """Images lying in the flat uint8 buffer buf (on the device), described by rows im (integers:
    offset, H, W, strides of channel, row and column, output row, flip, samples per output pixel
    down and across) and fm (floats: the crop box's top, left, height and width), cropped,
    resized to size x size, flipped, normalised ((v - mean) * inv_std per channel, in 0-255 units)
    into a new (n, 3, size, size) float32 batch (channels_last memory if asked). Rows nobody
    writes are left uninitialised. train/pipeline.py's rows() makes im and fm."""
    dev = buf.device
    pin = dev.type == "cuda"   # pinned: the copies stay asynchronous on the stage's stream
    imeta = torch.tensor(im, dtype=torch.int64, pin_memory=pin).to(dev, non_blocking=True)
    fmeta = torch.tensor(fm, dtype=torch.float32, pin_memory=pin).to(dev, non_blocking=True)
    if channels_last:
        out = torch.empty((n, size, size, 3), dtype=torch.float32, device=dev).permute(0, 3, 1, 2)
        sn, sc, sp = size * size * 3, 1, 3
    else:
        out = torch.empty((n, 3, size, size), dtype=torch.float32, device=dev)
        sn, sc, sp = 3 * size * size, size * size, 1
    block = 256
    _crop_resize[(len(im), triton.cdiv(size * size, block))](
        buf, imeta, fmeta, out, sn, sc, sp, *mean, *inv_std, S=size, BLOCK=block)
    return out
