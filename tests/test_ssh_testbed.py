"""The ssh backend on the cluster in a box: 3 hosts (network namespaces, each with a real sshd), gloo.

Every verb runs as ``python -m cluster ...`` in a new process, as from a fresh shell. What is left
on the hosts is checked over ssh, each host looking at its own processes (one pid namespace holds
all three hosts here, so each check keeps to the host's own network namespace).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.testbed_client import HELLO, STEPS_LONG, TRAIN, assert_merged, host_lines

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.testbed


# ---------------------------------------------------------------- a real run, then resume
def test_training_across_three_hosts_checkpoint_synced_then_resume(client):
    t0 = time.time()
    rid, p = client.submit(client.job(TRAIN.format(steps=30, log_every=5)))
    assert "preflight: 3 host(s) node[1-3]" in p.stderr and "reachable from node[2-3]" in p.stderr
    st = client.wait(rid)
    logs = client.cli("logs", rid).stdout
    assert st["state"] == "SUCCEEDED", logs[-4000:]
    for rank, h in enumerate(client.testbed.host_names):          # one rank on every host, rank 0 on node 0
        assert f"[{h} {rank}] " in logs
    assert_merged(logs.splitlines(), host_lines(client, rid))
    # loss goes down (rank 0's metrics, on node1)
    recs = [json.loads(l) for l in client.host_file("node1", rid, "metrics/metrics-rank0.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    # the checkpoint comes back to this machine (the watcher syncs it when the run ends); status says when
    ck = client.runs / rid / "checkpoints"
    deadline = time.time() + 90
    while (cs := client.state(rid)["checkpoints"])["state"] == "syncing":
        assert time.time() < deadline, f"checkpoint not synced: {list(ck.iterdir()) if ck.exists() else None}"
        time.sleep(1)
    assert cs["state"] == "synced" and cs["latest"] == "ckpt_30.pt", cs
    assert (ck / "latest").read_text().strip() == "ckpt_30.pt"
    assert "checkpoints: synced (latest ckpt_30.pt in " in client.cli("status", rid).stdout
    rec = client.record(rid)
    assert rec["git_commit"] and rec["checkpoint_dir"] == str(ck)
    assert not client.left_anywhere(rid)
    # logs --collect brings every host's log here
    p = client.cli("logs", rid, "--collect")
    assert p.returncode == 0, p.stderr
    for h in client.testbed.host_names:
        assert (client.runs / rid / "logs" / f"{h}.log").read_text() == client.host_file(h, rid, f"logs/{h}.log").read_text()
    print(f"train run: {time.time() - t0:.1f}s")

    # resume: the synced checkpoint goes back to node 0, training continues from step 30
    # (as make submit does: --follow streams the logs, then waits for the last checkpoint sync)
    rid2, p = client.submit(client.job(TRAIN.format(steps=40, log_every=5), "job40.yaml"), "--resume", rid, "--follow")
    assert "resume: checkpoint copied to node1" in p.stderr
    assert "warm start: the agents on node[1-3] import torch now" in p.stderr   # the code was in place
    assert f"-- run {rid2} SUCCEEDED" in p.stderr and "-- checkpoints: synced (latest ckpt_40.pt in " in p.stderr
    assert (client.runs / rid2 / "checkpoints" / "latest").read_text().strip() == "ckpt_40.pt"
    logs2 = client.cli("logs", rid2).stdout
    assert client.state(rid2)["state"] == "SUCCEEDED", logs2[-4000:]
    assert "[node1 0] " in p.stdout and "step 40/40" in p.stdout                 # followed to the end
    assert re.search(r"\[node1 0\] resumed from .*ckpt_30\.pt: step 30", logs2), logs2[-3000:]
    assert "step 10/40" not in logs2 and "step 40/40" in logs2
    assert logs2.count("torchrun from a warm interpreter") == 3, logs2[:3000]   # one per host
    assert logs2.count("workers fork from a server that imported torch") == 3, logs2[:3000]


# ---------------------------------------------------------------- gang: kill -9 one torchrun
def test_kill9_of_one_torchrun_stops_the_whole_run_without_a_controller(client):
    rid, _ = client.submit(client.job(HELLO.format(sleep=300)))
    client.wait_lines(rid, "hello from rank", 3)
    rec = client.record(rid)
    os.kill(rec["handle"]["watcher_pid"], signal.SIGKILL)   # no controller: the agents alone
    agent = json.loads(client.host_file("node2", rid, "state/node2.pid").read_text())["pid"]
    torchrun = client.testbed.run("node2", ["pgrep", "-P", agent]).stdout.split()
    assert len(torchrun) == 1
    t0 = time.time()
    assert client.testbed.run("node2", ["kill", "-9", torchrun[0]]).returncode == 0
    while client.left_anywhere(rid):
        assert time.time() - t0 < 30, f"still running after 30 s: {client.left_anywhere(rid)}"
        time.sleep(1)
    took = time.time() - t0
    st = client.wait(rid, timeout=60)
    assert st["state"] == "FAILED"
    assert st["failure"]["host"] == "node2" and st["failure"]["rank"] == 1
    assert "exit code -9" in st["failure"]["error"] or st["failure"]["exit_code"] == -9
    assert sorted(st["failure"]["gang_stopped"]) == ["node1", "node3"]
    assert {n["host"]: n["state"] for n in st["nodes"]} == {"node1": "CANCELLED", "node2": "FAILED", "node3": "CANCELLED"}
    print(f"whole run stopped {took:.1f}s after kill -9")


def test_stop_leaves_nothing_on_any_host(client):
    rid, _ = client.submit(client.job(HELLO.format(sleep=300)))
    client.wait_lines(rid, "hello from rank", 3)
    assert all(client.run_pids(h, rid) for h in client.testbed.host_names)
    t0 = time.time()
    p = client.cli("stop", rid, "--grace-s", "5")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "nothing of the run is left running" in p.stdout and time.time() - t0 < 40
    assert not client.left_anywhere(rid)
    assert client.state(rid)["state"] == "CANCELLED"


# ---------------------------------------------------------------- preflight: all or nothing
def test_unreachable_host_or_wrong_gpu_count_is_a_preflight_error_and_nothing_starts(client):
    before = {h: set(os.listdir(w / "runs")) if (w / "runs").exists() else set() for h, w in client.workdir.items()}
    job = client.job(HELLO.format(sleep=0))
    dead = client.inventory(lambda t: t.replace("  - name: node3\n", "  - name: node3\n    port: 2299\n"), "dead.yaml")
    p = client.cli("submit", job, "-i", dead)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "node3: cannot connect to root@node3:2299: Connection refused" in p.stderr
    assert "preflight failed, nothing was started" in p.stderr and "Traceback" not in p.stderr
    gpus = client.inventory(lambda t: t.replace("gpus: 0", "gpus: 2"), "gpus.yaml")
    p = client.cli("doctor", job, "-i", gpus)
    assert p.returncode == 2 and "node1: 0 GPU(s) found, the inventory says 2" in p.stderr, p.stderr
    p = client.cli("submit", job, "-i", gpus)
    assert p.returncode == 2 and "0 GPU(s) found" in p.stderr
    assert not client.runs.exists() or not any(client.runs.iterdir())
    after = {h: set(os.listdir(w / "runs")) if (w / "runs").exists() else set() for h, w in client.workdir.items()}
    assert after == before
    # no agent that a probe parked (warm start) outlives the failed submit (the hosts share our pids)
    parked = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"--park-fd" in (d / "cmdline").read_bytes():
                parked.append(d.name)
        except OSError:
            pass
    assert parked == []


def test_two_submits_of_one_job_seconds_apart_both_run(client):
    """The second submit's preflight sees the first run starting on the same hosts (its agents
    parked, no pid file yet): not a leftover to stop. CPU hosts, distinct ports: both run."""
    job = client.job(HELLO.format(sleep=3))
    first = subprocess.Popen([sys.executable, "-m", "cluster", "submit", str(job), "-i", str(client.testbed.inventory)],
                             cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=client.testbed.env(CLUSTER_RUNS_DIR=str(client.runs)))
    err1 = ""
    for line in first.stderr:          # the first run's agents are parked: it is starting, right now
        err1 += line
        if line.startswith("warm start:") or "started" in line:
            break
    second = client.cli("submit", job, "-i", client.testbed.inventory)
    out1, rest = first.communicate(timeout=240)
    err1 += rest
    assert first.returncode == 0 and second.returncode == 0, err1 + second.stdout + second.stderr
    rid1, rid2 = out1.split()[1], second.stdout.split()[1]
    assert "!!  leftovers" not in second.stderr and "earlier run" not in second.stderr, second.stderr
    assert f"{rid1} (starting)" in second.stderr or f"{rid1} (running)" in second.stderr, second.stderr
    for rid in (rid1, rid2):
        assert client.wait(rid)["state"] == "SUCCEEDED", client.cli("logs", rid).stdout[-3000:]
        assert not client.left_anywhere(rid)


def test_unknown_host_keys_are_refused_unless_the_inventory_accepts_new_ones(client):
    kh = client.tmp / "known_hosts"
    kh.write_text("")
    strict = client.inventory(lambda t: re.sub(r"known_hosts: .*", f"known_hosts: {kh}", t), "strict.yaml")
    p = client.cli("doctor", client.job(HELLO.format(sleep=0)), "-i", strict)
    assert p.returncode == 2 and "is not in known_hosts" in p.stderr and "accept_new_host_keys" in p.stderr
    assert kh.read_text() == ""
    tofu = client.inventory(lambda t: re.sub(r"known_hosts: .*", f"known_hosts: {kh}\n  accept_new_host_keys: true", t),
                         "tofu.yaml")
    p = client.cli("doctor", client.job(HELLO.format(sleep=0)), "-i", tofu)
    assert p.returncode == 0, p.stderr
    assert sorted(l.split()[0] for l in kh.read_text().splitlines()) == ["node1", "node2", "node3"]


# ---------------------------------------------------------------- an sshd stopped mid-run
class OwnSshd:
    """A second sshd on a host (port 2222) that this test may stop and start at will; the
    testbed's own sshd (which other tests use) is left alone."""

    def __init__(self, client, host):
        sd = Path(client.testbed.state["state_dir"])
        self.host = host
        self.addr = next(h["address"] for h in client.testbed.hosts if h["name"] == host)
        self.log = client.tmp / "sshd.log"
        self.argv = ["nsenter", f"--net=/run/netns/{host}", "unshare", "--uts", "sh", "-c",
                     'hostname "$0" && exec "$@"', host,
                     "/usr/sbin/sshd", "-D", "-f", str(sd / "etc" / "sshd_config"),
                     "-h", str(sd / "hosts" / host / "ssh_host_ed25519_key"),
                     "-o", f"ListenAddress={self.addr}:2222", "-o", f"PidFile={client.tmp}/sshd.pid", "-E", str(self.log)]
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 10
        while subprocess.run(["nsenter", f"--net=/run/netns/{self.host}", "sh", "-c",
                              f"ss -ltn | grep -q {self.addr}:2222"]).returncode:
            assert time.time() < deadline, self.log.read_text() if self.log.exists() else "sshd did not start"
            time.sleep(0.1)

    def stop(self):
        """The daemon and every session it serves (their connections drop)."""
        if self.proc is None:
            return
        sessions = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == self.proc.pid]
        os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc = None


