"""Worker programs that fail the way real jobs fail; run under torchrun by generate.py.

    python -m torch.distributed.run --nproc-per-node=2 tests/logs/scenarios.py <scenario>

Each scenario reproduces one entry of cluster/run/failures.yaml for real (CPU/gloo where the
failure exists there, CUDA/NCCL for the GPU ones), so the log excerpts under tests/logs are
the output of the real libraries rather than text typed from memory.
"""
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


def unused_parameters():
    """A module whose forward skips a submodule: DDP's reducer waits for its gradients."""
    dist.init_process_group("gloo")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.aux = nn.Linear(8, 8), nn.Linear(8, 2), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.a(x))

    model = DDP(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()


def gloo_timeout():
    """Rank 1 never joins the all-reduce: rank 0's gloo recv times out."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=5))
    if dist.get_rank() == 1:
        time.sleep(30)
    dist.all_reduce(torch.ones(4))


def killed():
    """Rank 1 is killed with SIGKILL mid-run, as the kernel's OOM killer does."""
    import signal
    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(4))
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(4))


def dataloader_workers():
    """More DataLoader workers than cores, pin_memory without a GPU: the warnings of a starved input
    pipeline (then a rank fails, so the run is diagnosed)."""
    from torch.utils.data import DataLoader, TensorDataset
    dist.init_process_group("gloo")
    data = TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,)))
    loader = DataLoader(data, batch_size=8, num_workers=(os.cpu_count() or 1) * 4, pin_memory=True)
    for _ in loader:
        pass
    raise SystemExit(f"rank {dist.get_rank()}: stopping after one epoch (scenario)")


def missing_module():
    import torchvision_extra_ops  # noqa: F401  (not installed on this host)


def disk_full():
    """Rank 0 writes a checkpoint onto a full filesystem (FULL_DIR: e.g. a 1 MB tmpfs)."""
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        path = os.path.join(os.environ["FULL_DIR"], "ckpt_100.pt")
        torch.save({"model": torch.randn(1 << 20), "step": 100}, path + ".tmp")
        os.replace(path + ".tmp", path)
    dist.barrier()


def device_assert():
    """A label outside [0, num_classes): the loss kernel's device-side assert."""
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    logits = torch.randn(8, 10, device="cuda")
    labels = torch.full((8,), 10 + dist.get_rank(), device="cuda")   # 10 classes, labels 10, 11
    loss = torch.nn.functional.cross_entropy(logits, labels)
    print(f"loss {loss.item()}", flush=True)


def ok():
    dist.init_process_group(os.environ.get("BACKEND", "gloo"))
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        t = torch.ones(4, device="cuda")
    else:
        t = torch.ones(4)
    dist.all_reduce(t)
    print(f"all_reduce ok on rank {dist.get_rank()}: {t.tolist()}", flush=True)


def cuda_oom():
    """A ResNet-sized activation at a batch that does not fit: the caching allocator gives up."""
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    model = DDP(nn.Sequential(nn.Conv2d(3, 256, 7, stride=1, padding=3), nn.ReLU(),
                              nn.Conv2d(256, 256, 3, padding=1)).cuda(), device_ids=[local])
    for step in range(4):
        # rank 1 was given a bigger batch than its GPU holds (a per-host override gone wrong)
        batch = 64 if dist.get_rank() == 0 else 256 << step
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        model(x).float().mean().backward()
        print(f"step {step} ok", flush=True)


def nccl_timeout():
    """Rank 1 stalls before an all-reduce: rank 0's NCCL watchdog fires and tears the job down."""
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=15),
                            device_id=torch.device("cuda", local))
    t = torch.ones(1 << 20, device="cuda")
    dist.all_reduce(t)
    torch.cuda.synchronize()
    if dist.get_rank() == 1:
        time.sleep(90)
    dist.all_reduce(t)
    torch.cuda.synchronize()


def nccl_duplicate_gpu():
    """Two ranks on one GPU (a wrong CUDA_VISIBLE_DEVICES / gpus_per_node)."""
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    dist.all_reduce(torch.ones(4, device="cuda"))
    torch.cuda.synchronize()


if __name__ == "__main__":
    globals()[sys.argv[1]]()
    if dist.is_initialized():
        dist.destroy_process_group()
