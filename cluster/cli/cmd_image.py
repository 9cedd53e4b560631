from cluster.spec.config import load_inventory
from cluster.errors import UserError
from cluster.backends.fanout import select

HELP = "image push IMAGE: copy a container image to every host that lacks it (no registry needed)"


def add_arguments(p):
    p.add_argument("action", choices=["push"])
    p.add_argument("image", help="local image (docker/podman name or ID) or an apptainer .sif path")
    p.add_argument("-i", "--inventory", help="inventory file (default: inventory.yaml)")
    p.add_argument("--hosts", metavar="RANGE", help="only these hosts (default: all)")
    p.add_argument("--runtime", choices=["docker", "podman", "apptainer"],
                   help="default: the hosts' container_runtime from the inventory, else podman (apptainer for a .sif)")
    p.add_argument("--fanout", type=int, default=4, help="hosts copied to at a time (default: 4)")


def run(args):
    from cluster.backends.image_push import push
    inv = load_inventory(args.inventory)
    if inv.backend == "local":
        raise UserError("image push copies to ssh hosts; this inventory's backend is local", where=inv.path,
                        key="backend", hint="give an inventory with ssh hosts (-i rack.yaml)")
    names = select(inv, args.hosts)
    runtime = args.runtime
    if runtime is None:
        found = {inv.host(n).container_runtime for n in names} - {None}
        if len(found) > 1:
            raise UserError(f"the hosts use different runtimes ({', '.join(sorted(found))})", where="--hosts",
                            hint="push per runtime: --hosts ... --runtime ...")
        runtime = found.pop() if found else ("apptainer" if args.image.endswith(".sif") else "podman")
    if args.fanout < 1:
        raise UserError("must be at least 1", where="--fanout")
    status = push(inv, names, args.image, runtime, fanout=args.fanout)
    copied = sorted(h for h, s in status.items() if s == "copied")
    print(f"ok: {args.image} on {len(status)} host(s); copied to {len(copied)}"
          + (f" ({', '.join(copied)})" if copied else ""))
    return 0
