import getpass

from cluster.spec import hostlist
from cluster.submit import resolve

HELP = "check that a job can start: hosts reachable, GPUs, versions, disk, ports (changes nothing); --deep: GPU health and network bandwidth too"

# Runs on each host (its python, standard library only): the sshd serving this very session and
# whether its config lets root log in with a password. The listener is an ancestor of this process;
# its title keeps its argv ("sshd: /usr/sbin/sshd -D -f CONFIG ... [listener]"). Read as text, as
# sshd does: the first value of a keyword wins, Include is expanded in place, Match blocks (which
# apply to some clients only) are left out. Defaults are OpenSSH's.
_SSHD_PROBE = r'''
import glob, os, re
def cmdline(pid):
    return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
pid, cfg = os.getppid(), None
while pid > 1 and cfg is None:
    line = cmdline(pid)
    if "sshd" in line and ("listener" in line or " -D" in line):
        m = re.search(r" -f\s*(\S+)", line)
        cfg = m.group(1) if m else "/etc/ssh/sshd_config"
    pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
cfg = cfg or "/etc/ssh/sshd_config"
seen = {}
def read(path):
    for raw in open(path, errors="replace"):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        key = words[0].lower()
        if key == "match":
            return False
        if key == "include":
            for pat in words[1:]:
                for p in sorted(glob.glob(pat if pat.startswith("/") else "/etc/ssh/" + pat)):
                    if read(p) is False:
                        return False
        elif len(words) > 1:
            seen.setdefault(key, words[1].lower())
try:
    read(cfg)
except OSError as e:
    print("unreadable", cfg, e.strerror); raise SystemExit
root = seen.get("permitrootlogin", "prohibit-password")
pw = seen.get("passwordauthentication", "yes") == "yes" or \
     seen.get("kbdinteractiveauthentication", seen.get("challengeresponseauthentication", "yes")) == "yes"
print("root-password" if root == "yes" and pw else "ok", cfg)
'''


def add_arguments(p):
    p.add_argument("job", nargs="?", default="resnet50", help="job to check for (default: resnet50)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("-i", "--inventory", help="inventory file (default: inventory.yaml)")
    p.add_argument("-b", "--backend", help="local, ssh or slurm (default: from the inventory)")
    p.add_argument("--deep", action="store_true",
                   help="also GPU health (ECC, XID, a matmul) and an all-reduce bandwidth test across the hosts; "
                        "pairwise tests name a slow host or link (ssh backend; the job's preflight: deep does it too)")
    p.add_argument("--min-busbw-gbps", type=float, metavar="GBIT_S",
                   help="the all-reduce threshold (default: the job's min_busbw_gbps, else one per GPU type)")


def root_login_warnings(inv, hosts) -> list[str]:
    """Warnings (never errors) about logging in as root: the inventory's user, the hosts' sshd."""
    out = []
    ssh_hosts = [h for h in hosts if inv.backend == "ssh" and not h.is_local]
    as_root = [h.name for h in ssh_hosts if (h.user or getpass.getuser()) == "root"]
    if as_root:
        out.append(f"warning: {hostlist.fold(as_root)}: the inventory logs in as root (user: root). Remedy: "
                   "give each person an account on the hosts and set user: <name> in the inventory; "
                   "containers run as that user, files on mounted volumes stay theirs")
    if ssh_hosts:
        from cluster.backends.transport import Pool
        from cluster.quoting import quote_argv
        with Pool(ssh_hosts, inv.ssh) as pool:     # unreachable hosts: the preflight says so next
            res = pool.run({h.name: quote_argv([h.python, "-c", _SSHD_PROBE]) for h in ssh_hosts}, timeout_s=30)
        bad = {}
        for name, r in res.items():
            words = r.stdout.split() if r.ok else []
            if words[:1] == ["root-password"]:
                bad.setdefault(words[1], []).append(name)
        for cfg, names in sorted(bad.items()):
            out.append(f"warning: {hostlist.fold(names)}: sshd lets root log in with a password ({cfg}). "
                       "Remedy: set 'PermitRootLogin prohibit-password' (or 'no') and "
                       "'PasswordAuthentication no' there, then reload sshd (systemctl reload ssh)")
    return out


def run(args):
    inv, be, loaded, plan = resolve(args.job, args.overrides, args.inventory, args.backend)
    for n in plan.notes:
        print(n)
    for w in root_login_warnings(be.inv, [be.inv.host(n.host) for n in plan.nodes]):
        print(w)
    be.check_only = True
    be.preflight(plan)
    if args.deep or loaded.job.preflight == "deep":
        from cluster.backends.deepcheck import deep_preflight
        deep_preflight(be, plan, args.min_busbw_gbps or loaded.job.min_busbw_gbps, what="doctor --deep")
    hosts = ", ".join(n.host for n in plan.nodes)
    print(f"ok: {len(plan.nodes)} node(s) ({hosts}), {plan.nodes[0].nprocs} process(es) per node, "
          f"rendezvous {plan.rdzv_endpoint}; backend {inv.backend}")
    return 0
