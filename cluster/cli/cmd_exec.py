import argparse
import sys

from cluster.spec import hostlist
from cluster.spec.config import load_inventory
from cluster.errors import UserError
from cluster.backends.fanout import run_argv, select
from cluster.backends.transport import render_folded
from cluster.cli import seconds

HELP = "run a command on every inventory host in parallel; identical output folded (clush -b)"


def add_arguments(p):
    p.add_argument("-i", "--inventory", help="inventory file (default: inventory.yaml)")
    p.add_argument("--hosts", metavar="RANGE", help="only these hosts, e.g. gpu[01-03]")
    p.add_argument("--run", metavar="RUN", help="on the hosts of this run, in its run directory (its job's cwd)")
    p.add_argument("--no-fold", action="store_true", help="print '[host] line' as it came, host by host")
    p.add_argument("--timeout-s", type=seconds, help="seconds per host (default: the inventory's command_timeout_s)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARG ... (passed as argv)")


def run(args):
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        raise UserError("no command given", where="exec", hint="python -m cluster exec -- nvidia-smi -L")
    cwd = None
    if args.run:        # the run's hosts, each in the run's directory there
        from cluster.backends.attach import target
        from cluster.spec.config import inventory_from_plain
        from cluster.run.records import resolve
        run = resolve(args.run)
        if run.data.get("backend") == "slurm":
            raise UserError("exec --run does not reach SLURM nodes", where="--run",
                            hint=f"python -m cluster shell {run.id} --node N (srun inside the job's allocation)")
        inv = inventory_from_plain(run.data["inventory"])
        nodes = [n["host"] for n in (run.data.get("plan") or {}).get("nodes", [])]
        cwd = {h: target(run.id, h).cwd for h in nodes}
        names = [n for n in select(inv, args.hosts) if n in cwd] if args.hosts else nodes
    else:
        inv = load_inventory(args.inventory)
        names = select(inv, args.hosts)
    results = run_argv(inv, names, argv, args.timeout_s, cwd)
    outputs = {h: r.stdout + r.stderr + (f"[{r.error}]\n" if r.error else "") for h, r in results.items()}
    if args.no_fold:
        for h in names:
            for line in outputs[h].splitlines():
                print(f"[{h}] {line}")
    else:
        print(render_folded(outputs), end="")
    failed = results.failed
    if failed:
        by_code: dict[str, list[str]] = {}
        for h, r in failed.items():
            by_code.setdefault(r.error or f"exit code {r.exit_code}", []).append(h)
        for why, hosts in sorted(by_code.items()):
            print(f"{why}: {hostlist.fold(sorted(hosts))}", file=sys.stderr)
        print(f"failed on {len(failed)} of {len(results)} host(s)", file=sys.stderr)
        return 1
    return 0
