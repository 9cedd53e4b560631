"""shell and jupyter without the testbed: the ssh command line, container shells, node choice,
a local shell through a pty, and the node-side server watcher (cluster.node.probe._serve)."""
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.backends import attach
from cluster import container as ctr
from cluster.spec.config import Host, Inventory, SSHSettings
from cluster.container import ContainerRef
from cluster.errors import UserError
from cluster.backends.ship import _host_source
from cluster.run.records import Run
from cluster.spec.schema import to_plain
from tests.testbed_client import pty_cli

REPO = Path(__file__).resolve().parent.parent


def host(**kw):
    base = dict(name="gpu1", hostname="gpu1.example", address="10.0.0.1", user=None, port=None,
                identity_file=None, jump_host=None, interface=None, workdir="~/ddp", python="python3",
                gpus=0, container_runtime=None)
    return Host(**{**base, **kw})


def inventory(hosts, **ssh):
    return Inventory(path="inv.yaml", backend="ssh", hosts=tuple(hosts), ssh=SSHSettings(**ssh), slurm=None,
                     shared_fs=False, storage=None)


def test_ssh_command_line_follows_the_inventory():
    h = host(user="ml", port=2222, identity_file="~/.ssh/id_x", jump_host="bastion,inner")
    argv = attach.ssh_client_argv(h, inventory([h], known_hosts="/k/known", accept_new_host_keys=True), tty=True)
    assert argv[:2] == ["ssh", "-t"] and argv[-2:] == ["--", "gpu1.example"]
    text = " ".join(argv)
    for part in ("StrictHostKeyChecking=accept-new", "UserKnownHostsFile=/k/known", "-l ml", "-p 2222",
                 "IdentitiesOnly=yes", "PasswordAuthentication=no"):
        assert part in text
    # the jump hosts with the same key and known_hosts policy (ssh -J would use ssh's defaults there)
    proxy = next(a for a in argv if a.startswith("ProxyCommand="))
    assert proxy.endswith("-- bastion' -W '[%h]:%p' -- inner") and "accept-new" in proxy and "-J" not in argv
    assert os.path.expanduser("~/.ssh/id_x") in argv
    # unknown hosts refused unless the inventory says otherwise; no ssh config file when it has none
    argv = attach.ssh_client_argv(host(), inventory([host()], config_file=None), tty=False)
    assert "StrictHostKeyChecking=yes" in argv and argv[1] == "-T" and argv[2:4] == ["-F", "none"]


def target(ref=None, backend="ssh", env=None):
    h = host()
    return attach.Target(inventory([h]), h, backend, "/w d", env=env or {"A": "x y", "CLUSTER_RUN_ID": "r1"},
                         container=ref)


def test_shell_goes_into_the_running_container_or_a_new_one_of_the_image():
    ref = ContainerRef("podman", "ddp-r1-gpu1", "rootfs:/", False, "r1")
    argv, assigns = attach.shell_argv(target(ref), running=True)
    assert argv[:4] == ["podman", "exec", "-it", "-w"] and "ddp-r1-gpu1" in argv and assigns == []
    assert argv[argv.index("-w") + 1] == "/w d" and "A=x y" in argv
    argv, _ = attach.shell_argv(target(ref), running=False)
    # a fresh container runs as the submitting user: the host's shell adds --user "$(id -u):$(id -g)"
    assert argv[:3] == ["sh", "-c", ctr.host_script("self", False)]
    assert argv[3:7] == ["podman", "run", "--rm", "-it"] and "--rootfs" in argv and "/w d:/w d" in argv
    assert argv[argv.index("--rootfs") + 1] == "/:O"
    ref = ContainerRef("docker", "ddp-r1-gpu1", "nvcr.io/nvidia/pytorch:24.05-py3", False, "r1")
    argv, _ = attach.shell_argv(target(ref), running=False)
    assert argv[-4:-2] == ["nvcr.io/nvidia/pytorch:24.05-py3", "sh"]
    # no container: the user's shell with the run's environment as assignments
    argv, assigns = attach.shell_argv(target())
    assert argv[:2] == ["sh", "-c"] and assigns == ["A=x y", "CLUSTER_RUN_ID=r1"]


