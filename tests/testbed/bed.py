"""The cluster in a box: N hosts as network namespaces with sshd and SLURM.

Standard library only (plus nothing: the inventory is written by hand, in the exact shape the
project's strict loader expects). Everything here runs as root on Linux.

Layout (see README.md beside this file):
  root netns:  bridge ddptb0 10.213.0.1/24, munged (own key and socket), slurmctld under the
               hostname ``tbctl`` (private UTS namespace)
  nodeI netns: veth eth0 10.213.0.(10+I)/24, no default route, hostname nodeI (private UTS
               namespace), sshd on port 22, slurmd -N nodeI with 2 fake GPUs
  state:       one temporary directory /tmp/ddp-testbed-XXXX, recorded in <repo>/.testbed/state.json
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

SUBNET_PREFIX = "10.213.0."
BRIDGE = "ddptb0"
BRIDGE_ADDR = SUBNET_PREFIX + "1"
VETH_PREFIX = "tbveth"
CONTROLLER = "tbctl"
PARTITION = "debug"
GPUS_PER_NODE = 2
STATE_PREFIX = "ddp-testbed-"
TMP_ROOT = "/tmp"
MARKER = "ddp-testbed"  # tags /etc/hosts lines and /etc/slurm files we own
HOSTS_FILE = Path("/etc/hosts")
SLURM_ETC = Path("/etc/slurm")
SLURM_FILES = ("slurm.conf", "gres.conf")
NETNS_DIR = Path("/run/netns")
NODE_RE = re.compile(r"^node\d+$")

DAEMON_BINARIES = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "munged": "munged",
    "sshd": "/usr/sbin/sshd",
    "ssh": "ssh",
    "ssh-keygen": "ssh-keygen",
    "rsync": "rsync",
    "sinfo": "sinfo",
    "scontrol": "scontrol",
    "nsenter": "nsenter",
    "unshare": "unshare",
    "ip": "ip",
    "tmux": "tmux",         # the terminal `cluster top` is tested in
}

# Debian packages the testbed (and the containers work) needs; install-deps adds the missing ones.
DEB_PACKAGES = (
    "slurm-wlm", "munge", "openssh-server", "openssh-client", "rsync",
    "podman", "runc", "iproute2", "util-linux",
    "debootstrap", "docker.io",       # the small training image's base; the docker engine tests
    "tmux", "chromium",     # cluster top under a real terminal; TensorBoard and report pages in a real browser
)


class TestbedError(RuntimeError):
    """The testbed could not be brought up (or torn down)."""


class TestbedUnavailable(TestbedError):
    """This machine cannot run the testbed at all (not root, not Linux, no ip netns, no packages)."""


# ---------------------------------------------------------------------------------------------
# small helpers


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[testbed] {msg}", flush=True)


def _run(argv, check=True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 30)
    p = subprocess.run(argv, **kw)
    if check and p.returncode != 0:
        raise TestbedError(f"command failed ({p.returncode}): {' '.join(map(str, argv))}\n"
                           f"{(p.stderr or '').strip()}")
    return p


def node_names(n: int) -> list[str]:
    return [f"node{i}" for i in range(1, n + 1)]


def node_addr(i: int) -> str:
    return f"{SUBNET_PREFIX}{10 + i}"


def testbed_dir(root: Path = REPO_ROOT) -> Path:
    return Path(root) / ".testbed"


def state_file(root: Path = REPO_ROOT) -> Path:
    return testbed_dir(root) / "state.json"


def venv_python(root: Path = REPO_ROOT) -> str:
    """The repo venv's python (not resolved: resolving a venv's symlink leaves the venv)."""
    cand = Path(root) / ".venv" / "bin" / "python"
    if cand.exists():
        return str(cand)
    return sys.executable


def load_state(root: Path = REPO_ROOT) -> dict | None:
    try:
        return json.loads(state_file(root).read_text())
    except (OSError, ValueError):
        return None


def _write_state(state: dict, root: Path) -> None:
    d = testbed_dir(root)
    d.mkdir(exist_ok=True)
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, d / "state.json")


def unavailable_reason() -> str | None:
    """Why this machine cannot run the testbed, or None if it can."""
    if platform.system() != "Linux":
        return f"the testbed needs Linux (this is {platform.system()})"
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces, /etc/hosts, daemons)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"`ip netns` is unavailable here: {p.stderr.strip()}"
    missing = [name for name, exe in DAEMON_BINARIES.items() if shutil.which(exe) is None]
    if missing:
        return ("missing programs: " + ", ".join(missing)
                + " (run `make testbed-deps` or `python -m tests.testbed install-deps` as root)")
    return None


# ---------------------------------------------------------------------------------------------
# processes


def _proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _proc_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _protected_pids() -> set[int]:
    """This process and its ancestors: never signalled."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    out.add(1)
    return out


