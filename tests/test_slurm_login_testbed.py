"""SLURM from a machine without SLURM: every verb through the login node (cluster/backends/login.py).

node1 plays the login node (SLURM's clients, and /tmp is the filesystem every node shares); the
submitting side is this machine with a shim first on PATH whose sbatch/squeue/scancel/srun/sacct/
scontrol/sinfo fail loudly and record that they were called: no test may find a call in it.
Every verb runs as `python -m cluster ...` in a fresh process, as from a new shell.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_slurm_testbed import HELLO, job_pids, slurm_state, wait
from tests.test_slurm_testbed import Slurm
from tests.testbed_client import pty_cli

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.testbed, pytest.mark.slow]
SLURM_CLIENTS = ("sbatch", "squeue", "scancel", "srun", "sacct", "scontrol", "sinfo", "salloc")
TICKS = 150       # lines per rank, one every 0.2 s
TICKER = f"""name: ticker
nodes: 2
cpu_procs_per_node: 2
command: [sh, -c, 'for i in $(seq 1 {TICKS}); do echo "tick $RANK $i"; sleep 0.2; done']
"""


class Laptop(Slurm):
    """The submitting side: no SLURM client usable, an inventory with slurm.login, runs/ of its own."""

    def __init__(self, testbed, tmp_path, login="node1", edit=None, **slurm):
        super().__init__(testbed, tmp_path, login=login, remote_dir=str(tmp_path / "remote"), **slurm)
        if edit:
            inv = yaml.safe_load(self.inventory.read_text())
            edit(inv)
            self.inventory.write_text(yaml.safe_dump(inv))
        self.shim, self.calls = tmp_path / "shim", tmp_path / "shim-calls"
        self.shim.mkdir()
        for name in SLURM_CLIENTS:
            p = self.shim / name
            p.write_text(f'#!/bin/sh\necho "{name} $*" >> {self.calls}\n'
                         f'echo "{name} must not run on the submitting side" >&2\nexit 97\n')
            p.chmod(0o755)

    def env(self):
        env = super().env()
        env["PATH"] = f"{self.shim}{os.pathsep}{env['PATH']}"
        return env

    def cli(self, *args, timeout=180):
        return super().cli(*args, timeout=timeout)

    def record(self, run_id):
        return json.loads((self.runs / run_id / "run.json").read_text())

    def wait_state(self, run_id, states, timeout=150):
        return super().wait_state(run_id, states, timeout)

    def no_slurm_client_ran_here(self):
        assert not self.calls.exists(), self.calls.read_text()


def _no_shim_calls_possible(lap):
    """The shim is what this machine's PATH finds first."""
    p = subprocess.run(["sbatch", "--version"], env=lap.env(), capture_output=True, text=True)
    assert p.returncode == 97 and "must not run on the submitting side" in p.stderr
    lap.calls.unlink()


def test_submit_status_logs_through_the_login_node(testbed, tmp_path):
    lap = Laptop(testbed, tmp_path, gpus_per_node=2)
    _no_shim_calls_possible(lap)
    run_id, jid = lap.submit(lap.job("hello", HELLO.format(sleep=0)))
    st = lap.wait_state(run_id, {"SUCCEEDED", "FAILED", "CANCELLED"})
    assert st["state"] == "SUCCEEDED", lap.logs(run_id)
    logs = lap.logs(run_id)
    assert sorted(int(r) for r in re.findall(r"^\[node\d (\d)\] hello from rank \1/4 sum=10", logs, re.M)) == [0, 1, 2, 3]
    assert len({h for h in re.findall(r"^\[(node\d) \d\] ", logs, re.M)}) == 2
    # the run lives on the login node and is mirrored here; this side's record leads back there
    remote = tmp_path / "remote" / "runs" / run_id
    rec = lap.record(run_id)
    assert rec["state"] == "SUCCEEDED" and rec["login"]["run_dir"] == str(remote)
    assert rec["login"]["code"].startswith(str(tmp_path / "remote" / "code") + "/")
    assert (Path(rec["login"]["code"]) / "cluster" / "backends" / "slurm.py").is_file()
    assert (remote / "run.json").is_file() and (lap.runs / run_id / "events.jsonl").is_file()
    assert rec["inventory"]["login"]["name"] == "node1"
    assert json.loads((remote / "run.json").read_text())["inventory"].get("login") is None
    # logs on request
    p = lap.cli("logs", run_id, "--collect")
    assert p.returncode == 0, p.stderr
    assert len(list((lap.runs / run_id / "logs").glob(f"{jid}_*_log.out"))) == 4
    lap.no_slurm_client_ran_here()


