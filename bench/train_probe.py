"""Run `python -m train` with probes (bench/bench_data.py --probe ...):

    torchrun --standalone --nproc-per-node 1 bench/train_probe.py OUTDIR PROBES model=resnet50 ...

PROBES, comma-separated:
- gil: a thread sleeps 1 ms at a time and measures how late it wakes up; a thread that needs the
  GIL (the input pipeline's) waits about as long. Every 2 s it appends {"t", "late_share",
  "late_max_ms"} to OUTDIR/gil.jsonl.
- profile: the CUDA activity of optimizer steps 60-70 (torch.profiler), summed per stream, and
  how busy the GPU was (the union of its kernels and copies over the window), in
  OUTDIR/profile.json, with the input stage's wall time per batch over the same steps.
- nodecode: the input stage decodes the first batch of each size once and reuses the images
  (everything but the decode: what the decode itself costs the step).
"""

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def gil(path: str) -> None:
    start = time.perf_counter()
    while True:
        w0 = time.perf_counter()
        late = worst = 0.0
        while (now := time.perf_counter()) - w0 < 2.0:
            time.sleep(0.001)
            d = time.perf_counter() - now - 0.001
            late += max(0.0, d)
            worst = max(worst, d)
        with open(path, "a") as f:
            f.write(json.dumps({"t": round(now - start, 2), "late_share": round(late / (now - w0), 4),
                                "late_max_ms": round(1000 * worst, 2)}) + "\n")


def summarise(trace: str, stage_ms: list) -> dict:
    ev = [e for e in json.load(open(trace))["traceEvents"]
          if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not ev:
        return {"error": "no GPU events"}
    t0, t1 = min(e["ts"] for e in ev), max(e["ts"] + e["dur"] for e in ev)
    per: dict = {}
    for e in ev:
        s = per.setdefault(str(e.get("args", {}).get("stream")), {"ms": 0.0, "n": 0, "top": {}})
        s["ms"] += e["dur"] / 1000
        s["n"] += 1
        s["top"][e["name"][:60]] = s["top"].get(e["name"][:60], 0) + e["dur"] / 1000
    for s in per.values():
        s["ms"] = round(s["ms"], 1)
        s["top"] = {k: round(v, 1) for k, v in sorted(s["top"].items(), key=lambda kv: -kv[1])[:6]}
    busy, end = 0.0, t0
    for e in sorted(ev, key=lambda e: e["ts"]):
        a, b = max(e["ts"], end), e["ts"] + e["dur"]
        if b > a:
            busy += b - a
            end = b
    stage_ms = sorted(stage_ms)
    return {"window_ms": round((t1 - t0) / 1000, 1), "gpu_busy_share": round(busy / (t1 - t0), 3),
            "streams": per, "stage_calls": len(stage_ms),
            "stage_ms_median": stage_ms[len(stage_ms) // 2] if stage_ms else None}


def main() -> int:
    out, probes = sys.argv[1], sys.argv[2].split(",")
    os.makedirs(out, exist_ok=True)
    if "gil" in probes:
        threading.Thread(target=gil, args=(os.path.join(out, "gil.jsonl"),), daemon=True).start()
    import torch
    from train import loop, pipeline

    if "nodecode" in probes:
        real, cache = pipeline.DeviceStage.decode, {}

        def decode(self, datas, decoder=None):
            if len(datas) not in cache:
                cache[len(datas)] = real(self, datas, decoder)
            return cache[len(datas)]
        pipeline.DeviceStage.decode = decode
    if "profile" in probes:
        call, stage_ms, state = pipeline.DeviceStage.__call__, [], {"n": 0, "on": False}

        def timed(self, b):
            t = time.perf_counter()
            r = call(self, b)
            if state["on"]:
                stage_ms.append(round(1000 * (time.perf_counter() - t), 2))
            return r
        pipeline.DeviceStage.__call__ = timed
        tick = loop.Clock.tick

        def ticked(self, step):
            tick(self, step)
            state["n"] += 1
            if state["n"] == 60:
                state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                state["prof"].__enter__()
                state["on"] = True
            elif state["n"] == 70:
                torch.cuda.synchronize()
                state["on"] = False
                state["prof"].__exit__(None, None, None)
                trace = os.path.join(out, "trace.json")
                state["prof"].export_chrome_trace(trace)
                with open(os.path.join(out, "profile.json"), "w") as f:
                    json.dump(summarise(trace, stage_ms), f, indent=1)
                os.remove(trace)
        loop.Clock.tick = ticked
    from train.__main__ import main as train_main

    return train_main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
