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

Where the failure blamed a host and the inventory has spares, the next attempt runs on a spare in
its place (cluster/run/recovery.py next_hosts; the spare passes the preflight probe first), in the
same node rank; a new node 0 (or, with checkpoint.every_node, any new node) gets the latest
checkpoint from storage. With no spare left, a job with a range of nodes (``nodes: 2-4``) goes on
without the blamed host while its minimum is left (torchrun's world size shrinks; train/ keeps the
per-process batch and scales the learning rate with the global batch), and a new node 0 gets the
checkpoint the same way. A blamed host that does not answer is not waited for when a spare takes
its place or the run shrinks without it; otherwise the run ends FAILED naming it.
"""
from __future__ import annotations

import time
from pathlib import Path

from cluster.backends.base import progress
from cluster.backends.rsync import pull_checkpoints, push_run_files, shell_path
from cluster.run.checkpoints import checkpoint_path
from cluster.run.recovery import next_hosts, shrunk
from cluster.run.records import Run, State
from cluster.spec import hostlist

CLEAN_TRIES = 3


def relaunch(be, run_id: str, root: Path) -> State:
    """Start the next attempt of the RESTARTING run ``run_id``; returns the run's state after."""
    from cluster.spec.config import job_from_plain, min_nodes
    from cluster.spec.schema import to_plain
    run = Run(run_id, root)
    if run.state != State.RESTARTING:
        return run.state
    n = int(run.data.get("attempt") or 1)
    job = job_from_plain(run.data["job"]["resolved"])
    hosts = [be.inv.host(h["host"]) for h in run.data["plan"]["nodes"]]
    blame = ((run.data.get("attempts") or [{}])[-1]).get("blame")
    # the blamed host need not answer (nor be verified clean) where the next attempt runs without it
    shrinkable = min_nodes(job) is not None and len(hosts) - 1 >= min_nodes(job)
    spare_for_it = bool(blame and ([s for s in be.inv.spares if s not in {h.name for h in hosts}] or shrinkable))
    # ... nor asked at all where it did not answer the last status probe: cut off, each try would
    # cost the ssh connect timeout (its own agent stops its processes once it has lost its peers)
    skip = frozenset({blame}) if spare_for_it and blame in be.unanswered else frozenset()
    t0 = time.time()
    left = []
    for _ in range(CLEAN_TRIES):
        try:
            left = be.stop_nodes(run, grace_s=10.0, skip=skip)
        except Exception as e:      # noqa: BLE001 -- a host still down: tried again, then named
            left = [f"stop: {e}"]
        if not left or (spare_for_it and _only_unreachable(left, blame)):
            break
        time.sleep(job.restart.backoff_s or 1)
    unverified = bool(left) and _only_unreachable(left, blame)
    if left and not (unverified and spare_for_it):
        if unverified:
            return give_up(run, f"host {blame}, the cause of attempt {n}'s failure, does not answer and no spare "
                                f"is left to replace it: {left[0]}")
        return give_up(run, f"the gang of attempt {n} could not be verified stopped: " + "; ".join(left[:5]))
    run.event("gang-clean", attempt=n, hosts=[h.name for h in hosts], after_s=round(time.time() - t0, 1),
              **({"unverified": blame} if unverified else {}))
    dest = Path(run.data.get("checkpoint_dir") or run.dir / "checkpoints")
    if not (unverified and hosts[0].name == blame):     # node 0 lost: what the watcher synced is all there is
        r = pull_checkpoints(hosts[0], be.inv.ssh, run.id, dest, checkpoint_path(run.data))
        progress(f"recovery: checkpoints of attempt {n}: {r.describe()}")
    deadline = time.time() + job.restart.backoff_s
    while time.time() < deadline:
        if _stopped(run):
            return Run(run_id, root).state
        time.sleep(min(1.0, max(0.0, deadline - time.time())))
    _set_aside(be, run, [h for h in hosts if not (unverified and h.name == blame)], n)
    run = Run(run_id, root)
    if _stopped(run):
        return run.state
    peer = next((h.name for h in hosts if h.name != blame), None)     # a spare must answer as it does
    choice = next_hosts(run.data, be.inv.spares, lambda names: be.check_spares(names, peer), min_nodes(job))
    for spare, why in choice.rejected.items():
        run.event("spare-rejected", host=spare, reason=why)
        progress(f"recovery: spare {spare} failed the preflight: {why}")
    _record_hosts(run, n, choice)
    if choice.error or (unverified and blame in choice.hosts):
        return give_up(run, choice.error or f"host {blame}, the cause of attempt {n}'s failure, does not answer "
                                            "and no spare passed the preflight to replace it")
    new = [be.inv.host(h) for h in choice.hosts]
    plan = be.make_plan(job, run.id, be.detect_gpus(new), hosts=tuple(new))
    run.update(plan=to_plain(plan))     # a failed start stops what it started on these hosts
    try:
        _seed_spares(be, run, plan, choice, dest, job.checkpoint.every_node, hosts[0].name)
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
    run.event("attempt", attempt=n + 1, hosts=[x.host for x in plan.nodes], replaced=choice.replaced,
              dropped=list(choice.dropped), world_size=plan.world_size,
              checkpoint=(dest / "latest").read_text().strip() if (dest / "latest").exists() else None)
    run.set_state(State.STARTING)
    progress(f"recovery: attempt {n + 1} started on {hostlist.fold([x.host for x in plan.nodes])}")
    if _stopped(Run(run_id, root)):     # a stop that came during the launch: it ends this attempt too
        be.stop_nodes(run, grace_s=10.0)
    return State.STARTING


