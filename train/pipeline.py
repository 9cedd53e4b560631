"""The real-image input pipeline: CPU workers read compressed bytes, the GPU decodes and augments.

Per sample, a DataLoader worker (any number per rank) reads the file's bytes (a folder or the
packed form, train/imagesets.py) and chooses the crop: RandomResizedCrop's box and a flip for
training, the resize-256/center-224 box for validation, drawn from a generator seeded by
(seed, epoch, index) and the image size read from the JPEG header. So the crop does not depend
on which worker or which path decodes the image, and a resumed run sees the same crops.

- GPU path (decode=gpu, or auto on a GPU): baseline JPEGs travel as their compressed bytes;
  the main process decodes a whole batch (nvJPEG through torchvision.io.decode_jpeg(device="cuda"),
  which asks nvJPEG for its hardware backend, or nvImageCodec, the GPU's hardware JPEG decoders first),
  then one Triton kernel (train/gpu_crop.py) crops, resizes (roi_align's arithmetic: several
  samples per output pixel, as an antialiased resize does), flips and normalises every image, on
  a side CUDA stream in a thread, one batch ahead of the step.
- CPU path (the fallback, and every image on a machine without a GPU): the worker decodes with
  PIL, crops and resizes to the output size and hands back uint8 pixels. Images nvJPEG cannot
  decode (PNG and other formats, progressive or CMYK JPEGs) take this path on a GPU machine too;
  they are counted. A file nothing can decode is replaced by a blank (mean-colour) image, counted
  and named once per rank, so one bad file never stops a run.

Only uint8 crosses PCIe (compressed bytes, or decoded crops); floats are made on the device.
"""

from __future__ import annotations

import io
import json
import math
import queue
import random
import sys
import threading
from collections import Counter
from typing import Iterator, Optional

import torch

from .imagesets import Split

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_255, INV_STD_255 = [255 * m for m in IMAGENET_MEAN], [1 / (255 * v) for v in IMAGENET_STD]   # 0-255 units
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (stable across runs and machines)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def jpeg_header(data: bytes) -> Optional[tuple[int, int, int, int]]:
    """(SOF marker, height, width, components) of a JPEG, or None if it is not one."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        if marker in _SOF:
            if i + 10 > n:
                return None
            return (marker, int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big"),
                    data[i + 9])
        if marker == 0xDA:   # scan data before a frame header: not a JPEG we know
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def gpu_kind(data: bytes) -> tuple[str, int, int]:
    """('jpeg', h, w) for what nvJPEG decodes here (baseline or extended sequential Huffman, grey
    or YCbCr), else (why not: 'progressive', 'cmyk', 'lossless', 'not-jpeg', ..., 0, 0)."""
    hdr = jpeg_header(data)
    if hdr is None:
        return "not-jpeg", 0, 0
    marker, h, w, comps = hdr
    if marker == 0xC2 or marker == 0xC6 or marker == 0xCA or marker == 0xCE:
        return "progressive", 0, 0
    if marker not in (0xC0, 0xC1):
        return "lossless-or-arithmetic", 0, 0
    if comps not in (1, 3):
        return "cmyk", 0, 0
    if h == 0 or w == 0:
        return "no-size", 0, 0
    return "jpeg", h, w


def train_box(rng: random.Random, h: int, w: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width), as torchvision draws it."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def val_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """Resize the shorter side to size*256/224, take the centre size x size: the same pixels as a
    centre square of the original, side shorter*224/256."""
    side = max(1, min(h, w, int(round(min(h, w) * size / math.ceil(size * 256 / 224)))))
    return (h - side) // 2, (w - side) // 2, side, side


def cpu_crop(data: bytes, size: int, box_of) -> torch.Tensor:
    """PIL decode, crop to box_of(h, w), resize to size x size (bilinear, antialiased): (size, size, 3) uint8."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img = img.convert("RGB")
    top, left, ch, cw, flip = box_of(img.height, img.width)
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)


