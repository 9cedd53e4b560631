HELP = "a live view of a run: every rank's step, img/s, step time, data and communication wait, GPU use"


def add_arguments(p):
    p.add_argument("run", nargs="?", help="run id, prefix or job name (default: the latest run)")
    p.add_argument("--interval-s", type=float, default=3.0, help="seconds between refreshes (default 3)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (also when stdin is not a terminal)")
    p.add_argument("--bench", type=int, metavar="N", help="time N refreshes and print the median (no view)")


def run(args):
    from cluster.backends import backend_for
    from cluster.run.records import resolve
    from cluster.run.top import bench, top
    r = resolve(args.run)
    be = backend_for(r)
    be.with_gpus = True
    if args.bench:
        return bench(r.id, be, args.bench)
    return top(r.id, be, args.interval_s, args.once)
