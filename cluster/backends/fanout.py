"""Commands on every inventory host at once (exec, gpus): ssh fan-out, or this machine directly."""
from __future__ import annotations

import os
import subprocess
import time
from typing import Optional

from cluster.spec import hostlist
from cluster.spec.config import Inventory
from cluster.errors import UserError
from cluster.plan import cd_line
from cluster.backends.transport import GroupResult, Result
from cluster.quoting import quote_argv


def select(inv: Inventory, pattern: Optional[str]) -> list[str]:
    names = [h.name for h in inv.hosts]
    if not pattern:
        return names
    try:
        wanted = hostlist.expand(pattern)
    except ValueError as e:
        raise UserError(f"bad host range: {e}", where="--hosts", hint="e.g. --hosts node[1-2]") from None
    known = set(names)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise UserError(f"{len(unknown)} host(s) not in the inventory: {_short(hostlist.fold(unknown))}",
                        where="--hosts", hint="inventory hosts: " + _short(hostlist.fold(names)))
    return wanted


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def run_argv(inv: Inventory, names: list[str], argv: list[str], timeout_s: Optional[float] = None,
             cwd: Optional[dict] = None) -> GroupResult:
    """Run ``argv`` on each host; the argv is quoted once for the one remote shell hop. ``cwd``:
    host -> the directory to run in (a run's directory, ``exec --run``); else the login's home."""
    command = quote_argv(argv)
    if inv.backend == "local":
        t0 = time.monotonic()
        try:
            where = os.path.expanduser((cwd or {}).get(names[0]) or ".")
            p = subprocess.run(argv, capture_output=True, text=True, cwd=where,
                               timeout=timeout_s or inv.ssh.command_timeout_s)
            r = Result(names[0], command, p.returncode, p.stdout, p.stderr)
        except FileNotFoundError as e:
            r = Result(names[0], command, 127, "", f"{e.strerror}: {e.filename or argv[0]}\n")
        except subprocess.TimeoutExpired:
            r = Result(names[0], command, error=f"timed out after {timeout_s or inv.ssh.command_timeout_s:g} s")
        r.duration_s = time.monotonic() - t0
        return GroupResult({names[0]: r})
    from cluster.backends.transport import Pool
    with Pool([inv.host(n) for n in names], inv.ssh) as pool:
        if cwd:
            return pool.run({n: f"{cd_line(cwd[n])} && {command}" for n in names}, timeout_s=timeout_s)
        return pool.run(command, hosts=names, timeout_s=timeout_s)