def _testbed_pids(state_dirs: list[str], netns_names: list[str]) -> list[int]:
    """Processes of the testbed: in one of its network namespaces, or naming a state dir."""
    inodes = {i for i in (_ns_inode(str(NETNS_DIR / n)) for n in netns_names) if i is not None}
    protected = _protected_pids()
    found = []
    for pid in _all_pids():
        if pid in protected:
            continue
        hit = False
        if inodes:
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino in inodes:
                    hit = True
            except OSError:
                pass
        if not hit and state_dirs:
            cmd = _proc_cmdline(pid)
            hit = any(d in cmd for d in state_dirs)
        if hit and _alive(pid):
            found.append(pid)
    return found


def _kill_all(pids_fn, grace_s: float = 2.0) -> None:
    """TERM everything pids_fn() lists, wait up to grace_s, then KILL; reap our own children."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        pids = pids_fn()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        _reap(pids)
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                if time.monotonic() > deadline + 3:
                    left = [f"{p}:{_proc_cmdline(p)[:80]}" for p in pids_fn()]
                    if left:
                        raise TestbedError("processes survived SIGKILL: " + "; ".join(left))
                    return
            else:
                sig = signal.SIGKILL


def _reap(pids) -> None:
    """Collect the exit status of those pids that are our own children (daemons that this
    process spawned), never waitpid(-1): that would steal other code's children."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass


def _spawn(argv, log: Path, netns: str | None = None, hostname: str | None = None) -> int:
    """Start a daemon detached (own session, stdin /dev/null), optionally inside a host's
    network namespace and under its own hostname (private UTS namespace). Returns its pid.

    nsenter --net (not `ip netns exec`, which mounts a private /sys and hides /sys/fs/cgroup)."""
    prefix = []
    if netns:
        prefix += ["nsenter", f"--net={NETNS_DIR / netns}"]
    if hostname:
        prefix += ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname]
    with open(log, "ab") as out:
        p = subprocess.Popen(prefix + [str(a) for a in argv], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             close_fds=True)
    return p.pid


# ---------------------------------------------------------------------------------------------
# /etc files


def _hosts_lines(n: int) -> list[str]:
    lines = [f"{BRIDGE_ADDR}\t{CONTROLLER}\t# {MARKER}"]
    lines += [f"{node_addr(i)}\tnode{i}\t# {MARKER}" for i in range(1, n + 1)]
    return lines


def _rewrite_in_place(path: Path, text: str) -> None:
    # /etc/hosts may be a bind mount: rename over it can fail, so rewrite in place.
    with open(path, "r+") as f:
        f.seek(0)
        f.write(text)
        f.truncate()


def _hosts_add(n: int) -> None:
    text = HOSTS_FILE.read_text() if HOSTS_FILE.exists() else ""
    kept = [ln for ln in text.splitlines() if not ln.rstrip().endswith(f"# {MARKER}")]
    new = "\n".join(kept + _hosts_lines(n)) + "\n"
    if HOSTS_FILE.exists():
        _rewrite_in_place(HOSTS_FILE, new)
    else:
        HOSTS_FILE.write_text(new)


def _hosts_marked_lines() -> list[str]:
    try:
        text = HOSTS_FILE.read_text()
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.rstrip().endswith(f"# {MARKER}")]


def _hosts_remove() -> None:
    if not _hosts_marked_lines():
        return
    text = HOSTS_FILE.read_text()
    kept = [ln for ln in text.splitlines() if not ln.rstrip().endswith(f"# {MARKER}")]
    _rewrite_in_place(HOSTS_FILE, "\n".join(kept) + ("\n" if kept else ""))


def _is_ours(path: Path) -> bool:
    try:
        with open(path) as f:
            return MARKER in f.readline()
    except OSError:
        return False


def _slurm_etc_ours() -> list[Path]:
    return [SLURM_ETC / f for f in SLURM_FILES if _is_ours(SLURM_ETC / f)]


# ---------------------------------------------------------------------------------------------
# network


