"""SSH launch and log-merge speed of the ssh backend, against pdsh, on namespace hosts.

    sudo .venv/bin/python bench/bench_launch.py [--sizes 1,2,4,8] [--reps 3] [--out DIR]

Builds its own hosts (network namespaces bench1..N on bridge ddpbn0, 10.214.0.0/24, one real
sshd each; apart from the test suite's cluster in a box) and takes them down at the end. With
``--loopback`` (a machine without `ip`, veth or bridges, e.g. a bare GPU machine)
the hosts are sshds on 127.0.1.11.. in this network namespace, each in its own UTS namespace
(its own hostname); what a launch does over ssh is the same.

Launch: for each host count, alternately (same hosts, same minute):
  * ours: ``python -m cluster submit`` in a fresh process: preflight probe on every host (versions,
    ports, disk, leftovers, code check), code sync if needed, launch, watcher start; with warm
    start (the default: each probe parks the node's agent; torchrun and a fork server for its
    workers import torch meanwhile, and the workers are forked from that server);
  * ours-cold: the same with ``ssh.warm_start: false`` (the agents start at GO, as pdsh's do);
  * pdsh: ``pdsh -R ssh`` running the very same per-node shell lines (NodeLaunch.shell(), written
    to one script per host beforehand), i.e. launch without preflight or sync.
Each rank (``python -m bench.bench_launch payload``, one per host under torchrun) records when
its process started and when ``init_process_group`` returned. Reported from the start of the
submit/pdsh command: ``returned`` (the command came back: every agent started), ``started``
(every rank's process is up) and ``joined`` (every rank passed the rendezvous).

Logs: one writer per host appends ``[host r] seq=N t=...`` lines into that host's log file;
the merger (cluster/run/logs.py Merger over the backend's SFTP log sources, polled as ``logs -f``
does) reads them; reported: lines/s through the merger, write-to-merged latency (p50/p99/max),
and that no line is missing or repeated.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BRIDGE, PREFIX, VETH = "ddpbn0", "10.214.0.", "bnv"


# ---------------------------------------------------------------- the payload (each rank)
def payload(marker_dir: str) -> None:
    t_start = time.time()
    import torch.distributed as dist
    dist.init_process_group("gloo")
    t_joined = time.time()
    rank = dist.get_rank()
    tmp = Path(marker_dir, f".rank{rank}.tmp")    # whole or absent: the bench polls for these
    tmp.write_text(json.dumps({"started": t_start, "joined": t_joined}))
    tmp.rename(Path(marker_dir, f"rank{rank}.json"))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- namespace hosts
def bench_pids() -> list[int]:
    """Processes started by this bench's launches: each carries CLUSTER_RUN_ID=benchlaunch-..."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if b"CLUSTER_RUN_ID=benchlaunch-" in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def kill(pids, group: bool = False) -> None:
    for pid in pids:
        try:
            (os.killpg if group else os.kill)(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def sh(*argv, check=True, **kw):
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=True, **kw)


SSHD = os.environ.get("BENCH_SSHD") or shutil.which("sshd") or "/usr/sbin/sshd"   # an absolute path


