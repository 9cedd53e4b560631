import sys

from cluster.run.records import Run, resolve
from cluster.backends import backend_for
from cluster.cli import seconds

HELP = "stop a run: TERM its process groups, wait, KILL, then verify nothing of it is left"


def add_arguments(p):
    p.add_argument("run", nargs="?", help="run id, unique prefix or job name (default: the latest run)")
    p.add_argument("--grace-s", type=lambda t: seconds(t, zero_ok=True), default=10.0, help="seconds between TERM and KILL (default 10)")


def run(args):
    r = resolve(args.run)
    if r.damaged:
        return _stop_damaged(r, args.grace_s)
    be = backend_for(r)
    print(f"stopping {r.id} ...", file=sys.stderr)
    left = be.stop(r, grace_s=args.grace_s)
    if left:
        print("still running after KILL:\n  " + "\n  ".join(left), file=sys.stderr)
        return 1
    print(f"{r.id}: {r.state.value}; nothing of the run is left running")
    return 0


def _stop_damaged(r, grace_s):
    """A run whose run.json does not read: its hosts, backend and process groups come from the
    record before its last write (run.json.prev); without one, the processes on this machine that
    carry its CLUSTER_RUN_ID are stopped. The damaged record is left as it is, for the user."""
    print(r.damaged.render().replace("error: ", "warning: ", 1).split("\n")[0], file=sys.stderr)
    good = r.last_good()
    if good is not None and good.get("backend") and good.get("inventory"):
        view = Run(r.id, r.dir.parent)
        view._data = good            # read only: nothing is saved over the damaged record
        be = backend_for(view)
        print(f"stopping {r.id} on {', '.join(n['host'] for n in good.get('plan', {}).get('nodes', []))} "
              f"(hosts and process groups from {r.prev_path.name}) ...", file=sys.stderr)
        left = be.stop_nodes(view, grace_s)
    else:
        from cluster.backends.local import stop_by_run_id
        print(f"stopping {r.id}: no readable copy of its record; stopping what carries its "
              f"CLUSTER_RUN_ID on this machine ...", file=sys.stderr)
        left = stop_by_run_id(r.id, grace_s)
    r.event("stop", requested=True, damaged_record=True)
    if left:
        print("still running after KILL:\n  " + "\n  ".join(left), file=sys.stderr)
        return 1
    print(f"{r.id}: stopped; nothing of the run is left running (its record is still damaged)")
    return 0
