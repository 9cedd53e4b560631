"""decode=gpu jpeg_decoder=dali: NVIDIA DALI decodes, crops, resizes, flips and normalises a
batch's JPEGs in one pipeline of its own (package nvidia-dali-cuda130; bench/README.md).

The crop boxes and flips are still chosen in the DataLoader workers (train/pipeline.py's Items:
seeded by (seed, epoch, index)), so a resumed run sees the same crops whichever decoder runs;
DALI gets them as each image's region of interest, a flip as a region whose left edge lies right
of its right edge. Its decoder is nvImageCodec's (the GPU's hardware JPEG decoders for
``HW_LOAD`` of the images, its CUDA decoder for the rest), with DALI's own memory pools and
streams; its resize is antialiased linear, as PIL's and the crop kernel's are. Images DALI is
not given (what nvJPEG cannot decode took the CPU path in the workers) are normalised here and
put in their rows.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

# share of the JPEGs the hardware decoders take (the rest: DALI's CUDA decoder, on the SMs the
# training uses); they alone decoded 14,835 img/s on one H100, twice what a rank trains
HW_LOAD = 0.95
THREADS = 2     # DALI's CPU threads per rank (parsing, what the hardware decoders are fed)


class DaliCrop:
    """datas (uint8 CPU tensors, one JPEG each), boxes (top, left, height, width) and flips ->
    the normalised (n, 3, size, size) float32 batch on ``device`` (channels_last memory if asked),
    or with mean None the crops themselves, (n, size, size, 3) uint8 (the input process's
    output, train/input_process.py). ``device`` cpu: DALI's CPU operators."""

    def __init__(self, device: torch.device, size: int, channels_last: bool, mean=None, inv_std=None):
        self.device, self.size, self.channels_last = device, size, channels_last
        self.normalised = mean is not None
        if self.normalised:
            self.mean, self.std = [float(m) for m in mean], [1.0 / float(s) for s in inv_std]
        self._pipe, self._batch = None, 0

    def _build(self, batch: int) -> None:
        from nvidia.dali import fn, pipeline_def, types

        gpu, S = self.device.type == "cuda", self.size

        @pipeline_def
        def crop():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            start = fn.external_source(name="start", dtype=types.FLOAT, ndim=1)
            end = fn.external_source(name="end", dtype=types.FLOAT, ndim=1)
            # as PIL and the JPEG header see it: no EXIF rotation
            img = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    adjust_orientation=False, **({"hw_decoder_load": HW_LOAD} if gpu else {}))
            img = fn.resize(img, roi_start=start, roi_end=end, size=[S, S], antialias=True,
                            interp_type=types.INTERP_LINEAR)
            if not self.normalised:
                return img
            return fn.crop_mirror_normalize(img, dtype=types.FLOAT, mean=self.mean, std=self.std,
                                            output_layout="HWC" if self.channels_last else "CHW")

        # one batch at a time, fed by the caller (the input thread of train/pipeline.py's
        # overlapped(), which already runs a batch ahead of the step)
        self._pipe = crop(batch_size=batch, num_threads=THREADS, prefetch_queue_depth=1,
                          device_id=(self.device.index or 0) if gpu else None,
                          exec_async=False, exec_pipelined=False)
        self._pipe.build()
        self._batch = batch

    def __call__(self, datas: list[torch.Tensor], boxes: list, flips: list,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """out: a tensor of the result's shape to write it into, else a new one."""
        n, S = len(datas), self.size
        if self._pipe is None or n > self._batch:
            self._build(max(n, self._batch))
        start, end = [], []
        for (top, left, h, w), flip in zip(boxes, flips):
            # (y, x): the region's corners; a flip mirrors it left to right
            start.append(np.array([top, left + w if flip else left], dtype=np.float32))
            end.append(np.array([top + h, left if flip else left + w], dtype=np.float32))
        self._pipe.feed_input("jpegs", [d.numpy() for d in datas])
        self._pipe.feed_input("start", start)
        self._pipe.feed_input("end", end)
        (res,) = self._pipe.run()
        if not self.normalised:
            shape, dtype = (n, S, S, 3), torch.uint8
        else:
            shape, dtype = ((n, S, S, 3) if self.channels_last else (n, 3, S, S)), torch.float32
        x = torch.empty(shape, dtype=dtype, device=self.device) if out is None else out
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            feed_ndarray(res.as_tensor(), x, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            x.copy_(torch.from_numpy(np.array(res.as_tensor())).view(shape))
        return x.permute(0, 3, 1, 2) if self.channels_last and self.normalised else x


def normalise(pixels: torch.Tensor, mean, inv_std) -> torch.Tensor:
    """(n, size, size, 3) uint8 -> (n, 3, size, size) float32, (v - mean) * inv_std per channel."""
    m = torch.tensor(mean, device=pixels.device)
    s = torch.tensor(inv_std, device=pixels.device)
    return ((pixels.float() - m) * s).permute(0, 3, 1, 2)


def place(out: torch.Tensor, xs: Optional[torch.Tensor], jpeg_pos: torch.Tensor, rest: Optional[torch.Tensor],
          rest_pos: torch.Tensor) -> torch.Tensor:
    """out, one batch, with DALI's rows xs at jpeg_pos and the CPU path's rows rest at rest_pos."""
    if xs is not None:
        out[jpeg_pos.to(out.device)] = xs
    if rest is not None:
        out[rest_pos.to(out.device)] = rest
    return out
