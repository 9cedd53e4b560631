"""cluster/run/recovery.py: which failures relaunch a run by themselves, and the record of attempts
(the relaunch itself runs on the cluster in a box: tests/test_recovery_testbed.py)."""
import json

import pytest

from cluster.run.diagnose import diagnose, render_failure
from cluster.run.recovery import decide, describe, restart_instead, restart_policy
from cluster.run.records import Run, State
from cluster.spec.config import job_from_plain, load_job, max_failures
from cluster.spec.schema import to_plain

TORCHRUN_KILLED = ["[node2 agent] exitcode  : -9 (pid: 123)", "[node2 agent] Signal 9 (SIGKILL) received by PID 123"]


def failure(host="node2", rank=1, own=(), extra=(), error=None, **kw):
    tail = [f"[{host} {rank}] {l}" for l in own] + list(extra)
    return {"host": host, "rank": rank, "exit_code": 1, "log_tail": tail, "error": error,
            "findings": [f.to_dict() for f in diagnose(tail)], **kw}


def test_kill9_after_progress_restarts_and_says_why():
    d = decide({}, failure(extra=TORCHRUN_KILLED), 3, signal=9, progressed=True)
    assert d.restart and "signal 9" in d.reason and d.cause.startswith("host node2 rank 1")


def test_sigkill_before_the_first_step_does_not_restart():
    d = decide({}, failure(extra=TORCHRUN_KILLED), 3, signal=9, progressed=False)
    assert not d.restart and "before the first step" in d.reason


def test_python_error_in_the_jobs_code_does_not_restart():
    own = ["Traceback (most recent call last):", '  File "x.py", line 3, in <module>',
           "ValueError: bad label 12"]
    d = decide({}, failure(own=own, extra=["[node2 agent] torch.distributed.elastic.multiprocessing.errors."
                                           "ChildFailedError: "]), 3, signal=None, progressed=True)
    assert not d.restart and "Python error in the job's code (ValueError: bad label 12)" in d.reason
    # torch prefixes an uncaught exception's lines with the rank (the testbed's torch does)
    d = decide({}, failure(own=[f"[rank1]: {l}" for l in own]), 3, signal=None, progressed=True)
    assert not d.restart and "Python error in the job's code (ValueError: bad label 12)" in d.reason, d


def test_python_error_on_a_host_that_ended_later_does_not_restart():
    """The failure names a peer whose collective broke first (it ended before the rank that
    raised, as on a loaded machine): the error in the other failed host's lines still decides."""
    peer = failure(host="node1", rank=0, own=["RuntimeError: [../gloo/transport/tcp/pair.cc:598] Connection "
                                               "closed by peer [10.0.0.12]:1234"])
    raised = ["[node2 2] Traceback (most recent call last):", "[node2 2] ValueError: bad label 12",
              "[node2 agent] torch.distributed.elastic.multiprocessing.errors.ChildFailedError: "]
    d = decide({}, peer, 3, progressed=True, elsewhere=raised)
    assert not d.restart and "Python error in the job's code (ValueError: bad label 12)" in d.reason, d
    # a peer's own symptom elsewhere is no such error: the collective's failure restarts
    symptom = ["[node2 2] RuntimeError: [../gloo/transport/tcp/pair.cc:598] Connection closed by peer [10.0.0.11]:99"]
    assert decide({}, peer, 3, progressed=True, elsewhere=symptom).restart
    # nor is torchrun's report of a worker that ended (a warm node's torchrun logs it as a traceback)
    reported = ["[node2 agent] Traceback (most recent call last):",
                "[node2 agent] torch.multiprocessing.spawn.ProcessExitedException: process 0 terminated with exit code 1"]
    assert decide({}, peer, 3, progressed=True, elsewhere=symptom + reported).restart


def test_cuda_oom_at_step_0_does_not_restart_later_one_does():
    own = ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    assert not decide({}, failure(own=own), 3, progressed=False).restart
    assert decide({}, failure(own=own), 3, progressed=True).restart


