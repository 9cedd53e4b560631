from cluster.run.records import resolve

HELP = "draw loss, throughput per rank and step time of a run as a PNG and print a summary table"


def add_arguments(p):
    p.add_argument("run", nargs="?", help="run id, prefix or job name (default: the latest run)")
    p.add_argument("-o", "--output", help="PNG path (default: runs/<id>/report.png)")


def run(args):
    from cluster.backends import backend_for
    from cluster.run.report import report
    r = resolve(args.run)
    return report(r, backend_for(r), args.output)
