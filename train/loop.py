"""The training loop: build, resume, train (log, validate, checkpoint), report.

Reads top to bottom in `train()`; everything it calls is a small function below it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from . import checkpoint
from .config import ConfigError, TrainConfig
from .data import build_data
from .dist import DistEnv, all_gather_objects, all_reduce_sum, broadcast_object
from .metrics import MetricsWriter
from .model import build_model, build_optimizer, fast_stem, wrap


@dataclass(frozen=True)
class Speed:
    bf16: bool
    channels_last: bool
    compile: bool
    fast_stem: bool


@dataclass
class Position:
    """Where training is; saved in every checkpoint. samples_in_epoch counts global samples."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0


def train(cfg: TrainConfig, env: DistEnv) -> dict:
    """Run cfg on this rank; return the summary (same on every rank)."""
    speed = setup_runtime(cfg, env)
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    raw = build_model(cfg.model, cfg.num_classes, cfg.image_size)
    swapped = fast_stem(raw) if speed.fast_stem else []
    # One process has nothing to all-reduce: DDP would only split the compiled graph at its
    # bucket boundaries (and add hooks); 1.8% slower on an H200 (bench/README.md).
    net, ddp = wrap(raw, env.device,
                    distributed=env.backend is not None and (env.world_size > 1 or cfg.ddp_always),
                    channels_last=speed.channels_last, compile=speed.compile, compile_mode=cfg.compile_mode,
                    bucket_cap_mb=cfg.bucket_cap_mb)
    optimizer = build_optimizer(raw, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, env.device)
    data = build_data(cfg, env, speed.channels_last)
    samples_per_step = cfg.batch_size * cfg.grad_accum * env.world_size
    steps_per_epoch = data.samples_per_epoch // samples_per_step
    if steps_per_epoch < 1:
        raise ConfigError("grad_accum", f"one epoch ({data.samples_per_epoch} samples) is less than one step "
                          f"of {samples_per_step} samples")
    total = cfg.steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    pos = resume(cfg, env, raw, optimizer, scheduler, samples_per_step) if cfg.resume else Position()
    metrics = MetricsWriter(cfg.out_dir, env.rank, total, tensorboard=use_tensorboard(cfg, env),
                            wandb_project=cfg.wandb_project if env.is_main else "", config=dataclasses.asdict(cfg))
    times = StepTimes(ddp, env.device, compiled=speed.compile, grad_compress=cfg.grad_compress)
    # one line from every rank, so a user sees which ranks landed on which host and device
    print(f"rank {env.rank}/{env.world_size} (local {env.local_rank}) on {socket.gethostname()} "
          f"device {env.device}", flush=True)
    print0(env, f"train: model={cfg.model} params={sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M "
                f"world_size={env.world_size} device={env.device.type} backend={env.backend} "
                f"bf16={speed.bf16} channels_last={speed.channels_last} compile={speed.compile} "
                f"fast_stem={','.join(swapped) or 'no'} "
                f"batch={cfg.batch_size}x{cfg.grad_accum}x{env.world_size} steps={total} "
                f"({steps_per_epoch}/epoch) start_step={pos.step}")
    if speed.compile:
        print0(env, f"train: compiling the step (torch.compile mode={cfg.compile_mode}"
                    f"{', tune_kernels: minutes on a machine new to this model' if cfg.tune_kernels else ''}; "
                    "Inductor caches the result for the next run)")
    # A resumed run appends to the same files: this record marks where it took over, and
    # records of steps past its checkpoint from the run before are superseded by the ones after.
    metrics.log({"kind": "start", "step": pos.step, "epoch": pos.epoch, "world_size": env.world_size,
                 "steps_total": total})
    metrics.heartbeat(pos.step)
    clock = Clock(env.device, pos.step, total, samples_per_step, cfg.log_every)
    slow_s = cfg.debug_sleep_ms / 1000 if cfg.debug_sleep_rank in (-1, env.rank) else 0.0
    loss_sum = torch.zeros((), device=env.device)  # summed on the device: no host sync per step
    last = {"loss": math.nan, "top1": None, "top5": None}
    saved_at = pos.step
    try:
        while pos.step < total:
            batches = times.waiting(groups(data.batches(pos.epoch, pos.samples_in_epoch), cfg.grad_accum), slow_s)
            for group in batches:
                loss_sum += train_step(net, ddp, group, optimizer, loss_fn, speed.bf16, times)
                scheduler.step()
                pos.step += 1
                pos.samples_in_epoch += samples_per_step
                clock.tick(pos.step)
                metrics.heartbeat(pos.step, every_s=5.0)
                if pos.step % cfg.log_every == 0 or pos.step == total:
                    last["loss"] = log_progress(env, metrics, clock, pos, total, loss_sum, scheduler, times)
                    loss_sum.zero_()
                if cfg.val_every > 0 and pos.step % cfg.val_every == 0 and pos.step < total:
                    validate(env, metrics, raw, data, speed, pos.step, last)
                if cfg.ckpt_every and pos.step % cfg.ckpt_every == 0 and pos.step < total:
                    save_checkpoint(cfg, env, raw, optimizer, scheduler, pos)
                    saved_at = pos.step
                if pos.step >= total:
                    break
            else:  # the epoch ran out
                pos.epoch += 1
                pos.samples_in_epoch = 0
        if cfg.val_every >= 0:
            validate(env, metrics, raw, data, speed, pos.step, last)
        if saved_at != pos.step:
            save_checkpoint(cfg, env, raw, optimizer, scheduler, pos)
    except BaseException as e:
        metrics.heartbeat(pos.step, error=f"{type(e).__name__}: {e}"[:300])
        metrics.close()     # what the event files hold so far reaches the disk
        raise
    # mean_img_s: all ranks, steps mean_from_step..steps (status and report label theirs alike)
    summary = {"steps": pos.step, "time_s": round(clock.elapsed(), 2), "mean_img_s": round(clock.mean_img_s(), 1),
               "mean_from_step": clock.steady_from, "final_loss": round(last["loss"], 4)}
    if last["top1"] is not None:
        summary.update(top1=round(last["top1"], 2), top5=round(last["top5"], 2))
    if hasattr(data, "report"):   # real images: what took the CPU path, what was blank
        fallback = all_reduce_sum(torch.tensor([sum(v for k, v in data.report().items() if k != "corrupt"),
                                                data.report().get("corrupt", 0)], device=env.device)).tolist()
        summary.update(decode=data.decode, cpu_decoded=int(fallback[0]), blank=int(fallback[1]))
    if env.device.type == "cuda":
        summary["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(env.device) / 2**30, 2)
    metrics.log({"kind": "summary", **summary})
    metrics.heartbeat(pos.step, done=True)
    metrics.close()
    print0(env, "summary: " + " ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


def setup_runtime(cfg: TrainConfig, env: DistEnv) -> Speed:
    cuda = env.device.type == "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Ranks of one node share its cores; more threads than cores makes every rank slower.
    torch.set_num_threads(cfg.threads or max(1, cores // env.local_world_size))
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.tune_kernels:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    # auto: the fast settings on GPU; plain fp32 on CPU, where they are slower or need a compiler
    return Speed(bf16=cfg.precision == "bf16" or (cfg.precision == "auto" and cuda),
                 channels_last=cuda if cfg.channels_last == "auto" else cfg.channels_last,
                 compile=cuda if cfg.compile == "auto" else cfg.compile,
                 fast_stem=cuda if cfg.fast_stem == "auto" else cfg.fast_stem)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR factor: linear warmup to 1, then cosine decay to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def groups(batches: Iterator, n: int) -> Iterator[list]:
    """Micro-batches in lists of n (one optimizer step each); a ragged tail is dropped."""
    it = iter(batches)
    while len(group := list(itertools.islice(it, n))) == n:
        yield group


def train_step(net: nn.Module, ddp, micro_batches: list, optimizer, loss_fn, bf16: bool,
               times: "StepTimes | None" = None) -> torch.Tensor:
    """One optimizer step over len(micro_batches) micro-batches; returns the mean loss (on device)."""
    n = len(micro_batches)
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        # Gradients are all-reduced only on the last micro-batch; the others accumulate locally.
        sync = ddp is None or i == n - 1
        with nullcontext() if sync else ddp.no_sync():
            if times is not None:
                times.forward_start()
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(net(x), y) / n
            loss.backward()
        if sync and times is not None:
            times.backward_done()
        total += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


class StepTimes:
    """Where a rank's step time goes, by the host's wall clock: waiting for the next batch (data)
    and, with DDP on CPU, waiting for its peers in DDP's collectives (communication): the buffer
    broadcast that starts each forward (until the inner module's forward begins) and the gradient
    all-reduce once its own backward is done (from the last bucket handed to it to backward's
    return). A rank that the others wait for shows little of it, its peers much. The rest is
    compute.

    On GPU the host runs ahead of the device, so there only the data wait is measured (and a
    comm hook could cost speed); ``comm_s`` stays None. Also None with torch.compile."""

    def __init__(self, ddp, device: torch.device, compiled: bool = False, grad_compress: str = "none"):
        self.data_s, self.comm_s = 0.0, None
        self._ready = self._forward = None
        if ddp is None:
            return
        # DDP takes one communication hook: the timing below wraps the one the config asks for
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        reduce = default_hooks.bf16_compress_hook if grad_compress == "bf16" else default_hooks.allreduce_hook
        if device.type != "cpu" or compiled:
            if grad_compress != "none":
                ddp.register_comm_hook(None, reduce)
            return
        self.comm_s = 0.0

        def bucket_ready(state, bucket):
            self._ready = time.perf_counter()
            return reduce(state, bucket)

        def inner_forward(module, args):
            if self._forward is not None:
                self.comm_s += time.perf_counter() - self._forward
                self._forward = None
        ddp.register_comm_hook(None, bucket_ready)
        ddp.module.register_forward_pre_hook(inner_forward)

    def forward_start(self) -> None:
        if self.comm_s is not None:
            self._forward = time.perf_counter()

    def waiting(self, batches: Iterator, sleep_s: float = 0.0) -> Iterator:
        """``batches``, adding the time spent waiting for each to data_s (``sleep_s``: the test knob)."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            if sleep_s:
                time.sleep(sleep_s)
            try:
                item = next(it)
            except StopIteration:
                return
            self.data_s += time.perf_counter() - t0
            yield item

    def backward_done(self) -> None:
        if self._ready is not None:
            self.comm_s += time.perf_counter() - self._ready
            self._ready = None

    def take(self) -> tuple[float, float | None]:
        """(data seconds, comm seconds or None) since the previous call."""
        out = (self.data_s, self.comm_s)
        self.data_s = 0.0
        self.comm_s = None if self.comm_s is None else 0.0
        return out


def use_tensorboard(cfg: TrainConfig, env: DistEnv) -> bool:
    if cfg.tensorboard is False:
        return False
    try:
        import torch.utils.tensorboard  # noqa: F401 -- needs the tensorboard package
    except ImportError:
        if cfg.tensorboard is True:
            raise ConfigError("tensorboard", "the tensorboard package is not installed on this host: "
                              "pip install tensorboard, or tensorboard=false") from None
        print0(env, "train: no TensorBoard event files (the tensorboard package is not installed)")
        return False
    return True


class Clock:
    """Interval timing for progress lines and the steady-state rate for the summary.

    The first tenth of the run's steps (at least one) is left out of mean_img_s: it holds
    compilation, cuDNN autotuning and allocator warmup. Both ends are taken at steps, so the
    final validation and checkpoint do not count. The mean starts at a logged step, so that
    the per-rank intervals after it (metrics, `cluster report`) cover the same steps."""

    def __init__(self, device: torch.device, start_step: int, total: int, samples_per_step: int,
                 log_every: int = 1):
        self.device, self.samples_per_step, self.total = device, samples_per_step, total
        self.start = self.last = self.end = time.perf_counter()
        self.last_step = start_step
        run = total - start_step
        self.steady_from = start_step + (max(1, run // 10) if run > 1 else 0)
        aligned = -(-self.steady_from // max(1, log_every)) * max(1, log_every)
        if self.steady_from > start_step and aligned < total:
            self.steady_from = aligned
        self.steady_start = self.start if self.steady_from == start_step else None

    def sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def tick(self, step: int) -> None:
        if step == self.steady_from:
            self.steady_start = self.sync()
        if step == self.total:
            self.end = self.sync()

    def interval(self, step: int) -> tuple[float, int]:
        """(seconds, steps) since the previous call; synchronizes."""
        now = self.sync()
        dt, steps = now - self.last, step - self.last_step
        self.last, self.last_step = now, step
        return dt, steps

    def elapsed(self) -> float:
        return self.end - self.start

    def mean_img_s(self) -> float:
        if self.steady_start is None or self.end <= self.steady_start:
            return math.nan
        return (self.total - self.steady_from) * self.samples_per_step / (self.end - self.steady_start)


def log_progress(env: DistEnv, metrics: MetricsWriter, clock: Clock, pos: Position, total: int,
                 loss_sum: torch.Tensor, scheduler, times: "StepTimes | None" = None) -> float:
    """Write this rank's record, print rank 0's line; return the mean loss over all ranks."""
    dt, steps = clock.interval(pos.step)
    data_s, comm_s = times.take() if times is not None else (None, None)
    local_loss = loss_sum.item() / max(1, steps)
    img_s = steps * clock.samples_per_step / env.world_size / dt
    summed = all_reduce_sum(torch.tensor([local_loss, img_s], device=env.device)).tolist()
    mean_loss, total_img_s = summed[0] / env.world_size, summed[1]
    lr = scheduler.get_last_lr()[0]
    record = {"kind": "train", "step": pos.step, "epoch": pos.epoch, "loss": local_loss, "loss_mean": mean_loss,
              "lr": lr, "img_s": round(img_s, 1), "img_s_total": round(total_img_s, 1),
              "step_ms": round(1000 * dt / max(1, steps), 2)}
    per_step = 1000 / max(1, steps)
    if data_s is not None:
        record["data_ms"] = round(data_s * per_step, 2)
    if comm_s is not None:
        record["comm_ms"] = round(comm_s * per_step, 2)
    if env.device.type == "cuda":
        record["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(env.device) / 2**30, 3)
    metrics.log(record)
    shares = {k: round(v / (1000 * dt / max(1, steps)), 3) for k, v in
              (("data_share", record.get("data_ms")), ("comm_share", record.get("comm_ms"))) if v is not None}
    metrics.heartbeat(pos.step, img_s=record["img_s"], step_ms=record["step_ms"], **shares)
    print0(env, f"step {pos.step}/{total} loss {mean_loss:.4f} lr {lr:.4g} {total_img_s:.0f} img/s "
                f"{record['step_ms']:.1f} ms/step (all ranks, last {steps} step(s))")
    return mean_loss


@torch.no_grad()
def validate(env: DistEnv, metrics: MetricsWriter, raw: nn.Module, data, speed: Speed, step: int,
             last: dict) -> None:
    """Top-1/top-5 over the validation split, counted on every rank and summed."""
    batches = data.val_batches()
    if batches is None:
        return
    raw.eval()  # the plain module: evaluation needs neither DDP nor a second compiled graph
    counts = torch.zeros(3, device=env.device)  # top-1 hits, top-5 hits, images
    for x, y in batches:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=speed.bf16):
            logits = raw(x)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y[:, None])
        counts += torch.stack([hits[:, 0].sum(), hits.sum(), torch.tensor(len(y), device=env.device)])
    raw.train()
    top1_hits, top5_hits, seen = all_reduce_sum(counts).tolist()
    last["top1"], last["top5"] = 100 * top1_hits / max(1, seen), 100 * top5_hits / max(1, seen)
    metrics.log({"kind": "val", "step": step, "top1": last["top1"], "top5": last["top5"], "images": int(seen)})
    print0(env, f"val step {step}: top1 {last['top1']:.2f}% top5 {last['top5']:.2f}% ({int(seen)} images)")


def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def save_checkpoint(cfg: TrainConfig, env: DistEnv, raw: nn.Module, optimizer, scheduler, pos: Position) -> None:
    """Collective (gathers every rank's RNG state); rank 0 writes."""
    rngs = all_gather_objects(rng_state(env.device))
    if not env.is_main:
        return
    payload = {"format": checkpoint.FORMAT, "model_name": cfg.model, "config": dataclasses.asdict(cfg),
               "world_size": env.world_size, **dataclasses.asdict(pos),
               "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "rng": rngs,
               "torch_version": str(torch.__version__), "time": time.time()}
    path = checkpoint.save(cfg.ckpt_dir, payload, cfg.keep_ckpts)
    print(f"checkpoint: saved {path} (step {pos.step}, epoch {pos.epoch}, sample {pos.samples_in_epoch})")


def resume(cfg: TrainConfig, env: DistEnv, raw: nn.Module, optimizer, scheduler, samples_per_step: int) -> Position:
    """Load the latest readable checkpoint (rank 0 reads, everyone receives: only node 0 is sure
    to have the files) and return the position to continue from."""
    payload = error = None
    if env.is_main:
        try:
            payload = checkpoint.load_latest(cfg.ckpt_dir, log=print)
        except ValueError as e:
            error = str(e)
    payload, error = broadcast_object((payload, error))  # every rank stops, or none
    if error:
        raise ConfigError("ckpt_dir", f"{error}; repair it, use another ckpt_dir, or resume=false")
    if payload is None:
        return Position()
    saved = payload["config"]
    if (payload["model_name"], saved["num_classes"]) != (cfg.model, cfg.num_classes):
        raise ConfigError("ckpt_dir", f"{payload['path']} is for model={payload['model_name']} "
                          f"num_classes={saved['num_classes']}; use another ckpt_dir or resume=false")
    raw.load_state_dict(payload["model"])
    # The saved param groups would also bring back fused/foreach flags of the saving device.
    flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(payload["optimizer"])
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)
    scheduler.load_state_dict(payload["scheduler"])
    if payload["world_size"] != env.world_size and cfg.lr_scaling == "linear":
        rescale_lr(optimizer, scheduler, env.world_size / payload["world_size"])
        print0(env, f"lr scaled by {env.world_size}/{payload['world_size']} with the global batch "
                    f"(world size {payload['world_size']} -> {env.world_size}): "
                    f"peak lr {scheduler.base_lrs[0]:.6g}, now {optimizer.param_groups[0]['lr']:.6g}")
    if payload["world_size"] == env.world_size:
        state = payload["rng"][env.rank]
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if env.device.type == "cuda" and state["cuda"] is not None:
            torch.cuda.set_rng_state(state["cuda"], env.device)
    else:  # another world size: fresh per-rank streams (data randomness does not use them)
        torch.manual_seed(cfg.seed + 1_000_003 * payload["step"] + env.rank)
    # Keep the position a whole number of this world's steps; at another world size that can
    # repeat up to one step's samples.
    samples = payload["samples_in_epoch"] // samples_per_step * samples_per_step
    print0(env, f"resumed from {payload['path']}: step {payload['step']}, epoch {payload['epoch']}, "
                f"sample {payload['samples_in_epoch']}, saved at world size {payload['world_size']}")
    return Position(payload["step"], payload["epoch"], samples)


def rescale_lr(optimizer, scheduler, factor: float) -> None:
    """The LR schedule times ``factor``, from the step it is at: at another world size the
    per-process batch is kept, so the global batch changes by ``factor``, and the linear scaling
    rule keeps the LR per sample. The scaled schedule is what the next checkpoint saves, so a
    second change of world size scales from there."""
    scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = base
        group["lr"] *= factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]     # what get_last_lr reports until the next step


def print0(env: DistEnv, text: str) -> None:
    if env.is_main:
        print(text, flush=True)
