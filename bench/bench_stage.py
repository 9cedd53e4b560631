"""Dataset staging speed: one source (this machine) to N hosts of an inventory, packed vs loose,
ours (cluster/backends/stage.py: check, rsync, verify, stamp) against plain `rsync -a` of the same tree.

    python bench/bench_stage.py --inventory .testbed/inventory.yaml [--images 2000] [--out DIR]
    python bench/bench_stage.py --loopback 8 [--images 2000] [--out DIR]      # as root

``--loopback N`` makes its own N hosts (bench/bench_launch.py's Hosts: one real sshd each on
127.0.1.11.., each in its own UTS namespace, each with its own workdir, so every copy is a real
one to its own directory) and its own inventory, and takes them down at the end: for a machine
with more cores than the cluster in a box (which shares 2 cores and one disk among its hosts).

Generates an ImageNet-like set (bench/imageset.py) and its packed form in /tmp, then for 1 host
and for all hosts: ours packed, ours loose, plain rsync packed, plain rsync loose (each to fresh
paths under the hosts' workdirs, each removed once its rows are done), and ours again on the
hosts ours just made current (the check a second submit does). Then, packed to all hosts with fanout 1: copies between hosts off
(every host from the source, one at a time) and on (data.peers: a host with a verified copy serves
the next one while the source is busy), with where each host's copy came from.
Prints and writes a table: seconds, files/s and MB/s per host.
On the cluster in a box hold the testbed lock: `flock /tmp/ddp-testbed.lock python bench/...`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.imageset import make  # noqa: E402
from cluster.spec.config import DataSpec, load_inventory  # noqa: E402
from cluster.backends.transport import Pool  # noqa: E402
from cluster.backends.stage import Stager, describe, host_path  # noqa: E402
from cluster.backends.openssh import rsync_rsh  # noqa: E402
from cluster.backends.rsync import parallel  # noqa: E402
from train.pack import pack  # noqa: E402


def plain_rsync(hosts, ssh, src: str, rel: str) -> None:
    def one(h):
        dst = host_path(h, rel)
        subprocess.run(["rsync", "-a", "--protect-args", "-e", rsync_rsh(h, ssh),
                        "--rsync-path", f"mkdir -p {shlex.quote(dst)} && rsync", src + "/", f"{h.hostname}:{dst}/"],
                       check=True, capture_output=True)
    parallel(one, hosts, len(hosts))

def report(rows: list[dict], out: Path | None) -> None:
    """The table and the ratios (also of a run a time limit cut short), printed and written to out."""
    n = max((r["hosts"] for r in rows), default=1)
    lines = ["| hosts | form | how | files | MB | s | files/s per host | MB/s per host | MB/s total |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['hosts']} | {r['form']} | {r['how']} | {r['files']} | {r['mb']} | {r['s']} | "
              f"{r['files_s_per_host']:,} | {r['mb_s_per_host']} | {r['mb_s_total']} |" for r in rows]
    lines += [""] + [f"{r['how']}: " + ", ".join(f"{h} from {g}" for h, g in r["from"].items())
                     for r in rows if "fanout 1" in r["how"]]
    one = {(r["form"], r["how"]): r["s"] for r in rows if r["hosts"] == 1}
    many = {(r["form"], r["how"]): r["s"] for r in rows if r["hosts"] == n}
    lines.append("")
    lines += [f"{form}, {how}: {n} hosts / 1 host = {many[(form, how)] / one[(form, how)]:.2f}x"
              for form, how in one if (form, how) in many and n > 1]
    on, off = many.get(("packed", "ours, fanout 1, peers on")), many.get(("packed", "ours, fanout 1, peers off"))
    if on and off:
        lines.append(f"packed, {n} hosts, fanout 1: peers on / peers off = {on / off:.2f}x")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "stage_results.md").write_text(text)
        (out / "stage_results.json").write_text(json.dumps(rows, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--inventory", help="stage to the hosts of this inventory (e.g. .testbed/inventory.yaml)")
    where.add_argument("--loopback", type=int, metavar="N",
                       help="stage to N hosts this bench makes on 127.0.1.x (root; see bench/bench_launch.py)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--fanout", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    made_hosts = None
    if a.loopback is not None:
        from bench.bench_launch import SSHD, Hosts
        if a.loopback < 1 or os.geteuid() != 0 or not Path(SSHD).exists() or not shutil.which("rsync"):
            print("--loopback N: N >= 1, root, openssh-server and rsync needed", file=sys.stderr)
            return 2
        made_hosts = Hosts(a.loopback, loopback=True)
    # a time limit's TERM still takes the hosts down and removes the copies
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    work = Path(tempfile.mkdtemp(prefix="bench-stage-"))
    rows, made, pool = [], [], None
    try:
        if made_hosts is not None:
            t = time.time()
            made_hosts.up()
            a.inventory = str(made_hosts.inventory(a.loopback))
            print(f"{a.loopback} loopback hosts up in {time.time() - t:.2f} s ({made_hosts.sd}, "
                  f"{os.cpu_count()} CPUs)", flush=True)
        inv = load_inventory(a.inventory)
        hosts = list(inv.hosts)
        t = time.time()
        make(str(work / "loose"), a.images, 0, 100, workers=max(2, min(16, os.cpu_count() or 2)))
        pack(str(work / "loose"), str(work / "packed"), shard_mb=64, log=lambda _: None)
        print(f"set: {a.images} images, made and packed in {time.time() - t:.0f} s", flush=True)
        pool = Pool(hosts, inv.ssh)

        def drop(rel):
            pool.run({h.name: f"rm -rf {shlex.quote(host_path(h, rel))}" for h in hosts}, timeout_s=120)
            made.remove(rel)

        plan = [(n, form, how) for n in sorted({1, len(hosts)}) for form in ("packed", "loose")
                for how in ("ours", "plain rsync", "ours, current")]
        if len(hosts) > 1:
            plan += [(len(hosts), "packed", f"ours, fanout 1, peers {on}") for on in ("off", "on")]
        ours_rel = None
        for n, form, how in plan:
            sel = hosts[:n]
            src = describe(str(work / form))
            if how == "ours, current":
                rel = ours_rel      # the copies ours made (stamped) just before: nothing to copy
            else:
                rel = f"bench-stage-{uuid.uuid4().hex[:8]}"
                made.append(rel)
                if how == "ours":
                    ours_rel = rel
            said = []
            t = time.monotonic()
            if how == "plain rsync":
                plain_rsync(sel, inv.ssh, src.path, rel)
            else:
                spec = DataSpec(src.path, rel, 1 if "fanout 1" in how else a.fanout, peers="peers off" not in how)
                Stager(spec, sel, pool, inv.ssh, False, said.append).run()
            dt = time.monotonic() - t
            came = dict(re.findall(r"data: (\S+): copied in [\d.]+ s from (.+)$", "\n".join(said), re.M))
            rows.append({"hosts": n, "form": form, "how": how, "files": len(src.files),
                         "mb": round(src.total / 1e6, 1), "s": round(dt, 2),
                         "files_s_per_host": round(len(src.files) / dt), "mb_s_per_host": round(src.total / 1e6 / dt, 1),
                         "mb_s_total": round(n * src.total / 1e6 / dt, 1), "from": came})
            print(json.dumps(rows[-1]), flush=True)
            if how != "ours":           # keep the disk to one set per host at a time
                drop(rel)
    finally:
        if pool is not None:
            for rel in list(made):
                drop(rel)
            pool.close()
        if made_hosts is not None:
            made_hosts.down()
        shutil.rmtree(work, ignore_errors=True)
        report(rows, a.out)     # what was measured, also when a time limit or an error cut the run short
    return 0


if __name__ == "__main__":
    sys.exit(main())
