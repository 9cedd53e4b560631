"""1 -> N GPU scaling of `make submit JOB=resnet50` on one host, and two "nodes" on one host.

    python3 bench/bench_scaling.py --out DIR [--parts scaling,twonodes] [--sizes 1,2,4,8]
                                   [--steps 300] [--budget-s 580] [--tuned]

On a GPU machine without sshd/rsync (carry .launchpkg, see bench/launchpkg.sh):
    OUT=$OUT bash bench/gpu_launch.sh scaling          # PARTS=... SIZES=... STEPS=...

scaling   the job as shipped (synthetic data), through the CLI exactly as `make submit` runs it
          (local backend, one torchrun, one rank per GPU), on the first 1, 2, 4, 8 GPUs of the
          machine (CUDA_VISIBLE_DEVICES), plus one GPU with DDP (train.ddp_always=true). img/s per
          GPU and the efficiency against one GPU without DDP and against one GPU with DDP.
twonodes  the SSH backend on two loopback hosts of this machine (bench/bench_launch.py's Hosts),
          each holding half of the GPUs (its ssh sessions get CUDA_VISIBLE_DEVICES and a
          NCCL_HOSTID of its own, so NCCL treats them as two nodes: P2P/NVLink inside each,
          the network between them). NCCL is forced onto its socket transport between them
          (NCCL_IB_DISABLE=1, NCCL_NET=Socket, NCCL_SOCKET_IFNAME=lo from the inventory's
          interface). Variants: DDP's default 25 MiB buckets, 100 MiB buckets, and the bf16
          gradient hook (train.grad_compress=bf16), against the same GPUs as one node.

tune_kernels is off (it compiles for about 5 minutes per run; --tuned turns it back on): every
row uses the same settings, so the ratios hold. Results: DIR/scaling.json and DIR/scaling.md,
rewritten after every run; the runs' output in DIR/scaling-logs.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SOCKET_ENV = ["env.NCCL_IB_DISABLE=1", "env.NCCL_NET=Socket", "env.NCCL_DEBUG=INFO",
              "env.NCCL_DEBUG_SUBSYS=INIT,NET"]


class Bench:
    def __init__(self, out: Path, budget_s: float, steps: int, tuned: bool):
        self.out, self.steps = out, steps
        self.deadline = time.time() + budget_s
        self.train_args = [f"train.steps={steps}", f"train.tune_kernels={'true' if tuned else 'false'}",
                           f"train.ckpt_every=0"]
        self.rows: list[dict] = []
        self.log = open(out / "scaling-logs.txt", "a")

    def left(self) -> float:
        return self.deadline - time.time()

    def submit(self, name: str, gpus: int, args: list[str], env: dict | None = None,
               inventory: Path | None = None) -> dict:
        """One `python -m cluster submit resnet50 --follow ...`; the run's summary line."""
        row = {"name": name, "gpus": gpus, "args": args}
        if self.left() < 90:
            row["skipped"] = "out of time"
            return self._record(row)
        argv = [sys.executable, "-m", "cluster", "submit", "resnet50", *self.train_args, *args, "--follow"]
        if inventory:
            argv += ["--inventory", str(inventory)]
        e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        t0 = time.time()
        try:
            p = subprocess.run(argv, cwd=REPO, env=e, capture_output=True, text=True, timeout=self.left() - 10)
            text, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as te:
            text, rc = (te.stdout or b"").decode(errors="replace") if isinstance(te.stdout, bytes) else (te.stdout or ""), 124
        row["wall_s"] = round(time.time() - t0, 1)
        self.log.write(f"===== {name} ({' '.join(argv[2:])}) rc={rc}\n{text}\n")
        self.log.flush()
        m = re.findall(r"summary: .*?mean_img_s=([\d.]+)", text)
        if rc != 0 or not m:
            row["error"] = f"rc={rc}: " + " | ".join(text.strip().splitlines()[-3:])
            return self._record(row)
        row["img_s"] = float(m[-1])
        row["img_s_per_gpu"] = round(row["img_s"] / gpus, 1)
        row["nccl_socket_lines"] = len(re.findall(r"NET/Socket", text))
        return self._record(row)

    def _record(self, row: dict) -> dict:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.write()
        return row

    def write(self) -> None:
        info = {"gpus": gpu_names(), "cpus": os.cpu_count(), "steps": self.steps}
        (self.out / "scaling.json").write_text(json.dumps({"info": info, "rows": self.rows}, indent=1))
        base = {r["name"]: r.get("img_s_per_gpu") for r in self.rows}
        nodp, dp = base.get("1 GPU, no DDP"), base.get("1 GPU, DDP")
        lines = [f"GPUs: {', '.join(info['gpus'])}; {info['cpus']} CPU cores; {self.steps} steps per run", "",
                 "| run | GPUs | img/s per GPU | vs 1 GPU no DDP | vs 1 GPU DDP | wall s |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            v = r.get("img_s_per_gpu")
            eff = lambda b: f"{100 * v / b:.1f}%" if v and b else ""
            lines.append(f"| {r['name']} | {r['gpus']} | {v if v else r.get('error') or r.get('skipped')} "
                         f"| {eff(nodp)} | {eff(dp)} | {r.get('wall_s', '')} |")
        (self.out / "scaling.md").write_text("\n".join(lines) + "\n")


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
        return [ln.strip() for ln in out.splitlines() if ln.strip()]
    except (OSError, subprocess.TimeoutExpired):
        return []


def scaling(b: Bench, sizes: list[int], total: int) -> None:
    first = lambda n: {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(n))}
    b.submit("1 GPU, no DDP", 1, [], first(1))
    b.submit("1 GPU, DDP", 1, ["train.ddp_always=true"], first(1))
    for n in sizes:
        if 1 < n <= total:
            b.submit(f"{n} GPUs, one node", n, [], first(n))