def test_stop_from_a_new_shell_leaves_nothing(testbed, tmp_path):
    lap = Laptop(testbed, tmp_path)
    run_id, jid = lap.submit(lap.job("hello", HELLO.format(sleep=300)))
    wait(lambda: lap.logs(run_id).count("hello from rank") == 4, "all 4 ranks running", timeout=120)
    assert lap.status(run_id)["state"] == "RUNNING" and job_pids(jid)
    # a shell on node 1 inside the job's allocation (srun --overlap --pty on the login node)
    code, out = pty_cli(["shell", run_id, "--node", "1"],
                        b'echo "AT:$(hostname):$(pwd):$SLURM_JOB_ID:$CLUSTER_RUN_ID"; exit 4\n', lap.env())
    assert f"AT:node2:{tmp_path / 'remote' / 'runs' / run_id}:{jid}:{run_id}" in out and code == 4, out
    p = lap.cli("stop", run_id)
    assert p.returncode == 0, p.stderr
    assert "nothing of the run is left running" in p.stdout
    assert lap.status(run_id)["state"] == "CANCELLED" and lap.record(run_id)["state"] == "CANCELLED"
    assert slurm_state(jid) == "CANCELLED"
    assert job_pids(jid) == []
    lap.no_slurm_client_ran_here()


def test_bad_partition_refused_before_anything_is_submitted(testbed, tmp_path):
    lap = Laptop(testbed, tmp_path, partition="nosuch")
    before = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
    p = lap.cli("submit", lap.job("hello", HELLO.format(sleep=0)), "-i", str(lap.inventory))
    assert p.returncode == 2, p.stderr
    assert "SLURM rejects the job" in p.stderr and "Invalid partition name" in p.stderr
    assert str(lap.inventory) in p.stderr and "Traceback" not in p.stderr
    assert [l.startswith("error: ") for l in p.stderr.splitlines()].count(True) == 1, p.stderr
    assert not lap.runs.exists() and not list((tmp_path / "remote" / "runs").glob("*"))
    after = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
    assert not [n for n in after if n.startswith("hello-") and n not in before]
    # an unreachable login node: one message, nothing started
    (tmp_path / "far").mkdir()
    lap = Laptop(testbed, tmp_path / "far", login={"hostname": "10.213.0.99"})
    p = lap.cli("submit", lap.job("hello", HELLO.format(sleep=0)), "-i", str(lap.inventory))
    assert p.returncode == 2 and "login node 10.213.0.99" in p.stderr and "Traceback" not in p.stderr, p.stderr
    lap.no_slurm_client_ran_here()


def login_pythons(run_id, netns="node1"):
    """pid -> argv of the processes on the login node that look at ``run_id`` (a status there)."""
    ino = os.stat(f"/run/netns/{netns}").st_ino
    out = {}
    for d in Path("/proc").iterdir():
        try:
            if not d.name.isdigit() or os.stat(d / "ns" / "net").st_ino != ino:
                continue
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        # the run's follower (cluster/backends/slurm.py follow: one for the run's life, whoever
        # looks) aside: what is counted is what a look at the state starts there
        if run_id in argv and any(a.startswith("cluster") for a in argv) and "follow" not in argv:
            out[int(d.name)] = " ".join(argv)
    return out


