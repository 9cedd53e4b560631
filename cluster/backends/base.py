"""The backend interface: the base class owns the public verbs, each backend fills a few hooks."""
from __future__ import annotations

import re
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable, Optional

from cluster.spec.config import Inventory
from cluster.plan import Plan, make_plan, select_hosts
from cluster.run.diagnose import PEER_SYMPTOMS
from cluster.run.records import Run, State


@dataclass
class NodeStatus:
    host: str
    state: State
    pid: Optional[int] = None
    exit_code: Optional[int] = None
    exit_time: Optional[float] = None
    heartbeats: dict = field(default_factory=dict)   # rank -> {"step", "time", ...}
    detail: str = ""
    activity: Optional[dict] = None   # a live node: {"output_t": log's mtime, "cpu_s": its ranks' CPU}
    gpus: Optional[list] = None     # with Backend.with_gpus: hostside._gpu_query's answer (None: no GPU)



def start_detached(run: Run, module: str, verb: str, log_name: str, delay_s: float = 0) -> int:
    """``python -m MODULE VERB RUN`` in its own session, outliving this process (the ssh watcher,
    the SLURM follower): this checkout on its path, the run's root as CLUSTER_RUNS_DIR, its output
    in runs/<id>/state/LOG_NAME. ``delay_s``: it starts that much later (a shell's ``sleep``, then
    ``exec`` of python: the same pid). Returns its pid."""
    import os
    import subprocess
    from cluster.spec.config import REPO
    env = {**os.environ, "CLUSTER_RUNS_DIR": str(run.dir.parent)}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("CLUSTER_RUN_ID", None)
    (run.dir / "state").mkdir(parents=True, exist_ok=True)
    with open(run.dir / "state" / log_name, "ab") as out:
        argv = [sys.executable, "-m", module, verb, run.id]
        if delay_s:
            argv = ["sh", "-c", 'sleep "$0" && exec "$@"', str(delay_s), *argv]
        p = subprocess.Popen(argv, cwd=REPO, env=env,
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return p.pid

class LogSource(ABC):
    """One node's log file, read from a byte offset (so a dropped connection loses no line)."""

    name: str

    @abstractmethod
    def read(self, offset: int) -> bytes:
        """Bytes from ``offset`` to the current end; raise OSError when the host is unreachable."""


def node_status_of(host: str, pgid: Optional[int], info: dict) -> NodeStatus:
    """A node's state from the answer of cluster/node/probe.py's ``_status`` (run on the host by
    the ssh backend, called in-process by the local one)."""
    hb = {int(k): v for k, v in info["heartbeats"].items()}
    ex = info["exit"]
    if ex is not None:
        code, ab = ex.get("code"), ex.get("gang_abort")
        if code == 0:
            st, detail = State.SUCCEEDED, ""
        elif ab:
            st, detail = State.CANCELLED, f"stopped by the gang: {ab.get('reason')}"
        elif ex.get("signal"):
            st, detail = State.CANCELLED, f"stopped by signal {ex.get('signal')}"
        else:
            st, detail = State.FAILED, ex.get("error", "")
        return NodeStatus(host, st, pgid, code, ex.get("time"), hb, detail, gpus=info.get("gpus"))
    if info["alive"]:
        return NodeStatus(host, State.RUNNING if info["pid"] is not None else State.STARTING, pgid, heartbeats=hb,
                          activity=info.get("activity"), gpus=info.get("gpus"))
    return NodeStatus(host, State.FAILED, pgid, detail="agent gone without an exit record", heartbeats=hb,
                      gpus=info.get("gpus"))


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Backend(ABC):
    name = "base"
    # set by cluster top: node_status also reads each node's GPU use, in the same round trip
    with_gpus = False

    def __init__(self, inventory: Inventory):
        self.inv = inventory
        # what launch() started before it failed, so submit can stop exactly that
        self.partial_handle: dict = {}
        # doctor: preflight checks only (data staging reports, copies nothing)
        self.check_only = False

    # ---- hooks
    def select_hosts(self, job) -> tuple:
        """The hosts a job runs on (SLURM: stand-ins for the nodes the allocation will bring)."""
        return select_hosts(self.inv, job)

    def make_plan(self, job, run_id: str, gpus, **kw) -> Plan:
        """The launch of every node (SLURM: the sbatch request); keyword arguments as make_plan's."""
        return make_plan(self.inv, job, run_id, gpus, **kw)

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

    # ---- what a remote backend can do besides; the defaults are for runs whose files are here
    def collect_logs(self, run: Run) -> None:
        """Every node's log files into runs/<id>/logs (``logs --collect``)."""

    def collect_metrics(self, run: Run) -> None:
        """Every host's runs/<id>/metrics into runs/<id>/metrics (``report``, ``tensorboard``)."""

    def check_spares(self, names: list[str], peer: Optional[str] = None) -> Optional[dict[str, Optional[str]]]:
        """The preflight probe on each host in ``names`` (and ``peer``) on its own: per host what is
        wrong with it, or None. None in place of the answer: this backend does not probe a host on
        its own (local: this machine; SLURM: the allocation picks the nodes)."""
        return None

    # ---- verbs built on the hooks
    def status(self, run: Run) -> tuple[State, list[NodeStatus]]:
        """The run's state from its nodes. What it finds out is recorded through the run's one
        writer (cluster/run/records.py), which merges: a state change, the run's end (the first
        recorded end stands), events. Nothing else of the record is written."""
        run.reload()        # what other processes recorded since this one last looked
        if run.state == State.RESTARTING:      # between two attempts: the watcher relaunches
            from cluster.run.records import relauncher_gone
            pid = relauncher_gone(run)
            return self._relaunch_interrupted(run, pid) if pid else (State.RESTARTING, [])
        if run.state.is_terminal() and run.data.get("final"):
            return self._recorded(run)
        if run.state == State.PENDING and not run.data.get("handle"):
            from cluster.run.records import submitter_gone
            if submitter_gone(run):
                return self._launch_interrupted(run)
        nodes = self.node_status(run)
        state = aggregate(nodes, run)
        hang = None
        if state == State.HUNG and (run.data.get("job") or {}).get("resolved", {}).get("stop_on_hang"):
            # the job asked for it (stop_on_hang): a hung run is stopped and recorded as failed
            hang = self._stop_hung(run)
            nodes, state = self.node_status(run), State.FAILED
        if state == State.FAILED and any(n.state in (State.RUNNING, State.STARTING) for n in nodes):
            # gang semantics: a failed node takes the whole run down
            run.event("gang-stop", reason="a node failed")
            self.stop_nodes(run, grace_s=10.0)
            nodes = self.node_status(run)
        if state.is_terminal():
            if not self.finish(run, state, nodes, failure=hang):
                return self._recorded(run)
            # not an end: the run relaunches, or already has (this pass saw an earlier attempt)
            return (State.RESTARTING, nodes) if run.state == State.RESTARTING else self._recorded(run)
        elif state != run.state and not run.set_state(state):
            return self._recorded(run)      # the run ended while this one looked: its end stands
        return state, nodes

    @staticmethod
    def _recorded(run: Run) -> tuple[State, list[NodeStatus]]:
        """The end of a run as recorded (final)."""
        return run.state, [NodeStatus(**{**n, "state": State(n["state"])}) for n in run.data.get("nodes_final", [])]

    def finish(self, run: Run, state: State, nodes: list[NodeStatus], failure: Optional[dict] = None) -> bool:
        """Record the run's end; False where another process (the watcher, another verb) recorded
        it first: that record stands, and ``run.data`` is it."""
        seen = run.data.get("attempt")
        if run.reload().data.get("final"):
            return False    # looked up first: the failure below reads logs, a round trip per host
        if run.data.get("attempt") != seen:
            return False    # relaunched (the watcher) while this pass looked: what it saw is an earlier attempt's
        extra = {}
        if state == State.FAILED:
            tails = LogTails(self, run)     # each host's log read once, for the report and the recovery
            extra["failure"] = failure or self.first_failure(run, nodes, tails)
            if self._recover(run, extra["failure"], nodes, tails):
                return True     # not an end: the watcher relaunches (State.RESTARTING)
        return run.set_state(state, final=True, ended=time.time(),
                             nodes_final=[_plain(n) for n in nodes], **extra)

    def _recover(self, run: Run, failure: dict, nodes: list[NodeStatus], tails: "LogTails") -> bool:
        """Automatic recovery (cluster/run/recovery.py): True if the run relaunches instead of ending."""
        from cluster.run.recovery import restart_instead, restart_policy
        limit = restart_policy(run, self.name)
        if not limit:       # off (or not this backend's): the failure is recorded as it always was
            return False
        tail = failure.get("log_tail") or []
        if failure.get("host"):     # torchrun's summary (how the rank ended) is in the host's log, not the rank's lines
            try:
                tail = tails[failure["host"]] or tail
            except Exception:   # noqa: BLE001 -- unreachable host: judged by what the failure kept
                pass
        _, code = root_cause(tail)
        signal = -code if code is not None and code < 0 and -code not in _STOP_SIGNALS else None
        progressed = any(isinstance(hb, dict) and (hb.get("step") or 0) > 0
                         for n in nodes for hb in (n.heartbeats or {}).values())
        detail = next((n.detail for n in nodes if n.host == failure.get("host")), "")
        elsewhere = []      # the other failed hosts' lines: a Python error there is the job's too
        for n in [n for n in nodes if n.host != failure.get("host") and n.exit_code not in (None, 0)][:7]:
            try:
                elsewhere += tails[n.host]
            except Exception:   # noqa: BLE001 -- an unreachable host has nothing to add
                pass
        return restart_instead(run, failure, limit, signal, progressed, detail, elsewhere)

    def first_failure(self, run: Run, nodes: list[NodeStatus], tails: Optional["LogTails"] = None,
                      everyone: Optional[list[NodeStatus]] = None) -> dict:
        """The failure among ``nodes``; known failures are looked for in the logs of ``everyone``
        (default ``nodes``): a host lost off the network has no log to read, its peers' say why."""
        failed = [n for n in nodes if n.exit_code not in (None, 0)] or \
                 [n for n in nodes if n.state == State.FAILED]
        if not failed:
            return {}
        tails = LogTails(self, run) if tails is None else tails   # an empty cache is still the caller's
        first, tail, rank, own = self._root_failure(failed, tails)
        return {"host": first.host, "rank": rank, "exit_code": first.exit_code, "log_tail": own[-30:] or tail[-40:],
                "findings": self._diagnose(everyone or nodes, first.host, tails, rank)}

    def _root_failure(self, failed: list[NodeStatus], tails: "LogTails"):
        """The failed node whose failure is the cause: the first to end whose failing rank's own
        lines show more than a symptom of a peer's death (a connection closed by the peer, a
        collective timing out); the first to end if every one shows only that. When a rank dies,
        its peers can end before its own node has, and faster with warm workers, which skip the
        interpreter's teardown. A rank's own lines include the error its heartbeat recorded, so
        that a log that cannot be read names no wrong rank. Returns (node, log tail, rank, the
        rank's own lines)."""
        from cluster.run.diagnose import diagnose
        failed = sorted(failed, key=lambda n: n.exit_time or float("inf"))
        t0 = failed[0].exit_time or 0.0
        seen = []
        for n in failed[:8]:
            if seen and n.exit_time and n.exit_time - t0 > _SYMPTOM_WINDOW_S:
                break
            tail = tails[n.host]
            errors = _heartbeat_errors(n)
            rank, _ = root_cause(tail)
            if rank is None and errors:
                rank = min(errors)
            own = [l for l in tail if l.startswith(f"[{n.host} {rank}] ")] if rank is not None else []
            if rank in errors and not any(errors[rank] in l for l in own):
                own.append(f"[{n.host} {rank}] {errors[rank]}")
            seen.append((n, tail, rank, own))
            ids = {f.pattern_id for f in diagnose(own)}
            if not (ids and ids <= PEER_SYMPTOMS):
                return seen[-1]
        return seen[0]

    # ---- diagnosis (cluster/run/diagnose.py): known failures in the logs; hangs from heartbeats
    def _diagnose(self, nodes: list[NodeStatus], host: str, tails: "LogTails",
                  rank: Optional[int] = None) -> list[dict]:
        """Known failures in the failing host's log, then in up to 7 other hosts' logs."""
        from cluster.run.diagnose import diagnose_hosts
        logs = {host: tails[host]}
        for n in sorted(nodes, key=lambda n: n.exit_time or float("inf")):
            if len(logs) < 8 and n.host not in logs:
                logs[n.host] = tails[n.host]
        for n in nodes:     # what the ranks' heartbeats recorded, should a log lack it
            if n.host in logs:
                logs[n.host] = logs[n.host] + [f"[{n.host} {r}] {e}" for r, e in _heartbeat_errors(n).items()
                                               if not any(e in l for l in logs[n.host])]
        return [f.to_dict() for f in diagnose_hosts(logs, host, rank)]

    def _stop_all(self, run: Run, event: str, **fields) -> list[NodeStatus]:
        """A process the run needed is gone: the event recorded, what runs of the run stopped; the
        nodes as they are then."""
        run.event(event, **fields)
        self.stop_nodes(run, grace_s=5.0)
        return self.node_status(run)

    def _launch_interrupted(self, run: Run) -> tuple[State, list[NodeStatus]]:
        """The submit died before it recorded the launch (killed, machine rebooted): what started of
        the run is stopped (no half-started run), and the run is recorded FAILED."""
        pid = (run.data.get("submitter") or {}).get("pid")
        nodes = self._stop_all(run, "launch-interrupted", submitter_pid=pid)
        started = sorted(n.host for n in nodes if n.pid or n.exit_code is not None)
        self.finish(run, State.FAILED, nodes, failure={
            "host": None, "rank": None, "exit_code": None,
            "error": f"the submit (pid {pid}) ended in the middle of the launch; what had started "
                     f"({', '.join(started) or 'nothing'}) was stopped",
            "hint": "submit again (with --resume RUN to continue from a checkpoint it wrote)", "findings": []})
        return State.FAILED, nodes

    def _relaunch_interrupted(self, run: Run, pid: int) -> tuple[State, list[NodeStatus]]:
        """The process that starts the next attempt (the watcher, the follower) is gone while the
        run is RESTARTING (killed, machine rebooted): nothing would ever start it. What runs of the
        run is stopped, and the run is recorded FAILED, with the attempts' causes kept."""
        nodes = self._stop_all(run, "relaunch-interrupted", pid=pid)
        last = run.data.get("last_failure") or {}
        failure = {**last, "error": f"{last.get('error') or 'an attempt failed'}; the process that starts "
                                    f"the next attempt (pid {pid}) ended before it did, and nothing restarts the run",
                   "hint": f"submit again with --resume {run.id} to continue from its latest checkpoint"}
        # not finish(): its recovery would mark the run RESTARTING again, for no one to start
        run.set_state(State.FAILED, final=True, ended=time.time(), nodes_final=[_plain(n) for n in nodes],
                      failure=failure)
        return self._recorded(run)

    def _stop_hung(self, run: Run) -> dict:
        """Stop a hung run; the failure names the ranks behind and what their host's log shows."""
        from cluster.run.diagnose import saved_watch
        w = saved_watch(run) or {}
        behind = w.get("behind") or w.get("hung") or []
        run.event("hang-stop", ranks=behind, reason=w.get("reason", ""))
        self.stop_nodes(run, grace_s=10.0)
        hosts = {r["rank"]: r.get("host") for r in w.get("ranks", [])}
        host = hosts.get(behind[0]) if behind else None
        tails = LogTails(self, run)
        tail = tails[host] if host else []
        return {"host": host, "rank": behind[0] if behind else None, "exit_code": None,
                "error": "hung: " + (w.get("reason") or "no progress"),
                "hang": {k: w.get(k) for k in ("hung", "behind", "reason")}, "log_tail": tail[-30:],
                "findings": self._diagnose(self.node_status(run), host, tails) if host else []}

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


class LogTails(dict):
    """The last 400 lines of each host's log, read once (over ssh, a read is a round trip) for
    everything one failure report looks at."""
    LINES = 400

    def __init__(self, backend: "Backend", run: Run, known: Optional[dict] = None):
        super().__init__(known or {})
        self.backend, self.run = backend, run

    def __missing__(self, host: str) -> list[str]:
        self[host] = self.backend.log_tail(self.run, host, self.LINES)
        return self[host]


def aggregate(nodes: list[NodeStatus], run: Run) -> State:
    """One run state from the nodes' states (gang semantics: one failed node fails the run)."""
    states = {n.state for n in nodes}
    live = states & {State.RUNNING, State.STARTING}
    if run.data.get("stop_requested") and not live:
        return State.CANCELLED
    # a node stopped by a signal (stop, the gang) is CANCELLED whatever its exit code: only a node
    # that failed by itself fails the run
    if any(n.state == State.FAILED or (n.exit_code not in (None, 0) and n.state != State.CANCELLED)
           for n in nodes):
        return State.FAILED
    if live:
        state = State.RUNNING if State.RUNNING in states else State.STARTING
        # hang detection (cluster/run/diagnose.py): a rank without progress for the job's hang_timeout_s
        if state == State.RUNNING:
            from cluster.run.diagnose import watch_run
            if watch_run(run, nodes).hung:
                return State.HUNG
        return state
    if states == {State.SUCCEEDED}:
        return State.SUCCEEDED
    if states == {State.PENDING}:        # queued (SLURM), also again after a requeue
        return State.PENDING
    if State.CANCELLED in states:
        return State.CANCELLED
    return State.UNKNOWN


_RANK = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank")
# findings that a rank's death causes in its peers (failures.yaml ids), and how much later than
# the first node's end a node that failed of its own may still end
_SYMPTOM_WINDOW_S = 10.0
_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)")
_STOP_SIGNALS = (1, 2, 15)   # SIGHUP, SIGINT, SIGTERM: what a stop sends


