"""The training image's build, timed: the full one (CUDA base, the pinned torch) by default.

    python bench/bench_image.py                        # full: registry CUDA base (make image)
    python bench/bench_image.py --base local           # full pins on the local Debian base (no registry)
    python bench/bench_image.py --small                # the tests' variant
    python bench/bench_image.py --small --cold         # without podman's layer cache (--no-cache)

Appends one JSON line per build to bench/results/image.jsonl: options, seconds, tag, size.
Extra arguments go to image/build.py as they are (e.g. --build-opt=--ulimit=nofile=1000:1000).
"""
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv):
    cold = "--cold" in argv
    args = [a for a in argv if a != "--cold"] + (["--build-opt=--no-cache"] if cold else [])
    runtime = "docker" if "--runtime=docker" in args or "docker" in args else "podman"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(REPO / "image" / "build.py"), *args], text=True,
                       stdout=subprocess.PIPE)
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        print(f"build failed after {seconds:.0f} s (exit {p.returncode})")
        return p.returncode
    tag = p.stdout.strip().splitlines()[-1]
    size = subprocess.run([runtime, "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True,
                          text=True).stdout.strip()
    rec = {"args": argv, "seconds": round(seconds, 1), "tag": tag, "size_mb": int(size or 0) >> 20,
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = REPO / "bench" / "results" / "image.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"{tag}: {rec['size_mb']} MB, built in {seconds:.0f} s ({out})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
