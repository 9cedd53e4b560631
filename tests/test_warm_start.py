"""Warm start of the ssh backend, on this machine: the preflight probe parks the node's agent, which
imports torchrun while the preflight runs and starts nothing until GO (cluster/hostside.py,
cluster/agent.py). The probe runs as the ssh backend runs it (``python -c``, arguments on stdin),
in a local shell instead of an ssh session; the cluster in a box runs the same over real ssh."""
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cluster.backends.local import pids_of_run
from cluster.hostside import _probe_then_launch, host_command

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def probe(tmp_path, **env):
    """Start the probe with a park spec for a 2-rank hello node; returns (proc, run id, run dir)."""
    rid = f"warmtest-{uuid.uuid4().hex[:8]}"
    run_dir = f"runs/{rid}"
    argv = [sys.executable, "-m", "cluster.agent", "--run-dir", run_dir, "--host", "h1", "--node-rank", "0",
            "--", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "--max-restarts=0", "--tee=3", "-m", "tests.fixtures.hello"]
    node_env = {"CLUSTER_RUN_ID": rid, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    a = {"workdir": str(tmp_path), "host": "h1", "manifest": None, "ports": [], "address": "127.0.0.1",
         "role": "server", "peers": 0, "wait_s": 5, "park": {"argv": argv, "env": node_env}}
    p = subprocess.Popen(["/bin/sh", "-c", host_command(sys.executable, _probe_then_launch)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    p.stdin.write(json.dumps(a).encode() + b"\n")
    p.stdin.flush()
    answer = json.loads(p.stdout.readline())
    return p, rid, run_dir, answer


def test_a_parked_agent_that_gets_no_go_leaves_nothing(tmp_path):
    p, rid, _, answer = probe(tmp_path)
    assert answer["parked"] and answer["leftovers"] == {}          # the parked agent is not a leftover
    assert len(pids_of_run(rid)) == 1                               # parked: the agent alone, no torchrun
    p.stdin.close()                                                 # what a failed preflight sends: EOF
    out = p.stdout.read().decode()
    assert p.wait(timeout=30) == 0 and json.loads(out.splitlines()[-1]) == {"launched": False}
    assert pids_of_run(rid) == []                                   # gone when the probe has ended
    assert not (tmp_path / "runs").exists()                         # and it wrote nothing


@pytest.mark.parametrize("fail", [False, True])
def test_go_runs_torchrun_in_a_fork_of_the_warm_agent(tmp_path, fail):
    env = {"HELLO_SHOW_PARENT": "1"}
    if fail:
        env.update(HELLO_FAIL_RANK="1", HELLO_SLEEP_S="30")
    p, rid, run_dir, answer = probe(tmp_path, **env)
    assert answer["parked"]
    go = {"shell": "exit 7", "pid": f"{run_dir}/state/h1.pid", "out": f"{run_dir}/state/h1.agent.out", "wait_s": 60}
    p.stdin.write(b"GO " + json.dumps(go).encode() + b"\n")
    p.stdin.close()
    out, err = p.stdout.read(), p.stderr.read()
    assert p.wait(timeout=90) == 0, err
    res = json.loads(out.decode().splitlines()[-1])
    assert res["launched"] and res["warm"], res                     # not the shell line ('exit 7')
    agent = res["agent"]["pid"]
    exit_file = tmp_path / run_dir / "state" / "h1.exit"
    deadline = time.time() + 120
    while not exit_file.exists():
        assert time.time() < deadline, (tmp_path / run_dir / "logs" / "h1.log").read_text()
        time.sleep(0.2)
    log = (tmp_path / run_dir / "logs" / "h1.log").read_text()
    assert "torchrun from a warm interpreter" in log
    code = json.loads(exit_file.read_text())["code"]
    if fail:
        assert code != 0 and "[h1 1] rank 1 failing on purpose" in log, log
    else:
        assert code == 0, log
        assert "[h1 0] hello from rank 0/2 sum=3" in log and "[h1 1] hello from rank 1/2 sum=3" in log, log
        # the workers' parent (the forked torchrun) shows up in ps as torchrun, not as the agent
        parents = [l for l in log.splitlines() if "parent: " in l]
        assert len(parents) == 2 and all(" -m torch.distributed.run " in l and "cluster.agent" not in l
                                         for l in parents), parents
    assert (tmp_path / run_dir / "state" / "h1.agent.out").read_text() == ""   # nothing went wrong
    deadline = time.time() + 30
    while pids_of_run(rid):
        assert time.time() < deadline, f"left running: {pids_of_run(rid)} (agent {agent})"
        time.sleep(0.2)
