"""Multi-host runs in podman on the cluster in a box: 3 hosts (network namespaces, real sshd).

The first tests need no backend: each node's shell line from the plan (NodeLaunch.shell(), the
one line the ssh backend sends) goes over real ssh, the agents start torchrun inside podman on
every host, and the ranks find each other across the namespaces. Stop is done the way a backend
does it with cluster/container.py's commands: TERM the agent's group, then remove_argv and
list_argv on each host. The last test runs the same through ``python -m cluster`` with the ssh
backend (skipped while cluster/backends/ssh.py does not exist).
"""
import json
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster import container
from cluster.node import containers as node_containers
from cluster.spec.config import load_inventory, load_job
from cluster.plan import make_plan

from tests.testbed_client import pty_cli

from .test_container_podman import _podman_problem, podman_args
from .test_local import rank_logs

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.testbed, pytest.mark.slow]
NPROC = 2


@pytest.fixture(scope="module")
def podman_testbed(testbed):
    """The `testbed`, skipped where podman cannot run on its hosts."""
    problem = _podman_problem()
    if problem:
        pytest.skip(problem)
    return testbed


class Cluster:
    """This test's inventory: the testbed's hosts, each with its own fresh workdir (its 'disk')."""

    def __init__(self, testbed, tmp_path):
        self.testbed, self.tmp = testbed, tmp_path
        inv = yaml.safe_load(Path(testbed.inventory).read_text())
        for h in inv["hosts"]:
            h["workdir"] = str(tmp_path / "disk" / h["name"])
        self.inventory = tmp_path / "inventory.yaml"
        self.inventory.write_text(yaml.safe_dump(inv))
        self.inv = load_inventory(self.inventory)
        self.started = []

    def sync_code(self):
        """What the ssh backend's sync does: the code each agent and rank imports, on each host."""
        for h in self.inv.hosts:
            wd = Path(h.workdir)
            shutil.copytree(REPO / "cluster", wd / "cluster", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
            (wd / "tests").mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / "tests" / "__init__.py", wd / "tests" / "__init__.py")
            shutil.copytree(REPO / "tests" / "fixtures", wd / "tests" / "fixtures", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))

    def job(self, name, **fields):
        data = {"name": name, "module": "tests.fixtures.hello", "cpu_procs_per_node": NPROC,
                "container": {"image": "rootfs:/", "runtime": "podman", "args": podman_args()}, **fields}
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    def ssh_argv(self, host, line):
        """One shell hop, as the ssh backend makes it: the line is the remote command (no shared
        connection: a ControlPersist master would hold our output pipes for a minute)."""
        return ["ssh", "-F", str(self.testbed.ssh_config), "-o", "ControlPath=none", host, "--", line]

    def ssh(self, host, line, timeout=60):
        return subprocess.run(self.ssh_argv(host, line), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def containers(self, host, run_id):
        p = self.ssh(host, shlex.join(container.list_argv("podman", run_id, host)))
        assert p.returncode == 0, p.stderr
        return p.stdout.split()


@pytest.fixture
def cl(podman_testbed, tmp_path):
    """The test's Cluster; at the end, whatever it started is gone, also after a failure."""
    c = Cluster(podman_testbed, tmp_path)
    yield c
    for plan in c.started:
        for node in plan.nodes:
            pid_file = node_file(c, node, f"{node.state_dir}/{node.host}.pid")
            if pid_file.exists():
                c.ssh(node.host, f"kill -KILL -- -{json.loads(pid_file.read_text())['pgid']} 2>/dev/null")
            c.ssh(node.host, shlex.join(node_containers.remove_argv(node.container.runtime, node.container.name)))


def wait_files(paths, timeout):
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        assert time.time() < deadline, f"missing after {timeout}s: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.3)


def start(cl, job_path, run_id):
    plan = make_plan(cl.inv, load_job(job_path).job, run_id, {h.name: 0 for h in cl.inv.hosts})
    cl.sync_code()
    cl.started.append(plan)
    for node in plan.nodes:
        # as the ssh backend sends it: NodeLaunch.shell() backgrounds its whole 'cd && ... &' list,
        # whose shell would keep the ssh channel open; a subshell on /dev/null lets ssh return
        p = cl.ssh(node.host, f"( {node.shell()} ) </dev/null >/dev/null 2>&1")
        assert p.returncode == 0, p.stderr
    wait_files([node_file(cl, n, f"{n.state_dir}/{n.host}.pid") for n in plan.nodes], 30)
    return plan


def node_file(cl, node, rel):
    return Path(cl.inv.host(node.host).workdir) / rel


def test_multihost_hello_in_podman_over_ssh(cl):
    rid = f"ctb-{secrets.token_hex(3)}"
    plan = start(cl, cl.job("ctb"), rid)
    assert len(plan.nodes) == 3 and plan.world_size == 3 * NPROC
    exits = [node_file(cl, n, f"{n.state_dir}/{n.host}.exit") for n in plan.nodes]
    wait_files(exits, 120)
    world = 3 * NPROC
    for node, exit_file in zip(plan.nodes, exits):
        log = node_file(cl, node, node.log_path).read_text()
        assert json.loads(exit_file.read_text())["code"] == 0, log[-3000:]
        # the agent ran on that host (its own hostname), torchrun ran inside podman there
        assert f"[{node.host} agent] starting on {node.host} " in log and "podman run --rm --init" in log
        for local in range(NPROC):
            rank = node.node_rank * NPROC + local
            assert f"[{node.host} {rank}] hello from rank {rank}/{world} sum={world * (world + 1) // 2}" in log
        # torchrun in podman keeps its per-rank files in the run directory on that host, as outside
        ranks = rank_logs(node_file(cl, node, str(Path(node.state_dir).parent)), node.host)
        assert sorted(ranks) == list(range(NPROC)), ranks
        for local, text in ranks.items():
            assert f"hello from rank {node.node_rank * NPROC + local}/{world} " in text
        assert cl.containers(node.host, rid) == []         # --rm: nothing left after a clean end


def test_stop_removes_every_hosts_container(cl):
    from cluster.backends.local import pids_of_run    # the namespaces share one pid namespace here
    rid = f"ctb-{secrets.token_hex(3)}"
    plan = start(cl, cl.job("ctb", env={"HELLO_SLEEP_S": "120"}), rid)
    logs = [node_file(cl, n, n.log_path) for n in plan.nodes]
    deadline = time.time() + 120
    while sum(l.read_text().count("hello from rank") if l.exists() else 0 for l in logs) < 3 * NPROC:
        assert time.time() < deadline, [l.read_text()[-2000:] for l in logs if l.exists()]
        time.sleep(0.5)
    for node in plan.nodes:
        assert cl.containers(node.host, rid) == [container.container_name(rid, node.host)]
    # node3: the agent's group is killed outright; its container lives on (conmon owns it)
    victim = plan.nodes[2]
    pgid = json.loads(node_file(cl, victim, f"{victim.state_dir}/{victim.host}.pid").read_text())["pgid"]
    assert cl.ssh(victim.host, f"kill -KILL -- -{pgid}").returncode == 0
    time.sleep(1)
    assert cl.containers(victim.host, rid) == [container.container_name(rid, victim.host)]
    # stop as a backend does: TERM each group, wait, then remove by name and verify by label
    for node in plan.nodes[:2]:
        pgid = json.loads(node_file(cl, node, f"{node.state_dir}/{node.host}.pid").read_text())["pgid"]
        assert cl.ssh(node.host, f"kill -TERM -- -{pgid}").returncode == 0
    wait_files([node_file(cl, n, f"{n.state_dir}/{n.host}.exit") for n in plan.nodes[:2]], 30)
    for node in plan.nodes:
        ref = node.container
        rm = node_containers.remove_argv(ref.runtime, ref.name)
        assert cl.ssh(node.host, shlex.join(rm)).returncode == 0
        assert cl.containers(node.host, rid) == []
    deadline = time.time() + 10
    while pids_of_run(rid):
        assert time.time() < deadline, pids_of_run(rid)
        time.sleep(0.2)


def test_preflight_commands_on_each_host(cl):
    for h in cl.inv.hosts:
        for argv in container.preflight_argv("podman", "rootfs:/"):
            p = cl.ssh(h.name, shlex.join(argv))
            assert p.returncode == 0, (h.name, argv, p.stderr)
        # the last check reads the image's digest (compared across hosts): it fails too when missing
        runtime_ok, image_check, digest_check = container.preflight_argv("podman", "localhost/ddp-no-such-image:0")
        assert cl.ssh(h.name, shlex.join(image_check)).returncode == 1
        assert cl.ssh(h.name, shlex.join(digest_check)).returncode != 0
        assert cl.ssh(h.name, "nosuchruntime --version").returncode == 127


@pytest.mark.skipif(not (REPO / "cluster" / "backends" / "ssh.py").exists(),
                    reason="the ssh backend (cluster/backends/ssh.py) is not there yet")
def test_cli_submit_and_stop_in_podman_with_the_ssh_backend(cl, podman_testbed, tmp_path):
    """Through the ssh backend: needs its container hooks (preflight_checks, remove_argv/list_argv)."""
    runs = tmp_path / "runs"

    def cli(*args, timeout=180):
        return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, text=True, capture_output=True,
                              timeout=timeout, env=podman_testbed.env(CLUSTER_RUNS_DIR=str(runs)))

    def state(rid):
        return json.loads(cli("status", rid, "--json").stdout)

    p = cli("submit", cl.job("ctb"), "-i", str(cl.inventory))
    assert p.returncode == 0, p.stdout + p.stderr
    rid = p.stdout.split()[1]
    deadline = time.time() + 180
    while state(rid)["state"] not in ("SUCCEEDED", "FAILED"):
        assert time.time() < deadline
        time.sleep(1)
    logs = cli("logs", rid).stdout
    assert state(rid)["state"] == "SUCCEEDED", logs[-3000:]
    assert logs.count("hello from rank") == 3 * NPROC
    p = cli("submit", cl.job("ctb", env={"HELLO_SLEEP_S": "120"}), "-i", str(cl.inventory))
    assert p.returncode == 0, p.stdout + p.stderr
    rid = p.stdout.split()[1]
    deadline = time.time() + 120
    while cli("logs", rid).stdout.count("hello from rank") < 3 * NPROC:
        assert time.time() < deadline, cli("logs", rid).stdout[-3000:]
        time.sleep(1)
    # a shell on node 1 is inside that host's container of the run, in the run's directory
    env = podman_testbed.env(CLUSTER_RUNS_DIR=str(runs))
    code, out = pty_cli(["shell", rid, "--node", "1"],
                        b'echo "IN:$(hostname):$(pwd):$(test -e /run/.containerenv && echo container)"; exit\n', env)
    node2 = cl.inv.hosts[1]
    assert code == 0 and f"IN:node2:{node2.workdir}/runs/{rid}:container" in out, out   # the job's cwd
    # a server started in that container, on the node's loopback, through the tunnel; gone after Ctrl-C
    j = subprocess.Popen([sys.executable, "-m", "cluster", "jupyter", rid, "--node", "1", "--", "python3", "-c",
                          "import http.server as h, sys, os; open('inside', 'w').write(str(os.path.exists('/run/.containerenv'))); "
                          "h.test(HandlerClass=h.SimpleHTTPRequestHandler, port=int(sys.argv[1]), bind='127.0.0.1')",
                          "{port}"], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    url = re.search(r"http://\S+", j.stdout.readline()).group(0)
    with urllib.request.urlopen(url + "inside", timeout=10) as r:
        assert r.read() == b"True"
    j.send_signal(signal.SIGINT)
    assert j.wait(timeout=30) == 0, j.stderr.read()
    ps = podman_testbed.run(node2.name, ["podman", "exec", container.container_name(rid, node2.name), "sh", "-c",
                              "for p in /proc/[0-9]*; do cat $p/cmdline; echo; done"])
    assert "http.server" not in ps.stdout and "h.test" not in ps.stdout, ps.stdout
    p = cli("stop", rid)
    assert p.returncode == 0, p.stdout + p.stderr
    for h in cl.inv.hosts:
        assert cl.containers(h.name, rid) == []
