import sys

from ..runs import resolve
from ..submit import backend_for
from . import seconds

HELP = "stop a run: TERM its process groups, wait, KILL, then verify nothing of it is left"


def add_arguments(p):
    p.add_argument("run", nargs="?", help="run id, unique prefix or job name (default: the latest run)")
    p.add_argument("--grace-s", type=lambda t: seconds(t, zero_ok=True), default=10.0, help="seconds between TERM and KILL (default 10)")


def run(args):
    r = resolve(args.run)
    be = backend_for(r)
    print(f"stopping {r.id} ...", file=sys.stderr)
    left = be.stop(r, grace_s=args.grace_s)
    if left:
        print("still running after KILL:\n  " + "\n  ".join(left), file=sys.stderr)
        return 1
    print(f"{r.id}: {r.state.value}; nothing of the run is left running")
    return 0
