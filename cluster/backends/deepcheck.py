"""The deep preflight (``doctor --deep``; a job's ``preflight: deep`` before its launch, ssh backend):
GPU health on every host, then a real all-reduce across all the run's hosts with the run's own
backend (NCCL on GPUs, gloo on CPUs) measuring the bus bandwidth. Under the threshold, pairwise
all-reduces (every host in at most one pair at a time) find the slow host or link, and name it.

Thresholds: ``min_busbw_gbps`` (the job's, or doctor's --min-busbw-gbps), else a default per GPU
type below: a conservative share of what a healthy node of that type reaches across hosts
(nccl-tests all_reduce_perf's bus bandwidth); and half the published dense bf16 TFLOP/s of the GPU
for the matmul. Answers are folded as ``clush -b`` folds them (identical answers grouped).
"""
from __future__ import annotations

import json
from typing import Optional

from cluster.backends.ship import module_command
from cluster.backends.transport import fold
from cluster.node.deep import _allreduce, _gpu_health
from cluster.spec import hostlist

# Gbit/s of all-reduce bus bandwidth across hosts under which a run is not started
MIN_BUSBW_GBPS = {"H200": 100.0, "H100": 100.0, "A100": 50.0, "L40S": 20.0, "A10": 10.0, "gpu": 10.0,
                  "cpu": 0.2}
# published dense bf16 TFLOP/s (vendor data sheets, SXM where both exist); the matmul must reach half
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
CPU_BYTES, GPU_BYTES = 1 << 20, 256 << 20
ITERS = {"cpu": 3, "gpu": 20}
OP_TIMEOUT_S = 40


def gpu_type(name: str) -> str:
    for key in PEAK_BF16_TFLOPS:
        if key in name.upper().replace("-", " ").split() or key in name.upper():
            return key
    return "gpu"


def deep_preflight(be, plan, min_busbw_gbps, what: str = "deep preflight") -> None:
    """The deep checks (cluster/backends/deepcheck.py) on the plan's hosts; UserError naming the
    culprits if any fails. The ssh backend's: elsewhere it says so and checks nothing more."""
    import time
    from cluster.errors import UserError
    if be.name != "ssh":
        print(f"{what}: the deep checks run on the ssh backend only (this one is {be.name})")
        return
    from cluster.backends.ssh import gang_port
    t0 = time.monotonic()
    port = int(plan.rdzv_endpoint.rsplit(":", 1)[1])
    hosts = [be.inv.host(n.host) for n in plan.nodes]
    # ports of their own: above the rendezvous one, away from the gang's (cluster/backends/ssh.py)
    base = port + 10 if gang_port(port) > port else port - 20
    from cluster.backends.base import progress
    _, problems = deep_check(be, hosts, base, min_busbw_gbps, say=progress)
    progress(f"{what}: {len(hosts)} host(s) {hostlist.fold([h.name for h in hosts])} in {time.monotonic() - t0:.1f} s")
    if problems:
        raise UserError(f"{what} failed, nothing was started:\n  " + "\n  ".join(problems), where=be.inv.path,
                        hint="fix or leave out the host(s) named; 'python -m cluster doctor JOB --deep' checks again")


