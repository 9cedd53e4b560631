import json

from cluster.spec.config import load_inventory
from cluster.backends.fanout import run_argv, select

HELP = "one table of every host's GPUs: name, memory, utilisation, and the run and user holding each"

# Runs on each host with its python (standard library only): nvidia-smi's answers plus, for each
# process on a GPU, its user and the run id it inherited.
_PROBE = r'''
import json, os, pwd, shutil, subprocess
smi = shutil.which("nvidia-smi")
if not smi:
    print(json.dumps({"error": "no GPU (nvidia-smi not found)"})); raise SystemExit
q = lambda *a: subprocess.run([smi, *a, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
gpus = [dict(zip(("index", "uuid", "name", "used", "total", "util"), [x.strip() for x in l.split(",")]))
        for l in q("--query-gpu=index,uuid,name,memory.used,memory.total,utilization.gpu").splitlines() if l.strip()]
for l in q("--query-compute-apps=gpu_uuid,pid").splitlines():
    if "," not in l: continue
    uuid, pid = [x.strip() for x in l.split(",")]
    try:
        user = pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        run = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"CLUSTER_RUN_ID=")), "-")
    except OSError:
        user, run = "?", "?"
    for g in gpus:
        if g["uuid"] == uuid:
            g.setdefault("holders", []).append(f"{run}/{user}")
print(json.dumps({"gpus": gpus}))
'''


def add_arguments(p):
    p.add_argument("-i", "--inventory", help="inventory file (default: inventory.yaml)")
    p.add_argument("--hosts", metavar="RANGE", help="only these hosts")


def run(args):
    inv = load_inventory(args.inventory)
    names = select(inv, args.hosts)
    pythons = {inv.host(n).python for n in names}
    python = pythons.pop() if len(pythons) == 1 else "python3"
    results = run_argv(inv, names, [python, "-c", _PROBE])
    rows = [("HOST", "GPU", "NAME", "MEMORY (MiB)", "UTIL", "HELD BY (run/user)")]
    for h in names:
        r = results[h]
        try:
            info = json.loads(r.stdout.strip().splitlines()[-1]) if r.ok else {"error": r.describe(1)}
        except (ValueError, IndexError):
            info = {"error": "unreadable answer"}
        if "error" in info:
            rows.append((h, "-", info["error"], "", "", ""))
            continue
        for g in info["gpus"]:
            rows.append((h, g["index"], g["name"], f"{g['used']}/{g['total']}", f"{g['util']}%",
                         ", ".join(g.get("holders", [])) or "free"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 1 if results.failed else 0
