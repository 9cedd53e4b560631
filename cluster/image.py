"""One image on every host: its digest per host, and ``image push`` without a registry.

    python -m cluster image push ddp-train:torch2.4.0-cu121-abc1234 [--hosts node[1-3]] [-i INV]

docker/podman: the image is saved here once (``RUNTIME save``, a tar in a temp dir) and streamed to
each host that lacks that digest (``ssh HOST RUNTIME load``), at most ``--fanout`` hosts at a time,
with a progress line per host every 10 %; a host that has the digest already is skipped. The digest
is the image ID (the sha256 of its config): it survives save/load and names the content, not the
tag. apptainer: a .sif file is copied to the same path (``cat > PATH.part && mv``), its sha256 is
the digest. A registry reference needs none of this: each host pulls it (container.pull: true).

The container preflight (cluster/container.py: checks marked ``digest``) reads the same digest on
every host of a run; ``compare`` turns a disagreement into one error naming the hosts.
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
from typing import Callable, Mapping, Optional

from cluster.spec import hostlist
from cluster.errors import UserError

CHUNK = 1 << 20


def digest_argv(runtime: str, image: str) -> list[str]:
    """Prints the image's digest on a host (exit 0), or fails when the image is not there."""
    if runtime in ("docker", "podman"):
        return [runtime, "image", "inspect", "--format", "{{.Id}}", image]
    if runtime == "apptainer":
        return ["sha256sum", image]
    raise UserError(f"runtime '{runtime}' has no local images to compare", key="container.runtime",
                    hint="use docker, podman or apptainer (a .sif path)")


def digest_of(output: str) -> str:
    """The digest in a digest command's output ('sha256:...' or sha256sum's first word)."""
    word = (output.split() or [""])[0]
    return word if ":" in word or not word else f"sha256:{word}"


def compare(image: str, digests: Mapping[str, Optional[str]]) -> None:
    """Raise one UserError naming the hosts when ``digests`` (host -> digest, None: missing) differ."""
    groups: dict[Optional[str], list[str]] = {}
    for host, d in digests.items():
        groups.setdefault(d, []).append(host)
    if len(groups) <= 1 and None not in groups:
        return
    parts = [f"{hostlist.fold(hosts)}: {d[:19] + '...' if d else 'missing'}"
             for d, hosts in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0] is None, kv[0] or ""))]
    raise UserError(f"image {image} is not the same on every host ({'; '.join(parts)})", key="container.image",
                    hint=f"copy one image to every host: python -m cluster image push {image} "
                         "(or pull the same digest everywhere)")


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
    from cluster.backends.attach import ssh_client_argv
    from cluster.backends.fanout import run_argv
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
