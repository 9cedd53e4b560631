"""The GPU decode in a process of its own, beside each training process.

nvJPEG (through torchvision or nvImageCodec) waits for the whole device inside its decode call:
on one H100 a batch that decodes in 29 ms alone took 342 ms with 326 ms of other work queued on
the GPU (bench/bench_data.py, `decode_loaded_ms`). In the training process the decode therefore
waits for each queued step, and decoding and training take turns: 69% of synthetic speed, and
98% with the decode taken out. A process has its own CUDA context, and such waits stay inside it.
But two processes' contexts take turns on the GPU unless CUDA's multi-process service (MPS) runs:
measured on one H100, this process gave 69% of synthetic without MPS and 84-88% under it, so it
pays only under MPS; the training process says so when MPS is off. Under MPS a batch's decode
still took 90-100 ms there (29 ms alone) while the step's kernels filled the GPU, longer than a
step (80 ms): the decode set the pace. So the training process's work is below normal priority
(CUDA_MPS_CLIENT_PRIORITY=1, set before its CUDA context exists) and this process's normal: the
decode's kernels go first, a batch took 65 ms, and the run gave 95% of synthetic (README, Real data).

The input process owns the DataLoader (its workers read compressed bytes, as before) and the
decoder. It decodes each batch into one of SLOTS flat uint8 buffers on the GPU, shared with the
training process once (CUDA IPC), and sends the slot's number with the crop boxes and labels.
The training process's input thread runs the crop kernel on the slot (its own stream, overlapped
with the step, as before), then hands the slot back. With jpeg_decoder=dali the input process
crops too (DALI crops as it decodes), the slot holds the batch's uint8 crops, and the training
process only normalises them. It is on where MPS runs (`input_process: auto`, the default; true
or false decide); the tests run it on the CPU. Commands: ("train", epoch, start_sample), ("val",),
("abort",) and ("stop",); every epoch ends with ("end",), an error with ("error", text).
"""

from __future__ import annotations

import os
import queue
import time
import traceback
import weakref
from collections import deque
from typing import Iterator

import torch
import torch.multiprocessing as mp

SLOTS = 3
POLL_S = 0.5


