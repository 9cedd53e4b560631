"""Warm start of the ssh backend, on this machine: the preflight probe parks the node's agent, which
imports torchrun while the preflight runs and starts nothing until GO (cluster/node/probe.py,
cluster/node/agent.py). The probe runs as the ssh backend runs it (``python -c``, arguments on stdin),
in a local shell instead of an ssh session; the cluster in a box runs the same over real ssh."""
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cluster.backends.local import pids_of_run
from cluster.node.probe import _probe_then_launch, parked_argv
from cluster.backends.ship import host_command

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def probe(tmp_path, **env):
    """Start the probe with a park spec for a 2-rank hello node; returns (proc, run id, run dir,
    its answer, the node's agent argv)."""
    rid = f"warmtest-{uuid.uuid4().hex[:8]}"
    run_dir = f"runs/{rid}"
    argv = [sys.executable, "-m", "cluster.node.agent", "--run-dir", run_dir, "--host", "h1", "--node-rank", "0",
            "--preload", "tests",
            "--", sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
            "--node-rank=0", "--master-addr=127.0.0.1", f"--master-port={free_port()}", f"--rdzv-id={rid}",
            "--max-restarts=0", "--tee=3", "--log-dir=state/h1.torchrun", "-m", "tests.fixtures.hello"]  # as cluster/plan.py writes it
    # no OMP_NUM_THREADS: torchrun sets it to 1 for the workers, after the fork server loaded torch
    node_env = {"CLUSTER_RUN_ID": rid, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **env}
    a = {"workdir": str(tmp_path), "host": "h1", "manifest": None, "ports": [], "address": "127.0.0.1",
         "role": "server", "peers": 0, "wait_s": 5, "park": {"argv": argv, "env": node_env}}
    p = subprocess.Popen(["/bin/sh", "-c", host_command(sys.executable, _probe_then_launch)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    p.stdin.write(json.dumps(a).encode() + b"\n")
    p.stdin.flush()
    answer = json.loads(p.stdout.readline())
    return p, rid, run_dir, answer, argv


def test_a_parked_agent_that_gets_no_go_leaves_nothing(tmp_path):
    p, rid, _, answer, argv = probe(tmp_path)
    assert answer["parked"] and answer["leftovers"] == {}          # the parked agent is not a leftover
    deadline = time.time() + 20
    while True:         # the agent forks torchrun, which starts the fork server (and its resource tracker)
        parked = {pid: cmdline(pid) for pid in pids_of_run(rid)}
        if len(parked) >= 3 or time.time() > deadline:
            break
        time.sleep(0.1)
    # parked: the agent, its fork of torchrun and the fork server, all in the agent's group; no worker
    agent = [pid for pid, c in parked.items() if "cluster.node.agent --park-fd" in c]
    assert len(agent) == 1 and len(parked) >= 3, parked
    # exactly the argv the plan prints for it ('# parked:', cluster/plan.py)
    assert Path(f"/proc/{agent[0]}/cmdline").read_bytes() == b"\0".join(a.encode() for a in parked_argv(argv)) + b"\0"
    assert {os.getpgid(pid) for pid in parked} == set(agent), parked
    assert not any(" -u -m tests.fixtures.hello" in c for c in parked.values()), parked   # a worker
    p.stdin.close()                                                 # what a failed preflight sends: EOF
    out = p.stdout.read().decode()
    assert p.wait(timeout=30) == 0 and json.loads(out.splitlines()[-1]) == {"launched": False}
    assert pids_of_run(rid) == []                                   # gone when the probe has ended
    assert not (tmp_path / "runs").exists()                         # and it wrote nothing


def test_a_second_submit_sees_a_parked_agent_as_a_run_starting_not_a_leftover(tmp_path):
    """Two submits of one job seconds apart: the first's agent is parked (no pid file yet) while the
    second's probe looks for leftovers on the same host."""
    from cluster.node.probe import _probe
    p, rid, _, _, _ = probe(tmp_path)
    try:
        deadline = time.time() + 20
        while not any("cluster.node.agent --park-fd" in cmdline(pid) for pid in pids_of_run(rid)):
            assert time.time() < deadline, pids_of_run(rid)
            time.sleep(0.1)
        second = subprocess.run(["/bin/sh", "-c", host_command(sys.executable, _probe)], capture_output=True,
                                input=json.dumps({"workdir": str(tmp_path), "host": "h1"}), text=True, timeout=60)
        answer = json.loads(second.stdout)
        assert answer["leftovers"] == {} and answer["busy"] == {rid: "starting"}, answer
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    assert pids_of_run(rid) == []


# os_exit: the job ends with os._exit(0) (skipping the interpreter's teardown, as scripts do)
@pytest.mark.parametrize("fail", [None, "os_exit", "exit", "raise"])
def test_go_runs_torchrun_and_its_workers_warm(tmp_path, fail):
    env = {"HELLO_SHOW_PROCS": "1"}
    if fail == "os_exit":
        env["HELLO_OS_EXIT"], fail = "1", None
    elif fail:
        env.update(HELLO_FAIL_RANK="1", HELLO_FAIL_HOW=fail, HELLO_SLEEP_S="30")
    p, rid, run_dir, answer, argv = probe(tmp_path, **env)
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
        if fail == "raise":     # the traceback reaches the rank's log, as from `python -m`
            rank_log = (tmp_path / run_dir / "logs" / "h1.rank1.log").read_text()
            assert "Traceback (most recent call last)" in rank_log, rank_log
            assert "RuntimeError: rank 1 raising on purpose" in rank_log, rank_log
    else:
        assert code == 0, log
        assert "[h1 0] hello from rank 0/2 sum=3" in log and "[h1 1] hello from rank 1/2 sum=3" in log, log
        assert "workers fork from a server that imported torch" in log, log
        procs = [dict(kv.split("=", 1) for kv in l.split("procs: ", 1)[1].split(" | "))
                 for l in log.splitlines() if "procs: " in l]
        assert len(procs) == 2, log
        for p in procs:
            # each worker started with torch imported; ps shows it as the `python -m` it stands for,
            # and its torchrun (the fork of the agent) as torchrun
            assert p["torch_before_us"] == "True", p
            assert p["self"].endswith(" -u -m tests.fixtures.hello") and "forkserver" not in p["self"], p
            assert " -m torch.distributed.run " in p["torchrun"] and "cluster.node.agent" not in p["torchrun"], p
            # as the agent runs it cold: the payload after '--', as the plan wrote it
            payload = argv[argv.index("--") + 1:]
            assert p["torchrun"] == " ".join(payload), p
            # torch obeys the OMP_NUM_THREADS that torchrun gives its workers, as in a fresh interpreter
            assert p["OMP_NUM_THREADS"] == "1" and p["threads"] == "1", p
    assert (tmp_path / run_dir / "state" / "h1.agent.out").read_text() == ""   # nothing went wrong
    deadline = time.time() + 30
    while pids_of_run(rid):
        assert time.time() < deadline, f"left running: {pids_of_run(rid)} (agent {agent})"
        time.sleep(0.2)


def sem_files() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("sem.mp-")}


def test_a_stop_that_kills_the_whole_group_leaves_no_named_semaphore(tmp_path):
    """The warm workers' torchrun keeps an Event and a queue per rank as named semaphores in
    /dev/shm; a KILL of the whole group kills the resource tracker that would unlink them. The stop
    (as the ssh backend runs it, grace 0: straight to KILL) removes what the run left; another
    process's semaphore, in use, and an older file, stay."""
    from cluster.node.probe import _stop
    from cluster.node.shm import remove_left_semaphores
    older = Path(f"/dev/shm/sem.mp-ddptest-{uuid.uuid4().hex[:8]}")     # no process maps it, not the run's
    older.write_bytes(b"\0" * 32)
    other = run_dir = None
    try:
        before = sem_files()
        time.sleep(1.1)                                                  # the run starts after the older file
        p, rid, run_dir, answer, _ = probe(tmp_path, HELLO_SLEEP_S="120")
        assert answer["parked"]
        go = {"shell": "exit 7", "pid": f"{run_dir}/state/h1.pid", "out": f"{run_dir}/state/h1.agent.out",
              "wait_s": 60}
        p.stdin.write(b"GO " + json.dumps(go).encode() + b"\n")
        p.stdin.close()
        p.stdout.read()
        assert p.wait(timeout=90) == 0, p.stderr.read()
        log = tmp_path / run_dir / "logs" / "h1.log"
        deadline = time.time() + 90
        while "hello from rank 1/2" not in (log.read_text() if log.exists() else ""):
            assert time.time() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.2)
        # another process, started while the run runs, holds a semaphore of its own (it ends on EOF)
        other = subprocess.Popen([sys.executable, "-c", "import multiprocessing as mp, sys; "
                                  "l = mp.get_context('spawn').Lock(); print(l._semlock.name, flush=True); "
                                  "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        others = "sem." + other.stdout.readline().strip().lstrip("/")
        made = sem_files() - before - {others}
        assert len(made) >= 5, made            # torchrun's Event alone is five
        pgid = json.loads((tmp_path / run_dir / "state" / "h1.pid").read_text())["pgid"]
        stop = subprocess.run(["/bin/sh", "-c", host_command(sys.executable, _stop, site=False)], text=True,
                              capture_output=True, timeout=60,
                              input=json.dumps({"workdir": str(tmp_path), "run_id": rid, "pgid": pgid, "grace_s": 0}))
        assert stop.returncode == 0 and json.loads(stop.stdout) == {"left": []}, stop.stderr
        assert pids_of_run(rid) == []
        assert sem_files() - before == {others}         # the run's are gone, the other process's stays
        assert older.exists()
        other.stdin.close()                               # it unlinks its own on a normal exit
        assert other.wait(timeout=30) == 0 and others not in sem_files()
    finally:
        older.unlink(missing_ok=True)
        if other is not None and other.poll() is None:
            other.kill()
            other.wait()
        if run_dir is not None:         # what a failed check left, the other's too once killed
            remove_left_semaphores(str(tmp_path / run_dir / "state"))
