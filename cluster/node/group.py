"""The run's processes on this node: its process group and every descendant (standard library only)."""
from __future__ import annotations

import os
import signal
import time


def _proc_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, ppid, pgid) of every process, from /proc (Linux)."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            table[int(name)] = (fields[0], int(fields[1]), int(fields[2]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def run_members() -> list[int]:
    """Live processes of this node's run, the agent aside: its process group and every descendant.

    torchrun starts each worker in a session of its own, so the group alone misses the workers;
    the agent is their subreaper (become_subreaper), so a worker whose torchrun died is still its
    descendant."""
    me, pgid = os.getpid(), os.getpgrp()
    table = _proc_table()
    kids: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_, _, pg) in table.items() if pg == pgid}
    stack, seen = [me], {me}
    while stack:
        for child in kids.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                found.add(child)
                stack.append(child)
    return sorted(p for p in found if p != me and table.get(p, ("Z",))[0] != "Z")


def end_group(grace_s: float) -> list[int]:
    """TERM everything else of this node's run, wait up to ``grace_s``, KILL the rest."""
    others = run_members()
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        for pid in others:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + wait_s
        while others and time.time() < deadline:
            time.sleep(0.1)
            others = run_members()
        if not others:
            break
    return others


def become_subreaper() -> None:
    """Orphaned descendants (workers whose torchrun died) are re-parented to us, not to init."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass
