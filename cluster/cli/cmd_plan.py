from cluster.submit import resolve

HELP = "print the plan of a job without starting anything (per-node command lines, or the sbatch script)"


def add_arguments(p):
    from cluster.cli import add_target
    add_target(p)
    p.add_argument("--run-id", help="use this run id (for reproducible output)")


def run(args):
    _, be, _, plan = resolve(args.job, args.overrides, args.inventory, args.backend, run_id=args.run_id)
    print(be.render(plan), end="")
    return 0
