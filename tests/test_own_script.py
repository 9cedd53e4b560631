"""Your own script, on this machine: the run directory, {python}/{code}, module paths, checkpoint
contract, heartbeat helper and liveness without heartbeats (the 3-host versions are in
tests/test_own_script_testbed.py)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.run import diagnose as dg
from cluster.node import heartbeat
from cluster.node.agent import run_environment
from cluster.spec.config import load_inventory, load_job
from cluster.plan import make_plan
from tests.test_local import cli, submit, wait_state
from tests.test_plan import RACK

REPO = Path(__file__).resolve().parent.parent


def rack(tmp_path):
    p = tmp_path / "rack.yaml"
    p.write_text(RACK)
    return load_inventory(p)


def job_file(tmp_path, text, name="job.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ---------------------------------------------------------------- plan
def test_python_placeholder_is_the_inventorys_python_or_the_containers(tmp_path):
    inv = rack(tmp_path)
    job = load_job("ddp-script").job
    node = make_plan(inv, job, "r1", {h.name: 8 for h in inv.hosts}).nodes[1]
    argv = node.payload()
    i = argv.index("--no-python")
    assert argv[i + 1:i + 3] == ("/opt/venv/bin/python", "{code}/examples/ddp/train.py")
    assert node.job_python("/opt/venv/bin/python") is None           # the preflight's own python
    with_image = job_file(tmp_path, (REPO / "jobs" / "ddp-script.yaml").read_text() +
                          "container:\n  image: nvcr.io/nvidia/pytorch:24.05-py3\n  runtime: docker\n", "c.yaml")
    argv = make_plan(inv, load_job(with_image).job, "r1", {h.name: 8 for h in inv.hosts}).nodes[0].payload()
    assert argv[argv.index("--no-python") + 1] == "python3"            # the image's


def test_a_relative_script_path_is_refused_with_the_fix(tmp_path):
    job = job_file(tmp_path, 'name: j\ncommand: ["{python}", "-u", "examples/ddp/train.py"]\n')
    p = cli(tmp_path / "runs", "plan", job)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "command[2]: the script 'examples/ddp/train.py' is a relative path" in p.stderr
    assert "write '{code}/examples/ddp/train.py'" in p.stderr


def test_module_job_has_its_own_directory_on_the_path(tmp_path):
    inv = rack(tmp_path)
    argv = make_plan(inv, load_job("ddp-module").job, "r1", {h.name: 8 for h in inv.hosts}).nodes[0].argv
    assert argv[argv.index("--module-dir") + 1] == "examples/ddp"
    env = {"PYTHONPATH": "/elsewhere"}
    out = run_environment("/code", Path("/code/runs/r1"), ["examples/ddp"], ["x", "{code}/a.py", "{code}x"], env)
    assert out == ["x", "/code/a.py", "{code}x"]
    home = os.path.expanduser("~")
    out = run_environment("/code", Path("/code/runs/r1"), [], ["~/v/bin/python", "-m", "torch.distributed.run",
                          "--no-python", "~/v/bin/python", "~/data"], {})
    assert out == [f"{home}/v/bin/python", "-m", "torch.distributed.run", "--no-python", f"{home}/v/bin/python", "~/data"]
    assert env == {"PYTHONPATH": "/code/examples/ddp:/code:/elsewhere", "CLUSTER_RUN_DIR": "/code/runs/r1",
                   "CLUSTER_CODE_DIR": "/code", "CLUSTER_CHECKPOINT_DIR": "/code/runs/r1/checkpoints"}


@pytest.mark.parametrize("path", ["../snap.pt", "/abs/snap.pt", "~/snap.pt", "a/../../b"])
def test_checkpoint_path_outside_the_run_directory_is_refused(tmp_path, path):
    job = job_file(tmp_path, f"name: j\nmodule: m\ncheckpoint:\n  path: '{path}'\n")
    p = cli(tmp_path / "runs", "plan", job)
    assert p.returncode == 2 and "checkpoint.path" in p.stderr and "Traceback" not in p.stderr, p.stderr


# ---------------------------------------------------------------- liveness, diagnosis, heartbeat helper
def test_without_heartbeats_a_rank_is_judged_by_output_and_cpu():
    kw = dict(world_size=2, hang_timeout_s=60, startup_timeout_s=10)
    # an hour in, no heartbeat file at all, but the node printed 5 s ago: not hung
    w = dg.watch({}, None, now=4000.0, started=400.0, activity={0: 3995.0, 1: 3995.0}, **kw)
    assert not w.hung and [r.flag for r in w.ranks] == ["quiet", "quiet"]
    # nothing known of a node (unreachable): not hung for lack of a file either
    assert not dg.watch({}, None, now=4000.0, started=400.0, activity={0: None, 1: None}, **kw).hung
    # silent and idle for longer than hang_timeout_s: hung, and said why
    w = dg.watch({}, None, now=4000.0, started=400.0, activity={0: 3995.0, 1: 3900.0}, **kw)
    assert w.hung == [1] and w.behind == [1]
    assert "rank 1 no output and no CPU for 100s (no heartbeats)" in w.reason


def test_cpu_time_counts_as_life_only_when_it_grows():
    class N:
        def __init__(self, cpu, out=100.0):
            self.host, self.activity = "h", {"output_t": out, "cpu_s": cpu}
    memo = {}
    assert dg.node_activity([N(5.0)], memo, 200.0) == {"h": 200.0}     # first look: alive now
    assert dg.node_activity([N(5.1)], memo, 260.0) == {"h": 200.0}     # a poller's crumbs: no
    assert dg.node_activity([N(9.0)], memo, 300.0) == {"h": 300.0}     # real work
    assert dg.node_activity([N(9.0, out=350.0)], memo, 400.0) == {"h": 350.0}   # it printed


def test_pin_memory_warning_on_a_cpu_host_is_no_diagnosis():
    line = ("[node1 0] /venv/lib/python3.11/site-packages/torch/utils/data/dataloader.py:1118: UserWarning: "
            "'pin_memory' argument is set as true but no accelerator is found, then device pinned memory won't be used.")
    assert dg.diagnose([line]) == []


def test_heartbeat_helper_writes_what_status_reads(tmp_path, monkeypatch):
    monkeypatch.delenv("CLUSTER_RUN_DIR", raising=False)
    heartbeat.beat(1)                                   # outside a run: nothing, no error
    monkeypatch.setenv("CLUSTER_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    heartbeat.beat(7, total=10)
    hb = json.loads((tmp_path / "metrics" / "heartbeat-rank3.json").read_text())
    assert hb["step"] == 7 and hb["steps_total"] == 10 and hb["rank"] == 3 and not hb["done"]
    w = dg.watch({3: hb}, None, now=hb["time"] + 1, world_size=4, hang_timeout_s=60,
                 activity={0: None, 1: None, 2: None, 3: None})
    assert next(r for r in w.ranks if r.rank == 3).step == 7


# ---------------------------------------------------------------- local runs
@pytest.mark.slow
def test_local_module_job_runs_in_its_run_directory_then_resumes(tmp_path):
    runs = tmp_path / "runs"
    t0 = time.time()
    rid = submit(runs, "ddp-module", "args=[--epochs, '2']", "cpu_procs_per_node=2")
    st = wait_state(runs, rid, ("SUCCEEDED", "FAILED"), timeout=180)
    logs = cli(runs, "logs", rid).stdout
    assert st["state"] == "SUCCEEDED", logs[-3000:]
    assert logs.count(f"starts at epoch 0 in {runs / rid}") == 2
    assert (runs / rid / "snapshot.pt").is_file()
    assert not (REPO / "snapshot.pt").exists() or (REPO / "snapshot.pt").stat().st_mtime < t0
    # a shell (make shell RUN=...) and exec --run start in the run's directory
    p = cli(runs, "exec", "--run", rid, "--", "sh", "-c", "pwd; ls snapshot.pt")
    assert p.returncode == 0 and f"{runs / rid}\nsnapshot.pt" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "cluster", "shell", rid], input="pwd; exit\n", text=True,
                       capture_output=True, timeout=60, cwd=REPO, env={**os.environ, "CLUSTER_RUNS_DIR": str(runs)})
    assert f"\n{runs / rid}\n" in "\n" + p.stdout, p.stdout + p.stderr
    rid2 = submit(runs, "ddp-script", "args=[--epochs, '3']", "cpu_procs_per_node=2", "--resume", rid)
    st = wait_state(runs, rid2, ("SUCCEEDED", "FAILED"), timeout=180)
    logs = cli(runs, "logs", rid2).stdout
    assert st["state"] == "SUCCEEDED", logs[-3000:]
    assert logs.count(f"starts at epoch 2 in {runs / rid2}") == 2 and "rank 1 epoch 2 loss" in logs


def test_preflight_checks_the_interpreter_a_command_names(tmp_path):
    job = job_file(tmp_path, 'name: j\ncommand: ["python3.99", "{code}/examples/ddp/train.py"]\n')
    p = cli(tmp_path / "runs", "doctor", job)
    assert p.returncode == 2 and "the job's command runs 'python3.99', which cannot run" in p.stderr, p.stderr
    assert "write \"{python}\" in 'command:'" in p.stderr


def test_a_peer_that_left_without_an_error_means_ranks_out_of_step():
    from types import SimpleNamespace as N
    tail = ["[node3 2] RuntimeError: [../gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.1]:16303."]
    address = {"node1": "10.0.0.1", "node2": "10.0.0.2", "node3": "10.0.0.3"}
    quiet = N(host="node1", exit_code=-9, detail="stopped by the gang: node3 failed (exit code 1)")
    f = dg.out_of_step_finding(tail, "node3", 2, [quiet], address, lambda h: [])
    assert f.pattern_id == "ranks-out-of-step" and f.host == "node1"
    assert f.line == "node3 rank 2 lost its connection to node1 (10.0.0.1), whose ranks showed no error (stopped by the gang)"
    # the peer had an error of its own (it was a victim too, or the cause): no such claim
    assert dg.out_of_step_finding(tail, "node3", 2, [quiet], address, lambda h: ["nccl-network"]) is None
    failed = N(host="node1", exit_code=1, detail="")
    assert dg.out_of_step_finding(tail, "node3", 2, [failed], address, lambda h: []) is None