def rows(images: list[torch.Tensor], layouts: list[str], boxes: list, flips: list[bool], where: list[int],
         size: int) -> tuple[list, list]:
    """The crop kernel's rows (train/gpu_crop.py's launch) for images[k] ('chw' or 'hwc' per
    layouts[k]) lying one after another in one flat buffer, in this order."""
    im, fm, off = [], [], 0
    for t, lay, (top, left, bh, bw), flip, o in zip(images, layouts, boxes, flips, where):
        if lay == "chw":
            _, h, w = t.shape
            strides = (h * w, w, 1)
        else:
            h, w, _ = t.shape
            strides = (1, w * 3, 3)
        im.append((off, h, w, *strides, o, int(flip), max(1, math.ceil(bh / size)), max(1, math.ceil(bw / size))))
        fm.append((top, left, bh, bw))
        off += t.numel()
    return im, fm


def crop_rows(buf: torch.Tensor, im: list, fm: list, n: int, size: int, mean, inv_std, channels_last: bool):
    """What the kernel does, with roi_align image by image (no GPU: the tests; image by image, since
    a padded batch would blend the padding into boxes that touch an image's bottom or right edge)."""
    from torchvision.ops import roi_align

    out = torch.empty((n, 3, size, size), device=buf.device)
    for (off, h, w, sc, sy, sx, o, flip, _, _), (top, left, bh, bw) in zip(im, fm):
        img = torch.as_strided(buf, (3, h, w), (sc, sy, sx), off).float()
        roi = torch.tensor([[0, left, top, left + bw, top + bh]], dtype=torch.float32, device=buf.device)
        x = roi_align(img[None], roi, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)[0]
        out[o] = x.flip(-1) if flip else x
    m = torch.tensor(mean, device=buf.device).view(1, 3, 1, 1)
    s = torch.tensor(inv_std, device=buf.device).view(1, 3, 1, 1)
    out = (out - m) * s
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def blank(size: int) -> torch.Tensor:
    """What takes an undecodable image's place: the mean colour, (size, size, 3) uint8."""
    mean = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8)
    return mean.expand(size, size, 3).contiguous()


class Items(torch.utils.data.Dataset):
    """Item (epoch, index) -> (label, bytes or uint8 crop, crop box, flip, why it took the CPU path).

    Runs in the DataLoader workers; epoch -1 means validation (centre box, no flip)."""

    def __init__(self, split: Split, seed: int, size: int, gpu: bool, rank: int = 0):
        self.split, self.seed, self.size, self.gpu, self.rank = split, seed, size, gpu, rank
        self.warned: set = set()

    def __len__(self) -> int:
        return len(self.split)

    def box_of(self, epoch: int, index: int):
        def box(h: int, w: int):
            if epoch < 0:
                return (*val_box(h, w, self.size), False)
            rng = random.Random(mix_seed(self.seed, epoch, index))
            b = train_box(rng, h, w)
            return (*b, rng.random() < 0.5)
        return box

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        label, box = self.split.labels[index], self.box_of(epoch, index)
        try:
            data = self.split.read(index)
        except OSError as e:
            return self._blank(label, key, "corrupt", e)
        kind, h, w = gpu_kind(data) if self.gpu else ("cpu", 0, 0)
        if kind == "jpeg":
            *b, flip = box(h, w)
            return label, data, tuple(b), flip, "", key
        try:
            pixels = cpu_crop(data, self.size, box)
        except Exception as e:  # noqa: BLE001 - any undecodable file: PIL raises many kinds
            return self._blank(label, key, "corrupt", e)
        return label, pixels, None, False, kind if self.gpu else "", key

    def _blank(self, label: int, key: tuple[int, int], why: str, err: BaseException):
        index = key[1]
        if index not in self.warned:
            self.warned.add(index)
            print(f"data: rank {self.rank}: {self.split.names[index]}: cannot read or decode "
                  f"({type(err).__name__}: {str(err)[:120]}); a blank image takes its place", file=sys.stderr, flush=True)
        return label, blank(self.size), None, False, why, key


