"""Automatic recovery on the cluster in a box (3 hosts, ssh backend, a real training run over gloo):
a run that fails for a cause a restart can fix relaunches itself, as the same run id, from its
latest checkpoint; one that fails in the job's own code does not, and says why.

What a user checks: `status` (the state, the attempts), the run's metrics (which steps each attempt
trained), its merged log, and that nothing of the run is left on any host.
"""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest

from cluster.run.records import RELAUNCHERS, runs_for
from tests.testbed_client import HELLO, REPO, STEPS_LONG, TRAIN

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

STEPS = 60
FAULT_AT = 24         # checkpoints at 10, 20: the fault hits after step 24
RESTART = ["restart.max_failures=2", "restart.backoff_s=1"]


def heartbeat_step(client, rid, host="node1", rank=0):
    try:
        return json.loads(client.host_file(host, rid, f"metrics/heartbeat-rank{rank}.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def wait_for(what, pred, timeout=180, every=0.3):
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.time() < deadline, f"no {what} after {timeout}s"
        time.sleep(every)


def events(client, rid, name=None):
    p = client.runs / rid / "events.jsonl"
    evs = [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
    return [e for e in evs if name is None or e["event"] == name]


def kill_rank(client, rid, host="node2"):
    pids = [l.split()[0] for l in client.run_pids(host, rid) if " -m train " in l and "torch.distributed.run" not in l]
    assert len(pids) == 1, client.run_pids(host, rid)
    assert client.testbed.run(host, ["kill", "-9", pids[0]]).returncode == 0
    return time.time()


def metrics(client, rid, host="node1", rank=0):
    p = client.host_file(host, rid, f"metrics/metrics-rank{rank}.jsonl")
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]


def attempts_of(records):
    """The metric records split at each 'start' record (one list per attempt)."""
    out = []
    for r in records:
        if r.get("kind") == "start":
            out.append([r])
        elif out:
            out[-1].append(r)
    return out


def submit_following(client, job, *extra, inventory=None):
    """`submit -f` as a user types it, in its own session (so that the test can kill it)."""
    return subprocess.Popen([sys.executable, "-m", "cluster", "submit", str(job), "-i",
                             str(inventory or client.testbed.inventory),
                             "-f", *extra], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=client.testbed.env(CLUSTER_RUNS_DIR=str(client.runs)), start_new_session=True)


def run_id_of(client, before):
    return wait_for("run", lambda: sorted(set(p.name for p in client.runs.iterdir()) - before)
                    if client.runs.exists() else None, timeout=120)[0]


@contextlib.contextmanager
def following(client, job, *extra, inventory=None):
    """`submit -f` (submit_following) for the block, which faults the run ``f.rid``; after it, the
    follower's whole output (``f.out``, to the run's end) and exit code (``f.code``). A block that
    fails kills the follower."""
    client.runs.mkdir(parents=True, exist_ok=True)
    before = set(p.name for p in client.runs.iterdir())
    follower = submit_following(client, job, *extra, inventory=inventory)
    f = types.SimpleNamespace(rid=None, out="", code=None)
    try:
        f.rid = run_id_of(client, before)
        yield f
        f.out, _ = follower.communicate(timeout=300)
        f.code = follower.returncode
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)


def test_kill9_of_a_rank_recovers_to_the_exact_steps(client):
    job = client.job(TRAIN.format(steps=STEPS, log_every=2))
    with following(client, job, *RESTART) as f:
        wait_for("step", lambda: heartbeat_step(client, f.rid) >= FAULT_AT)
        latest = client.host_file("node1", f.rid, "checkpoints/latest").read_text().strip()
        t_fault = kill_rank(client, f.rid)
    rid, out = f.rid, f.out
    st = client.wait(rid, timeout=120)
    rec = client.record(rid)
    assert st["state"] == "SUCCEEDED", json.dumps(rec.get("attempts"), indent=1) + out[-3000:]
    assert f.code == 0, out[-3000:]
    # the record and `status`: attempt 2, and why attempt 1 was restarted
    assert rec["attempt"] == 2 and len(rec["attempts"]) == 1, rec.get("attempts")
    a1 = rec["attempts"][0]
    assert a1["restart"] is True and a1["host"] == "node2" and "signal 9" in a1["reason"], a1
    text = client.cli("status", rid).stdout
    assert "attempt 2" in text and "attempt 1: " in text and "restarted" in text, text
    names = [e["event"] for e in events(client, rid)]
    assert names.index("recovery") < names.index("gang-clean") < names.index("attempt"), names
    # exactly the configured steps; attempt 2 starts at the checkpoint, trains each later step once
    att = attempts_of(metrics(client, rid))
    assert len(att) == 2, [a[0] for a in att]
    resumed = att[1][0]["step"]
    assert f"ckpt_{resumed}.pt" == latest or resumed >= 20, (resumed, latest)
    steps2 = [r["step"] for r in att[1] if r.get("kind") == "train"]
    assert steps2 == sorted(set(steps2)) and steps2[0] > resumed and steps2[-1] == STEPS, steps2
    assert f"step {STEPS}/{STEPS}" in out
    # `submit -f` followed both attempts: attempt 1's steps and attempt 2's resume, in one stream
    assert re.search(rf"\[node1 0\] resumed from \S*ckpt_{resumed}\.pt: step {resumed}", out), out[-3000:]
    assert "step 24/60" in out or "step 22/60" in out, out[:3000]
    assert not client.left_anywhere(rid)
    first2 = next(r for r in att[1] if r.get("kind") == "train")
    from tests.test_faults_testbed import report
    report("kill -9 of one rank (automatic recovery)", state=st["state"], resumed_at=resumed,
           auto_recovery_s=round(first2["time"] - t_fault, 1))


def test_user_code_error_is_not_restarted(client):
    job = client.job(HELLO.format(sleep=5) + "  HELLO_FAIL_RANK: '1'\n  HELLO_FAIL_HOW: raise\n")
    rid, _ = client.submit(job, "restart.max_failures=2", "restart.backoff_s=1")
    st = client.wait(rid, timeout=120)
    rec = client.record(rid)
    assert st["state"] == "FAILED", st
    assert rec.get("attempt", 1) == 1 and not events(client, rid, "attempt"), events(client, rid)
    why = rec["failure"]["recovery"]
    assert why["restart"] is False and "Python error in the job's code" in why["reason"] \
        and "rank 1 raising on purpose" in why["reason"], why
    text = client.cli("status", rid).stdout
    assert "not restarted: a Python error in the job's code" in text, text
    assert not client.left_anywhere(rid)


def test_max_failures_reached_names_every_attempt(client):
    job = client.job(TRAIN.format(steps=300, log_every=2))
    rid, _ = client.submit(job, "restart.max_failures=1", "restart.backoff_s=1")
    wait_for("step", lambda: heartbeat_step(client, rid) >= 12)
    kill_rank(client, rid)
    wait_for("attempt 2", lambda: events(client, rid, "attempt"), timeout=180)
    wait_for("attempt 2's first step", lambda: heartbeat_step(client, rid) > 12, timeout=180)
    kill_rank(client, rid, host="node3")
    st = client.wait(rid, timeout=180)
    rec = client.record(rid)
    assert st["state"] == "FAILED", st
    causes = [(a["attempt"], a["restart"]) for a in rec["attempts"]]
    assert causes == [(1, True), (2, False)], rec["attempts"]
    assert rec["attempts"][0]["host"] == "node2", rec["attempts"]
    # attempt 2's culprit is the diagnosis's (run/diagnose.py): node3, or on a loaded box at times a
    # peer whose connection closed first; the recovery only needs the cause recorded and shown
    second = rec["attempts"][1]
    assert second["host"] in ("node1", "node2", "node3") and second["cause"].startswith(f"host {second['host']}")
    assert "max_failures (1) reached" in rec["failure"]["recovery"]["reason"]
    text = client.cli("status", rid).stdout
    assert "attempt 1: host node2 rank 1" in text and f"attempt 2: {second['cause']}" in text, text
    assert not client.left_anywhere(rid)


def test_submitter_killed_during_recovery(client):
    client.runs.mkdir(parents=True, exist_ok=True)
    job = client.job(TRAIN.format(steps=40, log_every=2))
    before = set(p.name for p in client.runs.iterdir())
    follower = submit_following(client, job, *RESTART)
    try:
        rid = run_id_of(client, before)
        wait_for("step", lambda: heartbeat_step(client, rid) >= 12)
        kill_rank(client, rid)
        wait_for("the recovery decision", lambda: events(client, rid, "recovery"), timeout=120, every=0.1)
        os.killpg(follower.pid, signal.SIGKILL)     # the terminal closes in the middle of the recovery
        follower.wait(timeout=10)
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
    st = client.wait(rid, timeout=240)
    assert st["state"] == "SUCCEEDED", json.dumps(client.record(rid).get("attempts"), indent=1)
    assert client.record(rid)["attempt"] == 2
    assert not client.left_anywhere(rid)


def test_the_watcher_killed_between_two_attempts_ends_the_run_failed_saying_how_to_go_on(client):
    """The detached watcher, which starts the next attempt, is killed while the run waits out its
    backoff: the run does not stay RESTARTING for ever. The next status records it FAILED, names
    what happened and how to go on, and nothing of the run is left on any host."""
    job = client.job(TRAIN.format(steps=300, log_every=2))
    rid, _ = client.submit(job, "restart.max_failures=2", "restart.backoff_s=120")
    wait_for("step", lambda: heartbeat_step(client, rid) >= 12)
    kill_rank(client, rid)
    wait_for("RESTARTING", lambda: client.record(rid).get("state") == "RESTARTING", timeout=120, every=0.2)
    pid = client.record(rid)["handle"]["watcher_pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for("the watcher's end", lambda: not runs_for(pid, RELAUNCHERS["watcher_pid"], rid), timeout=30)
    out = client.cli("status", rid).stdout
    assert "FAILED" in out and f"the process that starts the next attempt (pid {pid}) ended before it did" in out \
        and f"submit again with --resume {rid}" in out, out
    rec = client.record(rid)
    assert rec["state"] == "FAILED" and rec["final"] and rec["attempts"][0]["restart"] is True, rec
    assert not client.left_anywhere(rid)


def test_every_process_of_a_host_killed_recovers(client):
    """The agent, torchrun and the rank of node2 killed -9: the gang loses the host, the run relaunches."""
    job = client.job(TRAIN.format(steps=40, log_every=2))
    rid, _ = client.submit(job, *RESTART)
    wait_for("step", lambda: heartbeat_step(client, rid) >= 12)
    pids = [l.split()[0] for l in client.run_pids("node2", rid)]
    assert len(pids) >= 3, pids
    t_fault = time.time()
    assert client.testbed.run("node2", ["kill", "-9", *pids]).returncode == 0
    st = client.wait(rid, timeout=240)
    rec = client.record(rid)
    assert st["state"] == "SUCCEEDED", json.dumps(rec.get("attempts"), indent=1)
    assert rec["attempt"] == 2 and rec["attempts"][0]["host"] == "node2", rec["attempts"]
    att = attempts_of(metrics(client, rid))
    steps2 = [r["step"] for r in att[-1] if r.get("kind") == "train"]
    assert steps2 == sorted(set(steps2)) and steps2[0] > att[-1][0]["step"] and steps2[-1] == 40, steps2
    assert not client.left_anywhere(rid)
    from tests.test_faults_testbed import report
    first2 = next(r for r in att[-1] if r.get("kind") == "train")
    report("kill -9 of every process of one host (automatic recovery)", state=st["state"],
           resumed_at=att[-1][0]["step"], auto_recovery_s=round(first2["time"] - t_fault, 1))


def test_a_resumed_run_recovers_from_its_own_latest_checkpoint(client, tmp_path):
    """`submit --resume` seeds node 0 with the old run's checkpoint (step 20); the resumed run
    checkpoints at 30, 40, ..., then a rank is killed: attempt 2 resumes from the resumed run's own
    latest checkpoint, not from the seed (storage elsewhere, so the copy here is still the seed)."""
    inv = client.inventory(lambda t: t + f"storage: {tmp_path / 'storage'}\n")
    first, _ = client.submit(client.job(TRAIN.format(steps=20, log_every=2)), inventory=inv)
    assert client.wait(first)["state"] == "SUCCEEDED"
    rid, _ = client.submit(client.job(TRAIN.format(steps=STEPS, log_every=2)), "--resume", first, *RESTART,
                           inventory=inv)
    wait_for("step", lambda: heartbeat_step(client, rid) >= 33)
    latest = client.host_file("node1", rid, "checkpoints/latest").read_text().strip()
    kill_rank(client, rid)
    st = client.wait(rid, timeout=240)
    assert st["state"] == "SUCCEEDED", json.dumps(client.record(rid).get("attempts"), indent=1)
    att = attempts_of(metrics(client, rid))
    assert len(att) == 2 and att[0][0]["step"] == 20, [a[0] for a in att]
    resumed = att[1][0]["step"]
    assert resumed >= int(re.sub(r"\D", "", latest)) >= 30, (resumed, latest)    # not the seed's 20
    steps2 = [r["step"] for r in att[1] if r.get("kind") == "train"]
    assert steps2[0] > resumed and steps2[-1] == STEPS and steps2 == sorted(set(steps2)), steps2
    assert not client.left_anywhere(rid)


def test_a_spare_takes_the_place_of_the_host_whose_rank_was_killed(client):
    """nodes: 2 on node1, node2, with node3 the inventory's spare: node2's rank killed -9, attempt 2
    runs on node1 and node3 (node3 as node 1, the rendezvous still on node1) and ends the run."""
    inv = client.inventory(lambda t: t + "spares: [node3]\n")
    job = client.job(TRAIN.format(steps=STEPS, log_every=2))
    with following(client, job, *RESTART, "nodes=2", inventory=inv) as f:
        wait_for("step", lambda: heartbeat_step(client, f.rid) >= FAULT_AT)
        assert [n["host"] for n in client.record(f.rid)["plan"]["nodes"]] == ["node1", "node2"]
        kill_rank(client, f.rid, host="node2")
    rid, out = f.rid, f.out
    st = client.wait(rid, timeout=120)
    rec = client.record(rid)
    assert st["state"] == "SUCCEEDED", json.dumps(rec.get("attempts"), indent=1) + out[-3000:]
    assert f.code == 0, out[-3000:]
    # `submit -f` followed the spare too: attempt 1's node2, attempt 2's node3, to the last step
    assert "[node2 agent]" in out and "[node3 agent]" in out and f"step {STEPS}/{STEPS}" in out, out[-3000:]
    assert rec["attempt"] == 2 and len(rec["attempts"]) == 1, rec["attempts"]
    a1 = rec["attempts"][0]
    assert a1["blame"] == "node2" and a1["hosts"] == ["node1", "node2"] and a1["replaced"] == {"node2": "node3"}, a1
    assert [(n["host"], n["node_rank"]) for n in rec["plan"]["nodes"]] == [("node1", 0), ("node3", 1)]
    from cluster.spec.config import load_inventory
    assert rec["plan"]["rdzv_endpoint"].rsplit(":", 1)[0] == load_inventory(inv).host("node1").address
    assert [e["hosts"] for e in events(client, rid, "attempt")] == [["node1", "node3"]]
    # exactly the configured steps: attempt 2 resumes from the checkpoint, trains each later step once
    att = attempts_of(metrics(client, rid))
    assert len(att) == 2, [a[0] for a in att]
    steps2 = [r["step"] for r in att[1] if r.get("kind") == "train"]
    assert steps2 == sorted(set(steps2)) and steps2[0] > att[1][0]["step"] and steps2[-1] == STEPS, steps2
    # the spare trained as rank 1 up to the last step
    assert json.loads(client.host_file("node3", rid, "metrics/heartbeat-rank1.json").read_text())["step"] == STEPS
    text = client.cli("status", rid).stdout
    assert "attempt 1: host node2 rank 1" in text and "node2 replaced by node3" in text, text
    assert client.state(rid)["attempts"][0]["replaced"] == {"node2": "node3"}
    assert not client.left_anywhere(rid)


def node_0_killed(client, *extra, inventory=None):
    """A 60-step run (``extra`` overrides) whose node 0 (node1: the rendezvous, rank 0, the
    checkpoints) loses its rank after step 24; (run id, node1's latest checkpoint before the kill,
    the record once the run SUCCEEDED)."""
    job = client.job(TRAIN.format(steps=STEPS, log_every=2))     # room after the fault at 24
    rid, _ = client.submit(job, *RESTART, *extra, inventory=inventory)
    wait_for("step", lambda: heartbeat_step(client, rid) >= FAULT_AT)
    latest = client.host_file("node1", rid, "checkpoints/latest").read_text().strip()
    kill_rank(client, rid, host="node1")
    st = client.wait(rid, timeout=300)
    rec = client.record(rid)
    assert st["state"] == "SUCCEEDED", json.dumps(rec.get("attempts"), indent=1)
    return rid, latest, rec


def resumed_as_node_0(client, rid, rec, host, latest, inventory):
    """``host`` is node 0 of the last attempt: the rendezvous moved with it, and its rank 0 resumed
    from node1's latest checkpoint (the one read before the kill, or one written while it came)
    and trained each later step once. Returns the attempts of its metrics."""
    from cluster.spec.config import load_inventory
    assert rec["plan"]["rdzv_endpoint"].rsplit(":", 1)[0] == load_inventory(inventory).host(host).address
    att = attempts_of(metrics(client, rid, host=host))
    assert att[-1][0]["step"] >= int(re.sub(r"\D", "", latest)) >= 20, (att[-1][:1], latest)
    steps = [r["step"] for r in att[-1] if r.get("kind") == "train"]
    assert steps == sorted(set(steps)) and steps[0] > att[-1][0]["step"] and steps[-1] == STEPS, steps
    return att


def test_a_spare_becomes_node_0_with_the_latest_checkpoint(client):
    """node1 (node 0) loses its rank: the spare node3 is node 0 of attempt 2, gets the latest
    checkpoint first, and training goes on from it."""
    inv = client.inventory(lambda t: t + "spares: [node3]\n")
    rid, latest, rec = node_0_killed(client, "nodes=2", inventory=inv)
    assert rec["attempts"][0]["blame"] == "node1" and rec["attempts"][0]["replaced"] == {"node1": "node3"}
    assert [n["host"] for n in rec["plan"]["nodes"]] == ["node3", "node2"]
    assert len(resumed_as_node_0(client, rid, rec, "node3", latest, inv)) == 1
    assert "node1 replaced by node3" in client.cli("status", rid).stdout
    assert not client.left_anywhere(rid)


def test_a_host_that_fails_twice_is_quarantined(client):
    """node2 fails: the spare node3 takes its place; node3 fails, no spare is left: the same hosts
    again; node3 fails a second time: quarantined, and with no spare for it the run ends FAILED
    naming it."""
    inv = client.inventory(lambda t: t + "spares: [node3]\n")
    job = client.job(TRAIN.format(steps=STEPS_LONG, log_every=2))
    rid, _ = client.submit(job, "restart.max_failures=3", "restart.backoff_s=1", "nodes=2", inventory=inv)
    wait_for("step", lambda: heartbeat_step(client, rid) >= 12)
    at = heartbeat_step(client, rid)
    for k, host in enumerate(["node2", "node3", "node3"]):
        if k:       # the next attempt has trained past where the last one was killed
            wait_for(f"attempt {k + 1}", lambda: len(events(client, rid, "attempt")) == k, timeout=180)
            wait_for(f"attempt {k + 1}'s progress", lambda: heartbeat_step(client, rid) > at, timeout=180)
            at = heartbeat_step(client, rid)
        kill_rank(client, rid, host=host)
    st = client.wait(rid, timeout=180)
    rec = client.record(rid)
    assert st["state"] == "FAILED", st
    assert [(a["attempt"], a["blame"], a["hosts"]) for a in rec["attempts"]] == [
        (1, "node2", ["node1", "node2"]), (2, "node3", ["node1", "node3"]), (3, "node3", ["node1", "node3"])]
    assert [a["replaced"] for a in rec["attempts"]] == [{"node2": "node3"}, {}, {}], rec["attempts"]
    assert rec["quarantined"] == ["node3"] and client.state(rid)["quarantined"] == ["node3"]
    assert "host node3 caused 2 failures of this run (attempts 2, 3) and is quarantined" in rec["failure"]["error"]
    text = client.cli("status", rid).stdout
    assert "quarantined (caused two failures, not used again by this run): node3" in text, text
    assert not client.left_anywhere(rid)


def test_a_range_of_nodes_shrinks_without_the_host_whose_rank_was_killed(client):
    """nodes: 2-3 on the 3 hosts, no spare: node2's rank killed -9, attempt 2 goes on without node2
    on node1 and node3 (world size 3 -> 2, node3 now rank 1), from the latest checkpoint, with the
    LR scaled to the smaller global batch, to exactly the configured steps."""
    job = client.job(TRAIN.format(steps=STEPS, log_every=2))
    with following(client, job, *RESTART, "nodes=2-3") as f:
        wait_for("step", lambda: heartbeat_step(client, f.rid) >= FAULT_AT)
        rec = client.record(f.rid)
        assert [n["host"] for n in rec["plan"]["nodes"]] == ["node1", "node2", "node3"] and \
            rec["plan"]["world_size"] == 3, rec["plan"]
        t_fault = kill_rank(client, f.rid, host="node2")
    rid, out = f.rid, f.out
    st = client.wait(rid, timeout=120)
    rec = client.record(rid)
    assert st["state"] == "SUCCEEDED", json.dumps(rec.get("attempts"), indent=1) + out[-3000:]
    assert f.code == 0, out[-3000:]
    assert rec["attempt"] == 2 and len(rec["attempts"]) == 1, rec["attempts"]
    a1 = rec["attempts"][0]
    assert a1["blame"] == "node2" and a1["hosts"] == ["node1", "node2", "node3"] and a1["dropped"] == ["node2"] \
        and a1["replaced"] == {}, a1
    assert [(n["host"], n["node_rank"]) for n in rec["plan"]["nodes"]] == [("node1", 0), ("node3", 1)]
    assert rec["plan"]["world_size"] == 2
    assert [(e["hosts"], e["dropped"], e["world_size"]) for e in events(client, rid, "attempt")] == \
        [(["node1", "node3"], ["node2"], 2)]
    assert [e["message"] for e in events(client, rid, "shrunk")] == ["shrunk from 3 to 2 nodes: node2 dropped"]
    # exactly the configured steps: attempt 2 resumes from the checkpoint at world size 2, each later step once
    att = attempts_of(metrics(client, rid))
    assert len(att) == 2 and att[0][0]["world_size"] == 3 and att[1][0]["world_size"] == 2, [a[0] for a in att]
    steps2 = [r["step"] for r in att[1] if r.get("kind") == "train"]
    assert steps2 == sorted(set(steps2)) and steps2[0] > att[1][0]["step"] >= 20 and steps2[-1] == STEPS, steps2
    assert json.loads(client.host_file("node3", rid, "metrics/heartbeat-rank1.json").read_text())["step"] == STEPS
    # the global batch went from 3x16 to 2x16: the LR with it
    assert re.search(r"\[node1 0\] lr scaled by 2/3 with the global batch \(world size 3 -> 2\)", out), out[-3000:]
    assert f"step {STEPS}/{STEPS}" in out
    text = client.cli("status", rid).stdout
    print(text)     # README's example
    assert "world size 2" in text and "ran on node[1-3]; shrunk from 3 to 2 nodes: node2 dropped" in text, text
    assert not client.left_anywhere(rid)
    from tests.test_faults_testbed import report
    first2 = next(r for r in att[1] if r.get("kind") == "train")
    report("kill -9 of one rank, nodes: 2-3, no spare (shrinks to 2 nodes)", state=st["state"],
           resumed_at=att[1][0]["step"], auto_recovery_s=round(first2["time"] - t_fault, 1),
           **phases(client, rid, t_fault))


def test_a_range_of_nodes_shrinks_without_node_0(client):
    """node1 (node 0) loses its rank and no spare is left: node2 becomes node 0 of attempt 2, is
    given the latest checkpoint first, and training goes on."""
    rid, latest, rec = node_0_killed(client, "nodes=2-3")
    assert rec["attempts"][0]["blame"] == "node1" and rec["attempts"][0]["dropped"] == ["node1"]
    assert [n["host"] for n in rec["plan"]["nodes"]] == ["node2", "node3"]
    att = resumed_as_node_0(client, rid, rec, "node2", latest, client.testbed.inventory)
    assert att[-1][0]["world_size"] == 2, att[-1][:1]
    assert "shrunk from 3 to 2 nodes: node1 dropped" in client.cli("status", rid).stdout
    assert not client.left_anywhere(rid)


def _netns_pids(host, rid):
    """The run's processes on ``host``, looked up from here by its network namespace (a host cut
    off the network cannot be asked over ssh)."""
    from tests.test_faults_testbed import _env_has
    out = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True).stdout.split()
    return [p for p in out if _env_has(p, f"CLUSTER_RUN_ID={rid}")]


@pytest.mark.parametrize("nodes", ["2-3", "3"])
def test_a_host_cut_off_the_network_recovers(client, nodes):
    """node3's link down at step >= 24. nodes: 2-3 (no spare): the gang loses node3, attempt 2 goes
    on without it on node1 and node2 while it is still cut off. nodes: 3: the run waits for node3,
    whose link comes back once its processes have stopped themselves (its peers silent), and attempt
    2 runs on the 3 hosts again. Both end SUCCEEDED with exactly the configured steps, nothing left."""
    job = client.job(TRAIN.format(steps=STEPS if nodes != "3" else 80, log_every=2))
    rid, _ = client.submit(job, "restart.max_failures=2", "restart.backoff_s=1", f"nodes={nodes}")
    wait_for("step", lambda: heartbeat_step(client, rid) >= FAULT_AT)
    t_fault = time.time()
    subprocess.run(["ip", "link", "set", "tbveth3", "down"], check=True)
    try:
        if nodes == "3":    # back once node3 has stopped its own processes (as in the fault suite)
            wait_for("node3's processes to stop", lambda: not _netns_pids("node3", rid), timeout=90, every=0.5)
            subprocess.run(["ip", "link", "set", "tbveth3", "up"], check=True)
        st = client.wait(rid, timeout=300)
        left_cut = _netns_pids("node3", rid)
    finally:
        subprocess.run(["ip", "link", "set", "tbveth3", "up"], check=True)
    rec = client.record(rid)
    assert st["state"] == "SUCCEEDED", json.dumps(rec.get("attempts"), indent=1)
    assert rec["attempt"] == 2 and len(rec["attempts"]) == 1, rec["attempts"]
    a1 = rec["attempts"][0]
    assert a1["blame"] == "node3" and "cut off the network" in a1["cause"] and a1["restart"], a1
    hosts2 = ["node1", "node2"] if nodes == "2-3" else ["node1", "node2", "node3"]
    assert [n["host"] for n in rec["plan"]["nodes"]] == hosts2
    assert a1.get("dropped", []) == (["node3"] if nodes == "2-3" else []), a1
    att = attempts_of(metrics(client, rid))
    assert len(att) == 2 and att[1][0]["world_size"] == len(hosts2), [a[0] for a in att]
    steps2 = [r["step"] for r in att[1] if r.get("kind") == "train"]
    total = att[0][0]["steps_total"]
    assert steps2 == sorted(set(steps2)) and steps2[0] > att[1][0]["step"] >= 20 and steps2[-1] == total, steps2
    if nodes == "2-3":
        assert "shrunk from 3 to 2 nodes: node3 dropped" in client.cli("status", rid).stdout
    assert not left_cut and not client.left_anywhere(rid)
    from tests.test_faults_testbed import report
    first2 = next(r for r in att[1] if r.get("kind") == "train")
    report(f"a host cut off the network (node3), nodes: {nodes} (automatic recovery)", state=st["state"],
           resumed_at=att[1][0]["step"], auto_recovery_s=round(first2["time"] - t_fault, 1),
           **phases(client, rid, t_fault))


def phases(client, rid, t_fault):
    """Seconds from the fault to the recovery's steps: the decision (the failure found), the gang
    verified stopped, the next attempt launched."""
    return {f"{name}_s": round(next(e["t"] for e in events(client, rid, name)) - t_fault, 1)
            for name in ("recovery", "gang-clean", "attempt")}


def test_a_range_of_nodes_starts_on_the_healthy_hosts(client):
    """nodes: 2-3 with node3's python missing: the run starts on node1 and node2, saying why node3
    was left out; nodes: 3-3 on the same inventory is refused (exit 2), naming node3, nothing started."""
    inv = client.inventory(lambda t: t.replace("    hostname: node3\n",
                                               "    hostname: node3\n    python: /nonexistent/python\n"))
    job = client.job(HELLO.format(sleep=1))
    rid, p = client.submit(job, "nodes=2-3", inventory=inv)
    assert "node3 left out (nodes 2-3): " in p.stdout + p.stderr and "/nonexistent/python" in p.stdout + p.stderr, \
        p.stdout + p.stderr
    assert client.wait(rid)["state"] == "SUCCEEDED"
    rec = client.record(rid)
    assert [n["host"] for n in rec["plan"]["nodes"]] == ["node1", "node2"] and rec["plan"]["world_size"] == 2
    assert not client.left_anywhere(rid)
    before = set(p.name for p in client.runs.iterdir())
    bad = client.cli("submit", job, "-i", inv, "nodes=3-3")
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "nodes: 3-3 needs at least 3 healthy host(s); 2 of 3 passed the preflight probe" in bad.stderr \
        and "node3: " in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert set(p.name for p in client.runs.iterdir()) == before       # no run recorded, nothing started
