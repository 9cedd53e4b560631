"""How long `plan` takes on inputs at the size limits (cluster/spec/hostlist.py MAX_HOSTS, yamlsrc.MAX_BYTES).

    .venv/bin/python bench/bench_load.py          # one line per case: seconds (best of 3), exit code

Each case runs `python -m cluster plan` in a fresh process, as a user would: a 10,000-host range
(the largest inventory, planned), a product of ranges naming a million hosts and 53,000 one-line
host entries under 1 MiB (both refused), and /dev/zero (refused after 1 MiB).
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def case(job: str, inv: str) -> tuple[float, int]:
    best, code = float("inf"), None
    for _ in range(3):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "cluster", "plan", job, "-i", inv, "--run-id", "bench"],
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
        best, code = min(best, time.monotonic() - t0), p.returncode
    return best, code


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        job = Path(d, "job.yaml")
        job.write_text("name: bench\nmodule: tests.fixtures.hello\n")
        files = {
            "10,000 hosts (gpu[00001-10000]), planned": "backend: ssh\nhosts:\n  - name: gpu[00001-10000]\n    gpus: 8\n",
            "a million hosts (n[1-1000]-[1-1000]), refused": "hosts:\n  - name: n[1-1000]-[1-1000]\n",
            "53,000 host entries in 900 KB, refused": "hosts:\n" + "".join(f"  - name: h{i}\n" for i in range(53_000)),
        }
        for title, text in files.items():
            p = Path(d, "inv.yaml")
            p.write_text(text)
            s, code = case(str(job), str(p))
            print(f"{s:6.2f} s  exit {code}  {title}")
        s, code = case(str(job), "/dev/zero")
        print(f"{s:6.2f} s  exit {code}  /dev/zero, refused")


if __name__ == "__main__":
    main()