def _only_unreachable(left: list[str], host) -> bool:
    """All that the stop could not verify is ``host``, because it did not answer."""
    return bool(host) and all(line.startswith(f"{host}: could not check") for line in left)


def _record_hosts(run: Run, n: int, choice) -> None:
    """Attempt ``n``'s entry: the spare that replaces its culprit (or the culprit dropped), the
    hosts quarantined so far; the run's ``quarantined`` (shown by status)."""
    attempts = [dict(a, replaced=choice.replaced, quarantined=list(choice.quarantined),
                     **({"dropped": list(choice.dropped)} if choice.dropped else {}))
                if a.get("attempt") == n else a for a in run.data.get("attempts") or []]
    run.update(attempts=attempts, quarantined=list(choice.quarantined))
    if choice.dropped:
        entry = next(a for a in attempts if a.get("attempt") == n)
        run.event("shrunk", attempt=n + 1, dropped=list(choice.dropped), hosts=list(choice.hosts),
                  message=shrunk(entry))
        progress(f"recovery: no spare left for {', '.join(choice.dropped)}: attempt {n + 1} "
                 f"{shrunk(entry)} (nodes: MIN-MAX)")
    for old, new in choice.replaced.items():
        run.event("replaced", attempt=n + 1, host=old, spare=new)
        progress(f"recovery: {old} caused attempt {n}'s failure; attempt {n + 1} runs on spare {new} in its place")
    culprit = (run.data.get("attempts") or [{}])[-1].get("blame")
    if culprit in choice.quarantined:
        run.event("quarantined", host=culprit, attempt=n)


def _seed_spares(be, run: Run, plan, choice, dest: Path, every_node: bool, node0: str) -> None:
    """The latest checkpoint from storage (``dest``) onto each host that loads it and may not hold
    it: a new node 0 (rank 0 loads and broadcasts: a spare, or the next host where ``node0`` was
    dropped), or any spare where every rank loads it itself."""
    spares = set(choice.replaced.values())
    to = [be.inv.host(x.host) for x in plan.nodes
          if (x.host in spares and (every_node or x.node_rank == 0)) or (x.node_rank == 0 and x.host != node0)]
    latest = dest / "latest"
    if not to or not latest.exists():
        return
    import shutil
    name = latest.read_text().strip()
    here = run.dir / "checkpoints"
    if here.resolve() != dest.resolve():        # storage elsewhere: the run directory is what is pushed
        here.mkdir(parents=True, exist_ok=True)
        for f in (name, "latest"):
            shutil.copy2(dest / f, here / f)
    bad = [r for r in push_run_files(to, be.inv.ssh, run.id, run.dir, [f"checkpoints/{name}", "checkpoints/latest"])
           if not r.ok]
    if bad:
        raise RuntimeError("cannot copy the checkpoint to the spare: " + "; ".join(r.describe() for r in bad))
    progress(f"recovery: checkpoint {name} copied to {hostlist.fold([h.name for h in to])}")


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
