"""shell and jupyter on the cluster in a box: a shell on a run's node through a pty, a server on a
node's loopback forwarded here through ssh, and nothing left on the node after either."""
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.testbed_client import HELLO, REPO, pty_cli

pytestmark = pytest.mark.testbed

HTTP = ["--", "python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
# on a host: is anything listening on its own loopback port argv[1]? is pid argv[2] alive?
PROBE = r"""
import os, socket, sys
s = socket.socket()
s.settimeout(2)
listening = s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0
alive = os.path.exists(f"/proc/{sys.argv[2]}") and open(f"/proc/{sys.argv[2]}/stat").read().split(") ")[1][0] != "Z"
print(listening, alive)
"""


def pty_session(client, args, send: bytes, timeout=60):
    return pty_cli(args, send, client.testbed.env(CLUSTER_RUNS_DIR=str(client.runs)), timeout)


@pytest.fixture
def hello_run(client):
    rid, _ = client.submit(client.job(HELLO.format(sleep=600)))
    client.wait_lines(rid, "hello from rank", 3)
    return rid


def test_shell_on_the_chosen_node_in_the_runs_directory(client, hello_run):
    rid = hello_run
    # by node rank; the command runs on node2, in the run's directory (its job's cwd), with the run's environment
    code, out = pty_session(client, ["shell", rid, "--node", "1"],
                            b"echo \"MARK:$(hostname):$(pwd):$CLUSTER_RUN_ID:$(tty >/dev/null && echo tty)\"; exit 7\n")
    assert code == 7, out
    assert f"MARK:node2:{client.workdir['node2'] / 'runs' / rid}:{rid}:tty" in out, out
    # by host name; a file the run wrote is right there (relative path from the run's directory)
    code, out = pty_session(client, ["shell", rid, "--node", "node3"], b"cat state/node3.pid; exit\n")
    assert code == 0 and '"pgid"' in out, out
    # a node the run does not have: one clear error, exit 2, nothing started
    p = client.cli("shell", rid, "--node", "5")
    assert p.returncode == 2 and "has no node '5'" in p.stderr and "2 (node3)" in p.stderr, p.stderr


def start_server(client, *args):
    p = subprocess.Popen([sys.executable, "-m", "cluster", "jupyter", *args], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=client.testbed.env(CLUSTER_RUNS_DIR=str(client.runs)))
    line = p.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/\S*", line)
    assert m, line + p.stderr.read() if p.poll() is not None else line
    return p, m.group(0), int(m.group(1))


def wait_gone(client, host, port, pid, timeout=20):
    deadline = time.time() + timeout
    while True:
        out = client.testbed.run(host, [client.testbed.python, "-c", PROBE, str(port), str(pid)], timeout=30).stdout.split()
        if out == ["False", "False"]:
            return
        assert time.time() < deadline, f"server still there on {host} (listening, alive) = {out}"
        time.sleep(0.5)


def server_of(client, rid, host):
    """(port, pid) of the http.server the session started on ``host`` (from the node's process list)."""
    for line in client.run_pids(host, rid):
        if "http.server" in line:
            pid = int(line.split()[0])
            args = line.split()
            return int(args[args.index("http.server") + 1]), pid
    return None


def test_jupyter_tunnel_serves_the_nodes_loopback_and_leaves_nothing(client, hello_run):
    rid = hello_run
    marker = f"served from node2 for {rid}\n"
    (client.host_file("node2", rid, f"tunnel-{rid}.txt")).write_text(marker)     # the server runs in the run's directory
    try:
        # 1. Ctrl-C: the page comes through the tunnel; the server is on node2's loopback only
        p, url, local = start_server(client, rid, "--node", "1", *HTTP)
        port, pid = server_of(client, rid, "node2")
        with urllib.request.urlopen(url.split("?")[0] + f"tunnel-{rid}.txt", timeout=10) as r:
            assert r.read().decode() == marker
        s = socket.socket()
        s.settimeout(2)
        assert s.connect_ex(("10.213.0.12", port)) != 0, "the server must not listen on the node's network"
        s.close()
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 0, p.stderr.read()
        wait_gone(client, "node2", port, pid)
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=3)
        assert client.state(rid)["state"] == "RUNNING"   # the run goes on

        # 2. this side killed -9 (no goodbye): the node sees the connection gone and stops the server
        p, url, local = start_server(client, rid, "--node", "node2", *HTTP)
        port, pid = server_of(client, rid, "node2")
        p.kill()
        p.wait(timeout=10)
        wait_gone(client, "node2", port, pid, timeout=30)

        # 3. the run stops: the session ends by itself and the server goes with the run
        p, url, local = start_server(client, rid, "--node", "1", *HTTP)
        port, pid = server_of(client, rid, "node2")
        stop = client.cli("stop", rid, "--grace-s", "3")
        assert stop.returncode == 0, stop.stderr
        assert p.wait(timeout=30) == 0
        assert "stopped: the run ended" in p.stderr.read()
        wait_gone(client, "node2", port, pid)
        assert not client.left_anywhere(rid)
    finally:
        (client.host_file("node2", rid, f"tunnel-{rid}.txt")).unlink()


def test_jupyter_without_a_run_on_an_inventory_host_and_a_failing_server(client):
    p, url, local = start_server(client, "-i", client.testbed.inventory, "--host", "node3", *HTTP)
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 0
    # a server that cannot start: its exit code and the tail of its log, exit 1
    q = client.cli("jupyter", "-i", client.testbed.inventory, "--host", "node1", "--", "python3", "-c",
                "import sys; print('no luck here'); sys.exit(4)", timeout=60)
    assert q.returncode == 1 and "exited with code 4" in q.stderr and "no luck here" in q.stderr, q.stderr
    # the default, JupyterLab, is not installed on the test hosts: a hint says what to do
    q = client.cli("jupyter", "-i", client.testbed.inventory, "--host", "node1", timeout=60)
    assert q.returncode == 1 and "pip install jupyterlab" in q.stderr, q.stderr