def deep_check(be, hosts, base_port: int, min_busbw_gbps: Optional[float] = None,
               say=print) -> tuple[list[str], list[str]]:
    """(folded report lines, problems) for ``hosts`` (inventory Hosts) through ``be``'s ssh pool."""
    lines: list[str] = []
    problems: list[str] = []

    def line(ok: bool, check: str, text: str) -> None:
        lines.append(f"  {'ok' if ok else '!!'}  {check:<11} {text}")
        say(lines[-1])

    names = [h.name for h in hosts]
    res = be.pool.run({h.name: module_command(h.python, _gpu_health) for h in hosts}, stdin=b"{}\n",
                      timeout_s=300, label="GPU health (python -c ...)")
    health = {}
    for h in hosts:
        r = res[h.name]
        try:
            health[h.name] = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            health[h.name] = {"error": r.error or r.describe()}
    kinds = set()
    for n, hv in health.items():
        if hv.get("error"):
            problems.append(f"{n}: GPU check failed: {hv['error']}")
        for g in hv.get("list") or []:
            kind = gpu_type(g["name"])
            kinds.add(kind)
            if g.get("ecc"):
                problems.append(f"{n}: GPU {g['index']} ({g['name']}) has {g['ecc']} uncorrected ECC error(s)")
            peak = PEAK_BF16_TFLOPS.get(kind)
            if peak and g.get("tflops") is not None and g["tflops"] < peak / 2:
                problems.append(f"{n}: GPU {g['index']} ({g['name']}) matmul {g['tflops']} TFLOP/s, under half "
                                f"its {peak:g} TFLOP/s (clocks {g['sm_mhz']}/{g['max_sm_mhz']} MHz)")
        if hv.get("xid"):
            problems.append(f"{n}: XID errors in the kernel log: {hv['xid'][-1]}")
    want = {n: int(h.gpus) for n, h in zip(names, hosts) if h.gpus != "auto"}
    for n, k in want.items():
        if health[n].get("gpus") is not None and health[n]["gpus"] != k and not health[n].get("error"):
            problems.append(f"{n}: {health[n]['gpus']} GPU(s) found, the inventory says {k}")
    line(not problems, "gpu health", " | ".join(
        f"{v} ({hostlist.fold(hs)})" for hs, v in fold({n: _gpu_text(hv) for n, hv in health.items()})))
    gpu = any(hv.get("gpus") for hv in health.values())
    backend = "nccl" if gpu else "gloo"
    kind = "cpu" if not gpu else (kinds.pop() if len(kinds) == 1 else "gpu")
    threshold = min_busbw_gbps or MIN_BUSBW_GBPS[kind]
    src = "min_busbw_gbps" if min_busbw_gbps else f"default for {kind}"
    if len(hosts) < 2:
        line(True, "all-reduce", f"one host: nothing crosses the network ({backend})")
        return lines, problems
    size = GPU_BYTES if gpu else CPU_BYTES
    iters = ITERS["gpu" if gpu else "cpu"]
    whole = _allreduce_group(be, [list(hosts)], base_port, backend, size, iters)
    bw = min((v.get("busbw_gbps", 0.0) for v in whole.values()), default=0.0)
    errors = {n: v["error"] for n, v in whole.items() if v.get("error")}
    ok = not errors and bw >= threshold
    line(ok, "all-reduce", f"{backend}, {hostlist.fold(names)}: " +
         (f"{bw:g} Gbit/s bus bandwidth" if not errors else "failed: " + " | ".join(
             f"{e} ({hostlist.fold(hs)})" for hs, e in fold(errors))) + f" (threshold {threshold:g}, {src})")
    if ok:
        return lines, problems
    slow_hosts, slow_links, pair_bw = _pairwise(be, hosts, base_port + 1, backend, size, iters, threshold)
    per_host = {}      # one word per host, so that healthy hosts fold together (clush -b)
    for n in names:
        mine = [v for k, v in pair_bw.items() if n in k]
        links = sorted(b if a == n else a for a, b in slow_links if n in (a, b))
        per_host[n] = (f"slow: {max(mine):.2g} Gbit/s at best, with every peer" if n in slow_hosts else
                       f"slow link to {hostlist.fold(links)}" if links else
                       "no pair answered" if not mine else "ok")
    line(not slow_hosts and not slow_links, "pairs", " | ".join(
        f"{v} ({hostlist.fold(hs)})" for hs, v in fold(per_host)) + "; Gbit/s per pair: " +
        ", ".join(f"{a}-{b} {v:.2g}" for (a, b), v in sorted(pair_bw.items())))
    if slow_hosts:
        problems.append(f"{hostlist.fold(slow_hosts)}: all-reduce bus bandwidth under {threshold:g} Gbit/s "
                        f"with every other host (the slow host{'s' if len(slow_hosts) > 1 else ''}); check its "
                        "NIC, link speed and errors (ethtool, ip -s link), or leave it out of the inventory")
    for a, b in slow_links:
        problems.append(f"link {a} <-> {b}: all-reduce bus bandwidth {pair_bw[(a, b)]:g} Gbit/s, under "
                        f"{threshold:g}, while both hosts are fast with others: check the path between them")
    if not slow_hosts and not slow_links:
        problems.append(f"all-reduce across {hostlist.fold(names)}: {bw:g} Gbit/s, under {threshold:g} Gbit/s, "
                        "and no single host or link is to blame (every pair is fast): check the switch, "
                        "or lower min_busbw_gbps if this is what these hosts can do")
    return lines, problems