def failed_by_itself(n: NodeStatus, tail: Iterable[str] = ()) -> bool:
    """The node failed of its own, whatever stopped it: a rank recorded an error (heartbeat) that
    is a known failure, not only a symptom of a peer's death, or torchrun's summary in ``tail``
    names a rank that died by a signal other than a stop's (kill -9, a crash). True of a node the
    gang stopped whose own failure was overtaken by a peer's report (the peer failing because of it)."""
    from cluster.run.diagnose import diagnose
    lines = [f"[{n.host} {r}] {e}" for r, e in _heartbeat_errors(n).items()]
    if {f.pattern_id for f in diagnose(lines)} - PEER_SYMPTOMS:
        return True
    _, code = root_cause(tail)
    return code is not None and code < 0 and -code not in _STOP_SIGNALS


def _heartbeat_errors(n: NodeStatus) -> dict[int, str]:
    """rank -> the error its heartbeat recorded as the rank failed (train/loop.py)."""
    out = {}
    for r, hb in (n.heartbeats or {}).items():
        if isinstance(hb, dict) and hb.get("error") and str(r).isdigit():
            out[int(r)] = str(hb["error"])
    return out


def root_cause(lines: Iterable[str]) -> tuple[Optional[int], Optional[int]]:
    """(global rank, exit code) from the block under torchrun's 'Root Cause (first observed
    failure)'; without that block, the first rank a summary names and no exit code."""
    first = rank = code = None
    after_root = False
    for line in lines:
        if "Root Cause" in line:
            after_root = True
            continue
        m = _RANK.search(line)
        if m and after_root and rank is None:
            rank = int(m.group(1))
        elif m and first is None:
            first = int(m.group(1))
        m = _EXITCODE.search(line) if after_root and code is None else None
        if m:
            code = int(m.group(1))
        if rank is not None and code is not None:
            break
    return (rank if rank is not None else first), code


def _plain(n: NodeStatus) -> dict:
    return {"host": n.host, "state": n.state.value, "pid": n.pid, "exit_code": n.exit_code,
            "exit_time": n.exit_time, "heartbeats": n.heartbeats, "detail": n.detail}   # activity: live only
