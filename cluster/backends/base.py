"""The backend interface: the base class owns the public verbs, each backend fills a few hooks."""
from __future__ import annotations

import re
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable, Optional

from ..config import Inventory
from ..plan import Plan
from ..runs import Run, State


@dataclass
class NodeStatus:
    host: str
    state: State
    pid: Optional[int] = None
    exit_code: Optional[int] = None
    exit_time: Optional[float] = None
    heartbeats: dict = field(default_factory=dict)   # rank -> {"step", "time", ...}
    detail: str = ""


class LogSource(ABC):
    """One node's log file, read from a byte offset (so a dropped connection loses no line)."""

    name: str

    @abstractmethod
    def read(self, offset: int) -> bytes:
        """Bytes from ``offset`` to the current end; raise OSError when the host is unreachable."""


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Backend(ABC):
    name = "base"

    def __init__(self, inventory: Inventory):
        self.inv = inventory

    # ---- hooks
    def render(self, plan: Plan) -> str:
        """What --dry-run prints: per-node command lines (SLURM: the sbatch script)."""
        return plan.render()

    @abstractmethod
    def detect_gpus(self, hosts) -> dict[str, int]:
        """GPU count per host name (declared, or detected where the inventory says auto)."""

    def preflight(self, plan: Plan) -> None:
        """Raise UserError if anything would stop the run; nothing is started before it passes."""

    def prepare(self, plan: Plan, run: Run) -> None:
        """Make the code and checkpoints available on the nodes (sync)."""

    @abstractmethod
    def launch(self, plan: Plan, run: Run) -> dict:
        """Start every node detached; return the handle recorded in run.json."""

    @abstractmethod
    def node_status(self, run: Run) -> list[NodeStatus]:
        ...

    @abstractmethod
    def stop_nodes(self, run: Run, grace_s: float) -> list[str]:
        """TERM, wait, KILL; return descriptions of anything of the run still alive (empty = clean)."""

    @abstractmethod
    def log_sources(self, run: Run) -> list[LogSource]:
        ...

    # ---- verbs built on the hooks
    def status(self, run: Run) -> tuple[State, list[NodeStatus]]:
        if run.state.is_terminal() and run.data.get("final"):
            return run.state, [NodeStatus(**{**n, "state": State(n["state"])})
                               for n in run.data.get("nodes_final", [])]
        nodes = self.node_status(run)
        state = aggregate(nodes, run)
        if state == State.FAILED and any(n.state in (State.RUNNING, State.STARTING) for n in nodes):
            # gang semantics: a failed node takes the whole run down
            run.event("gang-stop", reason="a node failed")
            self.stop_nodes(run, grace_s=10.0)
            nodes = self.node_status(run)
        if state.is_terminal():
            self.finish(run, state, nodes)
        elif state != run.state:
            run.set_state(state)
        return state, nodes

    def finish(self, run: Run, state: State, nodes: list[NodeStatus]) -> None:
        extra = {}
        if state == State.FAILED:
            extra["failure"] = self.first_failure(run, nodes)
        run.set_state(state, final=True, ended=time.time(),
                      nodes_final=[_plain(n) for n in nodes], **extra)

    def first_failure(self, run: Run, nodes: list[NodeStatus]) -> dict:
        failed = [n for n in nodes if n.exit_code not in (None, 0)] or \
                 [n for n in nodes if n.state == State.FAILED]
        if not failed:
            return {}
        first = min(failed, key=lambda n: n.exit_time or float("inf"))
        tail = self.log_tail(run, first.host, 400)
        rank = failing_rank(tail)
        own = [l for l in tail if l.startswith(f"[{first.host} {rank}] ")] if rank is not None else []
        return {"host": first.host, "rank": rank, "exit_code": first.exit_code,
                "log_tail": own[-30:] or tail[-40:]}

    def log_tail(self, run: Run, host: str, lines: int) -> list[str]:
        for src in self.log_sources(run):
            if src.name == host:
                try:
                    data = src.read(0)
                except OSError:
                    return []
                return data.decode(errors="replace").splitlines()[-lines:]
        return []

    def stop(self, run: Run, grace_s: float = 10.0) -> list[str]:
        state, _ = self.status(run)
        if state.is_terminal():
            return self.stop_nodes(run, grace_s)   # already over; still verify nothing is left
        run.event("stop", requested=True)
        run.update(stop_requested=time.time())
        left = self.stop_nodes(run, grace_s)
        if not left:
            self.finish(run, State.CANCELLED, self.node_status(run))
        return left


def aggregate(nodes: list[NodeStatus], run: Run) -> State:
    """One run state from the nodes' states (gang semantics: one failed node fails the run)."""
    states = {n.state for n in nodes}
    live = states & {State.RUNNING, State.STARTING}
    if run.data.get("stop_requested") and not live:
        return State.CANCELLED
    if any(n.exit_code not in (None, 0) or n.state == State.FAILED for n in nodes):
        return State.FAILED
    if live:
        return State.RUNNING if State.RUNNING in states else State.STARTING
    if states == {State.SUCCEEDED}:
        return State.SUCCEEDED
    if State.CANCELLED in states:
        return State.CANCELLED
    return State.UNKNOWN


_RANK = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank")


def failing_rank(lines: Iterable[str]) -> Optional[int]:
    """The global rank named under torchrun's 'Root Cause (first observed failure)'."""
    first, after_root = None, False
    for line in lines:
        if "Root Cause" in line:
            after_root = True
            continue
        m = _RANK.search(line)
        if m:
            if after_root:
                return int(m.group(1))
            first = first if first is not None else int(m.group(1))
    return first


def _plain(n: NodeStatus) -> dict:
    return {"host": n.host, "state": n.state.value, "pid": n.pid, "exit_code": n.exit_code,
            "exit_time": n.exit_time, "heartbeats": n.heartbeats, "detail": n.detail}
