HELP = "serve the TensorBoard event files of one or more runs on this machine and print the URL"


def add_arguments(p):
    p.add_argument("runs", nargs="*", metavar="RUN", help="run ids, prefixes or job names (default: the latest run)")
    p.add_argument("--port", type=int, default=6006, help="local port (default 6006; 0: any free one)")


def run(args):
    from ..report import serve_tensorboard
    from ..runs import resolve
    return serve_tensorboard([resolve(a) for a in (args.runs or [None])], args.port)
