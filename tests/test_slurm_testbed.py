"""The SLURM backend on the cluster in a box's real SLURM (3 nodes, 2 fake GPUs each).

Every verb runs as `python -m cluster ...` in a fresh process, as a user would run it. Jobs are
tiny: tests.fixtures.hello (gloo all_reduce) or train with a two-conv model at 32x32. A requeued
job waits ~120 s for its BeginTime; the tests start it at once with `scontrol update StartTime=now`.
"""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.backends.slurm import job_info
from tests.testbed_client import pty_cli

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.testbed, pytest.mark.slow]
PREFIX = re.compile(r"^\[(\S+) (\d+|agent)\] ")
TRAIN_STEPS = 800    # tiny_cnn: ~20 ms a step for 4 ranks on 2 cores; a checkpoint every 100


class Slurm:
    """A test's view: its own inventory (the testbed's with backend slurm) and runs dir."""

    def __init__(self, testbed, tmp_path, **slurm):
        inv = yaml.safe_load(Path(testbed.inventory).read_text())
        inv["backend"] = "slurm"
        inv["slurm"].update(slurm)
        self.inventory = tmp_path / "inventory.yaml"
        self.inventory.write_text(yaml.safe_dump(inv))
        self.runs = tmp_path / "runs"    # /tmp: shared by every node of the testbed
        self.tmp, self.testbed = tmp_path, testbed

    def env(self):
        return self.testbed.env(CLUSTER_RUNS_DIR=str(self.runs), PYTHONUNBUFFERED="1")

    def cli(self, *args, timeout=120):
        return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, env=self.env(), text=True,
                              capture_output=True, timeout=timeout)

    def job(self, name, text):
        p = self.tmp / f"{name}.yaml"
        p.write_text(text)
        return str(p)

    def submit(self, job, *overrides):
        p = self.cli("submit", job, *overrides, "-i", str(self.inventory))
        assert p.returncode == 0, p.stdout + p.stderr
        run_id = p.stdout.split()[1]
        jid = json.loads((self.runs / run_id / "run.json").read_text())["handle"]["job_id"]
        return run_id, jid

    def follow(self, run_id):
        return subprocess.Popen([sys.executable, "-m", "cluster", "logs", run_id, "-f"], cwd=REPO, env=self.env(),
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def status(self, run_id):
        p = self.cli("status", run_id, "--json")
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    def wait_state(self, run_id, states, timeout=120):
        deadline, st = time.time() + timeout, None
        while time.time() < deadline:
            st = self.status(run_id)
            if st["state"] in states:
                return st
            time.sleep(1)
        raise AssertionError(f"{run_id} not in {states} after {timeout}s: {st}\n{self.logs(run_id)}")

    def logs(self, run_id):
        p = self.cli("logs", run_id)
        assert p.returncode == 0, p.stderr
        return p.stdout

    def latest_step(self, run_id):
        latest = self.runs / run_id / "checkpoints" / "latest"
        m = re.match(r"ckpt_(\d+)\.pt", latest.read_text().strip()) if latest.exists() else None
        return int(m[1]) if m else 0


def wait(cond, what, timeout=90, interval=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def slurm_state(jid):
    return (job_info(jid) or {}).get("JobState", "").split()[0]


def start_now(jid, restarts):
    """A requeued job waits for its BeginTime (~120 s): start it at once (once requeued ``restarts`` times)."""
    def requeued():
        info = job_info(jid) or {}
        return info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= restarts
    wait(requeued, f"job {jid} to be requeued ({restarts}x) and pending", timeout=120)
    subprocess.run(["scontrol", "update", f"jobid={jid}", "StartTime=now"], check=True, timeout=30)


def wait_slurm_state(jid, state, timeout=120):
    """Until the job is in ``state``; a job still PENDING is nudged again every 15 s (on a loaded
    machine the first StartTime=now can land before the requeue settled)."""
    deadline, nudged = time.time() + timeout, time.time()
    while time.time() < deadline:
        now = slurm_state(jid)
        if now == state:
            return
        if now == "PENDING" and time.time() - nudged > 15:
            subprocess.run(["scontrol", "update", f"jobid={jid}", "StartTime=now"], timeout=30)
            nudged = time.time()
        time.sleep(0.5)
    raise AssertionError(f"job {jid} not {state} after {timeout}s: {job_info(jid)}")


def job_pids(jid, netns=None):
    """Live processes of a SLURM job (its tasks, their payloads, its slurmstepds), on any node."""
    ino = os.stat(f"/run/netns/{netns}").st_ino if netns else None
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if ino is not None and os.stat(d / "ns" / "net").st_ino != ino:
                continue
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={jid}".encode() in env or cmd.startswith(f"slurmstepd: [{jid}.".encode()):
            out.append(int(d.name))
    return out


HELLO = """name: hello
module: tests.fixtures.hello
nodes: 2
cpu_procs_per_node: 2
env:
  HELLO_SLEEP_S: "{sleep}"
"""
TINY = f"""name: tiny
nodes: 2
cpu_procs_per_node: 2
train:
  model: train.model:tiny_cnn
  num_classes: 10
  image_size: 32
  batch_size: 8
  steps: {TRAIN_STEPS}
  log_every: 100
  ckpt_every: 100
  val_every: -1
  lr: 0.01
"""


def check_one_stream(logs, ranks=range(4)):
    lines = logs.splitlines()
    assert lines and all(PREFIX.match(l) for l in lines), [l for l in lines if not PREFIX.match(l)][:5]
    return {int(m[2]): m[1] for m in map(PREFIX.match, lines) if m[2] != "agent"}


def check_train_finished(s, run_id, resumes):
    logs = s.logs(run_id)
    check_one_stream(logs)
    resumed = [int(m) for m in re.findall(r"\[\S+ 0\] resumed from \S+: step (\d+)", logs)]
    assert len(resumed) == resumes and resumed == sorted(resumed) and all(resumed), resumed
    assert s.latest_step(run_id) == TRAIN_STEPS
    recs = [json.loads(l) for l in (s.runs / run_id / "metrics" / "metrics-rank0.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in recs if "step" in r) == TRAIN_STEPS
    assert f"step {TRAIN_STEPS}/{TRAIN_STEPS}" in logs
    return resumed, logs


# ---------------------------------------------------------------------------------------------
def test_two_nodes_four_ranks_one_per_gpu_and_never_run_again(testbed, tmp_path):
    """2 nodes x 2 tasks (one per fake GPU) to completion; a requeue of the finished job runs nothing."""
    s = Slurm(testbed, tmp_path, gpus_per_node=2)
    run_id, jid = s.submit(s.job("hello", HELLO.format(sleep=0)))
    st = s.wait_state(run_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=120)
    assert st["state"] == "SUCCEEDED", s.logs(run_id)
    logs = s.logs(run_id)
    hosts = check_one_stream(logs)
    assert sorted(hosts) == [0, 1, 2, 3]
    assert hosts[0] == hosts[1] != hosts[2] == hosts[3]             # ranks 0,1 | 2,3: two hostnames
    assert sorted(int(r) for r in re.findall(r"hello from rank (\d)/4 sum=10", logs)) == [0, 1, 2, 3]
    assert len(re.findall(r"\] task \d/4 on node\d \(job \d+, restart 0, GPUs 0,1\)", logs)) == 4
    assert {n["host"] for n in st["nodes"]} == {hosts[0], hosts[2]}

    # a finished run is never run again, even when SLURM requeues the job
    subprocess.run(["scontrol", "requeue", jid], check=True, timeout=30)
    start_now(jid, 1)
    wait_slurm_state(jid, "COMPLETED")
    again = s.logs(run_id)
    assert again.count("not running it again") == 4 and again.count("hello from rank") == 4
    assert s.status(run_id)["state"] == "SUCCEEDED"


def test_stop_mid_run_cancels_and_leaves_nothing_and_a_shell_on_node_1_first(testbed, tmp_path):
    s = Slurm(testbed, tmp_path)
    run_id, jid = s.submit(s.job("hello", HELLO.format(sleep=300)))
    wait(lambda: s.logs(run_id).count("hello from rank") == 4, "all 4 ranks running", timeout=90)
    assert s.status(run_id)["state"] == "RUNNING" and job_pids(jid)
    # a shell on node 1, inside the job's allocation, in the run's directory with its environment
    code, out = pty_cli(["shell", run_id, "--node", "1"],
                        b'echo "AT:$(hostname):$(pwd):$SLURM_JOB_ID:$CLUSTER_RUN_ID"; exit 4\n',
                        s.testbed.env(CLUSTER_RUNS_DIR=str(s.runs)))
    assert f"AT:node2:{s.runs / run_id}:{jid}:{run_id}" in out and code == 4, out   # in the run directory
    p = s.cli("stop", run_id)
    assert p.returncode == 0, p.stderr
    assert "nothing of the run is left running" in p.stdout
    assert s.status(run_id)["state"] == "CANCELLED"
    assert slurm_state(jid) == "CANCELLED"
    assert job_pids(jid) == []                                      # no task, payload or stepd anywhere


def test_preemption_and_scontrol_requeue_resume_from_latest_checkpoint(testbed, tmp_path):
    """Preempted (TERM then USR2: submitit checkpoints and requeues from task 0), then requeued by
    hand: each time the job resumes from the latest checkpoint; it ends at exactly TRAIN_STEPS."""
    s = Slurm(testbed, tmp_path)
    run_id, jid = s.submit(s.job("tiny", TINY))
    follower = s.follow(run_id)          # `logs -f` from the start, across both requeues
    wait(lambda: s.latest_step(run_id) >= 100, "a first checkpoint", timeout=90)
    subprocess.run(["scancel", "--signal=TERM", jid], check=True, timeout=30)
    subprocess.run(["scancel", "--signal=USR2", jid], check=True, timeout=30)
    start_now(jid, 1)
    assert s.status(run_id)["state"] in ("PENDING", "RUNNING")
    first = s.latest_step(run_id)
    wait(lambda: s.latest_step(run_id) > first, "a checkpoint after the first resume", timeout=90)
    subprocess.run(["scontrol", "requeue", jid], check=True, timeout=30)
    start_now(jid, 2)
    st = s.wait_state(run_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=120)
    assert st["state"] == "SUCCEEDED"
    resumed, logs = check_train_finished(s, run_id, resumes=2)
    assert resumed[0] >= 100 and resumed[1] > resumed[0]
    assert "Caught signal SIGUSR2" in logs and "checkpoint: a requeued job runs this task again (attempt 1)" in logs
    events = [json.loads(l)["event"] for l in (s.runs / run_id / "events.jsonl").read_text().splitlines()]
    assert events.count("checkpoint") == 1
    assert job_info(jid)["Restarts"] == "2"
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0 and f"-- run {run_id} SUCCEEDED" in err
    assert sorted(out.splitlines()) == sorted(s.logs(run_id).splitlines())   # not a line lost or doubled
    assert [f"restart {i}" in out for i in range(3)] == [True] * 3


@contextlib.contextmanager
def frozen_node(testbed, jid: str, victim: str):
    """victim stops answering as a dead machine does (no connection reset): its slurmd and the
    job's processes there are frozen (SIGSTOP); yields the time of the fault. On the way out the
    job's leftovers there are killed and slurmd resumes: the shared testbed's node comes back."""
    slurmd = testbed.state["pids"][f"slurmd-{victim}"]
    frozen = job_pids(jid, victim)
    assert frozen and Path(f"/proc/{slurmd}/comm").read_text().strip() == "slurmd"
    t_fault = time.time()
    try:
        for pid in frozen + [slurmd]:
            _kill(pid, signal.SIGSTOP)
        yield t_fault
    finally:
        try:
            for pid in job_pids(jid, victim):
                _kill(pid, signal.SIGKILL)                             # the dead node's leftovers
        finally:
            _kill(slurmd, signal.SIGCONT)


def test_node_silent_mid_run_is_replaced_by_a_new_job_before_slurm_notices(testbed, tmp_path):
    """The second node stops answering (slurmd and the job's processes frozen, as a dead machine:
    no connection reset). Before SLURM counts it down (SlurmdTimeout, 30 s here), the run's
    detached follower finds its beat silent for restart.silent_s (20 s) while the other node beats,
    cancels the job and submits a new one without it; the run resumes from its checkpoint there
    and ends SUCCEEDED. Nobody runs status or logs meanwhile (a `logs -f` only reads)."""
    s = Slurm(testbed, tmp_path)
    run_id, jid = s.submit(s.job("tiny", TINY))
    reader = s.follow(run_id)            # `logs -f` from the start, across the change of job
    record = lambda: json.loads((s.runs / run_id / "run.json").read_text())
    follower = record()["handle"]["follower_pid"]
    wait(lambda: s.latest_step(run_id) >= 100, "a first checkpoint", timeout=90)
    old_nodes = _expand(job_info(jid)["NodeList"])
    victim = old_nodes[1]                                       # not the batch host
    # the node comes back once replaced (before SLURM counted it down: the shared testbed's node
    # stays in service for the tests after this one); the new job keeps it excluded
    with frozen_node(testbed, jid, victim) as t_fault:
        new = wait(lambda: (j := record()["handle"]["job_id"]) != jid and j, "the follower to replace the job",
                   timeout=60, interval=0.2)
        t_replaced = time.time()
        assert int((job_info(jid) or {}).get("Restarts", 0)) == 0          # SLURM had not requeued it
        # the old job is gone from the node that answers: nothing of it is left there
        for host in old_nodes[:1]:
            wait(lambda: job_pids(jid, host) == [], f"job {jid}'s processes on {host} to end", timeout=30)
    st = s.wait_state(run_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=150)
    assert st["state"] == "SUCCEEDED", s.logs(run_id)
    wait(lambda: job_pids(jid) == [] and slurm_state(jid) == "CANCELLED", f"job {jid} gone everywhere", timeout=60)
    resumed, logs = check_train_finished(s, run_id, resumes=1)
    assert resumed[0] >= 100
    info = job_info(new)
    assert victim not in _expand(info["NodeList"]) and len(_expand(info["NodeList"])) == 2
    assert victim in _expand(info["ExcNodeList"])
    rec = record()
    assert rec["handle"]["job_ids"] == [jid, new] and rec["attempt"] == 2
    [attempt] = rec["attempts"]
    assert attempt["cause"].startswith(f"node {victim} silent for ") and attempt["restart"]
    assert "no beat from its tasks; SLURM had not noticed" in attempt["cause"]
    out = s.cli("status", run_id).stdout
    assert f"  excluded {victim} after it fell silent (job {jid}, attempt 1)\n" in out, out
    assert f"attempt 1: node {victim} silent for " in out and "-> restarted: a new job without" in out
    assert [(e["node"], e["excluded"]) for e in st["excluded_nodes"]] == [(victim, True)]
    # the logs: both jobs' (the first job's lines, then the new one's), and `logs -f` saw them all
    assert f"on {victim} (job {jid}, restart 0" in logs and f"(job {new}, restart 0" in logs
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0 and f"-- run {run_id} SUCCEEDED" in err
    assert sorted(out.splitlines()) == sorted(s.logs(run_id).splitlines())   # not a line lost or doubled
    wait(lambda: not _alive(follower), "the follower to end with the run", timeout=60)
    # the figures of README's auto-recovery table: fault -> the new job's first step; the follower's
    # part (the new job submitted), SLURM's (the new job started: a node of the old one freed)
    from tests.test_faults_testbed import report
    from tests.test_recovery_testbed import attempts_of
    recs = [json.loads(l) for l in (s.runs / run_id / "metrics" / "metrics-rank0.jsonl").read_text().splitlines()]
    start2 = attempts_of(recs)[-1][0]       # log_every 100: its 'start' record (resumed, training) is the step's time
    started = time.mktime(time.strptime(info["StartTime"], "%Y-%m-%dT%H:%M:%S"))
    report("a SLURM node failure (slurmd and the job's processes frozen; the follower replaces the job)",
           state=st["state"], resumed_at=resumed[0], auto_recovery_s=round(start2["time"] - t_fault, 1),
           replaced_s=round(t_replaced - t_fault, 1), started_s=round(started - t_fault, 1))
    # the shared testbed's node in service for whatever runs next
    wait(lambda: subprocess.run(["sinfo", "-h", "-n", victim, "-o", "%T"], capture_output=True, text=True)
         .stdout.strip() in ("idle", "mixed", "allocated"), f"{victim} back in service", timeout=180)


def test_node_killed_mid_run_is_requeued_and_finishes(testbed, tmp_path):
    """SLURM's own path (restart.silent_s: 0, as where no follower runs): the second node stops
    answering (slurmd and the job's processes frozen, as a dead machine: no connection reset):
    SLURM marks it down (~34 s), requeues the job, which resumes elsewhere. Nobody runs status or
    logs meanwhile: the run's detached follower excludes the failed node while the job waits, so
    the requeued job does not land on it although it is back in service."""
    s = Slurm(testbed, tmp_path)
    run_id, jid = s.submit(s.job("tiny", TINY), "restart.silent_s=0")
    follower = json.loads((s.runs / run_id / "run.json").read_text())["handle"]["follower_pid"]
    wait(lambda: s.latest_step(run_id) >= 100, "a first checkpoint", timeout=90)
    victim = _expand(job_info(jid)["NodeList"])[1]             # not the batch host: its log tells
    with frozen_node(testbed, jid, victim) as t_fault:
        wait(lambda: int((job_info(jid) or {}).get("Restarts", 0)) >= 1, "SLURM to requeue the job", timeout=120)
        t_requeued = time.time()
    wait(lambda: victim in _expand_or_none((job_info(jid) or {}).get("ExcNodeList")),
         f"the follower to exclude {victim} from the requeued job", timeout=90)
    t_excluded = time.time()
    wait(lambda: subprocess.run(["sinfo", "-h", "-n", victim, "-o", "%T"], capture_output=True, text=True)
         .stdout.strip() in ("idle", "mixed", "allocated"), f"{victim} back in service", timeout=60)
    start_now(jid, 1)
    t_started = time.time()
    st = s.wait_state(run_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=120)
    assert st["state"] == "SUCCEEDED"
    resumed, logs = check_train_finished(s, run_id, resumes=1)
    assert f"Node failure on {victim}" in logs
    info = job_info(jid)
    assert info["Restarts"] == "1" and victim not in _expand(info["NodeList"])    # the requeued start's nodes
    assert len(_expand(info["NodeList"])) == 2
    assert f"  excluded {victim} after its node failure (restart 1)\n" in s.cli("status", run_id).stdout
    assert [(e["node"], e["restart"], e["excluded"]) for e in st["excluded_nodes"]] == [(victim, 1, True)]
    wait(lambda: not _alive(follower), "the follower to end with the run", timeout=60)
    # the figures of README's auto-recovery table: fault -> the requeued attempt's first step, and
    # SLURM's part (the node counted down, the job requeued), the exclusion, the test's start at once
    from tests.test_faults_testbed import report
    from tests.test_recovery_testbed import attempts_of
    recs = [json.loads(l) for l in (s.runs / run_id / "metrics" / "metrics-rank0.jsonl").read_text().splitlines()]
    start2 = attempts_of(recs)[-1][0]       # log_every 100: its 'start' record (resumed, training) is the step's time
    report("a SLURM node failure (slurmd and the job's processes frozen; requeue, node excluded)",
           state=st["state"], resumed_at=resumed[0], auto_recovery_s=round(start2["time"] - t_fault, 1),
           requeued_s=round(t_requeued - t_fault, 1), excluded_s=round(t_excluded - t_fault, 1),
           started_s=round(t_started - t_fault, 1))


def test_time_limit_warning_reaches_the_job_and_requeues_are_limited(testbed, tmp_path):
    """1 min limit, warning 50 s before it (--signal=USR2@50): task 0 gets it; with
    restart.max_requeues=0 the time-out is not requeued and the run fails, saying why.
    (A requeue on the warning itself: test_preemption_and_scontrol_requeue_...)"""
    s = Slurm(testbed, tmp_path, signal_delay_s=50)
    run_id, jid = s.submit(s.job("hello", HELLO.format(sleep=300)), "time_limit_min=1", "restart.max_requeues=0")
    st = s.wait_state(run_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=90)   # SLURM signals within 30 s
    assert st["state"] == "FAILED"
    logs = s.logs(run_id)
    check_one_stream(logs)
    assert re.search(r"^\[\S+ 0\] submitit WARNING .* Caught signal SIGUSR2", logs, re.M)
    assert "Job not requeued because: timed-out too many times. Stopping." in logs
    assert job_info(jid)["Restarts"] == "0" and job_pids(jid) == []


def test_bad_settings_are_refused_by_slurm_before_submitting(testbed, tmp_path):
    s = Slurm(testbed, tmp_path, partition="nosuch")
    p = s.cli("submit", s.job("hello", HELLO.format(sleep=0)), "-i", str(s.inventory))
    assert p.returncode == 2 and "SLURM rejects the job" in p.stderr and "Invalid partition name" in p.stderr
    s = Slurm(testbed, tmp_path, gpus_per_node=4)                    # the nodes have 2
    p = s.cli("submit", s.job("hello", HELLO.format(sleep=0)), "-i", str(s.inventory))
    assert p.returncode == 2 and "Requested node configuration is not available" in p.stderr
    assert not s.runs.exists()
    names = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
    assert not any(n.startswith("hello-") and n in p.stdout for n in names)


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass      # ended meanwhile


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _expand_or_none(nodelist):
    return [] if not nodelist or nodelist == "(null)" else _expand(nodelist)


def _expand(nodelist):
    from cluster.spec.hostlist import expand
    return expand(nodelist)
