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

from tests.sshbed import HELLO, STEPS_LONG, TRAIN, assert_merged, host_lines

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.testbed


# ---------------------------------------------------------------- a real run, then resume
def test_training_across_three_hosts_checkpoint_synced_then_resume(bed):
    t0 = time.time()
    rid, p = bed.submit(bed.job(TRAIN.format(steps=30, log_every=5)))
    assert "preflight: 3 host(s) node[1-3]" in p.stderr and "reachable from node[2-3]" in p.stderr
    st = bed.wait(rid)
    logs = bed.cli("logs", rid).stdout
    assert st["state"] == "SUCCEEDED", logs[-4000:]
    for rank, h in enumerate(bed.tb.host_names):          # one rank on every host, rank 0 on node 0
        assert f"[{h} {rank}] " in logs
    assert_merged(logs.splitlines(), host_lines(bed, rid))
    # loss goes down (rank 0's metrics, on node1)
    recs = [json.loads(l) for l in bed.host_file("node1", rid, "metrics/metrics-rank0.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    # the checkpoint comes back to this machine (the watcher syncs it when the run ends); status says when
    ck = bed.runs / rid / "checkpoints"
    deadline = time.time() + 90
    while (cs := bed.state(rid)["checkpoints"])["state"] == "syncing":
        assert time.time() < deadline, f"checkpoint not synced: {list(ck.iterdir()) if ck.exists() else None}"
        time.sleep(1)
    assert cs["state"] == "synced" and cs["latest"] == "ckpt_30.pt", cs
    assert (ck / "latest").read_text().strip() == "ckpt_30.pt"
    assert "checkpoints: synced (latest ckpt_30.pt in " in bed.cli("status", rid).stdout
    rec = bed.record(rid)
    assert rec["git_commit"] and rec["checkpoint_dir"] == str(ck)
    assert not bed.left_anywhere(rid)
    # logs --collect brings every host's log here
    p = bed.cli("logs", rid, "--collect")
    assert p.returncode == 0, p.stderr
    for h in bed.tb.host_names:
        assert (bed.runs / rid / "logs" / f"{h}.log").read_text() == bed.host_file(h, rid, f"logs/{h}.log").read_text()
    print(f"train run: {time.time() - t0:.1f}s")

    # resume: the synced checkpoint goes back to node 0, training continues from step 30
    # (as make submit does: --follow streams the logs, then waits for the last checkpoint sync)
    rid2, p = bed.submit(bed.job(TRAIN.format(steps=40, log_every=5), "job40.yaml"), "--resume", rid, "--follow")
    assert "resume: checkpoint copied to node1" in p.stderr
    assert "warm start: the agents on node[1-3] import torch now" in p.stderr   # the code was in place
    assert f"-- run {rid2} SUCCEEDED" in p.stderr and "-- checkpoints: synced (latest ckpt_40.pt in " in p.stderr
    assert (bed.runs / rid2 / "checkpoints" / "latest").read_text().strip() == "ckpt_40.pt"
    logs2 = bed.cli("logs", rid2).stdout
    assert bed.state(rid2)["state"] == "SUCCEEDED", logs2[-4000:]
    assert "[node1 0] " in p.stdout and "step 40/40" in p.stdout                 # followed to the end
    assert re.search(r"\[node1 0\] resumed from .*ckpt_30\.pt: step 30", logs2), logs2[-3000:]
    assert "step 10/40" not in logs2 and "step 40/40" in logs2
    assert logs2.count("torchrun from a warm interpreter") == 3, logs2[:3000]   # one per host
    assert logs2.count("workers fork from a server that imported torch") == 3, logs2[:3000]


# ---------------------------------------------------------------- gang: kill -9 one torchrun
def test_kill9_of_one_torchrun_stops_the_whole_run_without_a_controller(bed):
    rid, _ = bed.submit(bed.job(HELLO.format(sleep=300)))
    bed.wait_lines(rid, "hello from rank", 3)
    rec = bed.record(rid)
    os.kill(rec["handle"]["watcher_pid"], signal.SIGKILL)   # no controller: the agents alone
    agent = json.loads(bed.host_file("node2", rid, "state/node2.pid").read_text())["pid"]
    torchrun = bed.tb.run("node2", ["pgrep", "-P", agent]).stdout.split()
    assert len(torchrun) == 1
    t0 = time.time()
    assert bed.tb.run("node2", ["kill", "-9", torchrun[0]]).returncode == 0
    while bed.left_anywhere(rid):
        assert time.time() - t0 < 30, f"still running after 30 s: {bed.left_anywhere(rid)}"
        time.sleep(1)
    took = time.time() - t0
    st = bed.wait(rid, timeout=60)
    assert st["state"] == "FAILED"
    assert st["failure"]["host"] == "node2" and st["failure"]["rank"] == 1
    assert "exit code -9" in st["failure"]["error"] or st["failure"]["exit_code"] == -9
    assert sorted(st["failure"]["gang_stopped"]) == ["node1", "node3"]
    assert {n["host"]: n["state"] for n in st["nodes"]} == {"node1": "CANCELLED", "node2": "FAILED", "node3": "CANCELLED"}
    print(f"whole run stopped {took:.1f}s after kill -9")


def test_stop_leaves_nothing_on_any_host(bed):
    rid, _ = bed.submit(bed.job(HELLO.format(sleep=300)))
    bed.wait_lines(rid, "hello from rank", 3)
    assert all(bed.run_pids(h, rid) for h in bed.tb.host_names)
    t0 = time.time()
    p = bed.cli("stop", rid, "--grace-s", "5")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "nothing of the run is left running" in p.stdout and time.time() - t0 < 40
    assert not bed.left_anywhere(rid)
    assert bed.state(rid)["state"] == "CANCELLED"


# ---------------------------------------------------------------- preflight: all or nothing
def test_unreachable_host_or_wrong_gpu_count_is_a_preflight_error_and_nothing_starts(bed):
    before = {h: set(os.listdir(w / "runs")) if (w / "runs").exists() else set() for h, w in bed.workdir.items()}
    job = bed.job(HELLO.format(sleep=0))
    dead = bed.inventory(lambda t: t.replace("  - name: node3\n", "  - name: node3\n    port: 2299\n"), "dead.yaml")
    p = bed.cli("submit", job, "-i", dead)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "node3: cannot connect to root@node3:2299: Connection refused" in p.stderr
    assert "preflight failed, nothing was started" in p.stderr and "Traceback" not in p.stderr
    gpus = bed.inventory(lambda t: t.replace("gpus: 0", "gpus: 2"), "gpus.yaml")
    p = bed.cli("doctor", job, "-i", gpus)
    assert p.returncode == 2 and "node1: 0 GPU(s) found, the inventory says 2" in p.stderr, p.stderr
    p = bed.cli("submit", job, "-i", gpus)
    assert p.returncode == 2 and "0 GPU(s) found" in p.stderr
    assert not bed.runs.exists() or not any(bed.runs.iterdir())
    after = {h: set(os.listdir(w / "runs")) if (w / "runs").exists() else set() for h, w in bed.workdir.items()}
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


def test_two_submits_of_one_job_seconds_apart_both_run(bed):
    """The second submit's preflight sees the first run starting on the same hosts (its agents
    parked, no pid file yet): not a leftover to stop. CPU hosts, distinct ports: both run."""
    job = bed.job(HELLO.format(sleep=3))
    first = subprocess.Popen([sys.executable, "-m", "cluster", "submit", str(job), "-i", str(bed.tb.inventory)],
                             cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=bed.tb.env(CLUSTER_RUNS_DIR=str(bed.runs)))
    err1 = ""
    for line in first.stderr:          # the first run's agents are parked: it is starting, right now
        err1 += line
        if line.startswith("warm start:") or "started" in line:
            break
    second = bed.cli("submit", job, "-i", bed.tb.inventory)
    out1, rest = first.communicate(timeout=240)
    err1 += rest
    assert first.returncode == 0 and second.returncode == 0, err1 + second.stdout + second.stderr
    rid1, rid2 = out1.split()[1], second.stdout.split()[1]
    assert "!!  leftovers" not in second.stderr and "earlier run" not in second.stderr, second.stderr
    assert f"{rid1} (starting)" in second.stderr or f"{rid1} (running)" in second.stderr, second.stderr
    for rid in (rid1, rid2):
        assert bed.wait(rid)["state"] == "SUCCEEDED", bed.cli("logs", rid).stdout[-3000:]
        assert not bed.left_anywhere(rid)


def test_unknown_host_keys_are_refused_unless_the_inventory_accepts_new_ones(bed):
    kh = bed.tmp / "known_hosts"
    kh.write_text("")
    strict = bed.inventory(lambda t: re.sub(r"known_hosts: .*", f"known_hosts: {kh}", t), "strict.yaml")
    p = bed.cli("doctor", bed.job(HELLO.format(sleep=0)), "-i", strict)
    assert p.returncode == 2 and "is not in known_hosts" in p.stderr and "accept_new_host_keys" in p.stderr
    assert kh.read_text() == ""
    tofu = bed.inventory(lambda t: re.sub(r"known_hosts: .*", f"known_hosts: {kh}\n  accept_new_host_keys: true", t),
                         "tofu.yaml")
    p = bed.cli("doctor", bed.job(HELLO.format(sleep=0)), "-i", tofu)
    assert p.returncode == 0, p.stderr
    assert sorted(l.split()[0] for l in kh.read_text().splitlines()) == ["node1", "node2", "node3"]


# ---------------------------------------------------------------- an sshd stopped mid-run
class OwnSshd:
    """A second sshd on a host (port 2222) that this test may stop and start at will; the
    testbed's own sshd (which other tests use) is left alone."""

    def __init__(self, bed, host):
        sd = Path(bed.tb.state["state_dir"])
        self.host = host
        self.addr = next(h["address"] for h in bed.tb.hosts if h["name"] == host)
        self.log = bed.tmp / "sshd.log"
        self.argv = ["nsenter", f"--net=/run/netns/{host}", "unshare", "--uts", "sh", "-c",
                     'hostname "$0" && exec "$@"', host,
                     "/usr/sbin/sshd", "-D", "-f", str(sd / "etc" / "sshd_config"),
                     "-h", str(sd / "hosts" / host / "ssh_host_ed25519_key"),
                     "-o", f"ListenAddress={self.addr}:2222", "-o", f"PidFile={bed.tmp}/sshd.pid", "-E", str(self.log)]
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


def test_sshd_stopped_mid_run_does_not_stop_training_and_logs_catch_up(bed):
    """node1 (node 0, where rank 0 prints its progress) loses its sshd for 10 s mid-run."""
    sshd = OwnSshd(bed, "node1")
    sshd.start()
    try:
        key = (Path(bed.tb.state["state_dir"]) / "hosts" / "node1" / "ssh_host_ed25519_key.pub").read_text().split()
        kh = bed.tmp / "known_hosts"
        kh.write_text(Path(re.search(r"known_hosts: (.*)", bed.tb.inventory.read_text()).group(1)).read_text()
                      + f"[node1]:2222 {key[0]} {key[1]}\n")
        inv = bed.inventory(lambda t: re.sub(r"known_hosts: .*", f"known_hosts: {kh}", t)
                            .replace("  - name: node1\n", "  - name: node1\n    port: 2222\n"), "own.yaml")
        rid, _ = bed.submit(bed.job(TRAIN.format(steps=STEPS_LONG, log_every=2)), inventory=inv)
        out = open(bed.tmp / "follow.txt", "w")
        follow = subprocess.Popen([sys.executable, "-m", "cluster", "logs", rid, "-f"], cwd=REPO, stdout=out,
                                  stderr=subprocess.PIPE, text=True, env=bed.tb.env(CLUSTER_RUNS_DIR=str(bed.runs)))
        log1 = bed.host_file("node1", rid, "logs/node1.log")
        bed.wait_lines(rid, "[node1 0] step", 3)
        sshd.stop()
        t_down = time.time()
        steps_before = log1.read_text().count("[node1 0] step")
        time.sleep(10)
        st = bed.state(rid)
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
        st = bed.wait(rid)
        assert st["state"] == "SUCCEEDED"
        assert_merged((bed.tmp / "follow.txt").read_text().splitlines(), host_lines(bed, rid))
    finally:
        sshd.stop()


# ---------------------------------------------------------------- jump hosts and ~/.ssh/config aliases
def test_jump_host_and_ssh_config_alias(bed):
    """node2 and node3 only through node1 (the inventory's jump_host); node3 by an ssh config alias."""
    st = bed.tb.state
    key = Path(st["state_dir"]) / "client_key"
    cfg = bed.tmp / "ssh_config"
    cfg.write_text(f"Host far3\n  HostName node3\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n")

    def edit(t):
        t = t.replace("  - name: node2\n", "  - name: node2\n    jump_host: root@node1\n")
        t = t.replace("  - name: node3\n    hostname: node3\n",
                      "  - name: node3\n    hostname: far3\n    jump_host: root@node1\n")
        return t.replace("ssh:\n", f"ssh:\n  config_file: {cfg}\n")
    inv = bed.inventory(edit, "jump.yaml")
    p = bed.cli("doctor", bed.job(HELLO.format(sleep=0)), "-i", inv)
    assert p.returncode == 0, p.stderr
    rid, _ = bed.submit(bed.job(HELLO.format(sleep=0)), inventory=inv)
    assert bed.wait(rid, timeout=180)["state"] == "SUCCEEDED"
    assert bed.cli("logs", rid).stdout.count("hello from rank") == 3
    # the connections to node2 and node3 came from node1 (sshd logs the client address)
    logs = Path(st["state_dir"]) / "logs"
    assert "from 10.213.0.11 port" in (logs / "sshd-node3.log").read_text()