def test_known_setup_error_does_not_restart():
    d = decide({}, failure(own=["ModuleNotFoundError: No module named 'timm'"]), 3, progressed=True)
    assert not d.restart and "a restart would fail the same way" in d.reason


def test_lost_host_and_collective_timeout_restart():
    lost = failure(error="node3: lost by the gang (no heartbeat for 10 s): the host went down or was cut off",
                   host="node3", rank=2)
    assert decide({}, lost, 3).restart
    timeout = failure(own=["RuntimeError: [../gloo/transport/tcp/pair.cc:598] Connection closed by peer"
                           " [10.0.0.3]:1234"])
    d = decide({}, timeout, 3, progressed=True)
    assert d.restart, d


def test_unknown_cause_off_stop_and_the_limit():
    assert "not one a restart is known to fix" in decide({}, failure(), 3).reason
    assert "recovery is off" in decide({}, failure(extra=TORCHRUN_KILLED), 0, signal=9, progressed=True).reason
    assert "stopped" in decide({"stop_requested": 1}, failure(), 3, signal=9).reason
    two = {"attempts": [{"attempt": 1}, {"attempt": 2}]}
    d = decide(two, failure(extra=TORCHRUN_KILLED), 2, signal=9, progressed=True)
    assert not d.restart and "max_failures (2) reached" in d.reason


def test_default_policy_train_with_checkpoints_only():
    job = load_job("resnet50", ["train.ckpt_every=100"]).job
    assert max_failures(job) == 3
    assert max_failures(load_job("resnet50", ["train.ckpt_every=0"]).job) == 0
    assert max_failures(load_job("resnet50", ["restart.max_failures=0", "train.ckpt_every=5"]).job) == 0
    assert job_from_plain(to_plain(job)) == job


def test_bad_restart_values_are_refused(tmp_path):
    from cluster.errors import UserError
    with pytest.raises(UserError) as e:
        load_job("resnet50", ["restart.max_failures=-1"])
    assert "restart.max_failures" in str(e.value.key or e.value.message)


def _run(tmp_path, **data) -> Run:
    job = to_plain(load_job("resnet50", ["train.ckpt_every=10"]).job)
    r = Run("r1", tmp_path)
    r.create({"id": "r1", "state": "RUNNING", "backend": "ssh", "job": {"name": "resnet50", "resolved": job},
              "plan": {"nodes": [{"host": "a"}]}, **data})
    return r


def test_attempts_recorded_once_and_shown(tmp_path):
    r = _run(tmp_path)
    assert restart_policy(r, "ssh") == 3 and restart_policy(r, "slurm") is None
    f = failure(extra=TORCHRUN_KILLED)
    assert restart_instead(r, f, 3, signal=9, progressed=True)
    assert Run("r1", tmp_path).state == State.RESTARTING
    # a second process that judged the same attempt does not record it again
    assert restart_instead(Run("r1", tmp_path), dict(f), 3, signal=9, progressed=True)
    data = json.loads((tmp_path / "r1" / "run.json").read_text())
    assert len(data["attempts"]) == 1 and data["attempts"][0]["restart"] is True
    lines = describe(data)
    assert lines[0].startswith("attempt 1 (restarting)") and "attempt 1: host node2 rank 1" in lines[1]


def test_a_failure_seen_by_a_pass_that_began_before_a_relaunch_is_not_the_new_attempts(tmp_path):
    """A status pass looked at attempt 1 (its exits), a slow host kept it waiting, and meanwhile
    the watcher recorded attempt 1's failure and launched attempt 2: what the pass found is not
    attempt 2's failure; nothing is recorded again and the run is not ended."""
    r = _run(tmp_path)                      # the pass's view: attempt 1, running
    f = failure(extra=TORCHRUN_KILLED)
    assert restart_instead(Run("r1", tmp_path), dict(f), 3, signal=9, progressed=True)     # the watcher's
    Run("r1", tmp_path).set_state(State.STARTING, attempt=2)                               # ... relaunch
    assert restart_instead(r, f, 3, signal=9, progressed=True)      # True: not an end to record
    data = json.loads((tmp_path / "r1" / "run.json").read_text())
    assert data["attempt"] == 2 and data["state"] == "STARTING" and not data.get("final")
    assert [a["attempt"] for a in data["attempts"]] == [1]


