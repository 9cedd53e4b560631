"""The SLURM run's follower: the detached process that ``submit`` leaves on the login node
(``python -m cluster.backends.slurm_follower follow RUN``; cluster/backends/slurm.py's docstring
says why and the trade-offs), and what it does besides SLURM's status.

* ``follow``: the run's status every FOLLOW_S until it ends (so a failed node is excluded while
  the requeued job waits, ``exclude_failed``), every WATCH_S while the batch log shows a failure.
* A node that falls silent, found sooner than SLURM finds it (``restart.silent_s``): each node's
  first task beats (cluster/node/slurm_task.py: ``state/alive-<job>-<host>`` every ALIVE_S); the
  follower reads the beats of the job's current start (``read_beats``), notes by its own clock
  when each changed (``BeatWatch``) and asks ``silent_hosts`` which nodes fell silent;
  ``_replace_silent`` checks that SLURM still has the job RUNNING in that start and
  ``replace_job`` replaces it: the attempt recorded, the nodes excluded, the job cancelled, a new
  one submitted for the same run.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from pathlib import Path
from typing import Mapping

from cluster.backends.base import progress
from cluster.backends.local import FileSource
from cluster.backends.slurm import (BURST_S, FOLLOW_S, NODE_NAME, WATCH_S, _START_LINE, SlurmBackend, SlurmPlan,
                                    _batch_log, _folder, _nodelist, _partition_nodes, _read_lines, _run,
                                    decide_exclusion, job_info)
from cluster.plan import NodeLaunch
from cluster.spec.config import RestartSpec, inventory_from_plain
from cluster.run.records import Run, State

# Silent nodes (restart.silent_s): each node's first task beats every ALIVE_S (slurm_task); another
# node "beat recently" within RECENT_S (at most half of silent_s), i.e. a few beats and looks
RECENT_S = 8.0


def read_beats(state_dir: Path, jid: str, restart: int) -> dict[str, str]:
    """host -> its alive file's text (``cluster.node.slurm_task._start_beat``), for the start
    ``restart`` of job ``jid`` only; names SLURM could not have given are left out."""
    prefix, out = f"alive-{jid}-", {}
    try:
        names = os.listdir(state_dir)
    except OSError:
        return out
    for name in names:
        host = name[len(prefix):] if name.startswith(prefix) else ""
        if not NODE_NAME.fullmatch(host):
            continue
        try:
            text = (state_dir / name).read_text()
        except OSError:
            continue
        f = text.split()
        if len(f) >= 4 and f[0] == str(jid) and f[1] == str(restart):
            out[host] = text
    return out


class BeatWatch:
    """When each node's beat last changed, by this process's clock (``time.monotonic``): the nodes'
    clocks are never compared with it or with each other. A node seen first counts as changed then;
    one whose last beat says its task ended is not watched any more."""

    def __init__(self):
        self.last: dict[str, tuple[str, float]] = {}

    def look(self, beats: Mapping[str, str], now: float) -> None:
        for host, text in beats.items():
            if host not in self.last or self.last[host][0] != text:
                self.last[host] = (text, now)

    def changed(self) -> dict[str, float]:
        return {h: t for h, (text, t) in self.last.items() if text.split()[-1] != "ended"}


def silent_hosts(changed: Mapping[str, float], nodes, now: float, silent_s: float,
                 recent_s: float = RECENT_S) -> dict[str, float]:
    """The nodes of the job's current start (``nodes``) that fell silent -> how long: a node that
    has beaten in this start (``changed``: when its beat last changed) but not for ``silent_s``,
    while another node of the job beat within ``recent_s`` (at most half of ``silent_s``). None
    while every node that beat is quiet: that is the filesystem's or this process's stall, not
    one node's, and the nodes go quiet one after the other within a beat or two then. A node that
    never beat in this start is SLURM's to judge (one that dies while starting up)."""
    ages = {h: now - changed[h] for h in dict.fromkeys(nodes) if h in changed}
    recent = min(recent_s, silent_s / 2)
    if not silent_s or not any(a < recent for a in ages.values()):
        return {}
    return {h: a for h, a in ages.items() if a >= silent_s}