def two_nodes(b: Bench, total: int) -> None:
    from bench.bench_launch import Hosts

    # without GPUs (a dry run of the script on a CPU machine) each host runs the job's cpu profile
    half = total // 2
    if total == 1:
        print("twonodes: needs 2 GPUs or more", flush=True)
        return
    gpu_sets = [",".join(str(i) for i in range(k * half, (k + 1) * half)) for k in (0, 1)]
    host_env = {f"bench{k + 1}": {"NCCL_HOSTID": f"bench{k + 1}"} for k in (0, 1)}
    if total:
        for k in (0, 1):
            host_env[f"bench{k + 1}"]["CUDA_VISIBLE_DEVICES"] = gpu_sets[k]
    else:
        half, gpu_sets = 1, ["", ""]
    hosts = Hosts(2, loopback=True, shared_fs=True, host_env=host_env)
    try:
        hosts.up()
        inv = hosts.inventory(2)
        b.submit(f"{2 * half} GPUs, one node, socket env", 2 * half, SOCKET_ENV,
                 {"CUDA_VISIBLE_DEVICES": ",".join(gpu_sets)})
        b.submit(f"2 nodes x {half} GPUs, 25 MiB buckets", 2 * half, SOCKET_ENV, inventory=inv)
        b.submit(f"2 nodes x {half} GPUs, 100 MiB buckets", 2 * half, [*SOCKET_ENV, "train.bucket_cap_mb=100"],
                 inventory=inv)
        b.submit(f"2 nodes x {half} GPUs, bf16 gradients", 2 * half, [*SOCKET_ENV, "train.grad_compress=bf16"],
                 inventory=inv)
    finally:
        hosts.down()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-out")
    ap.add_argument("--parts", default="scaling,twonodes")
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--budget-s", type=float, default=580)
    ap.add_argument("--tuned", action="store_true", help="tune_kernels on, as the job ships (long compiles)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    total = len(gpu_names())
    b = Bench(a.out, a.budget_s, a.steps, a.tuned)
    parts = a.parts.split(",")
    if "scaling" in parts:
        scaling(b, [int(s) for s in a.sizes.split(",")], total)
    if "twonodes" in parts:
        two_nodes(b, total)
    b.write()
    print((a.out / "scaling.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