def collate(items: list) -> dict:
    jpeg = [i for i, it in enumerate(items) if it[2] is not None]
    done = [i for i, it in enumerate(items) if it[2] is None]
    return {
        "labels": torch.tensor([it[0] for it in items]),
        # all compressed images in one tensor: one shared-memory block per batch from a worker, not one each
        "jpeg": torch.frombuffer(bytearray(b"".join(items[i][1] for i in jpeg)) or bytearray(1), dtype=torch.uint8),
        "jpeg_sizes": [len(items[i][1]) for i in jpeg],
        "jpeg_pos": torch.tensor(jpeg, dtype=torch.long),
        "boxes": torch.tensor([items[i][2] for i in jpeg], dtype=torch.float32).view(-1, 4),
        "flips": torch.tensor([items[i][3] for i in jpeg], dtype=torch.bool),
        "pixels": torch.stack([items[i][1] for i in done]) if done else None,
        "pixels_pos": torch.tensor(done, dtype=torch.long),
        "reasons": [it[4] for it in items if it[4]],
        "keys": [it[5] for it in items],
    }


class DeviceStage:
    """Turns a collated batch into the normalised float batch on the device.

    decoder: torchvision (nvJPEG, batched) or nvimgcodec (nvImageCodec: the hardware JPEG
    decoders, the SMs only for what they refuse). On a GPU one Triton kernel (train/gpu_crop.py)
    then crops, resizes, flips and normalises the whole batch; elsewhere (tests), roi_align image
    by image, the same arithmetic. decoder dali: DALI does all of that in one pipeline
    (train/dali_stage.py)."""

    def __init__(self, device: torch.device, size: int, channels_last: bool, trace: Optional[str] = None,
                 decoder: str = "torchvision", fused: Optional[bool] = None):
        self.device, self.size, self.channels_last = device, size, channels_last
        self.decoder, self._nvimgcodec, self._dali = decoder, None, None
        self.fused = device.type == "cuda" if fused is None else fused   # the Triton kernel
        self.trace = trace   # tests: a file that gets the (epoch, index) keys of every training batch staged
        self.counts: Counter = Counter()
        self._held: list = []   # the last batch's compressed bytes, alive until its decode has surely read them
        self._pool: list = []   # nvImageCodec's output images, reused batch after batch
        self.reuse_images = True

    def decode(self, datas: list[torch.Tensor], decoder: Optional[str] = None) -> list[Optional[tuple[torch.Tensor, str]]]:
        """[(image uint8, 'chw' or 'hwc') or None where it could not be decoded], by decoder
        (default: the stage's)."""
        if (decoder or self.decoder) == "nvimgcodec":
            return self.decode_nvimgcodec(datas)
        from torchvision.io import ImageReadMode, decode_jpeg

        dev = "cuda" if self.device.type == "cuda" else "cpu"
        try:
            out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=dev)
        except RuntimeError:
            out = []   # one bad image must not lose the batch: decode one by one, PIL for failures
            for d in datas:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=dev))
                except RuntimeError:
                    out.append(None)
        return [None if im is None else (im, "chw") for im in out]

    def decode_nvimgcodec(self, datas: list[torch.Tensor]) -> list[Optional[tuple[torch.Tensor, str]]]:
        """nvImageCodec: the GPU's hardware JPEG decoders (A100, H100, H200) first, so the decode
        does not take the training's SMs; its CUDA decoder for what they refuse (never the hybrid
        one, which would take the main process's CPU). Not a region of each image (ROI decode):
        on one H100 both decoders refused every region (bench/README.md)."""
        from nvidia import nvimgcodec as nv

        streams, where = self.code_streams(datas)
        if self._nvimgcodec is None:
            self._nvimgcodec = nv.Decoder(device_id=self.device.index or 0, max_num_cpu_threads=2, backends=[
                nv.Backend(nv.BackendKind.HW_GPU_ONLY), nv.Backend(nv.BackendKind.GPU_ONLY)])
            # as PIL and the JPEG header see it: no EXIF rotation; always 3 interleaved channels
            self._params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB,
                                           sample_format=nv.SampleFormat.I_RGB)
        self._held = [datas, streams]
        stream = torch.cuda.current_stream(self.device)
        # the last batch's output images again (grown where needed), not new device buffers per image
        # per batch; safe: what read them (the kernel's gather) comes earlier on this same stream
        reuse = self._pool if self.reuse_images and len(self._pool) == len(streams) else None
        imgs = self._nvimgcodec.decode(streams, images=reuse, params=self._params,
                                       cuda_stream=stream.cuda_stream) if streams else []
        self._pool = list(imgs) if all(im is not None for im in imgs) else self._pool
        out: list = [None] * len(datas)
        for k, im in zip(where, imgs):
            if im is not None:
                t = torch.as_tensor(im, device=self.device)
                if t.dim() == 3 and t.shape[2] == 3:
                    out[k] = (t, "hwc")
        return out

    def code_streams(self, datas: list[torch.Tensor]) -> tuple[list, list[int]]:
        """nvImageCodec's inputs: (code streams, which of datas they are)."""
        from nvidia import nvimgcodec as nv

        streams, where = [], []
        for k, d in enumerate(datas):
            try:
                streams.append(nv.CodeStream(d.numpy()))
                where.append(k)
            except Exception:  # noqa: BLE001 - a header nvImageCodec cannot parse: the CPU path
                pass
        return streams, where

    def cpu_fallback(self, data: torch.Tensor, box: tuple, flip: bool) -> torch.Tensor:
        """The GPU decoder refused a JPEG after all: PIL for this one (a blank if PIL fails too)."""
        try:
            pixels = cpu_crop(data.numpy().tobytes(), self.size, lambda h, w: (*box, flip))
            self.counts["gpu-refused"] += 1
        except Exception:  # noqa: BLE001 - PIL raises many kinds
            pixels = blank(self.size)
            self.counts["corrupt"] += 1
        return pixels

    def gather(self, b: dict, decoder: Optional[str] = None) -> tuple[list, list, list, list, list]:
        """Decode the batch's JPEGs: (images on the device, their layouts, crop boxes, flips, rows
        of the batch), the ones decoded by PIL in the workers (or here, where the GPU decoder
        refused) as identity crops."""
        S, dev = self.size, self.device
        srcs, lays, boxes, flips, where = [], [], [], [], []
        if b["jpeg_sizes"]:
            datas = list(torch.split(b["jpeg"][:sum(b["jpeg_sizes"])], b["jpeg_sizes"]))
            bx, fl, pos = b["boxes"].tolist(), b["flips"].tolist(), b["jpeg_pos"].tolist()
            for k, dec in enumerate(self.decode(datas, decoder=decoder)):
                if dec is None:
                    pixels = self.cpu_fallback(datas[k], tuple(int(v) for v in bx[k]), fl[k])
                    srcs.append(pixels.to(dev))
                    lays.append("hwc")
                    boxes.append((0.0, 0.0, float(S), float(S)))
                    flips.append(False)
                else:
                    srcs.append(dec[0])
                    lays.append(dec[1])
                    boxes.append(tuple(bx[k]))
                    flips.append(fl[k])
                where.append(pos[k])
        if b["pixels"] is not None:
            pixels = b["pixels"].to(dev, non_blocking=True)
            for j, o in enumerate(b["pixels_pos"].tolist()):
                srcs.append(pixels[j])
                lays.append("hwc")
                boxes.append((0.0, 0.0, float(S), float(S)))
                flips.append(False)
                where.append(o)
        return srcs, lays, boxes, flips, where

    def flat(self, b: dict, buf: Optional[torch.Tensor] = None,
             decoder: Optional[str] = None) -> tuple[torch.Tensor, list, list]:
        """The batch decoded (gather) into one flat uint8 buffer, with the crop kernel's rows: into
        buf where it is large enough, else into a new one (a quarter larger than needed where it
        replaces buf, so that it is rarely replaced again)."""
        srcs, lays, boxes, flips, where = self.gather(b, decoder)
        parts = [im.contiguous().view(-1) for im in srcs]
        need = sum(p.numel() for p in parts)
        if buf is None or buf.numel() < need:
            buf = torch.empty(need if buf is None else need * 5 // 4, dtype=torch.uint8, device=self.device)
        torch.cat(parts, out=buf[:need])
        return (buf, *rows(srcs, lays, boxes, flips, where, self.size))

    def crop(self, buf: torch.Tensor, im: list, fm: list, n: int, mean=MEAN_255, inv_std=INV_STD_255) -> torch.Tensor:
        """Crop, resize, flip and normalise the images that rows im, fm describe in buf: the Triton
        kernel (train/gpu_crop.py), or without it (no GPU: the tests) roi_align image by image.
        (mean 0, inv_std 1: the crops in 0-255 units.)"""
        if self.fused:
            from .gpu_crop import launch
            return launch(buf, im, fm, n, self.size, mean, inv_std, self.channels_last)
        return crop_rows(buf, im, fm, n, self.size, mean, inv_std, self.channels_last)

    def decode_into(self, b: dict, buf: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The input process's half (train/input_process.py): decode the batch into the flat
        buffer buf (a larger one if it does not fit), and what the other half needs to crop it.
        With DALI, which crops as it decodes, buf gets the batch's uint8 crops instead."""
        before = Counter(self.counts)
        if self.decoder == "dali":
            buf, d = self.dali_crops(b, buf), {"crops": True}
        else:
            buf, im, fm = self.flat(b, buf)
            d = {"im": im, "fm": fm}
        counts = Counter(b["reasons"]) + (self.counts - before)
        return buf, {**d, "labels": b["labels"], "counts": dict(counts), "keys": b["keys"]}

    def from_decoded(self, buf: torch.Tensor, d: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The training process's half: crop, resize, flip and normalise what decode_into left in
        buf (with DALI, only normalise: the crops are done)."""
        n, S = len(d["labels"]), self.size
        if d.get("crops"):
            from .dali_stage import normalise

            x = normalise(buf[:n * S * S * 3].view(n, S, S, 3), MEAN_255, INV_STD_255)   # channels_last memory
            x = x if self.channels_last else x.contiguous()
        else:
            x = self.crop(buf, d["im"], d["fm"], n)
        self.counts.update(d["counts"])
        self.record(d["keys"])
        return x, d["labels"].to(self.device, non_blocking=True)

    def dali_crops(self, b: dict, buf: Optional[torch.Tensor]) -> torch.Tensor:
        """The batch's (n, size, size, 3) uint8 crops, one after another at the start of buf (a
        new buf where it is too small): DALI's for its JPEGs, the workers' for the rest."""
        n, S = len(b["labels"]), self.size
        if buf is None or buf.numel() < n * S * S * 3:
            buf = torch.empty(n * S * S * 3, dtype=torch.uint8, device=self.device)
        crops = buf[:n * S * S * 3].view(n, S, S, 3)
        in_order = len(b["jpeg_sizes"]) == n   # every image a JPEG DALI takes, in the batch's order
        xs = self.dali_rows(b, uint8=True, out=crops if in_order else None) if b["jpeg_sizes"] else None
        if xs is None and b["jpeg_sizes"]:   # DALI refused the batch: torchvision's decode and the crop kernel
            x = self.crop(*self.flat(b, decoder="torchvision"), n, mean=(0.0,) * 3, inv_std=(1.0,) * 3)
            crops.copy_(x.permute(0, 2, 3, 1).round_().clamp_(0, 255))
            return buf
        if not in_order:
            from .dali_stage import place

            pixels = None if b["pixels"] is None else b["pixels"].to(self.device, non_blocking=True)
            place(crops, xs, b["jpeg_pos"], pixels, b["pixels_pos"])
        return buf

    def dali_rows(self, b: dict, uint8: bool = False, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """DALI's rows for the batch's JPEGs: normalised, or (uint8) the crops themselves, into out
        where given; None where DALI refused the batch (said once, counted). A stage uses one kind."""
        from .dali_stage import DaliCrop

        if self._dali is None:
            norm = (None, None) if uint8 else (MEAN_255, INV_STD_255)
            self._dali = DaliCrop(self.device, self.size, self.channels_last, *norm)
        datas = list(torch.split(b["jpeg"][:sum(b["jpeg_sizes"])], b["jpeg_sizes"]))
        try:
            return self._dali(datas, b["boxes"].tolist(), b["flips"].tolist(), out=out)
        except RuntimeError as e:
            if not self.counts["dali-refused-batches"]:
                print(f"data: DALI refused a batch ({' '.join(str(e).split())[:200]}); such batches are decoded "
                      f"by torchvision, image by image where it refuses too", file=sys.stderr, flush=True)
            self.counts["dali-refused-batches"] += 1
            self._dali = None       # a DALI pipeline that failed stays failed: a new one for the next batch
            return None

    def dali(self, b: dict) -> torch.Tensor:
        """jpeg_decoder=dali (train/dali_stage.py): the batch's JPEGs decoded, cropped and normalised
        by DALI, the CPU path's images normalised here. A batch DALI fails on (a JPEG its decoder
        refuses) goes the torchvision way instead, where each refused image falls back to PIL."""
        from .dali_stage import normalise, place

        n, S = len(b["labels"]), self.size
        xs = self.dali_rows(b) if b["jpeg_sizes"] else None
        if xs is None:
            return self.crop(*self.flat(b, decoder="torchvision"), n)
        if len(b["jpeg_sizes"]) == n:
            return xs           # every image a JPEG DALI took, in the batch's order
        rest = None
        if b["pixels"] is not None:
            rest = normalise(b["pixels"].to(self.device, non_blocking=True), MEAN_255, INV_STD_255)
        x = (torch.empty((n, S, S, 3), device=self.device).permute(0, 3, 1, 2) if self.channels_last
             else torch.empty((n, 3, S, S), device=self.device))
        return place(x, xs, b["jpeg_pos"], rest, b["pixels_pos"])

    def record(self, keys: list) -> None:
        if self.trace and keys[0][0] >= 0:
            with open(self.trace, "a") as f:
                f.write(json.dumps(keys) + "\n")

    def __call__(self, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dali(b) if self.decoder == "dali" else self.crop(*self.flat(b), len(b["labels"]))
        self.counts.update(b["reasons"])
        self.record(b["keys"])
        return x, b["labels"].to(self.device, non_blocking=True)


def overlapped(loader, stage, device: torch.device, depth: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """stage(batch) -> (x, y) for each batch of loader; on a GPU in a thread on its own stream,
    `depth` batches ahead of the consumer (whose stream waits for each batch's event). A loader
    that is a generator (the input process's batches) is closed when this ends, early or not."""
    if device.type != "cuda":
        try:
            for b in loader:
                yield stage(b)
        finally:
            _close(loader)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    side = torch.cuda.Stream(device)

    def produce():
        try:
            with torch.cuda.device(device), torch.cuda.stream(side):
                for b in loader:
                    x, y = stage(b)
                    ev = torch.cuda.Event()
                    ev.record(side)
                    while not stop.is_set():
                        try:
                            q.put((x, y, ev), timeout=0.2)
                            break
                        except queue.Full:
                            pass
                    if stop.is_set():
                        return
            q.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(e)
        finally:
            _close(loader)

    t = threading.Thread(target=produce, name="gpu-input", daemon=True)
    t.start()
    try:
        main = torch.cuda.current_stream(device)
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            x, y, ev = item
            main.wait_event(ev)
            x.record_stream(main)   # made on the side stream: not reused before the step is done with it
            y.record_stream(main)
            yield x, y
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass


def _close(loader) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        close()
