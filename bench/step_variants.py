"""Many train-step variants of ResNet-50 on one GPU, in one call: which settings make train/ faster.

    python3 bench/step_variants.py --out DIR [--budget-s 520] [--variants NAME,NAME] [--steps 50]

Each variant runs in its own process, one after another (never two on the GPU at once), and
builds its step from train/'s own pieces (build_model, wrap, build_optimizer, train_step,
warmup_cosine), so what is timed is train/'s step with some settings changed. Synthetic data:
one random batch on the GPU (as train/'s data=synthetic). Per variant: `warmup` steps (the
compilation, cuDNN autotuning, CUDA graph recording), then two timed windows of `steps` steps,
each closed by a device synchronize; img/s = batch x steps / window seconds; step ms = median of
per-step CUDA event times. The variant "profile" instead prints where the GPU time goes.

This is the search tool; the figures to report come from bench/bench_train.py (real
`torchrun -m train` processes). Writes DIR/variants.json and DIR/variants.md after every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLOP_PER_IMAGE = 24.5e9
PEAK_BF16_FLOPS = 989e12

# name -> settings. ddp: wrap in DDP at world size 1 (what train/ did under torchrun);
# mode: torch.compile mode; bs: batch; ind.*: torch._inductor.config; dyn.*: torch._dynamo.config;
# cudnn_limit: torch.backends.cudnn.benchmark_limit (0 = try every algorithm).
VARIANTS: dict[str, dict] = {
    "ddp-ro": {"ddp": 1, "mode": "reduce-overhead"},
    "noddp-ro": {"ddp": 0, "mode": "reduce-overhead"},
    "profile": {"ddp": 0, "mode": "default", "profile": 1},
    "ddp-whole-ro": {"ddp": 1, "mode": "reduce-overhead", "dyn.optimize_ddp": False},
    "noddp-ro-1x1mm": {"ddp": 0, "mode": "reduce-overhead", "ind.conv_1x1_as_mm": True},
    "noddp-ro-cudnnall": {"ddp": 0, "mode": "reduce-overhead", "cudnn_limit": 0},
    "noddp-ro-b768": {"ddp": 0, "mode": "reduce-overhead", "bs": 768},
    "noddp-ro-b256": {"ddp": 0, "mode": "reduce-overhead", "bs": 256},
    "noddp-ro-cdt": {"ddp": 0, "mode": "reduce-overhead", "ind.coordinate_descent_tuning": True},
    "noddp-ro-b1024": {"ddp": 0, "mode": "reduce-overhead", "bs": 1024},
    "noddp-ro-again": {"ddp": 0, "mode": "reduce-overhead"},
    "noddp-default": {"ddp": 0, "mode": "default"},
    "noddp-ro-aggr": {"ddp": 0, "mode": "reduce-overhead", "ind.aggressive_fusion": True},
    # train.model.fast_stem: the stem conv as space-to-depth, the max-pool with a saved argmax, both
    "stem-conv": {"ddp": 0, "mode": "reduce-overhead", "stem": "conv1"},
    "stem-pool": {"ddp": 0, "mode": "reduce-overhead", "stem": "maxpool"},
    "stem-both": {"ddp": 0, "mode": "reduce-overhead", "stem": "conv1,maxpool"},
    "stem-both-cdt": {"ddp": 0, "mode": "reduce-overhead", "stem": "conv1,maxpool",
                      "ind.coordinate_descent_tuning": True},
    "stem-both-profile": {"ddp": 0, "mode": "default", "stem": "conv1,maxpool", "profile": 1},
    "stem-both-b256": {"ddp": 0, "mode": "reduce-overhead", "stem": "conv1,maxpool", "bs": 256},
    # tri: the max-pool backward as train/'s Triton kernel (1, the default) or Inductor's (0)
    "stem-both-inductor": {"ddp": 0, "mode": "reduce-overhead", "stem": "conv1,maxpool", "tri": 0},
    # the max-pool backward alone at ResNet-50's stem size: Triton kernel against Inductor's
    "maxpool-micro": {"micro": 1},
}
# the first call (2026-11-28): DDP at world size 1, compile and cuDNN options, batch
FIRST = ["ddp-ro", "noddp-ro", "profile", "ddp-whole-ro", "noddp-ro-1x1mm", "noddp-ro-cudnnall",
         "noddp-ro-b768", "noddp-ro-again", "noddp-ro-cdt"]


def child(name: str, spec: dict, steps: int, warmup: int) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(REPO))
    from train import dist
    from train.loop import train_step, warmup_cosine
    from train import model as train_model
    from train.model import MaxPool3x3s2, SpaceToDepthStemConv, build_model, build_optimizer, wrap

    train_model.USE_TRITON_MAXPOOL = bool(spec.get("tri", 1))
    if spec.get("micro"):
        return maxpool_micro(name, spec)
    for key, value in spec.items():
        if key.startswith("ind."):
            import torch._inductor.config as ic
            setattr(ic, key[4:], value)
        elif key.startswith("dyn."):
            setattr(torch._dynamo.config, key[4:], value)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(29400 + os.getpid() % 500))
    env = dist.init(600)  # an NCCL group of one, as under torchrun
    device = env.device
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if "cudnn_limit" in spec:
        torch.backends.cudnn.benchmark_limit = spec["cudnn_limit"]
    bs = spec.get("bs", 512)
    torch.manual_seed(0)
    raw = build_model("resnet50", 1000, 224)
    stem = spec.get("stem", "").split(",")
    if "conv1" in stem:
        raw.conv1 = SpaceToDepthStemConv(raw.conv1)
    if "maxpool" in stem:
        raw.maxpool = MaxPool3x3s2()
    net, ddp = wrap(raw, device, distributed=bool(spec.get("ddp")), channels_last=True, compile=True,
                    compile_mode=spec.get("mode", "reduce-overhead"), bucket_cap_mb=25)
    opt = build_optimizer(raw, "sgd", 0.1, 0.9, 1e-4, device)
    total = warmup + 2 * steps + 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(20, total))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn((bs, 3, 224, 224), generator=g, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (bs,), generator=g, device=device)
    loss_sum = torch.zeros((), device=device)

    def step():
        nonlocal loss_sum
        loss_sum += train_step(net, ddp, [(x, y)], opt, loss_fn, True)
        sched.step()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    result = {"name": name, "spec": spec, "batch": bs, "warmup_s": round(time.perf_counter() - t0, 1)}
    if spec.get("profile"):
        result.update(profile(step, 3))
    else:
        windows, step_ms = [], []
        for _ in range(2):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            torch.cuda.synchronize()
            t = time.perf_counter()
            events[0].record()
            for i in range(steps):
                step()
                events[i + 1].record()
            torch.cuda.synchronize()
            windows.append(bs * steps / (time.perf_counter() - t))
            step_ms += [a.elapsed_time(b) for a, b in zip(events, events[1:])]
        img_s = statistics.mean(windows)
        result.update(img_s=round(img_s, 1), windows=[round(w, 1) for w in windows],
                      step_ms_median=round(statistics.median(step_ms), 2),
                      step_ms_p90=round(sorted(step_ms)[int(0.9 * len(step_ms))], 2),
                      mfu=round(img_s * FLOP_PER_IMAGE / PEAK_BF16_FLOPS, 4))
    result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result["loss"] = round(loss_sum.item() / (warmup + 2 * steps), 4)
    dist.cleanup()
    return result


def maxpool_micro(name: str, spec: dict) -> dict:
    """The max-pool backward at ResNet-50's stem (512 x 64 x 112 x 112, bf16, channels-last):
    median ms of train/'s Triton kernel and of Inductor's kernel compiled from the pointwise
    formulation and from max_pool2d's own backward; and whether they agree with eager PyTorch."""
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from train import model as m

    x = torch.randn(512, 64, 112, 112, device="cuda", dtype=torch.bfloat16).relu()
    x = x.contiguous(memory_format=torch.channels_last)

    out, idx = m._maxpool_forward(x)
    g = torch.randn_like(out).contiguous(memory_format=torch.channels_last)
    a = x.clone().requires_grad_()
    F.max_pool2d(a, 3, 2, 1).backward(g)
    op = m._maxpool_bwd_op()
    tri = lambda: op(g, idx, 112, 112)  # noqa: E731
    pointwise = torch.compile(lambda: m._maxpool_bwd_pointwise(g, idx, 112, 112, True))
    xi = x.clone().requires_grad_()
    yi = torch.compile(lambda t: F.max_pool2d(t, 3, 2, 1))(xi)
    inductor_native = lambda: torch.autograd.grad(yi, xi, g, retain_graph=True)  # noqa: E731
    res = {"name": name, "spec": spec, "batch": 512,
           "triton_equal_eager": bool(torch.equal(tri(), a.grad)),
           "pointwise_equal_eager": bool(torch.equal(pointwise(), a.grad))}
    for key, fn in (("triton_ms", tri), ("inductor_pointwise_ms", pointwise), ("inductor_native_ms", inductor_native)):
        fn()
        res[key] = round(do_bench(fn, warmup=50, rep=300, return_mode="median"), 4)
    res["bytes_gb"] = round((g.numel() * 2 + idx.numel() + x.numel() * 2) / 1e9, 3)
    res["triton_tb_s"] = round(res["bytes_gb"] / res["triton_ms"], 2)
    return res