def _ppid(pid):
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_sshd_stopped_mid_run_does_not_stop_training_and_logs_catch_up(client):
    """node1 (node 0, where rank 0 prints its progress) loses its sshd for 10 s mid-run."""
    sshd = OwnSshd(client, "node1")
    sshd.start()
    try:
        key = (Path(client.testbed.state["state_dir"]) / "hosts" / "node1" / "ssh_host_ed25519_key.pub").read_text().split()
        kh = client.tmp / "known_hosts"
        kh.write_text(Path(re.search(r"known_hosts: (.*)", client.testbed.inventory.read_text()).group(1)).read_text()
                      + f"[node1]:2222 {key[0]} {key[1]}\n")
        inv = client.inventory(lambda t: re.sub(r"known_hosts: .*", f"known_hosts: {kh}", t)
                            .replace("  - name: node1\n", "  - name: node1\n    port: 2222\n"), "own.yaml")
        rid, _ = client.submit(client.job(TRAIN.format(steps=STEPS_LONG, log_every=2)), inventory=inv)
        out = open(client.tmp / "follow.txt", "w")
        follow = subprocess.Popen([sys.executable, "-m", "cluster", "logs", rid, "-f"], cwd=REPO, stdout=out,
                                  stderr=subprocess.PIPE, text=True, env=client.testbed.env(CLUSTER_RUNS_DIR=str(client.runs)))
        log1 = client.host_file("node1", rid, "logs/node1.log")
        client.wait_lines(rid, "[node1 0] step", 3)
        sshd.stop()
        t_down = time.time()
        steps_before = log1.read_text().count("[node1 0] step")
        time.sleep(10)
        st = client.state(rid)
        node1 = next(n for n in st["nodes"] if n["host"] == "node1")
        assert st["state"] == "RUNNING", st
        assert node1["state"] == "UNKNOWN" and "unreachable" in node1["detail"]
        assert log1.read_text().count("[node1 0] step") > steps_before     # training goes on without sshd
        sshd.start()
        print(f"sshd on node1 down for {time.time() - t_down:.1f}s")
        follow.wait(timeout=300)
        out.close()
        err = follow.stderr.read()
        assert "[node1] log unreachable" in err and "[node1] log reachable again; catching up" in err, err
        st = client.wait(rid)
        assert st["state"] == "SUCCEEDED"
        assert_merged((client.tmp / "follow.txt").read_text().splitlines(), host_lines(client, rid))
    finally:
        sshd.stop()