def _ip_netns_list() -> list[str]:
    p = _run(["ip", "netns", "list"], check=False)
    return [ln.split()[0] for ln in p.stdout.splitlines() if ln.strip()]


def _link_names() -> list[str]:
    p = _run(["ip", "-o", "link", "show"], check=False)
    names = []
    for ln in p.stdout.splitlines():
        parts = ln.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def _netns_is_ours(name: str) -> bool:
    p = _run(["ip", "-n", name, "-o", "-4", "addr", "show"], check=False)
    return SUBNET_PREFIX in p.stdout


def _network_up(n: int) -> None:
    _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    _run(["ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE])
    _run(["ip", "link", "set", BRIDGE, "up"])
    for i in range(1, n + 1):
        ns, veth = f"node{i}", f"{VETH_PREFIX}{i}"
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
        # One batch inside the namespace: address, eth0 up, lo up. No default route, on purpose.
        _run(["ip", "-n", ns, "-batch", "-"],
             input=f"addr add {node_addr(i)}/24 dev eth0\nlink set eth0 up\nlink set lo up\n")


# ---------------------------------------------------------------------------------------------
# config files


def _slurm_conf(sd: Path, n: int, hw: dict) -> str:
    nodes = node_names(n)
    hwline = " ".join(f"{k}={hw[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard",
                                                "CoresPerSocket", "ThreadsPerCore") if k in hw)
    lines = [
        f"# {MARKER}: generated by tests/testbed for {sd}; removed by `python -m tests.testbed down`",
        "ClusterName=ddptb",
        f"SlurmctldHost={CONTROLLER}({BRIDGE_ADDR})",
        "SlurmctldPort=6817",
        "SlurmdPort=6818",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={sd}/munge/munge.socket",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={sd}/slurmctld",
        f"SlurmctldPidFile={sd}/run/slurmctld.pid",
        f"SlurmctldLogFile={sd}/logs/slurmctld.log",
        f"SlurmdSpoolDir={sd}/slurmd/%n",
        f"SlurmdPidFile={sd}/slurmd/%n/slurmd.pid",
        f"SlurmdLogFile={sd}/logs/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "KillWait=5",
        # Finished jobs stay visible to `scontrol show job` (and so to the sacct stand-in) for a day.
        "MinJobAge=86400",
        "SlurmdTimeout=30",
        "SlurmctldTimeout=30",
        "InactiveLimit=0",
        "Waittime=0",
        "GresTypes=gpu",
    ]
    for i, name in enumerate(nodes, 1):
        lines.append(f"NodeName={name} NodeAddr={node_addr(i)} NodeHostname={name} {hwline} "
                     f"RealMemory=1000 Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN")
    lines.append(f"PartitionName={PARTITION} Nodes={','.join(nodes)} Default=YES "
                 "MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _gres_conf(sd: Path, n: int) -> str:
    files = ",".join(str(sd / "dev" / f"gpu{g}") for g in range(GPUS_PER_NODE))
    return (f"# {MARKER}: fake GPUs (character devices c 1 3) for {sd}\n"
            f"NodeName={','.join(node_names(n))} Name=gpu File={files}\n")


SSHD_CONFIG = """\
# {marker}: sshd config shared by the testbed hosts; ListenAddress/PidFile/HostKey per host
Port 22
AuthorizedKeysFile {sd}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
PrintLastLog no
UseDNS no
X11Forwarding no
MaxStartups 100:30:200
MaxSessions 100
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
LogLevel INFO
"""


def _ssh_config(st: dict) -> str:
    sd = st["state_dir"]
    out = [f"# {MARKER}: ssh -F .testbed/ssh_config node1   (valid while the testbed is up)"]
    for h in st["hosts"]:
        out += [
            f"Host {h['name']}",
            f"  HostName {h['hostname']}",
            "  User root",
            "  Port 22",
            f"  IdentityFile {sd}/client_key",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {sd}/known_hosts",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 5",
            "  LogLevel ERROR",
            "  ControlMaster auto",
            f"  ControlPath {sd}/run/cm-%h",
            "  ControlPersist 60",
            "",
        ]
    return "\n".join(out)


def _inventory_yaml(st: dict) -> str:
    sd = st["state_dir"]
    lines = [
        f"# {MARKER}: written by `python -m tests.testbed up`; valid while the testbed is up",
        "backend: ssh",
        "defaults:",
        "  user: root",
        "  port: 22",
        f"  identity_file: {sd}/client_key",
        f"  python: {st['python']}",
        "  gpus: 0",
        "ssh:",
        f"  known_hosts: {sd}/known_hosts",
        "  connect_timeout_s: 5",
        "hosts:",
    ]
    for h in st["hosts"]:
        lines += [
            f"  - name: {h['name']}",
            f"    hostname: {h['hostname']}",
            f"    address: {h['address']}",
            f"    workdir: {h['workdir']}",
        ]
    lines += ["slurm:", f"  partition: {st['partition']}", "  time_min: 10"]
    return "\n".join(lines) + "\n"


def _env_sh(st: dict) -> str:
    return (f"# {MARKER}: source .testbed/env  -> the sacct stand-in ahead of the real sacct\n"
            f"export PATH={st['bin_dir']}:$PATH\n"
            f"export DDP_TESTBED_STATE={st['state_dir']}\n")


def _install_sacct(sd: Path) -> None:
    src = (HERE / "sacct.py").read_text()
    interp = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    body = src.split("\n", 1)[1] if src.startswith("#!") else src
    dst = sd / "bin" / "sacct"
    dst.write_text(f"#!{interp}\n{body}")
    dst.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# waiting


def _port_open(addr: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait(cond, what: str, timeout: float, pids: dict | None = None, logs: list | None = None):
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if pids:
            dead = [k for k, pid in pids.items() if not _alive(pid)]
            if dead:
                raise TestbedError(f"while waiting for {what}: daemon(s) died: {', '.join(dead)}"
                                   + _tails(logs))
        if time.monotonic() > deadline:
            raise TestbedError(f"timed out after {timeout:.0f}s waiting for {what}" + _tails(logs))
        time.sleep(0.02)


def _tails(logs) -> str:
    out = []
    for p in logs or []:
        try:
            lines = Path(p).read_text(errors="replace").splitlines()[-8:]
        except OSError:
            continue
        out.append(f"\n--- {p} (tail)\n" + "\n".join(lines))
    return "".join(out)


def sinfo_states() -> dict[str, str]:
    p = _run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10)
    out = {}
    if p.returncode == 0:
        for ln in p.stdout.splitlines():
            parts = ln.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
    return out


# ---------------------------------------------------------------------------------------------
# up / down / status


def up(nodes: int = 3, root: Path = REPO_ROOT, quiet: bool = False, timeout: float = 60) -> dict:
    """Bring a fresh testbed up (tearing down any earlier one first). Returns the state dict."""
    root = Path(root)
    if not 1 <= nodes <= 200:
        raise TestbedError("--nodes must be between 1 and 200")
    reason = unavailable_reason()
    if reason:
        raise TestbedUnavailable(reason)
    if load_state(root) or _leftovers_quick():
        _log("tearing down an earlier testbed first", quiet)
        down(root=root, quiet=True)
    t0 = time.monotonic()
    sd = Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir=TMP_ROOT))
    sd.chmod(0o755)
    names = node_names(nodes)
    st = {
        "status": "starting",
        "state_dir": str(sd),
        "nodes": nodes,
        "netns": names,
        "bridge": BRIDGE,
        "controller": CONTROLLER,
        "controller_address": BRIDGE_ADDR,
        "partition": PARTITION,
        "python": venv_python(root),
        "bin_dir": str(sd / "bin"),
        "inventory": str(testbed_dir(root) / "inventory.yaml"),
        "ssh_config": str(testbed_dir(root) / "ssh_config"),
        "hosts": [{"name": n, "hostname": n, "address": node_addr(i),
                   "workdir": str(sd / "hosts" / n / "work")} for i, n in enumerate(names, 1)],
        "pids": {},
        "created_run_sshd": False,
        "started_at": time.time(),
    }
    (sd / f".{MARKER}").write_text("state directory of the ddp testbed\n")
    _write_state(st, root)  # first thing: a crashed up can always be torn down
    try:
        _bring_up(st, sd, nodes, root, quiet, timeout)
    except BaseException:
        _log("up failed; tearing down what was brought up", quiet)
        st["status"] = "failed"
        try:
            down(root=root, quiet=True, keep_state=bool(os.environ.get("TESTBED_KEEP_STATE")))
        except Exception as e:  # keep the original error
            print(f"[testbed] teardown after failed up also failed: {e}", file=sys.stderr)
        raise
    st["status"] = "up"
    st["up_seconds"] = round(time.monotonic() - t0, 3)
    _write_state(st, root)
    _log(f"up: {nodes} hosts in {st['up_seconds']:.2f}s; state {sd}", quiet)
    _log(f"inventory {st['inventory']}; ssh -F {st['ssh_config']} node1; "
         f"sacct stand-in: export PATH={st['bin_dir']}:$PATH", quiet)
    return st


