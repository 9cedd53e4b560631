from cluster.backends.attach import jupyter, target
from cluster.cli import seconds

HELP = ("Jupyter (or a server you name) on a node, bound to its loopback with a token, "
        "forwarded here through ssh; stops with the run or Ctrl-C")


def add_arguments(p):
    p.add_argument("run", nargs="?", help="run id, prefix or job name; leave out (or use --host) for no run")
    p.add_argument("--node", metavar="N", help="node rank or host name of the run (default: node 0)")
    p.add_argument("--host", metavar="HOST", help="an inventory host, without a run")
    p.add_argument("-i", "--inventory", help="inventory file for --host (default: inventory.yaml)")
    p.add_argument("--port", type=int, metavar="PORT", help="local port (default: the node's port if free here)")
    p.add_argument("--ready-timeout-s", type=seconds, default=120.0,
                   help="seconds for the server to listen before giving up (default 120)")
    p.set_defaults(command=[])
    p.epilog = ("After '--', another server to run instead of JupyterLab, as argv; {port}, {token} and "
                "{python} are filled in, e.g. -- python3 -m http.server {port} --bind 127.0.0.1")


def run(args):
    command = args.command
    if args.host and args.run:
        from cluster.errors import UserError
        raise UserError("give a run or --host, not both", where="jupyter", hint="--node picks a node of the run")
    need_run = args.run is not None
    t = target(args.run, args.node, args.inventory, args.host, need_run=need_run)
    return jupyter(t, command, args.port, ready_timeout_s=args.ready_timeout_s)