def test_final_failure_names_every_attempt(tmp_path):
    r = _run(tmp_path, attempt=2, attempts=[{"attempt": 1, "cause": "host node2 rank 1: killed by signal 9",
                                             "restart": True, "reason": "x", "host": "node2", "rank": 1}])
    f = failure(host="node3", rank=2, extra=["[node3 agent] exitcode  : -9 (pid: 1)"])
    assert not restart_instead(r, f, 1, signal=9, progressed=True)
    text = "\n".join(render_failure(f))
    assert "attempt 1: host node2 rank 1" in text and "attempt 2: host node3 rank 2" in text
    assert "not restarted: " in text and "max_failures (1) reached" in text


def test_agent_gone_without_an_exit_record_restarts():
    f = failure(error="torchrun on node2 ended with exit code None (ranks 1-1)")
    assert not decide({}, f, 3).restart
    d = decide({}, f, 3, node_detail="agent gone without an exit record")
    assert d.restart and "vanished" in d.reason


# ---------------------------------------------------------------- spares (inventory) and the next attempt's hosts
from cluster.errors import UserError  # noqa: E402
from cluster.run.recovery import next_hosts  # noqa: E402
from cluster.spec.config import load_inventory  # noqa: E402

RACK = "backend: ssh\nhosts:\n  - name: node[1-4]\n  - name: spare1\nspares: [node4, spare1]\n"


def _inv(tmp_path, text):
    p = tmp_path / "inv.yaml"
    p.write_text(text)
    return load_inventory(p)


def test_spares_are_left_out_of_jobs_and_kept_in_the_snapshot(tmp_path):
    from cluster.plan import make_plan, select_hosts
    from cluster.spec.config import inventory_from_plain
    inv = _inv(tmp_path, RACK)
    assert inv.spares == ("node4", "spare1") and [h.name for h in inv.job_hosts] == ["node1", "node2", "node3"]
    assert [h.name for h in select_hosts(inv, load_job("resnet50").job)] == ["node1", "node2", "node3"]
    assert [h.name for h in select_hosts(inv, load_job("resnet50", ["nodes=2"]).job)] == ["node1", "node2"]
    with pytest.raises(UserError) as e:
        select_hosts(inv, load_job("resnet50", ["nodes=4"]).job)
    assert "lists 3 (and 2 spare(s), kept for recovery)" in e.value.message
    assert inventory_from_plain(to_plain(inv)) == inv
    # the next attempt's plan: a spare in the failed host's place, rank order and node 0's rendezvous kept
    job = load_job("resnet50", ["nodes=2"]).job
    gpus = {h.name: 1 for h in inv.hosts}
    plan = make_plan(inv, job, "r1", gpus, hosts=(inv.host("node1"), inv.host("node4")))
    assert [(n.host, n.node_rank) for n in plan.nodes] == [("node1", 0), ("node4", 1)]
    assert plan.rdzv_endpoint.startswith("node1:") and plan.world_size == 2
    plan = make_plan(inv, job, "r1", gpus, hosts=(inv.host("node4"), inv.host("node2")))
    assert plan.rdzv_endpoint.startswith("node4:") and "--node-rank=1" in plan.nodes[1].argv


