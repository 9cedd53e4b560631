"""ResNet-50 training throughput of train/ against the naive tutorial loop, on one GPU host.

    python3 bench/bench_train.py --out DIR [--plan first|tune|all|NAME,NAME] [--budget-s 540]

Every run is a real `torchrun ... -m train` (or bench/naive_ddp.py) process on synthetic data,
so what is timed is what a job runs. On a host with 2+ GPUs, independent single-GPU runs go
in parallel lanes (one GPU each) to fit a short lease; scaling runs use all GPUs alone.
Writes DIR/results.json, DIR/results.md (table) and DIR/logs.txt, rewritten after every run.

Numbers: img/s per GPU = train/'s steady-state mean (its first tenth of steps, with the
compilation, left out) divided by the GPU count; MFU = img/s x 24.5 GFLOP (ResNet-50 fwd+bwd at
224 px, 3 x 8.2 GFLOP) over the H200's dense bf16 peak of 989 TFLOP/s (datasheet).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLOP_PER_IMAGE = 24.5e9
PEAK_BF16_FLOPS = 989e12

# name -> train/ key=value arguments (ResNet-50, synthetic data, 224 px unless set). In a plan,
# NAME@2 runs NAME again (recorded under NAME@2), to show the run-to-run spread.
TRAIN_VARIANTS = {
    "train-eager": ["compile=false"],
    "train-compile": ["compile=true", "compile_mode=default"],
    "train-cudagraphs": ["compile=true", "compile_mode=reduce-overhead"],
    "train-autotune": ["compile=true", "compile_mode=max-autotune-no-cudagraphs"],
    "train-autotune-cg": ["compile=true", "compile_mode=max-autotune"],
    "train-compile-b512": ["compile=true", "compile_mode=default", "batch_size=512"],
    "train-cudagraphs-b512": ["compile=true", "compile_mode=reduce-overhead", "batch_size=512"],
    # since 2026-11-28 (no DDP at world size 1, train.model.fast_stem; see bench/step_variants.py)
    "train-plain-b512": ["compile=true", "compile_mode=reduce-overhead", "batch_size=512", "fast_stem=false"],
    "train-fast-b512": ["compile=true", "compile_mode=reduce-overhead", "batch_size=512", "fast_stem=true"],
    "train-fast-tuned-b512": ["compile=true", "compile_mode=reduce-overhead", "batch_size=512", "fast_stem=true",
                              "tune_kernels=true"],
    "train-fast": ["compile=true", "compile_mode=reduce-overhead", "fast_stem=true"],
    "train-fast-tuned": ["compile=true", "compile_mode=reduce-overhead", "fast_stem=true", "tune_kernels=true"],
}
PLANS = {
    # first call: correctness on GPU, the baseline, the main variants, scaling of the better one
    "first": ["verify", "naive", "train-eager", "train-compile", "train-cudagraphs", "scaling"],
    # second call: the max-autotune modes (long compiles) against the best of the first, batch 512,
    # and the naive loop again, alone on its GPU, with its time split into host and GPU parts
    # (round-robin over GPUs: with 2, lane 0 runs b512, cudagraphs, autotune; lane 1 autotune-cg, naive)
    "tune": ["train-cudagraphs-b512", "train-autotune-cg", "train-cudagraphs", "naive", "train-autotune"],
    # the current figures in one call (about 8 minutes on a fresh machine, most of it tune_kernels'
    # compile): correctness, the tutorial loop, train/ as the resnet50 job runs it, with and without
    # tuning, so the table has the ratio to naive beside the best
    "current": ["verify", "naive", "train-fast-b512", "train-fast-tuned-b512"],
}


class Bench:
    def __init__(self, out: Path, budget_s: float, steps: int, gpus: int):
        self.out, self.steps, self.gpus = out, steps, gpus
        self.deadline = time.time() + budget_s
        self.work = Path("/tmp/bench_train")
        shutil.rmtree(self.work, ignore_errors=True)
        self.lock = threading.Lock()
        self.results: dict = {"info": host_info(), "runs": {}}
        self.logs: list[str] = []

    # -- running ---------------------------------------------------------------------------
    def sh(self, name: str, cmd: list[str], gpus: str, limit_s: float) -> tuple[int, str]:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        limit_s = max(10.0, min(limit_s, self.deadline - time.time()))
        t0 = time.time()
        try:
            p = subprocess.run(cmd, cwd=self.work, env=env, capture_output=True, text=True, timeout=limit_s)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = 124, (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        with self.lock:
            self.logs.append(f"===== {name} (GPUs {gpus}, rc {rc}, {time.time() - t0:.0f} s)\n$ {' '.join(cmd)}\n"
                             + "\n".join(text.splitlines()[-80:]) + "\n")
        print(f"[bench] {name}: rc {rc} in {time.time() - t0:.0f} s", flush=True)
        return rc, text

    def torchrun(self, nproc: int, target: list[str]) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *target]

    def record(self, name: str, result: dict) -> None:
        with self.lock:
            self.results["runs"][name] = result
            self.write()

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.out / "results.md").write_text(markdown(self.results))
        (self.out / "logs.txt").write_text("\n".join(self.logs))

    # -- the runs --------------------------------------------------------------------------
    def train_run(self, name: str, extra: list[str], nproc: int, gpus: str, limit_s: float = 420) -> dict:
        self.work.mkdir(parents=True, exist_ok=True)
        d = self.work / name
        args = ["model=resnet50", "data=synthetic", "batch_size=256", "image_size=224", f"steps={self.steps}",
                "log_every=25", "val_every=-1", "resume=false", "lr=0.1", "warmup_steps=20", "label_smoothing=0.1",
                f"out_dir={d}/metrics", f"ckpt_dir={d}/ckpt", *extra]
        rc, text = self.sh(name, self.torchrun(nproc, ["-m", "train", *args]), gpus, limit_s)
        result = {"rc": rc, "gpus": nproc, "args": extra}
        m = re.search(r"^summary: (.*)$", text, re.M)
        if rc == 0 and m:
            s = {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
            batch = int(next((a.split("=")[1] for a in extra if a.startswith("batch_size=")), 256))
            img_s = s["mean_img_s"] / nproc
            result.update(img_s_per_gpu=round(img_s, 1), img_s_total=s["mean_img_s"], batch_size=batch,
                          step_ms=round(1000 * batch / img_s, 2), steady_step_ms=steady_step_ms(d / "metrics"),
                          peak_mem_gb=s.get("peak_mem_gb"), mfu=round(img_s * FLOP_PER_IMAGE / PEAK_BF16_FLOPS, 4),
                          time_s=s["time_s"], final_loss=s["final_loss"])
        else:
            result["error_tail"] = text.splitlines()[-15:]
        self.record(name, result)
        return result

    def naive(self, gpus: str) -> None:
        rc, text = self.sh("naive", self.torchrun(1, [str(REPO / "bench" / "naive_ddp.py"), "--steps", "150"]), gpus, 240)
        line = next((ln for ln in text.splitlines() if ln.startswith('{"name": "naive"')), None)
        result = {"rc": rc, "gpus": 1, "args": ["fp32", "batch_size=20", "NCHW", "eager"]}
        if rc == 0 and line:
            r = json.loads(line)
            result.update(img_s_per_gpu=r["img_s_per_gpu"], step_ms=r["step_ms"], peak_mem_gb=r["peak_mem_gb"],
                          batch_size=r["batch_size"], mfu=round(r["img_s_per_gpu"] * FLOP_PER_IMAGE / PEAK_BF16_FLOPS, 4),
                          loader_ms=r.get("loader_ms"), resident_batch_step_ms=r.get("resident_batch_step_ms"))
        else:
            result["error_tail"] = text.splitlines()[-15:]
        self.record("naive", result)

    def verify(self) -> None:
        """train/ on the GPU does what the CPU tests check: learns, checkpoints, resumes."""
        n = min(2, self.gpus)
        d = self.work / "verify"
        self.work.mkdir(parents=True, exist_ok=True)
        common = ["model=resnet18", "data=synthetic-learnable", "num_classes=10", "image_size=64", "batch_size=64",
                  "synthetic_size=64000", "grad_accum=2", "lr=0.2", "warmup_steps=10", "log_every=10",
                  "ckpt_every=30", "compile=false", f"out_dir={d}/metrics", f"ckpt_dir={d}/ckpt"]
        gpus = ",".join(map(str, range(n)))
        rc1, t1 = self.sh("verify-60", self.torchrun(n, ["-m", "train", *common, "steps=60"]), gpus, 180)
        rc2, t2 = self.sh("verify-resume-90", self.torchrun(n, ["-m", "train", *common, "steps=90"]), gpus, 180)
        losses = [float(x) for x in re.findall(r"^step \d+/\d+ loss ([\d.]+)", t1, re.M)]
        top1 = re.findall(r"top1=([\d.]+)", t2)
        ok = (rc1 == 0 and rc2 == 0 and len(losses) >= 2 and losses[-1] < 0.5 * losses[0]
              and "resumed from " in t2 and "summary: steps=90" in t2 and bool(top1) and float(top1[-1]) > 90)
        self.record("verify", {"ok": ok, "gpus": n, "losses": losses, "resumed": "resumed from " in t2,
                               "top1": float(top1[-1]) if top1 else None})

    def scaling(self, best: str) -> None:
        n = 2
        while n <= self.gpus:
            self.train_run(f"{best}-x{n}", TRAIN_VARIANTS[best], n, ",".join(map(str, range(n))))
            n *= 2


def steady_step_ms(metrics_dir: Path) -> float | None:
    """Median of rank 0's interval step times over the second half of the run."""
    try:
        sys.path.insert(0, str(REPO))
        from train.metrics import read_metrics

        rows = [r["step_ms"] for r in read_metrics(metrics_dir)[0] if r["kind"] == "train"]
        return round(statistics.median(rows[len(rows) // 2:]), 2) if rows else None
    except Exception:
        return None


def host_info() -> dict:
    info = {"python": sys.version.split()[0]}
    try:
        import torch
        import torchvision

        info.update(torch=torch.__version__, torchvision=torchvision.__version__,
                    gpus=torch.cuda.device_count(),
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception as e:  # still write what we have
        info["error"] = repr(e)
    for mod in ("yaml", "fabric", "submitit"):
        try:
            __import__(mod)
            info[mod] = True
        except ImportError:
            info[mod] = False
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except Exception:
        pass
    return info


def markdown(results: dict) -> str:
    info = results["info"]
    runs = results["runs"]
    naive = runs.get("naive", {}).get("img_s_per_gpu")
    lines = [f"ResNet-50 training, synthetic data, {info.get('gpu')} x{info.get('gpus')}, torch {info.get('torch')}",
             "", "| run | GPUs | batch/GPU | img/s per GPU | x naive | step ms | peak mem GB | MFU | settings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in runs.items():
        if name == "verify":
            continue
        if "img_s_per_gpu" not in r:
            lines.append(f"| {name} | {r.get('gpus')} | | failed (rc {r.get('rc')}) | | | | | {' '.join(r.get('args', []))} |")
            continue
        ratio = f"{r['img_s_per_gpu'] / naive:.2f}" if naive else ""
        lines.append(f"| {name} | {r['gpus']} | {r.get('batch_size')} | {r['img_s_per_gpu']:.0f} | {ratio} | "
                     f"{r['step_ms']:.1f} | {r.get('peak_mem_gb')} | {100 * r['mfu']:.1f}% | {' '.join(r['args'])} |")
    if "verify" in runs:
        v = runs["verify"]
        lines += ["", f"verify (resnet18, synthetic-learnable, {v['gpus']} GPU, kill-free resume): ok={v['ok']} "
                      f"losses={v['losses']} top1={v['top1']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--plan", default="first", help="first | tune | all | comma-separated run names")
    p.add_argument("--budget-s", type=float, default=540, help="stop starting runs after this many seconds")
    p.add_argument("--steps", type=int, default=250, help="optimizer steps per train/ run")
    p.add_argument("--scale", default="", help="variant to scale over all GPUs (default: the fastest one measured)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    gpus = torch.cuda.device_count()
    plan = PLANS["first"] + PLANS["tune"] if args.plan == "all" else PLANS.get(args.plan, args.plan.split(","))
    bench = Bench(args.out, args.budget_s, args.steps, gpus)
    bench.write()
    if "verify" in plan:
        bench.verify()
    # Single-GPU runs: one lane per GPU, each lane runs its share in order.
    singles = [name for name in plan if name == "naive" or name.split("@")[0] in TRAIN_VARIANTS]
    lanes = [singles[i::max(1, gpus)] for i in range(max(1, gpus))]

    def lane(gpu: int, names: list[str]) -> None:
        for name in names:
            if time.time() > bench.deadline - 30:
                bench.record(name, {"rc": None, "gpus": 1, "args": ["skipped: out of time"]})
            elif name == "naive":
                bench.naive(str(gpu))
            else:
                bench.train_run(name, TRAIN_VARIANTS[name.split("@")[0]], 1, str(gpu))

    threads = [threading.Thread(target=lane, args=(g, names)) for g, names in enumerate(lanes) if names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if "scaling" in plan and gpus > 1:
        measured = {k: v["img_s_per_gpu"] for k, v in bench.results["runs"].items()
                    if k.split("@")[0] in TRAIN_VARIANTS and "img_s_per_gpu" in v}
        best = args.scale or (max(measured, key=measured.get) if measured else "")
        if best and bench.deadline - time.time() > 150:  # a compile and a run
            bench.scaling(best.split("@")[0])
    bench.write()
    print(markdown(bench.results), flush=True)


if __name__ == "__main__":
    main()
