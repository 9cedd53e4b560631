"""The testbed's processes: start a daemon inside a host (its network namespace and hostname),
find every process that belongs to a testbed, stop them, and wait for a daemon to answer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from .common import NETNS_DIR, TestbedError


def proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def protected_pids() -> set[int]:
    """This process and its ancestors: never signalled."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    out.add(1)
    return out


def testbed_pids(state_dirs: list[str], netns_names: list[str]) -> list[int]:
    """Processes of the testbed: in one of its network namespaces, or naming a state dir."""
    inodes = {i for i in (ns_inode(str(NETNS_DIR / n)) for n in netns_names) if i is not None}
    protected = protected_pids()
    found = []
    for pid in all_pids():
        if pid in protected:
            continue
        hit = False
        if inodes:
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino in inodes:
                    hit = True
            except OSError:
                pass
        if not hit and state_dirs:
            cmd = proc_cmdline(pid)
            hit = any(d in cmd for d in state_dirs)
        if hit and alive(pid):
            found.append(pid)
    return found


def kill_all(pids_fn, grace_s: float = 2.0) -> None:
    """TERM everything pids_fn() lists, wait up to grace_s, then KILL; reap our own children."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        pids = pids_fn()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        _reap(pids)
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                if time.monotonic() > deadline + 3:
                    left = [f"{p}:{proc_cmdline(p)[:80]}" for p in pids_fn()]
                    if left:
                        raise TestbedError("processes survived SIGKILL: " + "; ".join(left))
                    return
            else:
                sig = signal.SIGKILL


def _reap(pids) -> None:
    """Collect the exit status of those pids that are our own children (daemons that this
    process spawned), never waitpid(-1): that would steal other code's children."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass


def spawn(argv, log: Path, netns: str | None = None, hostname: str | None = None) -> int:
    """Start a daemon detached (own session, stdin /dev/null), optionally inside a host's
    network namespace and under its own hostname (private UTS namespace). Returns its pid.

    nsenter --net (not `ip netns exec`, which mounts a private /sys and hides /sys/fs/cgroup)."""
    prefix = []
    if netns:
        prefix += ["nsenter", f"--net={NETNS_DIR / netns}"]
    if hostname:
        prefix += ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname]
    with open(log, "ab") as out:
        p = subprocess.Popen(prefix + [str(a) for a in argv], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             close_fds=True)
    return p.pid


def port_open(addr: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(cond, what: str, timeout: float, pids: dict | None = None, logs: list | None = None):
    """Until cond() holds; fails at once (with the logs' tails) if one of pids dies first."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if pids:
            dead = [k for k, pid in pids.items() if not alive(pid)]
            if dead:
                raise TestbedError(f"while waiting for {what}: daemon(s) died: {', '.join(dead)}"
                                   + _tails(logs))
        if time.monotonic() > deadline:
            raise TestbedError(f"timed out after {timeout:.0f}s waiting for {what}" + _tails(logs))
        time.sleep(0.02)


def _tails(logs) -> str:
    out = []
    for p in logs or []:
        try:
            lines = Path(p).read_text(errors="replace").splitlines()[-8:]
        except OSError:
            continue
        out.append(f"\n--- {p} (tail)\n" + "\n".join(lines))
    return "".join(out)
