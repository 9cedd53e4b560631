"""Fault injection on the cluster in a box: 3 hosts, a real training run (tiny CNN, gloo, one rank
per host, a checkpoint every 10 steps synced to this machine), one fault per test.

Each fault must end in a recorded state (from a new shell: `status`), leave no process of the run on
any host (checked over ssh), and `submit --resume` must continue from the last good checkpoint.
Steps lost = the step the run had reached when the fault hit - the step the resumed run starts at.
With FAULTS_REPORT=<file>, each test appends one JSON line with its figures (README's reliability
section is written from such a file).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.testbed_client import REPO, TRAIN

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

STEPS = 400          # the faulted run never gets there
FAULT_AT = 24        # the fault hits once rank 0 has passed this step (checkpoints at 10, 20)
RESUME_STEPS = 40


def heartbeat_step(client, rid, host="node1", rank=0):
    try:
        return json.loads(client.host_file(host, rid, f"metrics/heartbeat-rank{rank}.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def wait_step(client, rid, step, timeout=180):
    deadline = time.time() + timeout
    while heartbeat_step(client, rid) < step:
        assert time.time() < deadline, f"{rid} did not reach step {step} in {timeout}s:\n" + \
            client.cli("logs", rid).stdout[-3000:]
        time.sleep(0.2)
    return heartbeat_step(client, rid)


def latest_on(client, rid, host="node1"):
    p = client.host_file(host, rid, "checkpoints/latest")
    return p.read_text().strip() if p.exists() else None


def wait_clean(client, rid, timeout=45, hosts=None):
    """Seconds until no process of the run is left on any host (fails after ``timeout``)."""
    t0 = time.time()
    while True:
        left = {h: client.run_pids(h, rid) for h in (hosts or client.testbed.host_names)}
        left = {h: v for h, v in left.items() if v}
        if not left:
            return time.time() - t0
        assert time.time() - t0 < timeout, f"still running after {timeout}s: {left}"
        time.sleep(0.5)


def resume(client, rid):
    """submit --resume: the step the new run starts from, and its final state."""
    rid2, p = client.submit(client.job(TRAIN.format(steps=RESUME_STEPS, log_every=2), "resume.yaml"), "--resume", rid)
    st = client.wait(rid2)
    logs = client.cli("logs", rid2).stdout
    assert st["state"] == "SUCCEEDED", logs[-3000:]
    m = re.search(r"\[node1 0\] resumed from \S*ckpt_(\d+)\.pt: step (\d+)", logs)
    assert m, logs[-3000:]
    assert f"step {RESUME_STEPS}/{RESUME_STEPS}" in logs
    assert not client.left_anywhere(rid2)
    return int(m.group(2))


def report(name, **figures):
    path = os.environ.get("FAULTS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fault": name, **figures}) + "\n")
    print(f"FAULT {name}: {figures}")


def start(client, **fmt):
    rid, _ = client.submit(client.job(TRAIN.format(steps=STEPS, log_every=2)))
    return rid, wait_step(client, rid, FAULT_AT)


def finish(client, name, rid, at_step, expect_state, t_fault, left_s, **extra):
    """Common checks after a fault: recorded state, nothing left, resume from the last good checkpoint."""
    st = client.wait(rid, timeout=120)
    assert st["state"] == expect_state, json.dumps(st, indent=1)[-3000:]
    assert client.record(rid)["final"] is True
    good = latest_on(client, rid)
    resumed_at = resume(client, rid)
    assert f"ckpt_{resumed_at}.pt" == good, f"resumed at {resumed_at}, node1's latest good checkpoint is {good}"
    report(name, state=st["state"], step_at_fault=at_step, resumed_at=resumed_at,
           steps_lost=at_step - resumed_at, clean_after_s=round(left_s, 1), **extra)
    return st


def test_kill9_of_one_rank(client):
    rid, _ = start(client)
    pids = [l.split()[0] for l in client.run_pids("node2", rid) if " -m train " in l and "torch.distributed.run" not in l]
    assert len(pids) == 1, client.run_pids("node2", rid)
    at = heartbeat_step(client, rid)
    t0 = time.time()
    assert client.testbed.run("node2", ["kill", "-9", pids[0]]).returncode == 0
    left_s = wait_clean(client, rid)
    st = finish(client, "kill -9 of one rank", rid, at, "FAILED", t0, left_s)
    assert st["failure"]["host"] == "node2" and st["failure"]["rank"] == 1, st["failure"]
    assert "-9" in json.dumps(st["failure"]) or "SIGKILL" in json.dumps(st["failure"])


def test_kill9_of_every_process_of_one_host(client):
    rid, _ = start(client)
    pids = [l.split()[0] for l in client.run_pids("node2", rid)]
    assert len(pids) >= 3, pids          # agent, torchrun, the rank
    at = heartbeat_step(client, rid)
    assert client.testbed.run("node2", ["kill", "-9", *pids]).returncode == 0
    left_s = wait_clean(client, rid)
    st = finish(client, "kill -9 of all of one host's processes", rid, at, "FAILED", None, left_s)
    assert st["failure"]["host"] == "node2", st["failure"]


def _cut_off(client, host, name):
    """Take ``host``'s link down until every process of the run is gone everywhere, then put it back;
    returns what `status` said while the host was still cut off, and the usual checks' result."""
    rid, _ = start(client)
    at = heartbeat_step(client, rid)
    link = "tbveth" + host[len("node"):]
    others = [h for h in client.testbed.host_names if h != host]
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    try:
        # the other hosts stop (the gang notices the host is silent); it stops itself (its peers silent)
        left_s = wait_clean(client, rid, timeout=90, hosts=others)
        # the host cannot be asked over ssh while cut off: look at its processes from here, by network namespace
        t0 = time.time()
        while True:
            out = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True).stdout.split()
            mine = [p for p in out if _env_has(p, f"CLUSTER_RUN_ID={rid}")]
            if not mine:
                break
            assert time.time() - t0 < 60, f"{host} still runs {mine} while cut off"
            time.sleep(0.5)
        cut_s = left_s + time.time() - t0
        during = client.state(rid)          # from a new shell, the host still unreachable
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    time.sleep(1)
    st = finish(client, name, rid, at, "FAILED", None, max(left_s, cut_s))
    for s in (during, st):       # the record, written while cut off, stays as it was
        f = s["failure"]
        assert s["state"] == "FAILED" and f["host"] == host and "cut off the network" in f["error"], f
        assert "node-lost" in [x["pattern_id"] for x in f["findings"]], f["findings"]
        assert sorted(f["gang_stopped"]) == others
    return st