def mps_running() -> bool:
    """Whether CUDA's MPS control daemon answers here: its pipe in $CUDA_MPS_PIPE_DIRECTORY, or in
    the default /tmp/nvidia-mps."""
    return os.path.exists(os.path.join(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps", "control"))


def wanted(cfg) -> bool:
    """Whether a run of real images decoded on the GPU uses the input process: input_process true,
    or auto where CUDA's MPS runs (under MPS the decode in the rank measured 58% of synthetic, this
    process 95%; without MPS it does not pay)."""
    return cfg.input_process is True or cfg.input_process == "auto" and mps_running()


def training_below_input(cfg) -> None:
    """In the training process, before its CUDA context exists, where the run will decode in the
    input process: under MPS the training's kernels are of below-normal priority, so the input
    process's decode goes first (one H100: 95% of synthetic against 87%, module docstring). A value
    the user set for the training stands."""
    if cfg.data not in ("synthetic", "synthetic-learnable") and cfg.decode != "cpu" and wanted(cfg):
        os.environ.setdefault("CUDA_MPS_CLIENT_PRIORITY", "1")


class InputProcess:
    """The training process's side: starts the input process, yields its decoded batches."""

    def __init__(self, cfg, env, decoder: str, gpu_items: bool, data):
        """data: the data class (train/data.py's RealImages), built in the input process with
        role="input" for its loaders."""
        ctx = mp.get_context("spawn")   # not fork: a forked child cannot use CUDA
        self.cmd, self.out, self.free = ctx.Queue(), ctx.Queue(), ctx.Queue()
        # not a daemon: those may not start processes, and this one starts the DataLoader's workers
        self.proc = ctx.Process(target=serve, name="train-input",
                                args=(cfg, env, decoder, gpu_items, data, os.getpid(), self.cmd, self.out, self.free))
        self.proc.start()
        self.slots: dict[int, torch.Tensor] = {}
        # stopped at the latest when this interpreter exits (before multiprocessing joins its children)
        self.close = weakref.finalize(self, _shutdown, self.proc, self.cmd)

    def batches(self, kind: str, epoch: int = 0, start_sample: int = 0) -> Iterator[tuple[torch.Tensor, int, dict]]:
        """(buffer, slot, what DeviceStage.from_decoded needs) for each batch of a training epoch
        from start_sample ("train") or of the validation split ("val"). Hand each slot back with
        release(). Leaving early aborts the input process's pass."""
        self.cmd.put((kind, epoch, start_sample))
        try:
            while (msg := self._get())[0] != "end":
                _, slot, buf, d = msg
                if buf is not None:   # a new or larger buffer for this slot
                    self.slots[slot] = buf
                yield self.slots[slot], slot, d
        except GeneratorExit:   # left early: end the pass there, take back what it still sends
            if self.proc.is_alive():
                self.cmd.put(("abort",))
                while (msg := self._get())[0] != "end":
                    if msg[2] is not None:
                        self.slots[msg[1]] = msg[2]
                    self.release(msg[1])
            raise

    def release(self, slot: int) -> None:
        self.free.put(slot)

    def _get(self):
        while True:
            try:
                msg = self.out.get(timeout=POLL_S)
            except queue.Empty:
                if self.proc.is_alive():
                    continue
                try:   # what it sent before it ended
                    msg = self.out.get(timeout=1)
                except queue.Empty:
                    raise RuntimeError(f"the input process (decode) ended with exit code {self.proc.exitcode}") from None
            if msg[0] == "error":
                raise RuntimeError(f"the input process (decode) failed:\n{msg[1]}")
            return msg



def _shutdown(proc, cmd) -> None:
    if proc.is_alive():
        cmd.put(("stop",))
        proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def serve(cfg, env, decoder: str, gpu_items: bool, data_class, parent: int, cmd, out, free) -> None:
    """The input process: runs until ("stop",) or until its parent is gone."""
    try:
        if env.device.type == "cuda":
            # read when this process's CUDA context is made (just below): under MPS its work is of
            # normal priority, the training process's below (training_below_input)
            os.environ["CUDA_MPS_CLIENT_PRIORITY"] = "0"
            torch.cuda.set_device(env.device)
        from .pipeline import DeviceStage

        data = data_class(cfg, env, channels_last=False, role="input", gpu=gpu_items)
        stage = DeviceStage(env.device, cfg.image_size, False, decoder=decoder)
        bufs: list = [None] * SLOTS
        idle = deque(range(SLOTS))
        while True:
            c = _next(cmd, parent)
            if c[0] == "stop":
                return
            if c[0] == "abort":   # the pass it meant had ended already
                continue
            if c[0] == "train":
                data.sampler.set_epoch(c[1], c[2])
            spent = Spent()
            for b in spent.timed(data.loader if c[0] == "train" else data.val_loader):
                if _aborted(cmd):
                    break
                slot = _slot(idle, free, cmd, parent)
                if slot is None:
                    break
                spent.mark("slot")
                buf, d = stage.decode_into(b, bufs[slot])
                if stage.device.type == "cuda":
                    torch.cuda.current_stream().synchronize()   # the slot is complete when it is sent
                spent.mark("decode")
                out.put(("batch", slot, buf if buf is not bufs[slot] else None, d))
                bufs[slot] = buf
            if env.is_main and spent.batches:
                print(f"data: input process, {c[0]} pass: {spent}", flush=True)
            while True:   # slots still out come back before the next pass
                try:
                    idle.append(free.get_nowait())
                except queue.Empty:
                    break
            out.put(("end",))
    except BaseException:  # noqa: BLE001 - reported to the training process, which raises it
        out.put(("error", traceback.format_exc()[-3000:]))


class Spent:
    """Where the input process's time per batch went: waiting for the workers' bytes, for a slot
    the training process has handed back, and decoding. The largest names the limit: the CPU
    workers, the training process (its step), or the decode."""

    def __init__(self):
        self.s = {"workers": 0.0, "slot": 0.0, "decode": 0.0}
        self.batches = 0
        self.t = time.perf_counter()

    def timed(self, loader):
        for b in loader:
            self.mark("workers")
            self.batches += 1
            yield b
            self.t = time.perf_counter()

    def mark(self, part: str) -> None:
        now = time.perf_counter()
        self.s[part] += now - self.t
        self.t = now

    def __str__(self) -> str:
        ms = {k: 1000 * v / self.batches for k, v in self.s.items()}
        return (f"{self.batches} batches; per batch {ms['workers']:.1f} ms waiting for the workers, "
                f"{ms['slot']:.1f} ms for the training process to hand a slot back, {ms['decode']:.1f} ms decoding")


def _next(cmd, parent: int):
    while True:
        try:
            return cmd.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent:   # the training process is gone: so is the reason to run
                return ("stop",)


def _aborted(cmd) -> bool:
    try:
        return cmd.get_nowait()[0] == "abort"
    except queue.Empty:
        return False


def _slot(idle: deque, free, cmd, parent: int):
    """A free slot; None when the pass is aborted (or the training process is gone)."""
    while not idle:
        try:
            idle.append(free.get(timeout=POLL_S))
        except queue.Empty:
            if _aborted(cmd) or os.getppid() != parent:
                return None
    return idle.popleft()
