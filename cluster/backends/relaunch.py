"""The next attempt of a run that failed for a cause a restart can fix (the decision:
cluster/run/recovery.py). Owned by the run's detached watcher (cluster/backends/watcher.py): it
lives in its own session, so the run recovers with no terminal open.

One attempt after another, as the same run id: the gang stopped and verified clean on every host,
node 0's checkpoints synced to storage, ``restart.backoff_s`` waited, the old attempt's exit, pid
and heartbeat files moved to runs/<id>/attempts/<n>/ on each host, then the preflight and the
launch of the plan rebuilt from the job recorded in run.json. Training resumes from the latest
checkpoint in the run's own checkpoints/ on node 0 (train: resume is on by default); logs are
appended to the same files, so 'logs -f' goes on across attempts. A preflight or launch that
fails counts as a failure of the next attempt.
"""
from __future__ import annotations

import time
from pathlib import Path

from cluster.backends.base import progress
from cluster.backends.rsync import pull_checkpoints, shell_path
from cluster.run.checkpoints import checkpoint_path
from cluster.run.records import Run, State
from cluster.spec import hostlist

CLEAN_TRIES = 3


def relaunch(be, run_id: str, root: Path) -> State:
    """Start the next attempt of the RESTARTING run ``run_id``; returns the run's state after."""
    from cluster.spec.config import job_from_plain
    from cluster.spec.schema import to_plain
    run = Run(run_id, root)
    if run.state != State.RESTARTING:
        return run.state
    n = int(run.data.get("attempt") or 1)
    job = job_from_plain(run.data["job"]["resolved"])
    hosts = [be.inv.host(h["host"]) for h in run.data["plan"]["nodes"]]
    t0 = time.time()
    left = []
    for _ in range(CLEAN_TRIES):
        try:
            left = be.stop_nodes(run, grace_s=10.0)
        except Exception as e:      # noqa: BLE001 -- a host still down: tried again, then named
            left = [f"stop: {e}"]
        if not left:
            break
        time.sleep(job.restart.backoff_s or 1)
    if left:
        return give_up(run, f"the gang of attempt {n} could not be verified stopped: " + "; ".join(left[:5]))
    run.event("gang-clean", attempt=n, hosts=[h.name for h in hosts], after_s=round(time.time() - t0, 1))
    dest = Path(run.data.get("checkpoint_dir") or run.dir / "checkpoints")
    r = pull_checkpoints(hosts[0], be.inv.ssh, run.id, dest, checkpoint_path(run.data))
    progress(f"recovery: checkpoints of attempt {n}: {r.describe()}")
    deadline = time.time() + job.restart.backoff_s
    while time.time() < deadline:
        if _stopped(run):
            return Run(run_id, root).state
        time.sleep(min(1.0, max(0.0, deadline - time.time())))
    _set_aside(be, run, hosts, n)
    run = Run(run_id, root)
    if _stopped(run):
        return run.state
    plan = be.make_plan(job, run.id, be.detect_gpus(be.select_hosts(job)))
    try:
        be.preflight(plan)
        be.prepare(plan, run)
        be.watcher_pid = _own_pid()        # this watcher goes on following the run: no second one
        handle = be.launch(plan, run)
    except Exception as e:      # noqa: BLE001 -- any failure to start: recorded as the next attempt's
        try:
            be.stop_nodes(run, grace_s=5.0)
        except Exception:       # noqa: BLE001
            pass
        return _failed_start(be, run, n + 1, e)
    run = Run(run_id, root)
    run.update(handle=handle, plan=to_plain(plan), attempt=n + 1)
    run.event("attempt", attempt=n + 1, hosts=[x.host for x in plan.nodes],
              checkpoint=(dest / "latest").read_text().strip() if (dest / "latest").exists() else None)
    run.set_state(State.STARTING)
    progress(f"recovery: attempt {n + 1} started on {hostlist.fold([x.host for x in plan.nodes])}")
    if _stopped(Run(run_id, root)):     # a stop that came during the launch: it ends this attempt too
        be.stop_nodes(run, grace_s=10.0)
    return State.STARTING


def _stopped(run: Run) -> bool:
    fresh = Run(run.id, run.dir.parent)
    return bool(fresh.data.get("stop_requested") or fresh.data.get("final"))


def _own_pid() -> int:
    import os
    return os.getpid()


def _set_aside(be, run: Run, hosts, n: int) -> None:
    """Each host's exit, pid and heartbeat files of attempt ``n`` into runs/<id>/attempts/<n>/:
    the next attempt's status reads only its own."""
    cmds = {}
    for h in hosts:
        base = shell_path(f"{h.workdir.rstrip('/')}/runs/{run.id}")
        keep = f"{base}/attempts/{n}"
        cmds[h.name] = (f"mkdir -p {keep} && cd {base} && "
                        f"for f in state/{h.name}.exit state/{h.name}.pid metrics/heartbeat-rank*.json; do "
                        f"[ -e \"$f\" ] && mv -f \"$f\" {keep}/; done; true")
    res = be.pool.run(cmds, timeout_s=60, label="set aside the attempt's state")
    for name, r in res.items():
        if not r.ok:
            progress(f"recovery: {name}: could not set aside attempt {n}'s files ({r.describe()})")


def _failed_start(be, run: Run, attempt: int, err: Exception) -> State:
    """The next attempt could not start (a host still down, a port held): a failure of that
    attempt, relaunched again (after the backoff) while restart.max_failures allows."""
    from cluster.run.recovery import Decision, record, restart_policy
    text = str(getattr(err, "message", None) or err).splitlines()
    error = f"attempt {attempt} could not start: " + " ".join(l.strip() for l in text[:6])[:600]
    failure = {"host": None, "rank": None, "exit_code": None, "findings": [], "error": error}
    run = Run(run.id, run.dir.parent)
    limit = restart_policy(run, be.name) or 0
    done = len(run.data.get("attempts") or []) + 1
    d = Decision(done <= limit, error, "a host or port may come back: tried again" if done <= limit
                 else f"restart.max_failures ({limit}) reached")
    if record(run, attempt, d, failure):
        return State.RESTARTING
    return give_up(run, error, failure)


def give_up(run: Run, error: str, failure: dict = None) -> State:
    run = Run(run.id, run.dir.parent)
    failure = failure or {"host": None, "rank": None, "exit_code": None, "findings": [], "error": error}
    if run.data.get("attempts") and "attempts" not in failure:
        failure["attempts"] = run.data["attempts"]
    run.set_state(State.FAILED, final=True, ended=time.time(), failure=failure)
    progress(f"recovery: {error}")
    return State.FAILED
