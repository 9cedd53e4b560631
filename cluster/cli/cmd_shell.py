
from cluster.backends.attach import shell, target

HELP = "an interactive shell on a node of a run, in the run's directory (inside its container, if any)"


def add_arguments(p):
    p.add_argument("run", nargs="?", help="run id, unique prefix or job name (default: the latest run)")
    p.add_argument("--node", metavar="N", help="node rank or host name (default: node 0)")


def run(args):
    return shell(target(args.run, args.node))