def local_run(tmp_path, monkeypatch, workdir):
    """A recorded local run with one node (as submit writes run.json), nothing running."""
    monkeypatch.setenv("CLUSTER_RUNS_DIR", str(tmp_path / "runs"))
    h = host(name="localhost", hostname="localhost", address="127.0.0.1", workdir=str(workdir))
    inv = replace(inventory([h]), backend="local")
    run = Run("hello-1", tmp_path / "runs")
    run.create({"id": "hello-1", "backend": "local", "created": time.time(), "state": "RUNNING",
                "inventory": to_plain(inv), "handle": {"pgids": {}},
                "plan": {"nodes": [{"host": "localhost", "workdir": str(workdir), "node_rank": 0,
                                    "env": {"CLUSTER_RUN_ID": "hello-1", "WEIRD": "a'b; $(x)"},
                                    "state_dir": "runs/hello-1/state"}]}})
    return run


def test_local_shell_through_a_pty(tmp_path, monkeypatch):
    wd = tmp_path / "work dir"
    wd.mkdir()
    local_run(tmp_path, monkeypatch, wd)
    code, out = pty_cli(["shell", "hello-1"], b'echo "AT:$(pwd):$CLUSTER_RUN_ID:$WEIRD"; exit 5\n', dict(os.environ), 30)
    assert code == 5
    assert f"AT:{tmp_path / 'runs' / 'hello-1'}:hello-1:a'b; $(x)" in out, out     # the run's directory
    # a node the run does not have
    q = subprocess.run([sys.executable, "-m", "cluster", "shell", "hello-1", "--node", "3"], cwd=REPO,
                       capture_output=True, text=True)
    assert q.returncode == 2 and "no node '3'" in q.stderr and "0 (localhost)" in q.stderr


def watcher(spec):
    p = subprocess.Popen([sys.executable, "-c", _host_source("_serve")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    p.stdin.write(json.dumps(spec) + "\n")
    p.stdin.flush()
    return p


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["stdin closed", "run ended"])
def test_watcher_stops_the_whole_server_group(tmp_path, how):
    # the server starts a child of its own: both must go
    server = ["sh", "-c", "sleep 300 & exec python3 -m http.server {port} --bind 127.0.0.1"]
    p = watcher({"argv": server, "workdir": str(tmp_path), "token": "t0k", "env": {"X": "1"},
                 "log": "logs/s.log", "end_file": "state/n.exit", "pgid": None})
    first = json.loads(p.stdout.readline())
    assert json.loads(p.stdout.readline()) == {"ready": True}
    with socket.create_connection(("127.0.0.1", first["port"]), timeout=5):
        pass
    if how == "stdin closed":
        p.stdin.close()
    else:
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / "n.exit").write_text("{}")
    last = json.loads(p.stdout.readlines()[-1])
    assert p.wait(timeout=20) == 0
    assert last == {"stopped": "asked to stop" if how == "stdin closed" else "the run ended", "left": False}
    assert not alive(first["pid"])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", first["port"]), timeout=2)


def test_watcher_reports_a_server_that_fails_or_never_listens(tmp_path):
    p = watcher({"argv": ["sh", "-c", "echo token={token}; exit 4"], "workdir": str(tmp_path), "token": "s3cret",
                 "log": "s.log"})
    lines = [json.loads(line) for line in p.stdout.readlines()]
    assert lines[-1]["exited"] == 4 and "token=s3cret" in lines[-1]["tail"]
    p = watcher({"argv": ["sleep", "30"], "workdir": str(tmp_path), "token": "t", "log": "s.log",
                 "ready_timeout_s": 1})
    lines = [json.loads(line) for line in p.stdout.readlines()]
    assert lines[-1]["stopped"].startswith("not listening on port") and lines[-1]["left"] is False


def test_jupyter_refuses_slurm_runs():
    t = target(backend="slurm")
    with pytest.raises(UserError, match="SLURM"):
        attach.jupyter(t, [])