def profile(step, n: int) -> dict:
    """GPU time per step by kind of kernel, and the top kernels (mode=default: no CUDA graphs)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    per: dict[str, list] = {}
    for e in p.events():  # device-side kernel records only (no CPU op that would count them twice)
        if e.device_type == DeviceType.CUDA:
            acc = per.setdefault(e.name, [0.0, 0])
            acc[0] += e.time_range.elapsed_us()
            acc[1] += 1
    rows = [(us / n / 1000, c // n, k) for k, (us, c) in per.items()]
    rows.sort(reverse=True)

    def kind(k: str) -> str:
        low = k.lower()
        if low.startswith("triton_"):
            return "triton:" + ("red" if "_red_" in low or "_per_" in low else "poi")
        for words, label in ((("conv", "cudnn", "xmma", "implicit", "dgrad", "wgrad", "fprop", "sm90_", "cutlass",
                               "nhwc", "cudnn"), "conv/cudnn"), (("gemm", "cublas", "nvjet"), "gemm"),
                             (("sgd", "multi_tensor", "foreach"), "optimizer"), (("nccl",), "nccl")):
            if any(w in low for w in words):
                return label
        return "other"

    kinds: dict[str, float] = {}
    for ms, _, k in rows:
        kinds[kind(k)] = kinds.get(kind(k), 0) + ms
    kernels = rows
    return {"gpu_ms_per_step_by_kind": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "gpu_ms_per_step": round(sum(kinds.values()), 2),
            "top_kernels": [[round(ms, 3), c, k[:140]] for ms, c, k in kernels[:45]]}


def markdown(results: list[dict]) -> str:
    lines = ["| variant | batch | img/s | windows | step ms (median) | p90 | peak GB | MFU | warmup s | settings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "img_s" in r:
            lines.append(f"| {r['name']} | {r['batch']} | {r['img_s']:.0f} | {r['windows']} | {r['step_ms_median']} | "
                         f"{r['step_ms_p90']} | {r['peak_mem_gb']} | {100 * r['mfu']:.1f}% | {r['warmup_s']} | "
                         f"{json.dumps(r['spec'])} |")
        elif "triton_ms" in r:
            lines.append(f"| {r['name']} | {r['batch']} | max-pool backward: Triton {r['triton_ms']} ms "
                         f"({r['triton_tb_s']} TB/s), Inductor {r['inductor_pointwise_ms']} / "
                         f"{r['inductor_native_ms']} ms | | | | | | | equal to eager: "
                         f"{r['triton_equal_eager']} / {r['pointwise_equal_eager']} |")
        elif "gpu_ms_per_step" in r:
            lines.append(f"| {r['name']} | {r['batch']} | profile: {r['gpu_ms_per_step']} GPU ms/step | | | | "
                         f"{r.get('peak_mem_gb')} | | {r['warmup_s']} | {json.dumps(r['gpu_ms_per_step_by_kind'])} |")
        else:
            lines.append(f"| {r['name']} | | failed: {r.get('error', '')[:120]} | | | | | | | {json.dumps(r.get('spec'))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--variants", default=",".join(FIRST))
    p.add_argument("--budget-s", type=float, default=520)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--limit-s", type=float, default=200, help="per variant")
    p.add_argument("--child", default="")
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, VARIANTS[args.child], args.steps, args.warmup)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    results, logs = [], []
    for name in args.variants.split(","):
        left = deadline - time.time()
        if left < 45:
            results.append({"name": name, "spec": VARIANTS[name], "error": "skipped: out of time"})
            continue
        t0 = time.time()
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(args.limit_s, left),
                                  env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO)))
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"), 124
        line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
        r = json.loads(line[7:]) if line else {"name": name, "spec": VARIANTS[name],
                                                 "error": f"rc {rc}: " + " / ".join(text.strip().splitlines()[-3:])}
        r["wall_s"] = round(time.time() - t0, 1)
        results.append(r)
        logs.append(f"===== {name} rc {rc} {r['wall_s']} s\n" + "\n".join(text.splitlines()[-40:]))
        print(f"[variants] {name}: {r.get('img_s', r.get('gpu_ms_per_step', r.get('error')))} ({r['wall_s']} s)",
              flush=True)
        (args.out / "variants.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "variants.md").write_text(markdown(results))
        (args.out / "variants-logs.txt").write_text("\n".join(logs))
    print(markdown(results))
    for r in results:
        if "top_kernels" in r:
            print(json.dumps(r["gpu_ms_per_step_by_kind"]))
            for row in r["top_kernels"][:25]:
                print(row)


if __name__ == "__main__":
    main()