def test_logs_follow_looks_at_the_state_through_one_kept_process(testbed, tmp_path):
    """`logs -f` through the login node: one process there answers the run's state for the whole
    follow (it used to be a new `python -m cluster status` there every 2 s), and it ends with it."""
    lap = Laptop(testbed, tmp_path)
    run_id, jid = lap.submit(lap.job("ticker", TICKER.replace(f"seq 1 {TICKS}", "seq 1 60")))
    follow = subprocess.Popen([sys.executable, "-m", "cluster", "logs", run_id, "-f"], cwd=REPO, env=lap.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, samples = {}, 0
    while follow.poll() is None:
        seen.update(login_pythons(run_id))
        samples += 1
        time.sleep(0.25)
    out, err = follow.communicate()
    assert follow.returncode == 0 and f"-- run {run_id} SUCCEEDED" in err, err
    assert sorted(re.findall(r"^\[node\d (\d)\] tick \1 60$", out, re.M)) == ["0", "1", "2", "3"]
    assert samples > 40                 # more than 10 s of following: 5 looks at the state or more
    assert len(seen) == 1 and "status-stream" in next(iter(seen.values())), seen
    wait(lambda: not login_pythons(run_id), "the status process there gone with the follow", timeout=15)
    assert lap.record(run_id)["state"] == "SUCCEEDED"
    events = [json.loads(l) for l in (lap.runs / run_id / "events.jsonl").read_text().splitlines()]
    assert [e["state"] for e in events if e["event"] == "state"][-1] == "SUCCEEDED"   # the end mirrored too
    lap.no_slurm_client_ran_here()


def test_logs_follow_loses_no_line_when_the_login_node_drops(testbed, client, tmp_path):
    """The login node's sshd (a second one, port 2222) is stopped for 20 s while `logs -f` follows."""
    from tests.test_ssh_testbed import OwnSshd
    sshd = OwnSshd(client, "node1")
    sshd.start()
    try:
        key = (Path(testbed.state["state_dir"]) / "hosts" / "node1" / "ssh_host_ed25519_key.pub").read_text().split()
        kh = tmp_path / "known_hosts"

        def edit(inv):
            kh.write_text(Path(inv["ssh"]["known_hosts"]).read_text() + f"[node1]:2222 {key[0]} {key[1]}\n")
            inv["ssh"]["known_hosts"] = str(kh)
        lap = Laptop(testbed, tmp_path, login={"hostname": "node1", "port": 2222}, edit=edit)
        run_id, jid = lap.submit(lap.job("ticker", TICKER))
        out = open(tmp_path / "follow.txt", "w")
        follow = subprocess.Popen([sys.executable, "-m", "cluster", "logs", run_id, "-f"], cwd=REPO, env=lap.env(),
                                  stdout=out, stderr=subprocess.PIPE, text=True)
        wait(lambda: (tmp_path / "follow.txt").read_text().count("tick ") >= 20, "ticks followed", timeout=120)
        sshd.stop()
        time.sleep(20)
        assert slurm_state(jid) == "RUNNING"          # the job goes on without the login node's sshd
        sshd.start()
        follow.wait(timeout=180)
        out.close()
        err = follow.stderr.read()
        assert follow.returncode == 0 and f"-- run {run_id} SUCCEEDED" in err, err
        assert "log unreachable" in err and "reachable again" in err, err     # the drop was seen
        lines = (tmp_path / "follow.txt").read_text().splitlines()
        ticks = sorted(re.findall(r"^\[node\d (\d)\] tick \1 (\d+)$", "\n".join(lines), re.M))
        assert ticks == sorted((str(r), str(i)) for r in range(4) for i in range(1, TICKS + 1))   # none lost, none twice
        assert sorted(lines) == sorted(lap.logs(run_id).splitlines())
        lap.no_slurm_client_ran_here()
    finally:
        sshd.stop()


@pytest.mark.parametrize("where", ["sbatch here", "through the login node"])
def test_a_detached_run_is_recorded_running_without_a_status_call(testbed, tmp_path, where):
    """`make submit DETACH=1`: the record says PENDING once sbatch answered (never STARTING), then
    RUNNING once the job runs, written by task 0 on the shared filesystem: nobody ran `status`."""
    side = Laptop(testbed, tmp_path) if where == "through the login node" else Slurm(testbed, tmp_path)
    run_id, jid = side.submit(side.job("hello", HELLO.format(sleep=300)))
    here = json.loads((side.runs / run_id / "run.json").read_text())
    # the job may have started before the laptop mirrored the login node's record: never STARTING
    assert here["state"] in ("PENDING", "RUNNING"), here["state"]
    shared = tmp_path / "remote" / "runs" / run_id if isinstance(side, Laptop) else side.runs / run_id
    try:
        wait(lambda: json.loads((shared / "run.json").read_text())["state"] == "RUNNING", "RUNNING recorded",
             timeout=120)
        events = [json.loads(l) for l in (shared / "events.jsonl").read_text().splitlines()]
        assert [(e["by"], e["job_id"]) for e in events if e["event"] == "state" and e["state"] == "RUNNING"] == \
            [("task 0", jid)]
        assert slurm_state(jid) == "RUNNING"
        if isinstance(side, Laptop):
            # the laptop's record follows at the next look through the login node
            assert side.status(run_id)["state"] == "RUNNING" and side.record(run_id)["state"] == "RUNNING"
            side.no_slurm_client_ran_here()
    finally:
        p = side.cli("stop", run_id)
        assert p.returncode == 0, p.stderr
    assert slurm_state(jid) == "CANCELLED" and job_pids(jid) == []


def test_plan_prints_the_script_as_the_login_node_submits_it(testbed, tmp_path):
    """`plan` with slurm.login: the login node's remote_dir, code directory and python, not this
    machine's; nothing made there; after a submit, the script submitted there is the one plan printed."""
    lap = Laptop(testbed, tmp_path)
    job = lap.job("hello", HELLO.format(sleep=0))
    remote = tmp_path / "remote"
    p = lap.cli("plan", job, "-i", str(lap.inventory), "--run-id", "hello-planned")
    assert p.returncode == 0, p.stderr
    assert f"#SBATCH --output={remote}/runs/hello-planned/slurm/%j_batch.log\n" in p.stdout
    # nothing of this checkout but the python, which on the cluster in a box is the login node's too
    assert f"#SBATCH --chdir={remote}/code/" in p.stdout, p.stdout
    assert str(REPO) not in p.stdout.replace(testbed.python, ""), p.stdout
    assert f"remote_dir {remote}, code {remote}/code/" in p.stderr and "python " in p.stderr, p.stderr
    assert not remote.exists()          # a plan makes nothing there
    run_id, jid = lap.submit(job)
    assert lap.wait_state(run_id, {"SUCCEEDED", "FAILED", "CANCELLED"})["state"] == "SUCCEEDED"
    submitted = (remote / "runs" / run_id / "slurm" / f"{jid}_submission.sh").read_text()
    p = lap.cli("plan", job, "-i", str(lap.inventory), "--run-id", run_id)
    assert p.returncode == 0, p.stderr
    assert p.stdout == submitted
    lap.no_slurm_client_ran_here()


def test_jupyter_on_a_slurm_node_through_the_login_node(testbed, tmp_path):
    """`jupyter RUN --node 1` from the laptop: the server runs on the run's node 1 (inside the job's
    allocation), on its loopback, and this machine reaches it through the login node; Ctrl-C stops
    it, and so does the end of the run."""
    import signal
    import urllib.request
    lap = Laptop(testbed, tmp_path)
    run_id, jid = lap.submit(lap.job("hello", HELLO.format(sleep=300)))
    try:
        wait(lambda: lap.logs(run_id).count("hello from rank") == 4, "all 4 ranks running", timeout=120)
        server = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
        jup = subprocess.Popen([sys.executable, "-m", "cluster", "jupyter", run_id, "--node", "1", "--", *server],
                               cwd=REPO, env=lap.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = jup.stdout.readline()
            m = re.search(r"on node2 \(node 1 of run \S+\): (http://127\.0\.0\.1:\d+/)", line)
            assert m, line + jup.stderr.read() if jup.poll() is not None else line
            page = urllib.request.urlopen(m[1], timeout=10).read().decode()
            assert "run.json" in page and "events.jsonl" in page          # the run's directory, served there
            served = [pid for pid in job_pids(jid, "node2")
                      if b"http.server" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            assert len(served) == 1          # on node 2, inside the job (its SLURM_JOB_ID)
            jup.send_signal(signal.SIGINT)
            out, err = jup.communicate(timeout=60)
            assert jup.returncode == 0 and "stopped" in err and "left running" not in err, err
            wait(lambda: not Path(f"/proc/{served[0]}").exists(), "the server gone", timeout=15)
            # a server on node 0 ends with the run
            jup = subprocess.Popen([sys.executable, "-m", "cluster", "jupyter", run_id, "--", *server],
                                   cwd=REPO, env=lap.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert "on node1 (node 0 of run" in jup.stdout.readline()
        finally:
            p = lap.cli("stop", run_id)
            assert p.returncode == 0, p.stderr
            try:
                jup.wait(timeout=60)
            finally:
                jup.kill()          # (a no-op once it ended)
        err = jup.stderr.read()
        assert jup.returncode == 0 and "stopped: the run's SLURM job ended" in err, err
        lap.no_slurm_client_ran_here()
    finally:
        lap.cli("stop", run_id)
    assert job_pids(jid) == []