def _bring_up(st: dict, sd: Path, n: int, root: Path, quiet: bool, timeout: float) -> None:
    names = st["netns"]
    for sub in ("etc", "logs", "bin", "run", "munge", "slurmctld", "dev", "slurmd"):
        (sd / sub).mkdir()
    for h in st["hosts"]:
        (sd / "slurmd" / h["name"]).mkdir()
        Path(h["workdir"]).mkdir(parents=True)
    (sd / "munge").chmod(0o711)

    # keys: client key, one host key per host, munge key (ssh-keygen runs in parallel)
    keygens = [subprocess.Popen(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", MARKER,
                                 "-f", str(sd / "client_key")], stdout=subprocess.DEVNULL)]
    for name in names:
        keygens.append(subprocess.Popen(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{MARKER}-{name}",
             "-f", str(sd / "hosts" / name / "ssh_host_ed25519_key")], stdout=subprocess.DEVNULL))
    with open(sd / "munge" / "munge.key", "wb") as f:
        f.write(os.urandom(1024))
    (sd / "munge" / "munge.key").chmod(0o600)
    for g in range(GPUS_PER_NODE):
        os.mknod(sd / "dev" / f"gpu{g}", 0o666 | 0o020000, os.makedev(1, 3))

    _network_up(n)
    _hosts_add(n)

    # munged first (slurmctld and slurmd authenticate through it)
    pids = st["pids"]
    pids["munged"] = _spawn(["munged", "-F", "-f", f"--key-file={sd}/munge/munge.key",
                             f"--socket={sd}/munge/munge.socket",
                             f"--pid-file={sd}/munge/munged.pid",
                             f"--log-file={sd}/logs/munged.log",
                             f"--seed-file={sd}/munge/munged.seed"], sd / "logs" / "munged.out")

    for p in keygens:
        if p.wait(timeout=30) != 0:
            raise TestbedError("ssh-keygen failed")
    pub = (sd / "client_key.pub").read_text()
    (sd / "authorized_keys").write_text(pub)
    kh = []
    for i, name in enumerate(names, 1):
        hk = (sd / "hosts" / name / "ssh_host_ed25519_key.pub").read_text().split()
        kh.append(f"{name},{node_addr(i)} {hk[0]} {hk[1]}")
    (sd / "known_hosts").write_text("\n".join(kh) + "\n")
    (sd / "etc" / "sshd_config").write_text(SSHD_CONFIG.format(marker=MARKER, sd=sd))
    if not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755)
        st["created_run_sshd"] = True
    for i, name in enumerate(names, 1):
        pids[f"sshd-{name}"] = _spawn(
            ["/usr/sbin/sshd", "-D", "-f", sd / "etc" / "sshd_config",
             "-h", sd / "hosts" / name / "ssh_host_ed25519_key",
             "-o", f"ListenAddress={node_addr(i)}", "-o", f"PidFile={sd}/run/sshd-{name}.pid",
             "-E", sd / "logs" / f"sshd-{name}.log"],
            sd / "logs" / f"sshd-{name}.out", netns=name, hostname=name)

    # SLURM config: written in the state dir (daemons read it there with -f) and copied to
    # /etc/slurm for the clients (sinfo, srun, sbatch, submitit). A foreign config is never replaced.
    hw = _slurmd_hw()
    (sd / "etc" / "slurm.conf").write_text(_slurm_conf(sd, n, hw))
    (sd / "etc" / "gres.conf").write_text(_gres_conf(sd, n))
    if not SLURM_ETC.is_dir():
        SLURM_ETC.mkdir(parents=True)
        st["created_etc_slurm"] = True
    for f in SLURM_FILES:
        dst = SLURM_ETC / f
        if dst.exists() and not _is_ours(dst):
            raise TestbedError(f"{dst} exists and is not the testbed's: refusing to replace it")
    for f in SLURM_FILES:
        shutil.copyfile(sd / "etc" / f, SLURM_ETC / f)

    _install_sacct(sd)
    _write_state(st, root)  # pids so far

    _wait(lambda: (sd / "munge" / "munge.socket").exists(), "munged", 10,
          {"munged": pids["munged"]}, [sd / "logs" / "munged.log"])
    pids["slurmctld"] = _spawn(["slurmctld", "-D", "-f", sd / "etc" / "slurm.conf"],
                               sd / "logs" / "slurmctld.out", hostname=CONTROLLER)
    _write_state(st, root)
    _wait(_ctld_up, "slurmctld to answer", timeout,
          {"slurmctld": pids["slurmctld"]}, [sd / "logs" / "slurmctld.log", sd / "logs" / "slurmctld.out"])
    for name in names:
        pids[f"slurmd-{name}"] = _spawn(["slurmd", "-D", "-f", sd / "etc" / "slurm.conf", "-N", name],
                                        sd / "logs" / f"slurmd-{name}.out", netns=name, hostname=name)
    _write_state(st, root)

    td = testbed_dir(root)
    (td / "inventory.yaml").write_text(_inventory_yaml(st))
    (td / "ssh_config").write_text(_ssh_config(st))
    (td / "env").write_text(_env_sh(st))

    logs = [sd / "logs" / f for f in ("slurmctld.log",)] + [sd / "logs" / f"slurmd-{x}.out" for x in names]
    _wait(lambda: all(_port_open(node_addr(i), 22) for i in range(1, n + 1)), "sshd on every host",
          timeout, {k: v for k, v in pids.items() if k.startswith("sshd")},
          [sd / "logs" / f"sshd-{x}.log" for x in names])
    _wait(lambda: _all_idle(names), "all SLURM nodes idle", timeout, pids, logs)