def replace_job(be: "SlurmBackend", run: Run, jid: str, info: dict, silent: Mapping[str, float]) -> bool:
    """Job ``jid`` of ``run`` is RUNNING with ``silent`` nodes (-> seconds silent) that SLURM has not
    noticed: record the failure as the run's attempt (cluster/run/recovery.py), exclude those nodes
    (run.json ``excluded_nodes``, as ``exclude_failed`` does), cancel the job and submit a new one for
    the run through ``launch``, its plan with the nodes added to the job's exclude list; the handle
    then names the new job (``job_ids``: every job of the run). Each replacement counts against
    restart.max_requeues; past it, or with restart.requeue off, or when the submit fails, the run
    ends FAILED. False: nothing done (a node SLURM does not list, a stop, another process acted)."""
    from cluster.run.recovery import Decision, attempt_of, record
    from cluster.spec.schema import to_plain
    partition = _partition_nodes(info.get("Partition"))
    nodes = [n for n in silent if n in partition]        # only names SLURM lists reach sbatch
    try:
        alloc = _nodelist(info.get("NodeList"))
        current = _nodelist(info.get("ExcNodeList"))
    except ValueError:
        return False
    if not nodes or not re.fullmatch(r"\d+", str(jid)):
        return False
    run.reload()
    if run.data.get("final") or run.data.get("stop_requested") or run.state == State.RESTARTING:
        return False
    restarts = int(info.get("Restarts") or 0)
    what = ", ".join(f"{n} silent for {silent[n]:.0f} s" for n in nodes)
    cause = f"node {what}: no beat from its tasks; SLURM had not noticed (job {jid} still RUNNING)"
    task = (run.data.get("plan") or {}).get("task") or {}
    done, limit = len(run.data.get("attempts") or []) + 1, int(task.get("max_requeues", 0))
    if not task.get("requeue", True):
        d = Decision(False, cause, "restart.requeue is off: the job is not started again", nodes[0])
    elif done > limit:
        d = Decision(False, cause, f"restart.max_requeues ({limit}) reached: no new job", nodes[0])
    else:
        d = Decision(True, cause, f"a new job without {', '.join(nodes)} resumes from the latest checkpoint",
                     nodes[0])
    n = attempt_of(run.data)
    failure = {"host": nodes[0], "rank": None, "exit_code": None, "error": cause, "slurm": f"job {jid} RUNNING",
               "log_tail": _read_lines(_folder(run) / f"{jid}_batch.log")[-30:], "findings": []}
    record(run, n, d, failure, hosts=alloc)
    _cancel_at_once(jid)
    if not d.restart:
        run.set_state(State.FAILED, final=True, ended=time.time(), failure=failure, nodes_final=[])
        return True
    needed = len((run.data.get("plan") or {}).get("nodes") or ()) or 1
    entries = decide_exclusion(nodes, restarts, set(), current, partition, needed,
                               after=f"it fell silent (job {jid}, attempt {n})")

    def exclude(d: dict) -> list:
        d["excluded_nodes"] = (d.get("excluded_nodes") or []) + entries
        return [("exclude-node", e) for e in entries]
    run.change(exclude)
    # the new job excludes what the old one did (the plan's, and what exclude_failed added since)
    # and the silent nodes
    plan = _recorded_plan(run.data["plan"])
    extra = dict(plan.sbatch.get("additional_parameters") or {})
    add = [e["node"] for e in entries if e["excluded"]]
    have = extra.get("exclude") or ""
    try:
        known = set(_nodelist(have))
    except ValueError:
        known = set()
    more = [x for x in dict.fromkeys(current + add) if x not in known]
    if more:
        extra["exclude"] = ",".join(([have] if have else []) + more)
    plan = dataclasses.replace(plan, sbatch={**plan.sbatch, "additional_parameters": extra})
    try:
        handle = be.launch(plan, run, follower_pid=os.getpid())
    except Exception as e:      # noqa: BLE001 -- any failure to submit ends the run, saying why
        why = getattr(e, "message", None) or str(e) or type(e).__name__
        failure = {**failure, "error": f"{cause}; the new job for attempt {n + 1} could not be submitted: {why}"}
        run.set_state(State.FAILED, final=True, ended=time.time(), failure=failure, nodes_final=[])
        return True
    stopped = []

    def swap(d: dict) -> list:
        if d.get("final") or d.get("stop_requested"):
            stopped.append(True)        # stopped while the new job was submitted: it goes too
            return []
        old = d.get("handle") or {}
        d["handle"] = {**handle, "job_ids": list(old.get("job_ids") or [old.get("job_id")]) + [handle["job_id"]]}
        d.update(plan=to_plain(plan), attempt=n + 1, state=State.PENDING.value, slurm_requeues_seen=0)
        return [("attempt", {"attempt": n + 1, "job_id": handle["job_id"], "replaces": jid, "excluded": add}),
                ("state", {"state": State.PENDING.value})]
    run.change(swap)
    if stopped:
        _cancel_at_once(handle["job_id"])
        return True
    progress(f"{time.strftime('%H:%M:%S')} recovery: job {jid} replaced by job {handle['job_id']} "
             f"(attempt {n + 1}) without {', '.join(nodes)}")
    _schedule_when_freed(handle["job_id"], [x for x in alloc if x not in nodes])
    return True


