from ..submit import resolve

HELP = "check that a job can start: hosts reachable, GPUs, versions, disk, ports (changes nothing)"


def add_arguments(p):
    p.add_argument("job", nargs="?", default="resnet50", help="job to check for (default: resnet50)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("-i", "--inventory", help="inventory file (default: inventory.yaml)")
    p.add_argument("-b", "--backend", help="local, ssh or slurm (default: from the inventory)")


def run(args):
    inv, be, loaded, plan = resolve(args.job, args.overrides, args.inventory, args.backend)
    for n in plan.notes:
        print(n)
    be.check_only = True
    be.preflight(plan)
    hosts = ", ".join(n.host for n in plan.nodes)
    print(f"ok: {len(plan.nodes)} node(s) ({hosts}), {plan.nodes[0].nprocs} process(es) per node, "
          f"rendezvous {plan.rdzv_endpoint}; backend {inv.backend}")
    return 0