def _ctld_up() -> bool:
    # `scontrol ping` rather than a bare TCP probe (which slurmctld logs as an error)
    p = _run(["scontrol", "ping"], check=False, timeout=10)
    return p.returncode == 0 and "is UP" in p.stdout


def _all_idle(names) -> bool:
    states = sinfo_states()
    return all(states.get(n) == "idle" for n in names)


def _slurmd_hw() -> dict:
    p = _run(["slurmd", "-C"], check=False)
    hw = {}
    for tok in (p.stdout.splitlines() or [""])[0].split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            hw[k] = v
    if "CPUs" not in hw:
        hw = {"CPUs": str(os.cpu_count() or 1)}
    return hw


def _leftovers_quick() -> bool:
    names = set(_ip_netns_list())
    return (BRIDGE in _link_names() or bool(_hosts_marked_lines()) or bool(_slurm_etc_ours())
            or any(NODE_RE.match(n) and _netns_is_ours(n) for n in names))


def _state_dirs_on_disk() -> list[str]:
    return sorted(d for d in glob.glob(os.path.join(TMP_ROOT, STATE_PREFIX + "*"))
                  if os.path.exists(os.path.join(d, f".{MARKER}")))


removed_containers: list[str] = []  # ids of the podman containers the last down() removed


def _testbed_containers(netns_names: list[str]) -> list[str]:
    """Ids of podman containers whose conmon runs in one of the testbed's network namespaces."""
    inodes = {i for i in (_ns_inode(str(NETNS_DIR / n)) for n in netns_names) if i is not None}
    ids = []
    for pid in _all_pids():
        if _proc_comm(pid) != "conmon":
            continue
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino not in inodes:
                continue
        except OSError:
            continue
        argv = _proc_cmdline(pid).split()
        if "-c" in argv and argv.index("-c") + 1 < len(argv):
            ids.append(argv[argv.index("-c") + 1])
    return ids


