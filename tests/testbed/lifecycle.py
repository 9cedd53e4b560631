"""up and down: bring the parts up in order (network, sshd, SLURM), write .testbed/ (state.json,
inventory.yaml, ssh_config, env), and take everything down again, also after a crashed up."""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import network, slurm, sshd
from .common import (BRIDGE, BRIDGE_ADDR, CONTROLLER, MARKER, NETNS_DIR, NODE_RE, PARTITION, REPO_ROOT,
                     STATE_PREFIX, TMP_ROOT, TestbedError, TestbedUnavailable, load_state, log, node_addr,
                     node_names, run, testbed_dir, venv_python, write_state)
from .packages import unavailable_reason
from .procs import all_pids, kill_all, ns_inode, port_open, proc_cmdline, proc_comm, testbed_pids, wait_for


def up(nodes: int = 3, root: Path = REPO_ROOT, quiet: bool = False, timeout: float = 60) -> dict:
    """Bring a fresh testbed up (tearing down any earlier one first). Returns the state dict."""
    root = Path(root)
    if not 1 <= nodes <= 200:
        raise TestbedError("--nodes must be between 1 and 200")
    reason = unavailable_reason()
    if reason:
        raise TestbedUnavailable(reason)
    if load_state(root) or _leftovers_quick():
        log("tearing down an earlier testbed first", quiet)
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
    write_state(st, root)  # first thing: a crashed up can always be torn down
    try:
        _bring_up(st, sd, nodes, root, quiet, timeout)
    except BaseException:
        log("up failed; tearing down what was brought up", quiet)
        st["status"] = "failed"
        try:
            down(root=root, quiet=True, keep_state=bool(os.environ.get("TESTBED_KEEP_STATE")))
        except Exception as e:  # keep the original error
            print(f"[testbed] teardown after failed up also failed: {e}", file=sys.stderr)
        raise
    st["status"] = "up"
    st["up_seconds"] = round(time.monotonic() - t0, 3)
    write_state(st, root)
    log(f"up: {nodes} hosts in {st['up_seconds']:.2f}s; state {sd}", quiet)
    log(f"inventory {st['inventory']}; ssh -F {st['ssh_config']} node1; "
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

    keygens = sshd.start_keygens(sd, names)        # in parallel with what follows
    slurm.make_munge_key_and_gpus(sd)
    network.network_up(n)
    network.hosts_add(n)
    slurm.start_munged(st, sd)
    sshd.start_sshd(st, sd, names, keygens)
    slurm.install_config(st, sd, n)
    slurm.install_sacct(sd)
    write_state(st, root)  # pids so far
    slurm.start_slurm(st, sd, names, timeout, save=lambda: write_state(st, root))

    td = testbed_dir(root)
    (td / "inventory.yaml").write_text(inventory_yaml(st))
    (td / "ssh_config").write_text(sshd.ssh_config(st))
    (td / "env").write_text(env_sh(st))

    pids = st["pids"]
    logs = [sd / "logs" / f for f in ("slurmctld.log",)] + [sd / "logs" / f"slurmd-{x}.out" for x in names]
    wait_for(lambda: all(port_open(node_addr(i), 22) for i in range(1, n + 1)), "sshd on every host",
             timeout, {k: v for k, v in pids.items() if k.startswith("sshd")},
             [sd / "logs" / f"sshd-{x}.log" for x in names])
    wait_for(lambda: slurm.all_idle(names), "all SLURM nodes idle", timeout, pids, logs)


def inventory_yaml(st: dict) -> str:
    """.testbed/inventory.yaml, in the exact shape the project's strict loader expects."""
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


def env_sh(st: dict) -> str:
    return (f"# {MARKER}: source .testbed/env  -> the sacct stand-in ahead of the real sacct\n"
            f"export PATH={st['bin_dir']}:$PATH\n"
            f"export DDP_TESTBED_STATE={st['state_dir']}\n")


def _leftovers_quick() -> bool:
    names = set(network.netns_list())
    return (BRIDGE in network.link_names() or bool(network.hosts_marked_lines()) or bool(slurm.slurm_etc_ours())
            or any(NODE_RE.match(n) and network.netns_is_ours(n) for n in names))


def state_dirs_on_disk() -> list[str]:
    return sorted(d for d in glob.glob(os.path.join(TMP_ROOT, STATE_PREFIX + "*"))
                  if os.path.exists(os.path.join(d, f".{MARKER}")))


removed_containers: list[str] = []  # ids of the podman containers the last down() removed


def _testbed_containers(netns_names: list[str]) -> list[str]:
    """Ids of podman containers whose conmon runs in one of the testbed's network namespaces."""
    inodes = {i for i in (ns_inode(str(NETNS_DIR / n)) for n in netns_names) if i is not None}
    ids = []
    for pid in all_pids():
        if proc_comm(pid) != "conmon":
            continue
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino not in inodes:
                continue
        except OSError:
            continue
        argv = proc_cmdline(pid).split()
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
    state_dirs = set(state_dirs_on_disk())
    if st.get("state_dir"):
        state_dirs.add(st["state_dir"])
    state_dirs = sorted(state_dirs)
    netns = network.testbed_netns(st.get("netns", []))

    # 1. podman containers started on the hosts (their conmon lives in a host's namespace):
    #    removed through podman, so that its storage and overlay mounts go too
    removed_containers[:] = _testbed_containers(netns)
    if removed_containers and shutil.which("podman"):
        run(["podman", "rm", "-f", "-t", "0", *removed_containers], check=False, timeout=60)
    # 2. processes (daemons, job steps, ssh sessions, ssh control masters, ...)
    kill_all(lambda: testbed_pids(state_dirs, netns))
    # 3. network
    network.network_down(netns)
    # 4. /etc
    network.hosts_remove()
    slurm.etc_slurm_remove(st)
    sshd.run_sshd_remove(st)
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
        log(f"down in {took:.2f}s" + (f" (state kept in {', '.join(state_dirs)})" if keep_state else ""),
            quiet)
    else:
        log("nothing to tear down", quiet)
    return took