def test_host_cut_off_the_network(client):
    _cut_off(client, "node3", "host cut off the network (link down)")


def test_node_0_cut_off_the_network(client):
    """Node 0 (rank 0, the rendezvous and gang server) lost: FAILED naming it, not CANCELLED."""
    st = _cut_off(client, "node1", "node 0's host cut off the network (link down)")
    assert st["failure"]["rank"] == 0


def test_a_rank_frozen_by_sigstop_is_named_as_the_hang(client):
    """SIGSTOP to node2's rank: every rank stops at the same step (the others wait in the next
    all-reduce); HUNG names rank 1 on node2 by its process state, not every rank as behind."""
    job = TRAIN.format(steps=STEPS, log_every=2) + "hang_timeout_s: 20\nstartup_timeout_s: 20\n"
    rid, _ = client.submit(client.job(job))
    wait_step(client, rid, 6)
    pid = [l.split()[0] for l in client.run_pids("node2", rid) if " -m train " in l and "torch.distributed.run" not in l]
    assert len(pid) == 1, client.run_pids("node2", rid)
    assert client.testbed.run("node2", ["kill", "-STOP", pid[0]]).returncode == 0
    try:
        st = client.wait(rid, states=("HUNG",), timeout=120)
        text = client.cli("status", rid).stdout
        assert "hung: rank 1 (node2) is stopped (process state T" in text, text
        assert "rank 0 (" not in text.split("hung:", 1)[1] and "rank 2 (" not in text.split("hung:", 1)[1], text
        assert st["watch"]["behind"] == [1], st["watch"]
    finally:
        client.testbed.run("node2", ["kill", "-CONT", pid[0]])
        p = client.cli("stop", rid, "--grace-s", "3")
    assert p.returncode == 0, p.stdout + p.stderr
    assert not client.left_anywhere(rid)


def _env_has(pid, entry):
    try:
        return entry.encode() in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return False