class Hosts:
    def __init__(self, n: int, loopback: bool = False, shared_fs: bool = False,
                 host_env: dict[str, dict[str, str]] | None = None):
        self.n = n
        # per host, variables its ssh sessions get (authorized_keys `environment=`): e.g. a GPU
        # subset per host with CUDA_VISIBLE_DEVICES, so two "nodes" of one machine hold different GPUs
        self.host_env = host_env or {}
        self.loopback = loopback
        self.shared_fs = shared_fs   # every host works in this checkout (no code sync)
        self.sd = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
        self.names = [f"bench{i}" for i in range(1, n + 1)]
        prefix = "127.0.1." if loopback else PREFIX
        self.addr = {name: f"{prefix}{10 + i}" for i, name in enumerate(self.names, 1)}
        self.interface = "lo" if loopback else "eth0"
        sys.path.insert(0, str(REPO))
        from cluster.node.probe import _gpu_count
        self.gpus = _gpu_count({})   # what preflight finds on every host: they are all this machine
        for env in self.host_env.values():
            if "CUDA_VISIBLE_DEVICES" in env:
                self.gpus = len(env["CUDA_VISIBLE_DEVICES"].split(","))
        self.pids: dict[str, int] = {}

    def up(self) -> None:
        sys.path.insert(0, str(REPO))
        from tests.testbed.sshd import SSHD_CONFIG    # the cluster in a box's sshd settings
        sd = self.sd
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", sd / "client_key")
        (sd / "authorized_keys").write_text((sd / "client_key.pub").read_text())
        (sd / "sshd_config").write_text(SSHD_CONFIG.format(sd=sd, marker="ddp launch bench"))
        (sd / "logs").mkdir()
        os.makedirs("/run/sshd", exist_ok=True)
        if self.loopback:
            # another bench's hosts on these addresses would answer the wait below for ours
            for name, addr in self.addr.items():
                try:
                    socket.create_connection((addr, 22), timeout=0.5).close()
                except OSError:
                    continue
                raise RuntimeError(f"{addr}:22 already answers (another bench's loopback hosts?): "
                                   "wait for it to end")
        if not self.loopback:
            sh("ip", "link", "add", BRIDGE, "type", "bridge")
            sh("ip", "addr", "add", f"{PREFIX}1/24", "dev", BRIDGE)
            sh("ip", "link", "set", BRIDGE, "up")
        known = []
        for i, name in enumerate(self.names, 1):
            hd = sd / "hosts" / name
            (hd / "work").mkdir(parents=True)
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hd / "host_key")
            known.append(f"{self.addr[name]} " + " ".join((hd / "host_key.pub").read_text().split()[:2]))
            sshd = [SSHD, "-D", "-f", sd / "sshd_config", "-h", hd / "host_key",
                    "-o", f"ListenAddress={self.addr[name]}", "-o", f"PidFile={sd}/sshd-{name}.pid",
                    "-E", sd / "logs" / f"sshd-{name}.log"]
            if name in self.host_env:
                opts = ",".join(f'environment="{k}={v}"' for k, v in self.host_env[name].items())
                (hd / "authorized_keys").write_text(f"{opts} " + (sd / "client_key.pub").read_text())
                sshd += ["-o", f"AuthorizedKeysFile={hd / 'authorized_keys'}", "-o", "PermitUserEnvironment=yes"]
            if self.loopback:
                # its own hostname (UTS namespace); the network is this one's loopback
                argv = ["unshare", "--uts", "sh", "-c", 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"',
                        name, *sshd]
                self.pids[name] = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                   start_new_session=True).pid
                continue
            sh("ip", "netns", "add", name)
            sh("ip", "link", "add", f"{VETH}{i}", "type", "veth", "peer", "name", f"{VETH}p{i}")
            sh("ip", "link", "set", f"{VETH}p{i}", "netns", name)
            sh("ip", "link", "set", f"{VETH}{i}", "master", BRIDGE, "up")
            sh("ip", "-n", name, "link", "set", f"{VETH}p{i}", "name", "eth0")
            sh("ip", "-n", name, "addr", "add", f"{self.addr[name]}/24", "dev", "eth0")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
            sh("ip", "-n", name, "link", "set", "lo", "up")
            argv = ["nsenter", f"--net=/run/netns/{name}", "unshare", "--uts", "sh", "-c",
                    'hostname "$0" && exec "$@"', name, *sshd]
            self.pids[name] = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True).pid
        (sd / "known_hosts").write_text("\n".join(known) + "\n")
        deadline = time.time() + 20
        for name in self.names:
            while True:
                try:
                    socket.create_connection((self.addr[name], 22), timeout=0.5).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        log = sd / "logs" / f"sshd-{name}.log"
                        raise RuntimeError(f"sshd on {name} did not come up: "
                                           + (log.read_text()[-600:] if log.exists() else "no log"))
                    time.sleep(0.05)

    def inventory(self, n: int, warm: bool = True) -> Path:
        lines = ["backend: ssh", "defaults:", "  user: root", "  port: 22",
                 f"  identity_file: {self.sd / 'client_key'}", f"  python: {sys.executable}", f"  gpus: {self.gpus}",
                 f"  interface: {self.interface}", f"shared_fs: {str(self.shared_fs).lower()}", "ssh:",
                 f"  known_hosts: {self.sd / 'known_hosts'}", "  connect_timeout_s: 10",
                 f"  warm_start: {str(warm).lower()}", "hosts:"]
        for name in self.names[:n]:
            lines += [f"  - name: {name}", f"    hostname: {self.addr[name]}", f"    address: {self.addr[name]}",
                      f"    workdir: {REPO if self.shared_fs else self.sd / 'hosts' / name / 'work'}"]
        p = self.sd / f"inventory-{n}{'' if warm else '-cold'}.yaml"
        p.write_text("\n".join(lines) + "\n")
        return p

    def busy(self, n: int) -> int:
        """How many processes of launches run on the first n hosts (sshd itself not counted)."""
        if self.loopback:
            return len(bench_pids())
        return sum(len(sh("ip", "netns", "pids", name, check=False).stdout.split()) - 1 for name in self.names[:n])

    def down(self) -> None:
        if self.loopback:
            # the sshds (their process groups), then what the bench's runs left
            kill(self.pids.values(), group=True)
            kill(bench_pids())
            shutil.rmtree(self.sd, ignore_errors=True)
            if self.shared_fs:      # the hosts' run directories were in this checkout's runs/
                for d in (REPO / "runs").glob("*"):
                    if d.name.startswith(("benchlaunch-", "logbench-")):
                        shutil.rmtree(d, ignore_errors=True)
            return
        for name in self.names:
            # everything in the namespace: sshd, its sessions, anything a run left behind
            out = sh("ip", "netns", "pids", name, check=False).stdout.split()
            kill([int(p) for p in out] + ([self.pids[name]] if name in self.pids else []))
        time.sleep(0.3)
        for i, name in enumerate(self.names, 1):
            sh("ip", "netns", "del", name, check=False)
            sh("ip", "link", "del", f"{VETH}{i}", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        shutil.rmtree(self.sd, ignore_errors=True)


# ---------------------------------------------------------------- launch timing
def job_file(sd: Path, markers: Path) -> Path:
    p = sd / "bench-job.yaml"
    p.write_text("name: benchlaunch\nmodule: bench.bench_launch\ncpu_procs_per_node: 1\n"
                 f"args: [payload, '{markers}']\n")
    return p


def wait_markers(markers: Path, world: int, timeout: float = 300) -> tuple[float, float]:
    deadline = time.time() + timeout
    while True:
        files = list(markers.glob("rank*.json"))
        if len(files) == world:
            data = [json.loads(f.read_text()) for f in files]
            return max(d["started"] for d in data), max(d["joined"] for d in data)
        if time.time() > deadline:
            raise RuntimeError(f"only {len(files)} of {world} ranks after {timeout}s in {markers}")
        time.sleep(0.05)


def quiet(hosts: Hosts, n: int, timeout=60) -> None:
    """Wait until no process of an earlier launch runs on the hosts (each run ends by itself)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if hosts.busy(n) <= 0:
            return
        time.sleep(0.2)


def run_ours(hosts: Hosts, n: int, runs: Path, env: dict, warm: bool = True, extra: tuple = ()) -> dict:
    markers = hosts.sd / "markers" / f"ours-{n}-{time.time_ns()}"
    markers.mkdir(parents=True)
    job = job_file(hosts.sd, markers)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "cluster", "submit", str(job), "-i", str(hosts.inventory(n, warm)),
                        *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    t_ret = time.time()
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    started, joined = wait_markers(markers, n)
    rid = p.stdout.split()[1]
    # how many nodes started torchrun from a warm interpreter (their agents say so in the node log)
    warm_nodes = 0
    for name in hosts.names[:n]:
        wd = REPO if hosts.shared_fs else hosts.sd / "hosts" / name / "work"
        log = wd / "runs" / rid / "logs" / f"{name}.log"
        warm_nodes += log.exists() and "torchrun from a warm interpreter" in log.read_text()
    return {"returned": t_ret - t0, "started": started - t0, "joined": joined - t0, "warm_nodes": warm_nodes}


def run_pdsh(hosts: Hosts, n: int, env: dict) -> dict:
    sys.path.insert(0, str(REPO))
    from cluster.submit import resolve
    markers = hosts.sd / "markers" / f"pdsh-{n}-{time.time_ns()}"
    markers.mkdir(parents=True)
    job = job_file(hosts.sd, markers)
    _, be, _, plan = resolve(str(job), [], str(hosts.inventory(n)), None)
    be.close()
    scripts = hosts.sd / "launch"
    scripts.mkdir(exist_ok=True)
    for node in plan.nodes:
        (scripts / f"{hosts.addr[node.host]}.sh").write_text(f"( {node.shell()} ) </dev/null >/dev/null 2>&1\n")
    targets = ",".join(hosts.addr[name] for name in hosts.names[:n])
    penv = {**env, "PDSH_RCMD_TYPE": "ssh",
            "PDSH_SSH_ARGS_APPEND": f"-i {hosts.sd / 'client_key'} -o IdentitiesOnly=yes -o BatchMode=yes "
                                    f"-o UserKnownHostsFile={hosts.sd / 'known_hosts'} -o StrictHostKeyChecking=yes"}
    t0 = time.time()
    p = subprocess.run(["pdsh", "-R", "ssh", "-f", "64", "-l", "root", "-w", targets, f"sh {scripts}/%h.sh"],
                       env=penv, capture_output=True, text=True, timeout=300)
    t_ret = time.time()
    if p.returncode != 0:
        raise RuntimeError(p.stdout + p.stderr)
    started, joined = wait_markers(markers, n)
    return {"returned": t_ret - t0, "started": started - t0, "joined": joined - t0}


def bench_launch(hosts: Hosts, sizes: list[int], reps: int, env: dict, log) -> dict:
    runs = Path(env["CLUSTER_RUNS_DIR"])
    # first submit on every host: code sync included (reported apart); later ones find it there
    t0 = time.time()
    first = run_ours(hosts, max(sizes), runs, env)
    log(f"first submit to {max(sizes)} hosts ({'shared checkout' if hosts.shared_fs else 'code rsync included'}): returned {first['returned']:.2f}s, "
        f"joined {first['joined']:.2f}s ({time.time() - t0:.1f}s)")
    quiet(hosts, max(sizes))
    out = {"first_submit_with_sync": first, "sizes": {}}
    for n in sizes:
        res = {"ours": [], "ours-cold": [], "pdsh": []}
        for _ in range(reps):
            for tool in res:
                r = run_pdsh(hosts, n, env) if tool == "pdsh" else run_ours(hosts, n, runs, env, tool == "ours")
                res[tool].append(r)
                log(f"{n} host(s) {tool:<9}: returned {r['returned']:.2f}s started {r['started']:.2f}s "
                    f"joined {r['joined']:.2f}s" + (f" (warm start on {r['warm_nodes']} of {n})" if tool != "pdsh" else ""))
                quiet(hosts, n)
        out["sizes"][n] = {tool: {k: statistics.median(r[k] for r in rs) for k in ("returned", "started", "joined")}
                           for tool, rs in res.items()}
        out["sizes"][n]["ours"]["warm_nodes"] = [r["warm_nodes"] for r in res["ours"]]
        log(f"{n} host(s) median joined: ours {out['sizes'][n]['ours']['joined']:.2f}s, "
            f"ours without warm start {out['sizes'][n]['ours-cold']['joined']:.2f}s, "
            f"pdsh {out['sizes'][n]['pdsh']['joined']:.2f}s")
    return out


def bench_resume(hosts: Hosts, n: int, mb: int, reps: int, env: dict, log) -> dict:
    """``submit --resume`` of a run with an ``mb`` MB checkpoint, which goes to node 0 before the
    start: with warm start, torchrun's import overlaps that copy; without, it follows it."""
    runs = Path(env["CLUSTER_RUNS_DIR"])
    src = runs / "benchsrc-resume"
    (src / "checkpoints").mkdir(parents=True, exist_ok=True)
    with open(src / "checkpoints" / "ckpt_1.pt", "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    (src / "checkpoints" / "latest").write_text("ckpt_1.pt\n")
    (src / "run.json").write_text(json.dumps({"id": src.name, "created": 0, "state": "SUCCEEDED", "backend": "local",
                                              "job": {"name": "benchsrc"}}))
    run_ours(hosts, n, runs, env)     # untimed: the code is in place on every host from here on
    quiet(hosts, n)
    res = {"ours": [], "ours-cold": []}
    for _ in range(reps):
        for tool in res:
            r = run_ours(hosts, n, runs, env, tool == "ours", ("--resume", src.name))
            res[tool].append(r)
            log(f"resume, {mb} MB checkpoint, {n} host(s) {tool:<9}: returned {r['returned']:.2f}s "
                f"started {r['started']:.2f}s joined {r['joined']:.2f}s (warm start on {r['warm_nodes']} of {n})")
            quiet(hosts, n)
    out = {tool: {k: statistics.median(r[k] for r in rs) for k in ("returned", "started", "joined")}
           for tool, rs in res.items()}
    log(f"resume, {mb} MB checkpoint, {n} host(s), median joined: ours {out['ours']['joined']:.2f}s, "
        f"without warm start {out['ours-cold']['joined']:.2f}s")
    return {"hosts": n, "checkpoint_mb": mb, **out}


# ---------------------------------------------------------------- log merging
def writer(path: Path, host: str, rate: int, seconds: float, start_at: float) -> None:
    """Append ``rate`` lines/s for ``seconds`` (in 10 ms batches), each stamped with its write time."""
    while time.time() < start_at:
        time.sleep(0.001)
    seq, batch_s = 0, 0.01
    with open(path, "ab", buffering=0) as f:
        t_end = start_at + seconds
        nxt = start_at
        while True:
            now = time.time()
            if now >= t_end:
                break
            due = int((now - start_at) * rate)
            lines = []
            while seq < due:
                lines.append(f"[{host} 0] seq={seq} t={time.time():.6f} some training output to pad the line\n")
                seq += 1
            if lines:
                f.write("".join(lines).encode())
            nxt += batch_s
            time.sleep(max(0.0, nxt - time.time()))
        last = int(rate * seconds)
        f.write("".join(f"[{host} 0] seq={s} t={time.time():.6f} some training output to pad the line\n"
                        for s in range(seq, last)).encode())


def bench_logs(hosts: Hosts, n: int, rate_per_host: int, seconds: float, log) -> dict:
    sys.path.insert(0, str(REPO))
    from cluster.backends.ssh import SSHBackend, SSHLogSource
    from cluster.spec.config import load_inventory
    from cluster.run.logs import Merger
    from cluster.backends.rsync import remote_path
    inv = load_inventory(hosts.inventory(n))
    be = SSHBackend(inv)
    rid = f"logbench-{time.time_ns()}"
    paths = {}
    for h in inv.hosts:
        d = Path(h.workdir) / "runs" / rid / "logs"
        d.mkdir(parents=True, exist_ok=True)   # one directory for all hosts with shared_fs
        paths[h.name] = d / f"{h.name}.log"
        paths[h.name].touch()
    for h in inv.hosts:
        be.pool.connection(h.name)
    sources = [SSHLogSource(be.pool, h, remote_path(h.workdir, "runs", rid, "logs", f"{h.name}.log")) for h in inv.hosts]
    merger = Merger(sources)
    start_at = time.time() + 1.0
    # writers run as separate processes, as the hosts' agents would
    procs = [subprocess.Popen([sys.executable, __file__, "writer", str(paths[name]), name, str(rate_per_host),
                               str(seconds), repr(start_at)]) for name in paths]
    lat, seen = [], {name: -1 for name in paths}
    errors = 0
    total = n * int(rate_per_host * seconds)
    got, t_last = 0, start_at
    deadline = start_at + seconds + 30
    sink = open(os.devnull, "w")
    while got < total and time.time() < deadline:
        lines = merger.poll()
        now = time.time()
        if lines:
            sink.write("\n".join(lines) + "\n")
            for line in lines:
                host = line[1:line.index(" ")]
                seq = int(line.split("seq=", 1)[1].split(" ", 1)[0])
                t = float(line.split(" t=", 1)[1].split(" ", 1)[0])
                if seq != seen[host] + 1:
                    errors += 1
                seen[host] = seq
                lat.append(now - t)
            got += len(lines)
            t_last = now
        else:
            time.sleep(0.25)          # as follow_run does when nothing came
    for p in procs:
        p.wait()
    be.close()
    lat.sort()
    res = {"hosts": n, "lines": got, "expected": total, "out_of_order_or_missing": errors,
           "lines_per_s": got / max(1e-9, t_last - start_at),
           "latency_p50_s": lat[len(lat) // 2] if lat else None,
           "latency_p99_s": lat[int(len(lat) * 0.99)] if lat else None, "latency_max_s": lat[-1] if lat else None}
    log(f"logs: {n} hosts x {rate_per_host} lines/s for {seconds:g}s: merged {got}/{total} lines at "
        f"{res['lines_per_s']:.0f} lines/s, latency p50 {res['latency_p50_s']:.3f}s p99 {res['latency_p99_s']:.3f}s "
        f"max {res['latency_max_s']:.3f}s, {errors} missing/out of order")
    return res


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "payload":
        payload(sys.argv[2])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "writer":
        writer(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,2,4,8", help="host counts to launch on (default 1,2,4,8)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per size and tool (median reported)")
    ap.add_argument("--log-rate", type=int, default=3000, help="lines/s per host in the log bench")
    ap.add_argument("--log-seconds", type=float, default=10.0)
    ap.add_argument("--loopback", action="store_true",
                    help="hosts on 127.0.1.x in this network namespace (no ip/veth/bridge needed)")
    ap.add_argument("--shared-fs", action="store_true",
                    help="the hosts work in this checkout (inventory shared_fs: no code sync; with --loopback)")
    ap.add_argument("--resume-mb", type=int, default=0,
                    help="also: submit --resume of a run with a checkpoint of this size, on the largest host count")
    ap.add_argument("--skip-launch", action="store_true")
    ap.add_argument("--skip-logs", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "launch"), help="writes results.json there")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("pdsh") or not Path(SSHD).exists():
        print("needs root, pdsh (apt-get install pdsh) and openssh-server", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    hosts = Hosts(max(sizes), loopback=args.loopback, shared_fs=args.shared_fs and args.loopback)
    # a time limit's TERM still takes the hosts down and writes what was measured
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    results: dict = {"cpus": os.cpu_count(), "sizes": sizes, "reps": args.reps}
    try:
        t0 = time.time()
        hosts.up()
        log(f"{hosts.n} {'loopback' if hosts.loopback else 'namespace'} hosts up in {time.time() - t0:.2f}s "
            f"({hosts.sd}, {os.cpu_count()} CPUs)")
        env = {**os.environ, "CLUSTER_RUNS_DIR": str(hosts.sd / "runs"), "PYTHONUNBUFFERED": "1"}
        if not args.skip_launch:
            results["launch"] = bench_launch(hosts, sizes, args.reps, env, log)
            table = ["| hosts | ours: returned / started / joined (s) | ours, warm_start off: joined (s) | "
                     "pdsh: returned / started / joined (s) | joined ours/pdsh | off/pdsh | joined vs 1 host (ours) |",
                     "|---|---|---|---|---|---|---|"]
            base = results["launch"]["sizes"][sizes[0]]["ours"]["joined"]
            for n in sizes:
                o, c, p = (results["launch"]["sizes"][n][t] for t in ("ours", "ours-cold", "pdsh"))
                table.append(f"| {n} | {o['returned']:.2f} / {o['started']:.2f} / {o['joined']:.2f} | {c['joined']:.2f} | "
                             f"{p['returned']:.2f} / {p['started']:.2f} / {p['joined']:.2f} | "
                             f"{o['joined'] / p['joined']:.2f} | {c['joined'] / p['joined']:.2f} | {o['joined'] / base:.2f} |")
            log("\n".join(table))
        if args.resume_mb:
            results["resume"] = bench_resume(hosts, max(sizes), args.resume_mb, args.reps, env, log)
        if not args.skip_logs:
            results["logs"] = bench_logs(hosts, max(sizes), args.log_rate, args.log_seconds, log)
    finally:
        hosts.down()
        (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out_dir / "log.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