BAD_SPARES = [
    ("not a host", RACK.replace("[node4, spare1]", "[node4, spare2]"), ["spares[1]", "'spare2' is not one of hosts:",
                                                                         "did you mean 'spare1'", "under hosts:"]),
    ("twice", RACK.replace("[node4, spare1]", "[node4, 'node[3-4]']"), ["spares[1]", "duplicate spare 'node4'"]),
    ("every host", RACK.replace("[node4, spare1]", "['node[1-4]', spare1]"), ["every host is a spare"]),
    ("bad range", RACK.replace("[node4, spare1]", "['node[4-']"), ["spares[0]", "bad host range"]),
    ("not a list", RACK.replace("[node4, spare1]", "{a: 1}"), ["spares", "expected a list"]),
    ("slurm", "backend: slurm\nhosts:\n  - name: a\n  - name: b\nslurm:\n  partition: p\nspares: [b]\n",
     ["spares", "for the ssh backend, not 'slurm'"]),
]


@pytest.mark.parametrize("case", BAD_SPARES, ids=[c[0] for c in BAD_SPARES])
def test_bad_spares_one_message_exit_2(tmp_path, case, capsys):
    from cluster.cli import main
    _, text, words = case
    p = tmp_path / "inv.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        load_inventory(p)
    msg = e.value.render()
    assert msg.startswith(f"error: {p}:"), msg
    for w in words:
        assert w in msg, (w, msg)
    assert main(["plan", "resnet50", "-i", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_a_host_is_blamed_for_what_it_did_not_for_a_collective_timeout():
    assert decide({}, failure(extra=TORCHRUN_KILLED), 3, signal=9, progressed=True).blame == "node2"
    lost = failure(error="node3: lost by the gang (no heartbeat for 10 s)", host="node3", rank=2)
    assert decide({}, lost, 3).blame == "node3"
    gone = failure(error="torchrun on node2 ended with exit code None (ranks 1-1)")
    assert decide({}, gone, 3, node_detail="agent gone without an exit record").blame == "node2"
    timeout = failure(own=["RuntimeError: [../gloo/transport/tcp/pair.cc:598] Connection closed by peer"
                           " [10.0.0.3]:1234"])
    assert decide({}, timeout, 3, progressed=True).blame is None


def _restarting(hosts, *blames):
    """run.json of a RESTARTING run whose attempts were blamed on ``blames`` in turn."""
    return {"plan": {"nodes": [{"host": h} for h in hosts]},
            "attempts": [{"attempt": i + 1, "blame": b, "hosts": list(hosts)} for i, b in enumerate(blames)]}


def healthy(*bad):
    seen = []

    def check(names):
        seen.append(list(names))
        return {n: ("python '/x' not found" if n in bad else None) for n in names}
    check.seen = seen
    return check


def test_next_hosts_replace_the_culprit_by_a_healthy_spare_in_its_rank():
    check = healthy("s1")
    nh = next_hosts(_restarting(["n1", "n2", "n3"], "n2"), ["s1", "s2"], check)
    assert nh.hosts == ("n1", "s2", "n3") and nh.replaced == {"n2": "s2"} and not nh.error
    assert nh.rejected == {"s1": "python '/x' not found"} and check.seen == [["s1", "s2"]]
    # node 0 at fault: the spare becomes node 0 (the rendezvous moves with it)
    assert next_hosts(_restarting(["n1", "n2"], "n1"), ["s1"], healthy()).hosts == ("s1", "n2")
    # a cause that is no host's (a collective timeout): the same hosts, no spare probed
    check = healthy()
    assert next_hosts(_restarting(["n1", "n2"], None), ["s1"], check).hosts == ("n1", "n2") and not check.seen


def test_no_spare_left_restarts_on_the_same_hosts():
    assert next_hosts(_restarting(["n1", "n2"], "n2"), [], healthy()) .hosts == ("n1", "n2")
    nh = next_hosts(_restarting(["n1", "n2"], "n2"), ["s1"], healthy("s1"))
    assert nh.hosts == ("n1", "n2") and not nh.error and "s1" in nh.rejected
    # a spare that an earlier attempt ran on (and was replaced) is no spare any more
    data = _restarting(["n1", "s1"], "n2", "s1")
    data["attempts"][0]["hosts"] = ["n1", "n2"]
    assert next_hosts(data, ["s1"], healthy()).hosts == ("n1", "s1")


def test_a_host_blamed_twice_is_quarantined():
    # replaced by the spare, and named
    nh = next_hosts(_restarting(["n1", "n2"], "n2", "n2"), ["s1"], healthy())
    assert nh.hosts == ("n1", "s1") and nh.quarantined == ("n2",)
    # no spare for it: no next attempt, and the reason names the host and its failures
    nh = next_hosts(_restarting(["n1", "n2"], "n2", "n1", "n2"), [], healthy())
    assert nh.error and "host n2 caused 2 failures of this run (attempts 1, 3)" in nh.error
    assert "quarantined" in nh.error and "no spare left" in nh.error and nh.quarantined == ("n2",)


def test_status_names_the_hosts_of_each_attempt_and_the_quarantined():
    data = {"attempt": 3, "state": "RUNNING", "quarantined": ["n2"], "attempts": [
        {"attempt": 1, "cause": "host n2 rank 1: killed by signal 9", "restart": True, "reason": "r",
         "hosts": ["n1", "n2"], "replaced": {}},
        {"attempt": 2, "cause": "host n2 rank 1: killed by signal 9", "restart": True, "reason": "r",
         "hosts": ["n1", "n2"], "replaced": {"n2": "s1"}}]}
    text = "\n".join(describe(data))
    assert "ran on n[1-2]; n2 replaced by s1" in text, text
    assert "quarantined (caused two failures, not used again by this run): n2" in text, text


def test_with_a_range_of_nodes_and_no_spare_the_run_shrinks_without_the_culprit():
    # nodes: 2-3, no spare: node2 dropped, the others keep their order (and node 0)
    nh = next_hosts(_restarting(["n1", "n2", "n3"], "n2"), [], healthy(), min_nodes=2)
    assert nh.hosts == ("n1", "n3") and nh.dropped == ("n2",) and not nh.replaced and not nh.error
    # node 0 dropped: node 1 becomes node 0 (the rendezvous, rank 0, the checkpoint it is given)
    assert next_hosts(_restarting(["n1", "n2", "n3"], "n1"), [], healthy(), min_nodes=1).hosts == ("n2", "n3")
    # spares are tried first: a healthy one keeps the world size
    nh = next_hosts(_restarting(["n1", "n2", "n3"], "n2"), ["s1"], healthy(), min_nodes=2)
    assert nh.hosts == ("n1", "s1", "n3") and nh.replaced == {"n2": "s1"} and not nh.dropped
    # ... and one that fails its probe does not stop the shrink
    nh = next_hosts(_restarting(["n1", "n2", "n3"], "n2"), ["s1"], healthy("s1"), min_nodes=2)
    assert nh.hosts == ("n1", "n3") and nh.dropped == ("n2",) and "s1" in nh.rejected
    # at the minimum: no shrink; the same hosts, as a fixed count
    nh = next_hosts(_restarting(["n1", "n3"], "n2", "n3"), [], healthy(), min_nodes=2)
    assert nh.hosts == ("n1", "n3") and not nh.dropped
    # a fixed count (min_nodes None) never shrinks
    assert next_hosts(_restarting(["n1", "n2", "n3"], "n2"), [], healthy()).hosts == ("n1", "n2", "n3")
    # a cause that is no host's: nothing dropped
    assert not next_hosts(_restarting(["n1", "n2", "n3"], None), [], healthy(), min_nodes=2).dropped
    # a host blamed twice at the minimum: quarantined, no next attempt; above it: dropped instead
    assert next_hosts(_restarting(["n1", "n2"], "n2", "n2"), [], healthy(), min_nodes=2).error
    nh = next_hosts(_restarting(["n1", "n2", "n3"], "n2", "n2"), [], healthy(), min_nodes=2)
    assert nh.hosts == ("n1", "n3") and nh.dropped == ("n2",) and not nh.error


def test_status_says_the_run_shrank():
    data = {"attempt": 2, "state": "RUNNING", "attempts": [
        {"attempt": 1, "cause": "host node2 rank 1: killed by signal 9", "restart": True, "reason": "r",
         "hosts": ["node1", "node2", "node3"], "replaced": {}, "dropped": ["node2"]}]}
    text = "\n".join(describe(data))
    assert "ran on node[1-3]; shrunk from 3 to 2 nodes: node2 dropped" in text, text


@pytest.mark.parametrize("value,words", [
    ("4-2", ["minimum is above its maximum", "'4-2'", "2-4"]),
    ("0-3", ["starts at 1 or more", "'0-3'"]),
    ("2-x", ["a range MIN-MAX", "'2-x'"]),
    ("'２-３'", ["a range MIN-MAX"]),            # fullwidth digits are not a range
    ("2-200000", ["at most 100000"]),
])
def test_a_bad_range_of_nodes_is_refused_with_file_line_key(tmp_path, value, words, capsys):
    from cluster.cli import main
    from cluster.errors import UserError
    p = tmp_path / "job.yaml"
    p.write_text(f"name: j\nmodule: a\nnodes: {value}\n")
    with pytest.raises(UserError) as ei:
        load_job(str(p))
    msg = ei.value.render()
    assert msg.startswith(f"error: {p}:3: nodes: "), msg
    for w in words:
        assert w in msg, (w, msg)
    assert main(["plan", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("error:") == 1


def test_a_range_of_nodes_parses_and_keeps_counts_and_all(tmp_path):
    from cluster.spec.config import min_nodes, node_range
    for value, span in [("2-4", (2, 4)), ("3", None), ("all", None), ("1-1", (1, 1))]:
        p = tmp_path / "job.yaml"
        p.write_text(f"name: j\nmodule: a\nnodes: {value}\n")
        job = load_job(str(p)).job
        assert node_range(job.nodes) == span and min_nodes(job) == (span[0] if span else None)
        # the job as run.json keeps it: a relaunch reads the same range
        assert job_from_plain(to_plain(job)).nodes == job.nodes
    assert load_job(str(p), ["nodes=2-3"]).job.nodes == "2-3"      # an override, as typed


def test_a_range_of_nodes_is_refused_on_slurm(tmp_path, capsys):
    from cluster.cli import main
    inv = tmp_path / "inv.yaml"
    inv.write_text("backend: slurm\nhosts:\n  - name: n1\n    gpus: 0\nslurm:\n  partition: debug\n  time_min: 5\n")
    p = tmp_path / "job.yaml"
    p.write_text("name: j\nmodule: a\nnodes: 2-3\n")
    assert main(["plan", str(p), "-i", str(inv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}:3: nodes: a range of nodes (2-3) is for the ssh backend"), err
    assert "nodes: 3" in err and "Traceback" not in err


def test_plan_shows_the_range(tmp_path, capsys):
    from cluster.cli import main
    inv = tmp_path / "inv.yaml"
    inv.write_text("backend: ssh\nhosts:\n  - name: n[1-4]\n    gpus: 0\nspares: [n4]\n")
    p = tmp_path / "job.yaml"
    p.write_text("name: j\ntrain: {steps: 5}\nnodes: 2-3\n")
    assert main(["plan", str(p), "-i", str(inv)]) == 0
    out = capsys.readouterr().out
    assert "3 node(s), world size" in out and "--nnodes=3" in out and "[n4]" not in out, out
    assert "# nodes 2-3: 3 node(s) now; when a host fails the run and no spare is left, the next attempt " \
           "goes on without it, down to 2 node(s)" in out, out
    # fewer job hosts than the minimum: refused, nothing planned
    p.write_text("name: j\ntrain: {steps: 5}\nnodes: 4-6\n")
    assert main(["plan", str(p), "-i", str(inv)]) == 2
    err = capsys.readouterr().err
    assert "at least 4 nodes (nodes: 4-6) but the inventory lists 3 (and 1 spare(s)" in err, err