def test_submitter_killed_in_the_middle_of_a_launch(client):
    job = client.job(TRAIN.format(steps=STEPS, log_every=2))
    p = subprocess.Popen([sys.executable, "-m", "cluster", "submit", str(job), "-i", str(client.testbed.inventory)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=client.testbed.env(CLUSTER_RUNS_DIR=str(client.runs)))
    # kill it the moment the first agent is up (the others may or may not be)
    deadline = time.time() + 120
    rid = None
    while True:
        assert time.time() < deadline and p.poll() is None, "the launch never started"
        runs = list(client.runs.iterdir()) if client.runs.exists() else []
        if runs:
            rid = runs[0].name
            if any(client.host_file(h, rid, f"state/{h}.pid").exists() for h in client.testbed.host_names):
                break
        time.sleep(0.01)
    p.kill()
    p.wait()
    started = [h for h in client.testbed.host_names if client.host_file(h, rid, f"state/{h}.pid").exists()]
    # from a new shell: status sees the launch was cut short, stops what had started, records FAILED
    t0 = time.time()
    p = client.cli("status", rid)
    assert p.returncode == 0 and f"run {rid}: FAILED" in p.stdout, p.stdout + p.stderr
    assert "ended in the middle of the launch" in p.stdout and "hint: submit again" in p.stdout, p.stdout
    left_s = wait_clean(client, rid, timeout=10) + time.time() - t0
    assert client.record(rid)["final"]
    # and stop, run by hand as well, finds nothing left
    p = client.cli("stop", rid, "--grace-s", "3")
    assert p.returncode == 0 and "nothing of the run is left running" in p.stdout, p.stdout + p.stderr
    report("submitter killed mid-launch", state="FAILED", started_before_kill=len(started),
           clean_after_s=round(left_s, 1), steps_lost=0)


def test_disk_full_while_a_checkpoint_is_written(client):
    # node1's run directories on a small filesystem of their own; fill it once a checkpoint exists
    runs_dir = client.workdir["node1"] / "runs"
    runs_dir.mkdir(exist_ok=True)
    hidden = runs_dir.with_name("runs.before-tmpfs")
    os.rename(runs_dir, hidden)
    runs_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(runs_dir)], check=True)
    filler = runs_dir / "filler"
    try:
        rid, _ = client.submit(client.job(TRAIN.format(steps=STEPS, log_every=2)))
        wait_step(client, rid, 12)
        assert latest_on(client, rid) in ("ckpt_10.pt", "ckpt_20.pt")
        before = latest_on(client, rid)
        at = heartbeat_step(client, rid)
        # leave room for log lines and heartbeats, not for the next checkpoint (about 80 kB)
        fs = os.statvfs(runs_dir)
        with open(filler, "wb") as f:
            f.write(b"\0" * (fs.f_bavail * fs.f_frsize - 40 * 1024))
        left_s = wait_clean(client, rid, timeout=90)
        at = heartbeat_step(client, rid)
        log = client.host_file("node1", rid, "logs/node1.log").read_text()
        assert "checkpoint: cannot write" in log and "latest good checkpoint is still" in log, log[-3000:]
        st = client.wait(rid, timeout=120)
        assert st["state"] == "FAILED"
        findings = st["failure"].get("findings", [])
        assert "disk-full" in [f["pattern_id"] for f in findings], (
            [f["pattern_id"] for f in findings], st["failure"].get("host"), st["failure"].get("rank"),
            [l for l in log.splitlines() if "rror" in l or "checkpoint" in l][-12:])
        good = latest_on(client, rid)
        assert good == before or good > before
        ck = torch.load(client.host_file("node1", rid, f"checkpoints/{good}"), weights_only=True)   # still usable
        assert f"ckpt_{ck['step']}.pt" == good
        assert not list(client.host_file("node1", rid, "checkpoints").glob(".ckpt_*"))   # no half-written file left
    finally:
        filler.unlink(missing_ok=True)
    try:
        resumed_at = resume(client, rid)
        assert f"ckpt_{resumed_at}.pt" == good
        report("disk full while a checkpoint is written", state="FAILED", step_at_fault=at, resumed_at=resumed_at,
               steps_lost=at - resumed_at, clean_after_s=round(left_s, 1))
    finally:
        subprocess.run(["umount", "-l", str(runs_dir)], check=False)
        runs_dir.rmdir()
        os.rename(hidden, runs_dir)


def test_sigterm_to_the_run(client):
    rid, _ = start(client)
    at = heartbeat_step(client, rid)
    # what a scheduler or an admin does: TERM to every process group of the run, on every host
    for h in client.testbed.host_names:
        pgid = json.loads(client.host_file(h, rid, f"state/{h}.pid").read_text())["pgid"]
        assert client.testbed.run(h, ["kill", "-TERM", f"-{pgid}"]).returncode == 0
    left_s = wait_clean(client, rid)
    finish(client, "SIGTERM to the run", rid, at, "CANCELLED", None, left_s)
