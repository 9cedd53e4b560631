"""Real data against synthetic, on one GPU box, in one command:

    python3 bench/bench_data.py --out DIR [--images 25600] [--cores 8] [--steps 150] [--budget-s 560]

1. generates an ImageNet-like JPEG set (bench/imageset.py: about 500x375, quality 90) and packs it
   (python -m train.pack), timing both;
2. checks the GPU path against the CPU (PIL) path on the same crops: mean absolute difference per
   image, in 0-255 levels (tolerance: 3);
3. the GPU input stage alone (decode + crop + normalise, no training), img/s;
4. the seed article's loop as written (bench/seed_loop.py: fp32, batch 20, torch.randn(...).to(device),
   DDP at world size 1);
5. train/ (`torchrun -m train`, the resnet50 job's settings without tune_kernels) on synthetic data,
   on the packed set with decode=cpu (PIL in the workers) and with decode=gpu, each confined to
   --cores CPU cores (taskset), with the cores it used in the steady state (CPU seconds of the
   whole process tree over wall seconds, between 30% of the steps and the end).

Writes DIR/data_results.json and DIR/data_results.md (rewritten after every step).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORK = Path("/tmp/bench_data")
# the resnet50 job's train settings (jobs/resnet50.yaml), tune_kernels off for a short compile
JOB = ["model=resnet50", "image_size=224", "batch_size=512", "optimizer=sgd", "lr=0.2", "warmup_steps=20",
       "label_smoothing=0.1", "compile=true", "compile_mode=reduce-overhead", "tune_kernels=false",
       "val_every=-1", "resume=false", "num_classes=1000"]


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of pid and all its descendants (from /proc)."""
    total, todo, tick = 0.0, [pid], os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
                children.setdefault(int(f[1]), []).append(int(d))
            except OSError:
                pass
    while todo:
        p = todo.pop()
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / tick
        except OSError:
            pass
        todo += children.get(p, [])
    return total


