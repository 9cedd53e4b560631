"""The deep preflight's checks on one host (``doctor --deep``, a job's ``preflight: deep``),
shipped whole as ``python -c`` (cluster/backends/ship.py ``module_command``): standard library at
import, torch imported inside, with the inventory's python.

* ``_gpu_health``: the GPUs nvidia-smi lists, their uncorrected ECC errors, XID errors in the
  kernel log (where it is readable), and a short bf16 matmul on each GPU in TFLOP/s;
* ``_allreduce``: one rank of an all-reduce across the hosts (gloo on CPUs, NCCL on GPUs), timed:
  the bus bandwidth as nccl-tests reports it (2(n-1)/n x bytes / time).
"""


def _gpu_health(a: dict) -> dict:
    import re
    import shutil
    import subprocess
    import time
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"gpus": 0}
    q = subprocess.run([smi, "--query-gpu=index,name,ecc.errors.uncorrected.volatile.total,clocks.sm,clocks.max.sm",
                        "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=60)
    gpus = []
    for line in q.stdout.splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) >= 5:
            gpus.append({"index": int(f[0]), "name": f[1], "ecc": None if not f[2].isdigit() else int(f[2]),
                         "sm_mhz": f[3], "max_sm_mhz": f[4]})
    xid = []
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
        xid = [l.strip()[:200] for l in log.splitlines() if re.search(r"NVRM: Xid", l)][-5:]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import torch
        for g in gpus:
            dev = torch.device("cuda", g["index"])
            n = int(a.get("matmul_n", 8192))
            x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
            y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
            for _ in range(3):
                x @ y
            torch.cuda.synchronize(dev)
            t0, k = time.perf_counter(), int(a.get("matmul_iters", 20))
            for _ in range(k):
                x @ y
            torch.cuda.synchronize(dev)
            g["tflops"] = round(2 * n ** 3 * k / (time.perf_counter() - t0) / 1e12, 1)
    except Exception as e:     # noqa: BLE001 -- reported as the host's problem
        return {"gpus": len(gpus), "list": gpus, "xid": xid, "error": f"matmul: {type(e).__name__}: {e}"[:300]}
    return {"gpus": len(gpus), "list": gpus, "xid": xid}


def _allreduce(a: dict) -> dict:
    import datetime
    import os
    import time
    if a.get("interface"):
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = a["interface"]
    try:
        import torch
        import torch.distributed as dist
        dist.init_process_group(a["backend"], init_method=f"tcp://{a['master']}:{a['port']}", rank=a["rank"],
                                world_size=a["world"], timeout=datetime.timedelta(seconds=a["timeout_s"]))
        dev = torch.device("cuda", 0) if a["backend"] == "nccl" else torch.device("cpu")
        t = torch.ones(int(a["bytes"]) // 4, dtype=torch.float32, device=dev)
        dist.all_reduce(t)          # the connections are made here, not timed
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(int(a["iters"])):
            dist.all_reduce(t)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        s = (time.perf_counter() - t0) / int(a["iters"])
        dist.destroy_process_group()
    except Exception as e:     # noqa: BLE001 -- a peer that never came, a timeout: the answer says so
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    n = a["world"]
    return {"busbw_gbps": round(2 * (n - 1) / n * int(a["bytes"]) * 8 / s / 1e9, 3), "s": round(s, 4)}