def down(root: Path = REPO_ROOT, quiet: bool = False, keep_state: bool = False) -> float:
    """Tear the testbed down: idempotent, and also cleans up after a crashed or partial up.

    Kills every process in a testbed namespace or naming a testbed state dir, deletes the
    namespaces and the bridge, removes our /etc/hosts lines and /etc/slurm files, the state
    dir(s) (unless keep_state) and .testbed/{state.json,inventory.yaml,ssh_config,env}."""
    root = Path(root)
    t0 = time.monotonic()
    st = load_state(root) or {}
    if os.geteuid() != 0:
        if st:
            raise TestbedError("testbed down needs root")
        return 0.0
    state_dirs = set(_state_dirs_on_disk())
    if st.get("state_dir"):
        state_dirs.add(st["state_dir"])
    state_dirs = sorted(state_dirs)
    netns = set(st.get("netns", []))
    for n in _ip_netns_list():
        if NODE_RE.match(n) and (n in netns or _netns_is_ours(n)):
            netns.add(n)
    netns = sorted(n for n in netns if (NETNS_DIR / n).exists())

    # 1. podman containers started on the hosts (their conmon lives in a host's namespace):
    #    removed through podman, so that its storage and overlay mounts go too
    removed_containers[:] = _testbed_containers(netns)
    if removed_containers and shutil.which("podman"):
        _run(["podman", "rm", "-f", "-t", "0", *removed_containers], check=False, timeout=60)
    # 2. processes (daemons, job steps, ssh sessions, ssh control masters, ...)
    _kill_all(lambda: _testbed_pids(state_dirs, netns))
    # 3. network
    for n in netns:
        _run(["ip", "netns", "del", n], check=False)
    links = _link_names()
    for link in links:
        if link.startswith(VETH_PREFIX):
            _run(["ip", "link", "del", link], check=False)
    if BRIDGE in links:
        _run(["ip", "link", "del", BRIDGE], check=False)
    # 4. /etc
    _hosts_remove()
    for f in _slurm_etc_ours():
        f.unlink()
    if st.get("created_etc_slurm"):
        try:
            SLURM_ETC.rmdir()
        except OSError:
            pass
    if st.get("created_run_sshd"):
        try:
            os.rmdir("/run/sshd")
        except OSError:
            pass
    # 5. files (TESTBED_SAVE_LOGS=<dir>: copy the daemons' logs there first, e.g. for CI artifacts)
    save = os.environ.get("TESTBED_SAVE_LOGS")
    if save:
        for d in state_dirs:
            if os.path.isdir(os.path.join(d, "logs")):
                shutil.copytree(os.path.join(d, "logs"), os.path.join(save, os.path.basename(d)),
                                dirs_exist_ok=True)
    if not keep_state:
        for d in state_dirs:
            shutil.rmtree(d, ignore_errors=True)
    td = testbed_dir(root)
    for f in ("inventory.yaml", "ssh_config", "env", "state.json", "state.json.tmp"):
        try:
            (td / f).unlink()
        except FileNotFoundError:
            pass
    try:
        td.rmdir()
    except OSError:
        pass
    took = time.monotonic() - t0
    if st or netns:
        _log(f"down in {took:.2f}s" + (f" (state kept in {', '.join(state_dirs)})" if keep_state else ""),
             quiet)
    else:
        _log("nothing to tear down", quiet)
    return took