def run_train(name: str, args: list[str], cores: str, steps: int, limit_s: float, probes: str = "",
              extra_env: dict | None = None) -> dict:
    d = WORK / name
    probe = d / "probe" / "gil.jsonl"
    entry = [str(REPO / "bench" / "train_probe.py"), str(d / "probe"), probes] if probes else ["-m", "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "1", *entry, *JOB, *args, f"steps={steps}", "log_every=10",
           f"out_dir={d}/metrics", f"ckpt_dir={d}/ckpt"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t0 = time.time()
    allowed = set(range(int(cores.split("-")[0]), int(cores.split("-")[1]) + 1))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=WORK,
                         preexec_fn=lambda: os.sched_setaffinity(0, allowed))   # as taskset -c would
    marks: dict[int, tuple[float, float]] = {}
    lines = []
    timer = threading.Timer(limit_s, p.kill)
    timer.start()
    for line in p.stdout:
        lines.append(line)
        m = re.search(r"^step (\d+)/", line)
        if m:
            marks[int(m.group(1))] = (time.time(), tree_cpu_s(p.pid))
    p.wait()
    timer.cancel()
    text = "".join(lines)
    res = {"rc": p.returncode, "wall_s": round(time.time() - t0, 1), "cores_allowed": cores, "args": args,
           "tail": text.splitlines()[-6:]}
    m = re.search(r"^summary: (.*)$", text, re.M)
    if m:
        res["summary"] = dict(kv.split("=", 1) for kv in m.group(1).split())
        res["img_s"] = float(res["summary"]["mean_img_s"])
    steady = [s for s in sorted(marks) if s >= 0.3 * steps]
    if len(steady) >= 2:
        (ta, ca), (tb, cb) = marks[steady[0]], marks[steady[-1]]
        res["cores_used"] = round((cb - ca) / (tb - ta), 2)
        if probe.exists():   # the probe's windows within the steady steps
            w = [json.loads(x) for x in probe.read_text().splitlines()]
            w = [x for x in w if ta - t0 + 5 <= x["t"] <= tb - t0 - 5] or w[-2:]
            res["gil_late_share"] = round(sum(x["late_share"] for x in w) / max(1, len(w)), 3)
            res["gil_late_max_ms"] = max((x["late_max_ms"] for x in w), default=None)
    if (d / "probe" / "profile.json").exists():
        res["profile"] = json.loads((d / "probe" / "profile.json").read_text())
    records = [json.loads(x) for f in sorted((d / "metrics").glob("metrics-rank*.jsonl"))
               for x in f.read_text().splitlines()]
    res["data_ms"] = [r.get("data_ms") for r in records if r.get("kind") == "train"]
    # input_process: where its time per batch went, in each training pass (train/input_process.py)
    passes = re.findall(r"input process, train pass: (\d+) batches; per batch ([\d.]+) ms waiting for the workers, "
                        r"([\d.]+) ms for the training process to hand a slot back, ([\d.]+) ms decoding", text)
    if passes:
        res["input_ms"] = [{"batches": int(n), "workers": float(w), "slot": float(s), "decode": float(d)}
                           for n, w, s, d in passes]
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=25600)
    ap.add_argument("--cores", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--only", default="gen,verify,stage,seed,synthetic,pil,gpu,gpu-hw")
    ap.add_argument("--decoders", default="", help="verify and stage: these decoders only (default: each installed)")
    ap.add_argument("--probe", default="", help="run train/ under bench/train_probe.py with these probes "
                                                "(gil,profile,nodecode)")
    a = ap.parse_args()
    deadline = time.time() + a.budget_s
    a.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    only = a.only.split(",")
    import torch

    R: dict = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__, "steps": a.steps,
               "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))}
    import torchvision

    R["torchvision"] = torchvision.__version__

    def save():
        (a.out / "data_results.json").write_text(json.dumps(R, indent=1) + "\n")
        (a.out / "data_results.md").write_text(table(R))
        print(json.dumps({k: v for k, v in R.items() if k != "runs"}), flush=True)

    src, packed = WORK / "src", WORK / "packed"
    if "gen" in only:
        from bench.imageset import make

        shutil.rmtree(WORK, ignore_errors=True)   # an earlier call's set: train.pack writes only to a new directory
        t = time.time()
        size = make(str(src), a.images, a.images // 10, 100, extras=True, workers=os.cpu_count() or 1)
        R["gen"] = {"images": a.images, "val": a.images // 10, "mb": round(size / 1e6, 1), "s": round(time.time() - t, 1)}
        t = time.time()
        subprocess.run([sys.executable, "-m", "train.pack", str(src), str(packed)], check=True,
                       stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))
        R["decoders"] = decoders()
        R["pack_s"] = round(time.time() - t, 1)
        save()
    if "verify" in only or "stage" in only:
        from train.imagesets import open_split
        from train.pipeline import DeviceStage, Items, collate

        split = open_split(str(packed), "train")
        dev = torch.device("cuda")
        idx = list(range(0, len(split), max(1, len(split) // 512)))[:512]
        for dec in [d for d in decoders() if not a.decoders or d in a.decoders.split(",")]:
            stage = DeviceStage(dev, 224, True, decoder=dec)
            if "verify" in only:
                try:
                    # one batch first, so the checked one is decoded into reused output buffers
                    stage(collate([Items(split, 1, 224, True)[(1, i)] for i in idx]))
                    b = collate([Items(split, 0, 224, True)[(0, i)] for i in idx])
                    g = stage(b)[0].float()
                    c = stage(collate([Items(split, 0, 224, False)[(0, i)] for i in idx]))[0].float()
                    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255
                    diff = ((g - c) * std).abs().mean(dim=(1, 2, 3))
                    R[f"verify-{dec}"] = {"images": len(idx), "mean_abs_diff": round(diff.mean().item(), 3),
                                          "max_image_mean_abs_diff": round(diff.max().item(), 3), "tolerance": 3.0,
                                          "ok": bool(diff.max().item() <= 3.0), "cpu_path": dict(stage.counts)}
                    # the input process's two halves (decode_into there, from_decoded in the rank)
                    # against the same decoder in the rank
                    buf, d = DeviceStage(dev, 224, False, decoder=dec).decode_into(b, None)
                    p = stage.from_decoded(buf, d)[0].float()
                    R[f"verify-{dec}"]["process_max_abs_diff"] = round(((p - g) * std).abs().max().item(), 4)
                except Exception as e:  # noqa: BLE001 - recorded; the other rows still run
                    R[f"verify-{dec}"] = {"error": f"{type(e).__name__}: {e}"[:400]}
                save()
            if "stage" in only:
                try:
                    R[f"stage-{dec}"] = stage_speed(stage, split)
                except Exception as e:  # noqa: BLE001
                    R[f"stage-{dec}"] = {"error": f"{type(e).__name__}: {e}"[:400]}
                save()
    R.setdefault("runs", {})
    cores = f"0-{a.cores - 1}"
    if "seed" in only:
        t = time.time()
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                            str(REPO / "bench" / "seed_loop.py"), "--steps", "120"], capture_output=True, text=True,
                           timeout=max(30, min(150, deadline - time.time())))
        m = re.search(r"^(\{.*\})$", p.stdout, re.M)
        R["runs"]["seed"] = {"rc": p.returncode, "wall_s": round(time.time() - t, 1),
                             **(json.loads(m.group(1)) if m else {"tail": (p.stdout + p.stderr)[-800:]})}
        save()
    def gpu(decoder: str, *more: str, process: bool = False) -> list[str]:
        """train/ on the packed set, decoded on the GPU by ``decoder``: in the rank (input_process
        false, also under MPS, where auto would turn it on) or in the input process."""
        return [f"data={packed}", "decode=gpu", f"jpeg_decoder={decoder}", *(more or ["workers=4"]),
                f"input_process={str(process).lower()}"]

    plan = [("synthetic", ["data=synthetic"], a.steps),
            ("pil", [f"data={packed}", "decode=cpu", f"workers={a.cores - 1}"], max(60, a.steps // 2)),
            ("gpu", gpu("torchvision"), a.steps),
            ("gpu-hw", gpu("nvimgcodec"), a.steps),
            ("gpu-hw-w8", gpu("nvimgcodec", "workers=7", "prefetch_factor=4"), a.steps),
            ("gpu-dali", gpu("dali"), a.steps),
            ("gpu-dali-w6", gpu("dali", "workers=6", "prefetch_factor=4"), a.steps),
            # the decode done once per batch size and reused: what the decode itself costs the step
            ("gpu-nodecode", gpu("torchvision"), a.steps),
            ("gpu-hw-nodecode", gpu("nvimgcodec"), a.steps),
            # the decode in a process of its own (train/input_process.py)
            ("gpu-process", gpu("torchvision", process=True), a.steps),
            ("gpu-hw-process", gpu("nvimgcodec", process=True), a.steps),
            ("gpu-dali-process", gpu("dali", process=True), a.steps),
            # under MPS the training's kernels are below normal priority with input_process (the
            # decode's go first); this row sets them back to normal, as both were before
            ("gpu-process-even", gpu("torchvision", process=True), a.steps)]
    env_of = {"gpu-process-even": {"CUDA_MPS_CLIENT_PRIORITY": "0"}}
    for name, args, steps in plan:
        if name in only:
            left = deadline - time.time()
            if left < 40:
                R["runs"][name] = {"skipped": f"{left:.0f} s left"}
                continue
            probes = ",".join(filter(None, [a.probe, "nodecode" if name.endswith("-nodecode") else ""]))
            R["runs"][name] = run_train(name, args, cores, steps, left - 10, probes, env_of.get(name))
            save()
    save()
    return 0


def stage_speed(stage, split) -> dict:
    """The GPU input stage alone on 4 batches of 512 (after 2 to warm up), the decoder alone, the
    stage with the decode already done (crop + resize + flip + normalise: the SMs' share when the
    decode runs on the hardware decoders), one core reading and collating the same batches (what a
    worker does), and for nvImageCodec how many images its hardware decoders take alone."""
    import torch
    from train.pipeline import Items, collate

    items = Items(split, 0, 224, True)
    batches = [collate([items[(0, i)] for i in range(k * 512, k * 512 + 512)]) for k in range(6)]
    for b in batches[:2]:
        stage(b)
    torch.cuda.synchronize()
    t = time.time()
    for b in batches[2:]:
        stage(b)
    torch.cuda.synchronize()
    stage_s = time.time() - t
    if stage.decoder == "dali":    # decode, crop and normalise are one DALI pipeline: the whole stage only
        return {"gpu_stage_img_s": round(4 * 512 / stage_s), **under_load(stage, batches[2], None)}
    datas = [list(torch.split(b["jpeg"][:sum(b["jpeg_sizes"])], b["jpeg_sizes"])) for b in batches]
    t = time.time()
    for d in datas[2:]:
        stage.decode(d)
    torch.cuda.synchronize()
    dec_s = time.time() - t
    fresh_s = 0.0
    if stage.decoder == "nvimgcodec":   # the same without reusing the output buffers
        stage.reuse_images = False
        t = time.time()
        for d in datas[2:]:
            stage.decode(d)
        torch.cuda.synchronize()
        fresh_s = time.time() - t
        stage.reuse_images = True
    stage.reuse_images = False   # 4 batches decoded at once: each needs its own buffers
    decoded = iter([stage.decode(d) for d in datas[2:]])
    torch.cuda.synchronize()
    stage.reuse_images = True
    real = stage.decode
    stage.decode = lambda datas, decoder=None: next(decoded)   # noqa: E731 - the decode already done
    t = time.time()
    for b in batches[2:]:
        stage(b)
    torch.cuda.synchronize()
    crop_s = time.time() - t
    stage.decode = real
    t = time.time()
    for k in range(2, 6):
        collate([items[(0, i)] for i in range(k * 512, k * 512 + 512)])
    cpu_s = time.time() - t
    res = {"gpu_stage_img_s": round(4 * 512 / stage_s), "decode_only_img_s": round(4 * 512 / dec_s),
           "after_decode_img_s": round(4 * 512 / crop_s), "worker_read_img_s_per_core": round(4 * 512 / cpu_s)}
    if stage.decoder == "nvimgcodec":
        res["decode_only_new_buffers_img_s"] = round(4 * 512 / fresh_s)
        from nvidia import nvimgcodec as nv

        hw = nv.Decoder(device_id=0, backends=[nv.Backend(nv.BackendKind.HW_GPU_ONLY)])
        inputs = [stage.code_streams(d)[0] for d in datas]
        hw.decode(inputs[1], params=stage._params)
        torch.cuda.synchronize()
        t = time.time()
        got = [hw.decode(cs, params=stage._params) for cs in inputs[2:]]
        torch.cuda.synchronize()
        res["hw_only_img_s"] = round(4 * 512 / (time.time() - t))
        res["hw_only_decoded"] = f"{sum(im is not None for g in got for im in g)}/{sum(len(g) for g in got)}"
    res.update(under_load(stage, batches[2], datas[2]))
    return res


def under_load(stage, batch: dict, datas: list) -> dict:
    """Wall time of one decode, and of one whole stage call, on the stage's own stream while
    another stream has about 300 ms of matmuls queued (what training does to it): about the same
    as idle if the stage overlaps with training, about 300 ms more if something in it waits for
    the whole device (an implicit synchronisation: cudaFree, a blocking copy, the legacy stream)."""
    import torch

    dev = stage.device
    busy, side = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    hi = torch.cuda.Stream(dev, priority=-1)     # the highest priority torch asks CUDA for
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

    def load(k: int) -> float:
        """k matmuls queued on the busy stream; their time when run alone (s)."""
        torch.cuda.synchronize()
        t = time.time()
        with torch.cuda.stream(busy):
            for _ in range(k):
                a @ a
        torch.cuda.synchronize()
        return time.time() - t

    load(1)
    n = max(1, round(10 * 0.3 / load(10)))

    def timed(fn, side=side) -> tuple[float, float]:
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            t = time.time()
            fn()
            idle = time.time() - t
        torch.cuda.synchronize()
        with torch.cuda.stream(busy):
            for _ in range(n):
                a @ a
        with torch.cuda.stream(side):
            t = time.time()
            fn()
            loaded = time.time() - t
        torch.cuda.synchronize()
        return round(1000 * idle, 1), round(1000 * loaded, 1)

    out = {"load_ms": round(1000 * load(n), 1)}
    out["stage_idle_ms"], out["stage_loaded_ms"] = timed(lambda: stage(batch))
    # the same on a high-priority stream: its blocks are scheduled before the queued matmuls' blocks
    out["stage_loaded_hi_ms"] = timed(lambda: stage(batch), hi)[1]
    if datas is None:       # DALI: no decode of its own
        return out
    out["decode_idle_ms"], out["decode_loaded_ms"] = timed(lambda: stage.decode(datas))
    out["decode_loaded_hi_ms"] = timed(lambda: stage.decode(datas), hi)[1]
    decoded = stage.decode(datas)
    real, stage.decode = stage.decode, (lambda d, decoder=None: decoded)
    out["crop_idle_ms"], out["crop_loaded_ms"] = timed(lambda: stage(batch))
    stage.decode = real
    return out


def decoders() -> list[str]:
    """torchvision, and the optional decoders whose packages are installed."""
    out = ["torchvision"]
    for name, module in (("nvimgcodec", "nvidia.nvimgcodec"), ("dali", "nvidia.dali")):
        try:
            __import__(module)
            out.append(name)
        except ImportError:
            pass
    return out


def table(R: dict) -> str:
    runs = R.get("runs", {})
    syn = runs.get("synthetic", {}).get("img_s")
    seed = runs.get("seed", {}).get("img_s_per_gpu")
    out = [f"{R.get('gpu')}, {R.get('cpus')} CPU cores, torch {R.get('torch')}, torchvision {R.get('torchvision')}"
           + (", under MPS (nvidia-cuda-mps-control)" if R.get("mps") else ""), "",
           "| run | img/s per GPU | of synthetic | × seed loop | CPU cores allowed / used (steady) | GIL late |",
           "|---|---|---|---|---|---|"]
    for name, label in (("seed", "seed article's loop (fp32, batch 20, randn().to(device), DDP 1)"),
                        ("synthetic", "train/, synthetic"), ("pil", "train/, real JPEGs, decode=cpu (PIL)"),
                        ("gpu", "train/, real JPEGs, decode=gpu, torchvision (nvJPEG, batched)"),
                        ("gpu-hw", "train/, real JPEGs, decode=gpu, nvImageCodec (hardware JPEG decoders)"),
                        ("gpu-hw-w8", "train/, real JPEGs, decode=gpu, nvImageCodec, 7 workers, prefetch 4"),
                        ("gpu-dali", "train/, real JPEGs, decode=gpu, DALI (decode, crop, normalise)"),
                        ("gpu-dali-w6", "train/, real JPEGs, decode=gpu, DALI, 6 workers, prefetch 4"),
                        ("gpu-nodecode", "train/, real JPEGs, torchvision, each batch size decoded once (no decode)"),
                        ("gpu-hw-nodecode", "train/, real JPEGs, nvImageCodec, each batch size decoded once (no decode)"),
                        ("gpu-process", "train/, real JPEGs, torchvision, decoded in a process of its own (input_process=true)"),
                        ("gpu-hw-process", "train/, real JPEGs, nvImageCodec, decoded in a process of its own (input_process=true)"),
                        ("gpu-dali-process", "train/, real JPEGs, DALI decodes and crops in a process of its own"),
                        ("gpu-process-even", "train/, real JPEGs, torchvision, own process, both of normal priority")):
        r = runs.get(name)
        if not r:
            continue
        v = r.get("img_s") or r.get("img_s_per_gpu")
        if v is None:
            out.append(f"| {label} | failed: {r.get('skipped') or r.get('tail')} | | | | |")
            continue
        out.append(f"| {label} | {v:,.0f} | {f'{100 * v / syn:.1f}%' if syn else ''} | "
                   f"{f'{v / seed:.1f}x' if seed else ''} | {r.get('cores_allowed', '')} / {r.get('cores_used', '')} | "
                   f"{r.get('gil_late_share', '')} |")
    for k in R:
        if k in ("gen", "pack_s", "decoders") or k.startswith(("verify", "stage")):
            out.append(f"\n{k}: {json.dumps(R[k])}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