def _schedule_when_freed(jid: str, freed: list[str], timeout_s: float = 30.0) -> None:
    """The new job starts at once where the partition has room; where it needs a node of the old
    job (``freed``), it waits for slurmctld's next scheduling pass once that node is released,
    which may be the backfill's (every 30 s by default): so once none of ``freed`` is completing
    the old job and the new one still waits, it is updated (StartTime=now, what it had), which
    has slurmctld schedule it then, as a submit does."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = ((job_info(jid) or {}).get("JobState") or "").split()[0:1]
        if state != ["PENDING"]:
            return
        p = _run(["sinfo", "-h", "-N", "-n", ",".join(freed), "-o", "%N %T"]) if freed else None
        if p is None or p.returncode == 0 and "completing" not in p.stdout:
            _run(["scontrol", "update", f"JobId={jid}", "StartTime=now"])
            return
        time.sleep(0.2)


def _cancel_at_once(jid: str) -> None:
    """Cancel the job without its grace: KILL ends a running job in slurmctld and reaches every
    process of it on the nodes that answer, the batch shell's included (``--full``), so those
    nodes are free for the next job sooner than after a plain scancel (TERM first: our tasks wait
    LINGER_S for a requeue signal on it, srun KillWait + 2 s; 5 s against 8 s on the testbed). A
    dead node keeps the job COMPLETING until SLURM's own timeout, which nothing here waits for."""
    _run(["scancel", "--signal=KILL", "--full", str(jid)])


def _recorded_plan(d: Mapping) -> SlurmPlan:
    """The run's SlurmPlan as run.json keeps it (the script it renders is the one submitted)."""
    fields = {f.name for f in dataclasses.fields(SlurmPlan)}
    return SlurmPlan(**{**{k: v for k, v in d.items() if k in fields},
                        "nodes": tuple(NodeLaunch(**{**x, "argv": tuple(x["argv"])}) for x in d["nodes"]),
                        "notes": tuple(d.get("notes") or ())})


def _replace_silent(run_id: str, jid: str, restart: int, silent: Mapping[str, float]) -> bool:
    """The follower found ``silent`` nodes in start ``restart`` of job ``jid``: replace the job,
    unless the run is being stopped, has moved on, or SLURM is handling the job already (not
    RUNNING any more, or requeued: its own path, ``exclude_failed``)."""
    run = Run(run_id)
    if run.damaged or run.data.get("final") or run.data.get("stop_requested") or run.state == State.RESTARTING:
        return False
    if (run.data.get("handle") or {}).get("job_id") != jid:
        return False
    info = job_info(jid)
    if not info or info.get("JobState", "").split()[0] != "RUNNING" or int(info.get("Restarts") or 0) != restart:
        return False
    print(f"{time.strftime('%H:%M:%S')} silent in job {jid} (RUNNING for SLURM): "
          + ", ".join(f"{h} for {a:.1f} s" for h, a in silent.items()), flush=True)
    return replace_job(SlurmBackend(inventory_from_plain(run.data["inventory"])), run, jid, info, silent)


