"""Automatic recovery: whether a failed run relaunches itself, and the record of its attempts.

A run fails; Backend.finish asks ``restart_instead`` before it records FAILED. The decision comes
from the diagnosis (cluster/run/diagnose.py, the ``restart:`` of each entry of failures.yaml) and
from how the failing rank ended:

* restarted: a host lost by the gang (down, cut off), a rank or torchrun killed by a signal that no
  stop sent (kill -9, the kernel), an agent gone without an exit record, a hang the job stops
  (stop_on_hang), a known failure whose entry says ``restart: 'yes'`` (a collective or NCCL timeout,
  a rendezvous that timed out) or ``after-progress`` once a step was trained (an OOM later on);
* not restarted: a known failure whose entry says ``restart: 'no'`` (a missing module, a version
  mismatch, a full disk), a Python error in the job's own code (an exception on the failing rank
  that is not a peer's death), an OOM at step 0, an unknown cause, a stop, and the failure after the
  first ``restart.max_failures``.

The run then stays one run: run.json keeps ``attempt`` (1, 2, ...) and ``attempts`` (each one's
cause and the decision with its reason); the state is RESTARTING until the relaunch (owned by the
detached watcher: cluster/backends/relaunch.py) starts the next attempt.

Where a host is the cause (lost by the gang, its rank or torchrun killed by a signal, its agent
gone), the decision blames it, and the next attempt runs on a spare in its place (the inventory's
``spares:``, preflighted first: ``next_hosts``); a host blamed for two failures is quarantined for
the run. With no spare, a job with a range of nodes (``nodes: 2-4``) goes on without the blamed
host while at least its minimum is left (the attempt's entry keeps ``dropped``). Each failed
attempt's entry keeps the hosts that ran it and what was replaced or dropped after it.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from cluster.run.records import Run, State
from cluster.spec import hostlist

# a Python exception's last line, after the log's "[host rank] " prefix
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\b(?::|$)")
_RANK_LINE = re.compile(r"^\[\S+ \d+\] ")      # a rank's own line; "[host agent] " is torchrun's and ours
_TORCH_RANK = re.compile(r"^\[rank\d+\]: ")     # torch's own prefix of an uncaught exception's lines
_TORCHRUN_OWN = ("ChildFailedError", "SignalException")       # torchrun's own report of a rank's end


@dataclass(frozen=True)
class Decision:
    restart: bool
    cause: str      # what failed, one line
    reason: str     # why the run is (not) relaunched
    blame: Optional[str] = None     # the host at fault (the next attempt replaces it by a spare)


def attempt_of(data: dict) -> int:
    return int(data.get("attempt") or 1)


def decide(data: dict, failure: dict, max_failures: int, signal: Optional[int] = None,
           progressed: bool = False, node_detail: str = "", elsewhere: Sequence[str] = ()) -> Decision:
    """Whether the attempt that ended with ``failure`` is followed by another.

    ``signal``: the signal that ended the failing rank (torchrun's summary; None if none did);
    ``progressed``: a rank had trained at least one step in this attempt; ``node_detail``: what the
    status of the failing host said (its agent gone without an exit record: killed, or a reboot);
    ``elsewhere``: the log lines of the other failed hosts. Which node failed first is judged by
    when each ended, and on a loaded machine a peer whose collective broke can end before the rank
    that raised: a Python error there that no known failure explains (not a peer's symptom such as
    a connection closed) is the job's own error too."""
    from cluster.run.diagnose import PEER_SYMPTOMS, diagnose, pattern
    host, rank = failure.get("host"), failure.get("rank")
    cause = _cause(failure, signal)
    if data.get("stop_requested"):
        return Decision(False, cause, "the run was stopped")
    if max_failures <= 0:
        return Decision(False, cause, "automatic recovery is off (restart.max_failures: 0)")
    done = len(data.get("attempts") or []) + 1       # failures so far, this one included
    own = [l for l in failure.get("log_tail") or [] if rank is not None and l.startswith(f"[{host} {rank}] ")]
    own_ids = {f.pattern_id for f in diagnose(own)}
    known = [f for f in failure.get("findings") or []
             if f.get("host") in (None, host) and _restart_of(pattern, f["pattern_id"]) is not None]
    verdict = blame = None
    for f in known:     # those on the failing rank first (the diagnosis orders them so)
        how = _restart_of(pattern, f["pattern_id"])
        if how == "no":
            return Decision(False, cause, f"{f['title']}: a restart would fail the same way ({f['remedy']})")
        if how == "after-progress" and not progressed:
            return Decision(False, cause, f"{f['title']} before the first step: a restart would fail the same way")
        verdict = verdict or f"{f['title']}: a restart can fix it"
    user_error = _user_error(own)
    # the failing rank showed only a peer's symptom: a Python error that no known failure explains,
    # on another failed host, is the cause
    other_error = None if not own_ids <= PEER_SYMPTOMS or user_error and not own_ids else \
        _user_error([l for l in elsewhere if not diagnose([l])])
    if failure.get("hang"):
        verdict = "hung ranks were stopped: a restart can fix it"
    elif "lost by the gang" in (failure.get("error") or ""):
        verdict, blame = (f"host {host} was lost: the next attempt starts once it answers again (or on a spare, "
                          "or without it for nodes: MIN-MAX)"), host
    elif signal is not None:
        verdict, blame = f"killed by signal {signal}, not by the job's code: a restart can fix it", host
    elif "without an exit record" in (failure.get("error") or "") + node_detail:
        verdict, blame = f"the agent on {host} vanished (host rebooted or killed): a restart can fix it", host
    elif user_error and not (own_ids & {f["pattern_id"] for f in known}) or other_error:
        return Decision(False, cause, f"a Python error in the job's code ({(other_error or user_error)[:200]}): "
                                      "a restart would fail the same way; fix it, then 'submit --resume RUN'")
    if verdict is None:
        return Decision(False, cause, "the cause is not one a restart is known to fix; see the log, then "
                                      "'submit --resume RUN'")
    if done > max_failures:
        return Decision(False, cause, f"restart.max_failures ({max_failures}) reached: {verdict}", blame)
    return Decision(True, cause, verdict, blame)


def _user_error(lines: Sequence[str]) -> Optional[str]:
    """The last Python exception among ``[host rank] ...`` lines, after torch's own ``[rankN]: ``
    prefix where it adds one: not torchrun's own reports of how a rank ended (with warm workers it
    logs a worker's exit as a ProcessExitedException traceback)."""
    texts = (_TORCH_RANK.sub("", l.split("] ", 1)[1]) for l in reversed(lines) if _RANK_LINE.match(l))
    return next((t for t in texts if _EXCEPTION.match(t) and not any(o in t for o in _TORCHRUN_OWN)), None)


def _restart_of(pattern, pattern_id: str) -> Optional[str]:
    try:
        return pattern(pattern_id).restart
    except KeyError:
        return None


def _cause(failure: dict, signal: Optional[int]) -> str:
    where = " ".join(x for x in (f"host {failure['host']}" if failure.get("host") else "",
                                 f"rank {failure['rank']}" if failure.get("rank") is not None else "") if x)
    what = failure.get("error") or (f"killed by signal {signal}" if signal else None) or \
        next((f["title"] for f in failure.get("findings") or []), None) or \
        (f"exit code {failure['exit_code']}" if failure.get("exit_code") is not None else "failed")
    return f"{where}: {what}" if where else what


def restart_instead(run: Run, failure: dict, max_failures: int, signal: Optional[int] = None,
                    progressed: bool = False, node_detail: str = "", elsewhere: Sequence[str] = ()) -> bool:
    """Called as an attempt of ``run`` is found FAILED: records the decision (in ``failure`` too,
    for the record FAILED gets otherwise) and, if the run relaunches, marks it RESTARTING.
    True: the caller must not record the run as ended."""
    fresh = Run(run.id, run.dir.parent)
    if attempt_of(fresh.data) != attempt_of(run.data):
        run._data = fresh.data      # relaunched meanwhile: this failure is an earlier attempt's, recorded
        return True
    if fresh.data.get("final") or fresh.data.get("state") == State.RESTARTING.value:
        run._data = fresh.data      # another process decided already
        return fresh.data.get("state") == State.RESTARTING.value
    run._data = fresh.data
    return record(run, attempt_of(fresh.data), decide(fresh.data, failure, max_failures, signal, progressed, node_detail,
                                                          elsewhere),
                  failure)


def record(run: Run, n: int, d: Decision, failure: dict, hosts: Optional[Sequence[str]] = None) -> bool:
    """Attempt ``n`` ended with ``failure``: the decision into run.json (``attempts``), the event
    and ``failure``; RESTARTING if the run goes on. Returns ``d.restart``. ``hosts``: those that
    ran the attempt, where the plan does not name them (SLURM's allocation)."""
    entry = {"attempt": n, "ended": round(time.time(), 3), "cause": d.cause, "restart": d.restart,
             "reason": d.reason, "host": failure.get("host"), "rank": failure.get("rank"), "blame": d.blame,
             "hosts": list(hosts) if hosts is not None else
             [x.get("host") for x in (run.data.get("plan") or {}).get("nodes") or []]}
    attempts = [a for a in run.data.get("attempts") or [] if a.get("attempt") != n] + [entry]
    run.event("recovery", attempt=n, restart=d.restart, cause=d.cause, reason=d.reason)
    failure["recovery"] = {"restart": d.restart, "reason": d.reason}
    if len(attempts) > 1:
        failure["attempts"] = attempts
    if not d.restart:
        run.update(attempts=attempts, attempt=n)
        return False
    run.set_state(State.RESTARTING, attempts=attempts, attempt=n, last_failure=failure)
    return True


def describe(data: dict) -> list[str]:
    """status: the attempts so far and what each ended with."""
    attempts = data.get("attempts") or []
    if not attempts:
        return []
    n = attempt_of(data)
    out = [f"attempt {n}" + (" (restarting)" if data.get("state") == State.RESTARTING.value else "")
           + f"; {len(attempts)} failure(s):"]
    for a in attempts:
        out.append(f"  attempt {a['attempt']}: {a['cause']} -> "
                   f"{'restarted' if a['restart'] else 'not restarted'}: {a['reason']}")
        if a.get("hosts"):
            out.append(f"    ran on {hostlist.fold(a['hosts'])}" + "".join(
                f"; {old} replaced by {new}" for old, new in (a.get("replaced") or {}).items()) +
                (f"; {shrunk(a)}" if a.get("dropped") else ""))
    if data.get("quarantined"):
        out.append("  quarantined (caused two failures, not used again by this run): " +
                   ", ".join(data["quarantined"]))
    return out


def shrunk(attempt: dict) -> str:
    """'shrunk from 3 to 2 nodes: node2 dropped' for a failed attempt's entry whose next attempt
    went on without its culprit (nodes: MIN-MAX, no spare left)."""
    n, gone = len(attempt.get("hosts") or []), attempt.get("dropped") or []
    return f"shrunk from {n} to {n - len(gone)} nodes: {', '.join(gone)} dropped"


@dataclass(frozen=True)
class NextHosts:
    """The hosts of a run's next attempt (``next_hosts``)."""
    hosts: tuple[str, ...]                              # node rank order
    replaced: dict = field(default_factory=dict)        # failed host -> the spare in its place
    quarantined: tuple[str, ...] = ()                   # blamed for two failures: never used again
    rejected: dict = field(default_factory=dict)        # spare -> why its preflight failed
    error: Optional[str] = None                         # no next attempt can start: why
    dropped: tuple[str, ...] = ()                       # left out, no spare for it (nodes: MIN-MAX)


def next_hosts(data: dict, spares: Sequence[str],
               check: Callable[[list[str]], Mapping[str, Optional[str]]],
               min_nodes: Optional[int] = None) -> NextHosts:
    """Where the next attempt of the RESTARTING run ``data`` runs: its last attempt's hosts, with
    the host blamed for that failure replaced by the first spare that passes ``check`` (names ->
    a problem, or None for a healthy host; the preflight probe). A spare is one of the inventory's
    ``spares`` that no attempt of this run ran on. Node rank order is kept, so the rendezvous stays
    on node 0 unless node 0 is the one replaced. With no spare, a job with a range of nodes
    (``min_nodes``: its MIN) goes on without the blamed host while at least MIN are left (the others
    keep their order: node 1 becomes node 0 if node 0 is dropped). Otherwise a host blamed for two
    failures is quarantined: with no spare for it, there is no next attempt; with no spare for a
    host blamed once, the run restarts on the same hosts."""
    current = [n["host"] for n in (data.get("plan") or {}).get("nodes") or []]
    attempts = data.get("attempts") or []
    blamed = Counter(a["blame"] for a in attempts if a.get("blame"))
    quarantined = tuple(dict.fromkeys(a["blame"] for a in attempts if a.get("blame") and blamed[a["blame"]] >= 2))
    culprit = attempts[-1].get("blame") if attempts else None
    if culprit not in current:
        return NextHosts(tuple(current), quarantined=quarantined)
    ran = {h for a in attempts for h in a.get("hosts") or []} | set(current)
    candidates = [s for s in spares if s not in ran and s not in quarantined]
    found = dict(check(candidates)) if candidates else {}
    rejected = {s: found.get(s, "no answer") for s in candidates if found.get(s, "no answer")}
    spare = next((s for s in candidates if s not in rejected), None)
    if spare is not None:
        return NextHosts(tuple(spare if h == culprit else h for h in current), {culprit: spare}, quarantined,
                         rejected)
    if min_nodes is not None and len(current) - 1 >= min_nodes:
        return NextHosts(tuple(h for h in current if h != culprit), quarantined=quarantined, rejected=rejected,
                         dropped=(culprit,))
    why = "no spare left" + (" (" + "; ".join(f"{s}: {p}" for s, p in rejected.items()) + ")" if rejected else "")
    if culprit in quarantined:
        runs = ", ".join(str(a["attempt"]) for a in attempts if a.get("blame") == culprit)
        return NextHosts(tuple(current), quarantined=quarantined, rejected=rejected,
                         error=f"host {culprit} caused {blamed[culprit]} failures of this run (attempts {runs}) "
                               f"and is quarantined; {why} to take its place")
    return NextHosts(tuple(current), quarantined=quarantined, rejected=rejected)


def restart_policy(run: Run, backend: str) -> Optional[int]:
    """The run's restart.max_failures (or its default), where automatic recovery applies (ssh);
    None where it does not."""
    if backend != "ssh" or not (run.data.get("job") or {}).get("resolved"):
        return None
    from cluster.spec.config import job_from_plain, max_failures
    try:
        return max_failures(job_from_plain(run.data["job"]["resolved"]))
    except Exception:   # noqa: BLE001 -- a record from an older version: no recovery, the run fails as before
        return None