# ---------------------------------------------------------------- jump hosts and ~/.ssh/config aliases
def test_jump_host_and_ssh_config_alias(client):
    """node2 and node3 only through node1 (the inventory's jump_host); node3 by an ssh config alias."""
    st = client.testbed.state
    key = Path(st["state_dir"]) / "client_key"
    cfg = client.tmp / "ssh_config"
    cfg.write_text(f"Host far3\n  HostName node3\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n")

    def edit(t):
        t = t.replace("  - name: node2\n", "  - name: node2\n    jump_host: root@node1\n")
        t = t.replace("  - name: node3\n    hostname: node3\n",
                      "  - name: node3\n    hostname: far3\n    jump_host: root@node1\n")
        return t.replace("ssh:\n", f"ssh:\n  config_file: {cfg}\n")
    inv = client.inventory(edit, "jump.yaml")
    p = client.cli("doctor", client.job(HELLO.format(sleep=0)), "-i", inv)
    assert p.returncode == 0, p.stderr
    rid, _ = client.submit(client.job(HELLO.format(sleep=0)), inventory=inv)
    assert client.wait(rid, timeout=180)["state"] == "SUCCEEDED"
    assert client.cli("logs", rid).stdout.count("hello from rank") == 3
    # the connections to node2 and node3 came from node1 (sshd logs the client address)
    logs = Path(st["state_dir"]) / "logs"
    assert "from 10.213.0.11 port" in (logs / "sshd-node3.log").read_text()
