"""The seed article's training loop as written: ResNet-50, fp32, batch 20, a random batch made
on the CPU each step and copied with .to(device), DDP (run at world size 1 under torchrun).
Only the timing around it is added.

    torchrun --standalone --nproc-per-node 1 bench/seed_loop.py --steps 120
Prints one JSON line: {"img_s_per_gpu", "step_ms", ...}.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args()
    dist.init_process_group("nccl")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    model = DDP(torchvision.models.resnet50().to(device), device_ids=[local_rank])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch_size = 20
    for step in range(args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        x = torch.randn(batch_size, 3, 224, 224).to(device)
        y = torch.randint(0, 1000, (batch_size,)).to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - start
    timed = args.steps - args.warmup
    if dist.get_rank() == 0:
        print(json.dumps({"img_s_per_gpu": round(timed * batch_size / dt, 1), "step_ms": round(1000 * dt / timed, 2),
                          "batch_size": batch_size, "world_size": dist.get_world_size(),
                          "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