def leftovers(root: Path = REPO_ROOT) -> list[str]:
    """Everything of a testbed that exists now: after down() this must be empty.

    Deliberately broader than what down() looks for (any node<N> namespace, any process that
    names a /tmp/ddp-testbed-* dir, any slurm daemon living in a non-root network namespace), so
    that a down() that forgets something is caught."""
    found = []
    for n in _ip_netns_list():
        if NODE_RE.match(n):
            found.append(f"network namespace {n}")
    for link in _link_names():
        if link == BRIDGE or link.startswith(VETH_PREFIX):
            found.append(f"link {link}")
    p = _run(["ip", "-o", "-4", "addr", "show"], check=False)
    for ln in p.stdout.splitlines():
        if f" {SUBNET_PREFIX}" in ln:
            found.append(f"address: {ln.strip()}")
    for ln in _hosts_marked_lines():
        found.append(f"/etc/hosts line: {ln}")
    try:
        for f in sorted(os.listdir(SLURM_ETC)):
            if _is_ours(SLURM_ETC / f):
                found.append(f"/etc/slurm file: {f}")
    except OSError:
        pass
    for d in glob.glob(os.path.join(TMP_ROOT, STATE_PREFIX + "*")):
        found.append(f"state dir {d}")
    for f in ("state.json", "inventory.yaml", "ssh_config", "env"):
        if (testbed_dir(root) / f).exists():
            found.append(f".testbed/{f}")
    root_net = _ns_inode("/proc/1/ns/net")
    protected = _protected_pids()
    needle = os.path.join(TMP_ROOT, STATE_PREFIX)
    for pid in _all_pids():
        if pid in protected or not _alive(pid):
            continue
        cmd = _proc_cmdline(pid)
        comm = _proc_comm(pid)
        if needle in cmd:
            found.append(f"process {pid}: {cmd[:120]}")
            continue
        if comm in ("slurmd", "slurmctld", "slurmstepd", "munged", "sshd"):
            try:
                ino = os.stat(f"/proc/{pid}/ns/net").st_ino
            except OSError:
                continue
            if ino != root_net:
                found.append(f"process {pid} ({comm}) in a non-root network namespace")
    if removed_containers and shutil.which("podman"):
        p = _run(["podman", "ps", "-a", "--no-trunc", "--format", "{{.ID}}"], check=False)
        for cid in removed_containers:
            if any(line.startswith(cid) for line in p.stdout.split()):
                found.append(f"podman container {cid[:12]} (was running on a testbed host)")
    try:
        with open("/proc/self/mounts") as f:
            for ln in f:
                if "/run/netns/node" in ln or needle in ln:
                    found.append(f"mount: {ln.strip()}")
    except OSError:
        pass
    return found


