"""Training and validation batches, on the device, resumable at any position in an epoch.

Three sources, one interface (see build_data):
- "synthetic": one random batch made on the device once and reused: the host never limits speed.
- "synthetic-learnable": class prototypes plus noise, made on the device per batch from a seed,
  so a model can learn it (tests) and any batch can be remade after a restart.
- real images: an ImageFolder `train/` (and `val/`), or its packed form, with the standard
  ImageNet augmentation, decoded on the GPU where possible (train/pipeline.py).

Position in an epoch is counted in global samples (`start_sample`), which means the same thing
at any world size. Every random choice is a function of (seed, epoch, position), never of a
stream's history, so a resumed run sees exactly the batches a straight run would have seen.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import ConfigError, TrainConfig
from .dist import DistEnv
from .pipeline import mix_seed

Batch = tuple[torch.Tensor, torch.Tensor]


class _SyntheticBase:
    def __init__(self, cfg: TrainConfig, env: DistEnv, channels_last: bool):
        self.cfg, self.env, self.channels_last = cfg, env, channels_last
        self.global_batch = cfg.batch_size * env.world_size
        self.per_rank_batches = cfg.synthetic_size // self.global_batch
        if self.per_rank_batches < 1:
            raise ConfigError("synthetic_size", f"{cfg.synthetic_size} is less than one global batch "
                              f"({cfg.batch_size} x {env.world_size} ranks)")
        self.samples_per_epoch = self.per_rank_batches * self.global_batch


class Synthetic(_SyntheticBase):
    def __init__(self, cfg: TrainConfig, env: DistEnv, channels_last: bool):
        super().__init__(cfg, env, channels_last)
        g = torch.Generator(device=env.device).manual_seed(mix_seed(cfg.seed, env.rank))
        shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
        self.x = torch.randn(shape, generator=g, device=env.device)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g, device=env.device)

    def batches(self, epoch: int, start_sample: int) -> Iterator[Batch]:
        for _ in range(start_sample // self.global_batch, self.per_rank_batches):
            yield self.x, self.y

    def val_batches(self) -> None:
        return None  # random labels: nothing to validate


class SyntheticLearnable(_SyntheticBase):
    """x = upsampled prototype of class y + noise; 4 validation batches per rank from other seeds."""

    VAL_BATCHES = 4

    def __init__(self, cfg: TrainConfig, env: DistEnv, channels_last: bool):
        super().__init__(cfg, env, channels_last)
        g = torch.Generator(device=env.device).manual_seed(mix_seed(cfg.seed, 7))
        self.prototypes = torch.randn((cfg.num_classes, 3, 4, 4), generator=g, device=env.device)

    def _make(self, seed: int) -> Batch:
        cfg, device = self.cfg, self.env.device
        g = torch.Generator(device=device).manual_seed(seed)
        y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g, device=device)
        x = F.interpolate(self.prototypes[y], size=(cfg.image_size, cfg.image_size), mode="nearest")
        x = x + torch.randn(x.shape, generator=g, device=device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def batches(self, epoch: int, start_sample: int) -> Iterator[Batch]:
        for b in range(start_sample // self.global_batch, self.per_rank_batches):
            # Seeded by global position: batch b of rank r covers global samples of batch b.
            yield self._make(mix_seed(self.cfg.seed, epoch, b, self.env.rank))

    def val_batches(self) -> Iterator[Batch]:
        for b in range(self.VAL_BATCHES):
            yield self._make(mix_seed(self.cfg.seed, -1, b, self.env.rank))


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch and tags each index with its epoch.

    Shards the epoch's permutation after skipping `start_sample` global positions, so the skip
    means the same at any world size (the loop keeps start_sample a multiple of the world size)."""

    def __init__(self, dataset: Dataset, env: DistEnv, seed: int):
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.start_sample = 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_sample = start_sample

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()[: self.total_size]
        mine = order[self.start_sample:][self.rank:: self.num_replicas]
        return iter([(self.epoch, i) for i in mine])

    def __len__(self) -> int:
        return max(0, self.total_size - self.start_sample) // self.num_replicas


