"""Is a testbed there, and is it well? `status` and health() for the one state.json describes;
leftovers() for anything of a testbed at all (after down() it must be empty)."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from .common import BRIDGE, NODE_RE, REPO_ROOT, STATE_PREFIX, SUBNET_PREFIX, TMP_ROOT, VETH_PREFIX, load_state, run, testbed_dir
from .lifecycle import removed_containers
from .network import hosts_marked_lines, link_names, netns_list
from .procs import alive, all_pids, ns_inode, port_open, proc_cmdline, proc_comm, protected_pids
from .slurm import SLURM_ETC, is_ours, sinfo_states


def leftovers(root: Path = REPO_ROOT) -> list[str]:
    """Everything of a testbed that exists now: after down() this must be empty.

    Deliberately broader than what down() looks for (any node<N> namespace, any process that
    names a /tmp/ddp-testbed-* dir, any slurm daemon living in a non-root network namespace), so
    that a down() that forgets something is caught."""
    found = []
    for n in netns_list():
        if NODE_RE.match(n):
            found.append(f"network namespace {n}")
    for link in link_names():
        if link == BRIDGE or link.startswith(VETH_PREFIX):
            found.append(f"link {link}")
    p = run(["ip", "-o", "-4", "addr", "show"], check=False)
    for ln in p.stdout.splitlines():
        if f" {SUBNET_PREFIX}" in ln:
            found.append(f"address: {ln.strip()}")
    for ln in hosts_marked_lines():
        found.append(f"/etc/hosts line: {ln}")
    try:
        for f in sorted(os.listdir(SLURM_ETC)):
            if is_ours(SLURM_ETC / f):
                found.append(f"/etc/slurm file: {f}")
    except OSError:
        pass
    for d in glob.glob(os.path.join(TMP_ROOT, STATE_PREFIX + "*")):
        found.append(f"state dir {d}")
    for f in ("state.json", "inventory.yaml", "ssh_config", "env"):
        if (testbed_dir(root) / f).exists():
            found.append(f".testbed/{f}")
    root_net = ns_inode("/proc/1/ns/net")
    protected = protected_pids()
    needle = os.path.join(TMP_ROOT, STATE_PREFIX)
    for pid in all_pids():
        if pid in protected or not alive(pid):
            continue
        cmd = proc_cmdline(pid)
        comm = proc_comm(pid)
        if needle in cmd:
            found.append(f"process {pid}: {cmd[:120]}")
            continue
        if comm in ("slurmd", "slurmctld", "slurmstepd", "munged", "sshd"):
            try:
                ino = os.stat(f"/proc/{pid}/ns/net").st_ino
            except OSError:
                continue
            if ino != root_net:
                found.append(f"process {pid} ({comm}) in a non-root network namespace")
    if removed_containers and shutil.which("podman"):
        p = run(["podman", "ps", "-a", "--no-trunc", "--format", "{{.ID}}"], check=False)
        for cid in removed_containers:
            if any(line.startswith(cid) for line in p.stdout.split()):
                found.append(f"podman container {cid[:12]} (was running on a testbed host)")
    try:
        with open("/proc/self/mounts") as f:
            for ln in f:
                if "/run/netns/node" in ln or needle in ln:
                    found.append(f"mount: {ln.strip()}")
    except OSError:
        pass
    return found


def health(root: Path = REPO_ROOT) -> tuple[bool, list[str]]:
    """(healthy, problems) of the testbed that state.json describes."""
    st = load_state(root)
    if not st:
        return False, ["no testbed (no .testbed/state.json)"]
    problems = []
    if st.get("status") != "up":
        problems.append(f"status is {st.get('status')!r}")
    if not os.path.isdir(st.get("state_dir", "")):
        problems.append(f"state dir {st.get('state_dir')} is missing")
    for k, pid in st.get("pids", {}).items():
        if not alive(pid):
            problems.append(f"{k} (pid {pid}) is not running")
    have = set(netns_list())
    for n in st.get("netns", []):
        if n not in have:
            problems.append(f"network namespace {n} is missing")
    for h in st.get("hosts", []):
        if not port_open(h["address"], 22, timeout=0.5):
            problems.append(f"sshd on {h['name']} ({h['address']}:22) does not answer")
    states = sinfo_states() if not problems else {}
    for h in st.get("hosts", []) if not problems else []:
        s = states.get(h["name"], "missing")
        if not (s.startswith("idle") or s.startswith("mix") or s.startswith("alloc")):
            problems.append(f"SLURM node {h['name']} is {s}")
    return not problems, problems


def status(root: Path = REPO_ROOT) -> int:
    st = load_state(root)
    if not st:
        print("testbed: down (no .testbed/state.json)")
        left = leftovers(root) if os.geteuid() == 0 else []
        for x in left:
            print(f"  leftover: {x}")
        return 1
    ok, problems = health(root)
    print(f"testbed: {st.get('status')} ({'healthy' if ok else 'UNHEALTHY'}), {st['nodes']} hosts, "
          f"state {st['state_dir']}" + (f", up in {st['up_seconds']}s" if 'up_seconds' in st else ""))
    print(f"  inventory:  {st['inventory']}")
    print(f"  ssh:        ssh -F {st['ssh_config']} node1")
    print(f"  sacct:      export PATH={st['bin_dir']}:$PATH   (or: . .testbed/env)")
    print(f"  slurm:      partition {st['partition']}, controller {st['controller']} "
          f"({st['controller_address']}), logs {st['state_dir']}/logs")
    for h in st["hosts"]:
        print(f"  {h['name']:8} {h['address']:14} workdir {h['workdir']}")
    if ok:
        states = sinfo_states()
        print("  sinfo:      " + ", ".join(f"{k}={v}" for k, v in sorted(states.items())))
    for p in problems:
        print(f"  problem: {p}")
    return 0 if ok else 3