def health(root: Path = REPO_ROOT) -> tuple[bool, list[str]]:
    """(healthy, problems) of the testbed that state.json describes."""
    st = load_state(root)
    if not st:
        return False, ["no testbed (no .testbed/state.json)"]
    problems = []
    if st.get("status") != "up":
        problems.append(f"status is {st.get('status')!r}")
    if not os.path.isdir(st.get("state_dir", "")):
        problems.append(f"state dir {st.get('state_dir')} is missing")
    for k, pid in st.get("pids", {}).items():
        if not _alive(pid):
            problems.append(f"{k} (pid {pid}) is not running")
    have = set(_ip_netns_list())
    for n in st.get("netns", []):
        if n not in have:
            problems.append(f"network namespace {n} is missing")
    for h in st.get("hosts", []):
        if not _port_open(h["address"], 22, timeout=0.5):
            problems.append(f"sshd on {h['name']} ({h['address']}:22) does not answer")
    states = sinfo_states() if not problems else {}
    for h in st.get("hosts", []) if not problems else []:
        s = states.get(h["name"], "missing")
        if not (s.startswith("idle") or s.startswith("mix") or s.startswith("alloc")):
            problems.append(f"SLURM node {h['name']} is {s}")
    return not problems, problems


def status(root: Path = REPO_ROOT) -> int:
    st = load_state(root)
    if not st:
        print("testbed: down (no .testbed/state.json)")
        left = leftovers(root) if os.geteuid() == 0 else []
        for x in left:
            print(f"  leftover: {x}")
        return 1
    ok, problems = health(root)
    print(f"testbed: {st.get('status')} ({'healthy' if ok else 'UNHEALTHY'}), {st['nodes']} hosts, "
          f"state {st['state_dir']}" + (f", up in {st['up_seconds']}s" if 'up_seconds' in st else ""))
    print(f"  inventory:  {st['inventory']}")
    print(f"  ssh:        ssh -F {st['ssh_config']} node1")
    print(f"  sacct:      export PATH={st['bin_dir']}:$PATH   (or: . .testbed/env)")
    print(f"  slurm:      partition {st['partition']}, controller {st['controller']} "
          f"({st['controller_address']}), logs {st['state_dir']}/logs")
    for h in st["hosts"]:
        print(f"  {h['name']:8} {h['address']:14} workdir {h['workdir']}")
    if ok:
        states = sinfo_states()
        print("  sinfo:      " + ", ".join(f"{k}={v}" for k, v in sorted(states.items())))
    for p in problems:
        print(f"  problem: {p}")
    return 0 if ok else 3


# ---------------------------------------------------------------------------------------------
# packages


def missing_packages() -> list[str]:
    missing = []
    for pkg in DEB_PACKAGES:
        p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if p.returncode != 0 or "install ok installed" not in p.stdout:
            missing.append(pkg)
    return missing


def install_deps(quiet: bool = False) -> int:
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        print("[testbed] not a Debian/Ubuntu system (no dpkg/apt-get): install slurm-wlm, munge, "
              "openssh-server, rsync, podman, runc, tmux, chromium by hand", file=sys.stderr)
        return 1
    missing = missing_packages()
    if not missing:
        _log("all Debian packages present: " + " ".join(DEB_PACKAGES), quiet)
        return 0
    if os.geteuid() != 0:
        print(f"[testbed] missing packages {' '.join(missing)}; run as root to install them",
              file=sys.stderr)
        return 1
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    t0 = time.monotonic()
    _log("apt-get update", quiet)
    rc = subprocess.call(["apt-get", "update", "-q"], env=env)
    if rc != 0:
        return rc
    _log("apt-get install -y " + " ".join(missing), quiet)
    rc = subprocess.call(["apt-get", "install", "-y", "-q", *missing], env=env)
    if rc == 0:
        _log(f"installed in {time.monotonic() - t0:.0f}s", quiet)
    return rc
