"""The deep preflight's GPU half on this machine, as `doctor --deep` runs it on each host
(cluster/backends/deepcheck.py, cluster/node/deep.py), without ssh: the same shipped commands
(python -c) run here through a local stand-in for the ssh pool.

* GPU health: nvidia-smi's GPUs and ECC counts, XID lines, the bf16 matmul TFLOP/s of each GPU,
  and the verdict doctor would print;
* the all-reduce rank the deep check runs on each host (NCCL), one process per GPU of this
  machine with CUDA_VISIBLE_DEVICES set (on one GPU: one rank, which checks the NCCL path, not a
  bandwidth).

    python bench/gpu_deep.py [--out DIR]

Writes DIR/deep.json and prints the report lines.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cluster.backends.deepcheck import GPU_BYTES, ITERS, OP_TIMEOUT_S, deep_check  # noqa: E402
from cluster.backends.ship import module_command  # noqa: E402
from cluster.backends.transport import GroupResult, Result  # noqa: E402
from cluster.node.deep import _allreduce  # noqa: E402
from cluster.spec.config import load_inventory  # noqa: E402


class LocalPool:
    """What deep_check asks of the ssh pool, run on this machine by sh."""

    def run(self, commands, stdin=b"", timeout_s=60, label="", **_):
        out = GroupResult()
        for name, cmd in commands.items():
            p = subprocess.run(["sh", "-c", cmd], input=stdin, capture_output=True, timeout=timeout_s)
            out[name] = Result(name, cmd, p.returncode, p.stdout.decode(), p.stderr.decode(), label=label)
        self.last = out         # the raw answers, for the report
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def allreduce_here(python: str, gpus: int) -> list[dict]:
    """One all-reduce rank per GPU, as the deep check starts one per host."""
    port, world = free_port(), max(gpus, 1)
    cmd = module_command(python, _allreduce)
    procs = []
    for rank in range(world):
        arg = {"backend": "nccl", "master": "127.0.0.1", "port": port, "rank": rank, "world": world,
               "bytes": GPU_BYTES, "iters": ITERS["gpu"], "timeout_s": OP_TIMEOUT_S}
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(rank)}
        p = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        p.stdin.write(json.dumps(arg).encode() + b"\n")
        p.stdin.close()
        procs.append(p)
    return [json.loads(p.stdout.read().decode().strip().splitlines()[-1]) for p in procs if p.wait() is not None]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inv = load_inventory()
    hosts = [dataclasses.replace(h, python=sys.executable) for h in inv.hosts[:1]]
    pool = LocalPool()
    be = type("Here", (), {"pool": pool})()
    t0 = time.monotonic()
    lines, problems = deep_check(be, hosts, free_port())      # one host: its one call is the health check
    health_s = time.monotonic() - t0
    health = json.loads(pool.last[hosts[0].name].stdout.strip().splitlines()[-1])
    t0 = time.monotonic()
    ranks = allreduce_here(sys.executable, health.get("gpus") or 0)
    result = {"lines": lines, "problems": problems, "health": health, "health_s": round(health_s, 1),
              "allreduce": ranks, "allreduce_s": round(time.monotonic() - t0, 1)}
    for r, a in enumerate(ranks):
        print(f"  all-reduce rank {r}/{len(ranks)}: {a}")
    print("problems:", problems or "none")
    (out / "deep.json").write_text(json.dumps(result, indent=1) + "\n")
    return 1 if problems or any(a.get("error") for a in ranks) else 0


if __name__ == "__main__":
    sys.exit(main())
