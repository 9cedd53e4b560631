from cluster.submit import resolve, submit

HELP = "start a job (preflight first; nothing starts anywhere if a check fails)"


def add_arguments(p):
    from cluster.cli import add_target
    add_target(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan (per-node commands) and exit")
    p.add_argument("--resume", metavar="RUN", help="continue from RUN's latest checkpoint")
    p.add_argument("--follow", "-f", action="store_true", help="stream the logs until the run ends")


def run(args):
    if args.dry_run:
        _, be, _, plan = resolve(args.job, args.overrides, args.inventory, args.backend)
        print(be.render(plan), end="")
        return 0
    r = submit(args.job, args.overrides, args.inventory, args.backend, resume=args.resume)
    print(f"run {r.id} started ({r.data['backend']}, {len(r.data['plan']['nodes'])} node(s), "
          f"world size {r.data['plan']['world_size']})")
    print(f"  logs:   python -m cluster logs {r.id} -f      (make logs RUN={r.id} FOLLOW=1)")
    print(f"  status: python -m cluster status {r.id}")
    print(f"  stop:   python -m cluster stop {r.id}")
    if args.follow:
        from cluster.run.logs import follow_run
        from cluster.backends import backend_for
        return follow_run(r, backend_for(r), follow=True)
    return 0
