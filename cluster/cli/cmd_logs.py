import sys

from cluster.backends import backend_for
from cluster.run.diagnose import render_failure
from cluster.run.logs import follow_run
from cluster.run.records import Run, resolve

HELP = "print a run's logs from every node as one stream (-f follows until the run ends)"


def add_arguments(p):
    p.add_argument("run", nargs="?", help="run id, unique prefix or job name (default: the latest run)")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming until the run ends")
    p.add_argument("--host", help="only this host's lines")
    p.add_argument("--rank", type=int, help="only this global rank's lines")
    p.add_argument("--grep", metavar="REGEX", help="only lines matching REGEX")
    p.add_argument("--collect", action="store_true",
                   help="copy every node's log files into runs/<id>/logs (remote backends)")


def run(args):
    r = resolve(args.run)
    if args.collect:
        be = backend_for(r)
        be.collect_logs(r)
        print(f"logs of {r.id} are in {r.dir / 'logs'}")
        return 0
    code = follow_run(r, backend_for(r), follow=args.follow, host=args.host, rank=args.rank, pattern=args.grep)
    _diagnosis(Run(r.id, r.dir.parent))   # a fresh read: following may have seen the run end
    return code


def _diagnosis(r):
    """For a failed run: the first failing host and rank and the known failures in its logs."""
    if not r.data.get("final"):
        from cluster.errors import UserError
        try:
            backend_for(r).status(r)
        except UserError:
            return
    if r.data.get("state") == "FAILED" and r.data.get("failure"):
        # stderr: stdout stays the log itself, for pipes and grep
        print("\n".join(["-- diagnosis"] + render_failure(r.data["failure"], tail=0)), file=sys.stderr)
