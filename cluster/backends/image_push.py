"""``image push``: one image onto every host without a registry (what cluster/image.py says).

    python -m cluster image push ddp-train:torch2.4.0-cu121-abc1234 [--hosts node[1-3]] [-i INV]
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from cluster.backends.attach import ssh_client_argv
from cluster.backends.fanout import run_argv
from cluster.errors import UserError
from cluster.image import digest_argv, digest_of
from cluster.spec import hostlist

CHUNK = 1 << 20


def _local_digest(runtime: str, image: str) -> str:
    try:
        p = subprocess.run(digest_argv(runtime, image), capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise UserError(f"{runtime} is not installed on this machine", hint=f"install {runtime}") from None
    if p.returncode != 0:
        raise UserError(f"image {image} is not on this machine ({runtime})", key="image",
                        hint="build it here first (make image), or pull it")
    return digest_of(p.stdout)


def push(inv, names: list[str], image: str, runtime: str, fanout: int = 4,
         say: Callable[[str], None] = print) -> dict[str, str]:
    """Copy ``image`` to the hosts ``names`` that lack its digest; host -> 'copied' or 'up to date'.
    Raises UserError naming every host where the copy failed (the others keep theirs)."""
    want = _local_digest(runtime, image)
    res = run_argv(inv, names, digest_argv(runtime, image), timeout_s=600)
    have = {h: digest_of(r.stdout) if r.ok else None for h, r in res.items()}
    unreachable = {h: r.error for h, r in res.items() if r.error}
    if unreachable:
        raise UserError("cannot reach " + "; ".join(f"{h}: {e}" for h, e in sorted(unreachable.items())),
                        hint="check the hosts (python -m cluster doctor)")
    todo = [h for h in names if have[h] != want]
    status = {h: "up to date" for h in names if h not in todo}
    say(f"image {image} ({want[:19]}...): {len(todo)} of {len(names)} host(s) to copy"
        + (f", up to date on {hostlist.fold(sorted(status))}" if status else ""))
    if not todo:
        return status
    tmp = tempfile.mkdtemp(prefix="ddp-image-")
    try:
        if runtime == "apptainer":
            src = image
        else:
            src = os.path.join(tmp, "image.tar")
            t0 = time.monotonic()
            p = subprocess.run([runtime, "save", "-o", src, image], capture_output=True, text=True)
            if p.returncode != 0:
                raise UserError(f"{runtime} save {image} failed: {p.stderr.strip()[-300:]}")
            say(f"saved {os.path.getsize(src) >> 20} MB in {time.monotonic() - t0:.1f} s")
        size = os.path.getsize(src)
        if runtime == "apptainer":
            q = shlex.quote(image)
            line = f"mkdir -p \"$(dirname {q})\" && cat > {q}.part && mv {q}.part {q}"
        else:
            line = f"{runtime} load -q"
        lock = threading.Lock()

        def one(h: str) -> tuple[str, Optional[str]]:
            argv = ssh_client_argv(inv.host(h), inv, tty=False) + [line]
            t0, sent, shown = time.monotonic(), 0, 0
            with open(src, "rb") as f, subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE) as p:
                try:
                    while chunk := f.read(CHUNK):
                        p.stdin.write(chunk)
                        sent += len(chunk)
                        if sent * 10 // max(1, size) > shown:
                            shown = sent * 10 // max(1, size)
                            with lock:
                                say(f"  {h}: {shown * 10}% ({sent >> 20}/{size >> 20} MB)")
                    p.stdin.close()
                except BrokenPipeError:
                    pass
                err = p.stderr.read().decode(errors="replace")
                if p.wait() != 0:
                    return h, f"load failed (exit {p.returncode}): {err.strip()[-300:]}"
            with lock:
                say(f"  {h}: loaded in {time.monotonic() - t0:.1f} s")
            return h, None

        with ThreadPoolExecutor(max_workers=max(1, fanout)) as ex:
            results = list(ex.map(one, todo))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = {h: e for h, e in results if e}
    # the proof is the digest on each host, not the loader's exit code
    after = run_argv(inv, [h for h in todo if h not in failed], digest_argv(runtime, image), timeout_s=600)
    for h, r in after.items():
        if not r.ok or digest_of(r.stdout) != want:
            failed[h] = f"after loading, the host has {digest_of(r.stdout) or 'no such image'}, not {want}"
    if failed:
        raise UserError("image push failed on " + "; ".join(f"{h}: {e}" for h, e in sorted(failed.items())),
                        hint="check free disk space for the runtime's storage on those hosts")
    status.update({h: "copied" for h in todo})
    return status