def _gpu_text(hv: dict) -> str:
    if hv.get("error"):
        return f"error: {hv['error']}"
    if not hv.get("gpus"):
        return "no GPU"
    gs = hv.get("list") or []
    return f"{len(gs)}x {gs[0]['name'] if gs else '?'}, ECC {sum(g.get('ecc') or 0 for g in gs)}, matmul " + \
        "/".join(str(g.get("tflops")) for g in gs) + " TFLOP/s"


def _allreduce_group(be, groups, port: int, backend: str, size: int, iters: int) -> dict[str, dict]:
    """One all-reduce per group of hosts, all at once (one fan-out), each on its own port."""
    stdin, cmds = {}, {}
    for k, group in enumerate(groups):
        for i, h in enumerate(group):
            stdin[h.name] = json.dumps({"master": group[0].address, "port": port + k, "rank": i, "world": len(group),
                                        "backend": backend, "bytes": size, "iters": iters, "timeout_s": OP_TIMEOUT_S,
                                        "interface": h.interface}).encode() + b"\n"
            cmds[h.name] = module_command(h.python, _allreduce)
    res = be.pool.run(cmds, stdin=stdin, timeout_s=OP_TIMEOUT_S * 3, label="all-reduce (python -c ...)")
    out = {}
    for name, r in res.items():
        try:
            out[name] = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out[name] = {"error": r.error or r.describe()}
    return out


def rounds(n: int) -> list[list[tuple[int, int]]]:
    """Every pair of n hosts once, in rounds where each host is in at most one pair (circle method)."""
    ids = list(range(n)) + ([None] if n % 2 else [])
    m, out = len(ids), []
    for _ in range(m - 1):
        pairs = [(ids[i], ids[m - 1 - i]) for i in range(m // 2)]
        out.append([tuple(sorted(p)) for p in pairs if None not in p])
        ids = [ids[0]] + [ids[-1]] + ids[1:-1]
    return out


def _pairwise(be, hosts, port: int, backend: str, size: int, iters: int, threshold: float):
    """(slow hosts, slow links, {(a, b): Gbit/s}): a host is slow when every pair it is in is slow
    and some pair without it is fast (with 2 hosts, only the link can be named)."""
    bw: dict[tuple[str, str], float] = {}
    for rnd in rounds(len(hosts)):
        res = _allreduce_group(be, [[hosts[i], hosts[j]] for i, j in rnd], port, backend, size, iters)
        for i, j in rnd:
            a, b = hosts[i].name, hosts[j].name
            bw[(a, b)] = min(res.get(a, {}).get("busbw_gbps", 0.0), res.get(b, {}).get("busbw_gbps", 0.0))
    return (*blame([h.name for h in hosts], bw, threshold), bw)


def blame(names: list[str], bw: dict, threshold: float) -> tuple[list[str], list[tuple[str, str]]]:
    """(slow hosts, slow links) from every pair's bandwidth: a host is slow when every pair it is
    in is slow and some pair without it is fast; a slow pair of two fast hosts is a slow link."""
    slow = {k for k, v in bw.items() if v < threshold}
    slow_hosts = [n for n in names if len(names) > 2 and all(k in slow for k in bw if n in k)
                  and any(k not in slow for k in bw if n not in k)]
    slow_links = [k for k in sorted(slow) if not (set(k) & set(slow_hosts))]
    return slow_hosts, slow_links