class RealImages:
    """A folder (ImageFolder layout) or its packed form (train/pack.py), through train/pipeline.py:
    compressed bytes from the workers, decode and augmentation on the GPU where it can."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, channels_last: bool, role: str = "main",
                 gpu: bool | None = None):
        """role "input": the loaders of train/input_process.py's process (gpu: its items' kind)."""
        from .imagesets import open_split
        from .pipeline import DeviceStage, Items, collate

        root = os.path.expandvars(cfg.data)   # a SLURM job's staged copy may sit under $TMPDIR
        try:
            train_split = open_split(root, "train")
            val_split = open_split(root, "val")
        except (OSError, ValueError) as e:
            raise ConfigError("data", f"{root!r}: {e}")
        if train_split is None:
            raise ConfigError("data", f"{root!r} is not synthetic, synthetic-learnable, a folder with train/ "
                              "or a packed set (MANIFEST.json, python -m train.pack)")
        if gpu is None:
            gpu = env.device.type == "cuda" if cfg.decode == "auto" else cfg.decode == "gpu"
            if gpu and env.device.type != "cuda":
                raise ConfigError("decode", "gpu needs a CUDA device; use decode=cpu or auto")
        self.decode = "gpu" if gpu else "cpu"
        self.sampler = ResumableSampler(train_split, env, cfg.seed)
        if len(self.sampler) < cfg.batch_size:
            raise ConfigError("data", f"{root}/train has {len(train_split)} images: too few for "
                              f"batch_size={cfg.batch_size} on {env.world_size} ranks")
        opts = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate,
                    pin_memory=env.device.type == "cuda")
        if cfg.workers > 0:
            opts.update(persistent_workers=True, prefetch_factor=cfg.prefetch_factor)
        items = lambda split: Items(split, cfg.seed, cfg.image_size, gpu, env.rank)  # noqa: E731
        self.loader = DataLoader(items(train_split), sampler=self.sampler, drop_last=True, **opts)
        self.val_loader = None
        if val_split is not None and len(val_split):
            # Every image exactly once across ranks (no padding), so top-1 counts are exact.
            mine = [(-1, i) for i in range(env.rank, len(val_split), env.world_size)]
            self.val_loader = DataLoader(items(val_split), sampler=mine, **opts)
        trace = os.environ.get("TRAIN_TEST_SAMPLE_TRACE")   # tests: which samples each rank trained on
        decoder = cfg.jpeg_decoder
        self.stage = DeviceStage(env.device, cfg.image_size, channels_last,
                                 trace and os.path.join(trace, f"samples-rank{env.rank}.jsonl"), decoder)
        self.samples_per_epoch = self.sampler.total_size // (cfg.batch_size * env.world_size) \
            * cfg.batch_size * env.world_size
        self.input = None
        if role == "input":
            return
        from .input_process import InputProcess, mps_running, wanted
        if gpu and wanted(cfg):
            if not mps_running():
                print0(env, "data: input_process without CUDA's MPS: the decode's kernels and the step's take "
                            "turns on the GPU, which measured slower than decoding here (README, Real data); "
                            "start it with nvidia-cuda-mps-control -d, or leave input_process off")
            self.input = InputProcess(cfg, env, decoder, gpu, RealImages)
        print0(env, f"data: {root} ({'packed' if train_split.paths is None else 'folder'}): "
                    f"{len(train_split)} train images, {len(val_split) if val_split else 0} val, "
                    f"{len(train_split.classes)} classes; decode on {f'GPU ({decoder})' if gpu else 'CPU (PIL)'}"
                    f"{' in a process of its own (input_process)' if self.input else ''}, "
                    f"{cfg.workers} workers per rank")

    def batches(self, epoch: int, start_sample: int) -> Iterator[Batch]:
        from .pipeline import overlapped

        if self.input is not None:
            return overlapped(self.input.batches("train", epoch, start_sample), self.from_input, self.stage.device)
        self.sampler.set_epoch(epoch, start_sample)
        return overlapped(self.loader, self.stage, self.stage.device)

    def val_batches(self) -> Iterator[Batch] | None:
        from .pipeline import overlapped

        if self.val_loader is None:
            return None
        if self.input is not None:
            return overlapped(self.input.batches("val"), self.from_input, self.stage.device)
        return overlapped(self.val_loader, self.stage, self.stage.device)

    def from_input(self, item) -> Batch:
        """A batch the input process decoded: crop it here, then hand its slot back once read."""
        buf, slot, d = item
        x, y = self.stage.from_decoded(buf, d)
        if buf.is_cuda:
            done = torch.cuda.Event()
            done.record()
            done.synchronize()
        self.input.release(slot)
        return x, y

    def report(self) -> dict:
        """Images that took the CPU path on a GPU run, and blanks for undecodable files (this rank)."""
        return dict(self.stage.counts)


def print0(env: DistEnv, text: str) -> None:
    if env.is_main:
        print(text, flush=True)


def build_data(cfg: TrainConfig, env: DistEnv, channels_last: bool):
    """The data source named by cfg.data: .samples_per_epoch, .batches(epoch, start_sample)
    (this rank's micro-batches, on the device) and .val_batches() (None: no validation split)."""
    if cfg.data == "synthetic":
        return Synthetic(cfg, env, channels_last)
    if cfg.data == "synthetic-learnable":
        return SyntheticLearnable(cfg, env, channels_last)
    return RealImages(cfg, env, channels_last)
