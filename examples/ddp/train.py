"""A plain torchrun DDP script, as you would write it without this project.

It imports a sibling module (toy.py), keeps its snapshot in the working directory and resumes
from it when the file exists, and prints one line per epoch. Run by the cluster as
``jobs/ddp-script.yaml`` (``command: ["{python}", "{code}/examples/ddp/train.py"]``) or as
``jobs/ddp-module.yaml`` (``module: examples.ddp.train``); by hand::

    torchrun --nproc-per-node 2 examples/ddp/train.py --epochs 5

Options: --epochs N, --epoch-s S (extra seconds per epoch, printing as it goes), --hang-at E (stop
at epoch E and wait silently: what a stuck job looks like), --heartbeat (report the epoch through
cluster.node.heartbeat).
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from toy import batches, make_model

SNAPSHOT = "snapshot.pt"       # relative: the run's own directory (the job's checkpoint.path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--epoch-s", type=float, default=0.0)
    ap.add_argument("--hang-at", type=int, default=-1)
    ap.add_argument("--heartbeat", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    model = make_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = 0
    if os.path.exists(SNAPSHOT):
        snap = torch.load(SNAPSHOT, map_location=device)
        model.load_state_dict(snap["model"])
        opt.load_state_dict(snap["opt"])
        start = snap["epoch"]
    print(f"rank {rank}/{world} starts at epoch {start} in {os.getcwd()}", flush=True)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    for epoch in range(start, args.epochs):
        if epoch == args.hang_at:
            time.sleep(1e6)                    # stuck: no output, no CPU
        for x, y in batches(epoch, rank):
            loss = torch.nn.functional.mse_loss(ddp(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        end = time.time() + args.epoch_s
        while time.time() < end:
            print(f"rank {rank} epoch {epoch} working", flush=True)
            time.sleep(min(1.0, max(0.0, end - time.time())))
        print(f"rank {rank} epoch {epoch} loss {loss.item():.4f}", flush=True)
        if rank == 0:                          # one writer; every rank reads it on resume
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1},
                       SNAPSHOT + ".tmp")
            os.replace(SNAPSHOT + ".tmp", SNAPSHOT)
        if args.heartbeat:
            from cluster.node import heartbeat
            heartbeat.beat(epoch + 1, total=args.epochs)
        dist.barrier()                         # the snapshot is complete before anyone goes on
    del ddp                                    # DDP's reducer goes before the process group it uses
    dist.destroy_process_group()
    if start < args.epochs or "SLURM_JOB_ID" in os.environ:
        # gloo's threads can abort the interpreter's own teardown ("terminate called without an
        # active exception", SIGABRT) at times: every rank passed the last barrier and the snapshot
        # is saved, so leave without it. A resumed rank with nothing left to do met no barrier:
        # under torchrun it exits normally, as leaving at once would cut off peers that are still
        # connecting, and their errors would no longer say that the ranks disagree.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
