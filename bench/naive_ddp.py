"""The baseline: a DDP loop as the PyTorch DDP tutorial writes it (multigpu_torchrun.py /
"train_ddp.py"), with ResNet-50 in place of its toy model.

fp32, batch 20 per GPU, NCHW, no compile, a CPU dataset of random tensors through a DataLoader
(pin_memory, DistributedSampler, no workers), blocking .to(gpu), zero_grad/forward/backward/step.
Only the timing around it is added.

    torchrun --standalone --nproc-per-node 1 bench/naive_ddp.py --steps 150
Prints one JSON line: {"img_s_per_gpu", "step_ms", "peak_mem_gb", ...}.
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class MyTrainDataset(Dataset):
    def __init__(self, size, image_size):
        self.size = size
        self.data = [(torch.rand(3, image_size, image_size), torch.randint(0, 1000, ()).item()) for _ in range(size)]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return self.data[index]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args()

    init_process_group(backend="nccl")
    gpu_id = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(gpu_id)
    model = DDP(torchvision.models.resnet50().to(gpu_id), device_ids=[gpu_id])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    dataset = MyTrainDataset(1024, args.image_size)
    train_data = DataLoader(dataset, batch_size=args.batch_size, pin_memory=True, shuffle=False,
                            sampler=DistributedSampler(dataset))

    step, epoch, start = 0, 0, None
    while step < args.steps:
        train_data.sampler.set_epoch(epoch)
        for source, targets in train_data:
            if step == args.warmup:
                torch.cuda.synchronize()
                start = time.perf_counter()
            source, targets = source.to(gpu_id), targets.to(gpu_id)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(source), targets)
            loss.backward()
            optimizer.step()
            step += 1
            if step == args.steps:
                break
        epoch += 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    timed = args.steps - args.warmup
    world = int(os.environ["WORLD_SIZE"])
    result = {"name": "naive", "img_s_per_gpu": round(timed * args.batch_size / seconds, 1),
              "step_ms": round(1000 * seconds / timed, 2), "batch_size": args.batch_size,
              "world_size": world, "final_loss": round(loss.item(), 4),
              "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    # Where the time goes (not part of the tutorial): the host side alone, the GPU side alone.
    t = time.perf_counter()
    for i, (source, targets) in zip(range(30), train_data):
        source, targets = source.to(gpu_id), targets.to(gpu_id)
    torch.cuda.synchronize()
    result["loader_ms"] = round(1000 * (time.perf_counter() - t) / 30, 2)
    t = time.perf_counter()
    for _ in range(30):
        optimizer.zero_grad()
        F.cross_entropy(model(source), targets).backward()
        optimizer.step()
    torch.cuda.synchronize()
    result["resident_batch_step_ms"] = round(1000 * (time.perf_counter() - t) / 30, 2)
    result["torch_threads"] = torch.get_num_threads()
    if int(os.environ["RANK"]) == 0:
        print(json.dumps(result), flush=True)
    destroy_process_group()


if __name__ == "__main__":
    main()
