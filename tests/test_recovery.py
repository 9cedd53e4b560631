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