def _silent_s(run: Run) -> float:
    """The run's restart.silent_s (0: off); a run recorded without it has the default."""
    restart = (((run.data.get("job") or {}).get("resolved") or {}).get("restart") or {})
    return float(restart.get("silent_s", RestartSpec.silent_s) or 0)


def follow(run_id: str, poll_s: float = FOLLOW_S, watch_s: float = WATCH_S) -> int:
    """Detached, one per SLURM run, in its own session (closing the terminal does not end it): polls
    the run's status every ``poll_s`` until it ends, so what status does on its own (excluding a
    failed node while the requeued job waits, recording the end) happens with no one looking; every
    ``watch_s`` while the batch log shows a failure (WATCH_S). Every ``watch_s`` it also reads the
    nodes' beats of the job's current start (its batch log's start line names the start and its
    nodes): a node silent for restart.silent_s while another beats is replaced (``replace_job``)."""
    every, burst = max(1, round(poll_s / watch_s)), max(1, round(BURST_S / watch_s))
    from cluster.run.logs import Merger
    unknown, looks, urgent, seen = None, 0, 0, None
    batch = None    # the batch log's new whole lines at each look, once the submit has recorded the job
    jid, start, beats, silent_s = None, None, BeatWatch(), 0.0    # start: (restart, nodes) of job jid
    while True:
        time.sleep(watch_s)
        looks += 1
        if batch is None:
            run = Run(run_id)
            path = _batch_log(run) if (run.dir / "run.json").exists() and not run.damaged else None
            batch = path and Merger([FileSource("batch", path)])
            if batch:
                jid, start, beats, silent_s = run.data["handle"]["job_id"], None, BeatWatch(), _silent_s(run)
        lines = batch.poll() if batch else []
        if any("error:" in line for line in lines):
            urgent = burst
        for line in lines:
            m = _START_LINE.match(line)
            if m and m[1] == str(jid):
                try:
                    start, beats = (int(m[2]), _nodelist(m[3])), BeatWatch()
                except ValueError:
                    start = None
        if start and silent_s:
            now = time.monotonic()
            beats.look(read_beats(Run(run_id).dir / "state", jid, start[0]), now)
            silent = silent_hosts(beats.changed(), start[1], now, silent_s)
            if silent and _replace_silent(run_id, jid, start[0], silent):
                batch, urgent = None, burst     # the new job's log, and its status soon
                continue
        if urgent:
            urgent -= 1
        elif looks % every:
            continue
        run = Run(run_id)
        if not (run.dir / "run.json").exists() or run.damaged:
            return 1            # the run was removed: nothing to follow
        try:
            # this backend whatever the inventory says of a login node: the follower runs where SLURM is
            state, _ = SlurmBackend(inventory_from_plain(run.data["inventory"])).status(run)
        except Exception as e:   # noqa: BLE001 -- a slurmctld hiccup must not end the follower
            print(f"status: {type(e).__name__}: {e}", flush=True)
            state = State.UNKNOWN
        if state.is_terminal():
            return 0
        unknown = (looks if unknown is None else unknown) if state == State.UNKNOWN else None
        if unknown is not None and looks - unknown >= 5 * every:
            print(f"SLURM has not known the run's job for {(looks - unknown) * watch_s:.0f} s; the follower ends",
                  flush=True)
            return 1
        requeues = int(run.data.get("slurm_requeues_seen") or 0)
        if seen is not None and requeues > seen:
            urgent = 0          # the requeue is handled: back to the slow poll
        seen = requeues


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "follow":
        from cluster.backends.slurm_follower import follow as _follow      # the module's one copy, not __main__'s
        sys.exit(_follow(sys.argv[2]))
    print("usage: python -m cluster.backends.slurm_follower follow RUN_ID", file=sys.stderr)
    sys.exit(2)
