"""The detached watcher of an ssh run (``python -m cluster.backends.watcher watch RUN``), one per run.

Until the run ends it keeps node 0's checkpoints synced (every ``checkpoint.sync_every_s``) and
polls the run's status, which stops every node if one failed (the agents' gang does the same
without it); at the end it makes one last checkpoint pass and collects metrics and logs. It lives
in its own session, so closing the submitting terminal does not end it. What it records (the
run's end, as its status poll finds it; events) goes through the run's one writer
(cluster/run/records.py), so `status` and `logs -f` recording at the same time lose nothing.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

from cluster.backends import backend_for
from cluster.backends.rsync import pull_checkpoints, pull_logs, pull_metrics
from cluster.run.checkpoints import _latest, checkpoint_path
from cluster.run.records import Run, State

GIVE_UP_S = float(os.environ.get("CLUSTER_WATCH_GIVE_UP_S", "1800"))   # no host answering this long
QUIET_START_S = 15.0



def watch(run_id: str, poll_s: float = 5.0) -> int:
    """Detached, one per ssh run: keep node 0's checkpoints synced until the run ends, then once more.

    It also polls the run's status, which stops every node if one failed (the agents' gang does the
    same without it), and collects the logs at the end.
    """
    try:
        os.nice(10)         # a helper: the run's own processes (here too, on a one-box cluster) come first
    except OSError:
        pass
    # the first seconds belong to the run starting (every host imports torch): poll once it is up
    time.sleep(QUIET_START_S)
    first = Run(run_id)
    be = backend_for(first)
    every_s = (first.data.get("job", {}).get("resolved", {}).get("checkpoint", {}) or {}).get("sync_every_s", 60)
    node0 = be.inv.host(first.data["plan"]["nodes"][0]["host"])
    dest = Path(first.data.get("checkpoint_dir") or first.dir / "checkpoints")
    own = checkpoint_path(first.data)
    last_sync = last_seen = time.time()
    while True:
        time.sleep(poll_s)
        run = Run(run_id, first.dir.parent)
        try:
            state, nodes = be.status(run)
            if any(n.state != State.UNKNOWN for n in nodes) or state.is_terminal():
                last_seen = time.time()
        except Exception as e:   # noqa: BLE001 -- a flaky host must not end the watcher
            print(f"status: {e}", flush=True)
            if run.damaged:     # nothing to follow without a record; 'stop RUN' still stops the run
                be.close()
                return 1
            state = run.state
        if state.is_terminal():
            break
        if state == State.RESTARTING:       # automatic recovery: this watcher owns the relaunch
            from cluster.backends.relaunch import relaunch
            try:
                relaunch(be, run_id, first.dir.parent)
            except Exception as e:   # noqa: BLE001 -- recorded: the run ends FAILED, saying why
                from cluster.backends.relaunch import give_up
                print(f"recovery: {type(e).__name__}: {e}", flush=True)
                give_up(Run(run_id, first.dir.parent), f"the relaunch failed: {type(e).__name__}: {e}")
            # the next attempt's node 0 (a spare may have taken its place) holds the checkpoints
            node0 = be.inv.host(Run(run_id, first.dir.parent).data["plan"]["nodes"][0]["host"])
            last_seen = time.time()
            continue
        if time.time() - last_seen > GIVE_UP_S:
            print(f"no host of the run answered for {GIVE_UP_S:g} s; giving up "
                  f"('python -m cluster logs {run_id} --collect' and 'status' still work later)", flush=True)
            run.event("checkpoints-synced", ok=False, files=0, latest=_latest(dest, own),
                      error=f"no host of the run answered for {GIVE_UP_S:g} s; the watcher gave up")
            be.close()
            return 1
        if time.time() - last_sync >= every_s:
            last_sync = time.time()
            if node0.name not in be.unanswered:     # cut off: rsync would wait out its connect timeout
                r = pull_checkpoints(node0, be.inv.ssh, run_id, dest, own)
                print(f"checkpoints: {r.describe()}", flush=True)
            _pull_metrics(be, run, skip=be.unanswered)
    r = pull_checkpoints(node0, be.inv.ssh, run_id, dest, own)
    print(f"checkpoints (final): {r.describe()}", flush=True)
    run = Run(run_id, first.dir.parent)
    run.event("checkpoints-synced", ok=r.ok, files=r.files, error=r.error or None, latest=_latest(dest, own))
    _pull_metrics(be, run)
    hosts = [be.inv.host(n["host"]) for n in run.data["plan"]["nodes"]]
    for r in pull_logs(hosts, be.inv.ssh, run_id, run.dir / "logs"):
        print(f"logs: {r.describe()}", flush=True)
    be.close()
    return 0


def _pull_metrics(be, run, skip=frozenset()) -> None:
    """The metrics and TensorBoard files of every host (but ``skip``), with the checkpoints (report, tensorboard)."""
    hosts = [be.inv.host(n["host"]) for n in run.data["plan"]["nodes"] if n["host"] not in skip]
    for r in pull_metrics(hosts, be.inv.ssh, run.id, run.dir / "metrics"):
        if not r.ok:
            print(f"metrics: {r.describe()}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m cluster.backends.watcher")
    sub = ap.add_subparsers(dest="verb", required=True)
    w = sub.add_parser("watch", help="sync a run's checkpoints until it ends")
    w.add_argument("run_id")
    w.add_argument("--poll-s", type=float, default=5.0)
    args = ap.parse_args(argv)
    return watch(args.run_id, args.poll_s)


if __name__ == "__main__":
    sys.exit(main())
