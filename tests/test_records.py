"""Run records (cluster/run/records.py): how RUN names a run, damaged records, durable writes,
and one writer: processes that record at the same time (the watcher, ``logs -f``, ``status``) lose
none of each other's updates, and the run's end, once recorded, is not overwritten by a stale state."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.errors import UserError
from cluster.run.records import DamagedRecord, Run, State, all_runs, resolve
from cluster.spec.config import load_inventory
from cluster.spec.schema import to_plain

REPO = Path(__file__).resolve().parent.parent
HOST = "localhost"


def local_run(root: Path, rid: str, pgid: int, state: str = "STARTING") -> Run:
    """A run record as the local backend leaves it after the launch, its node being ``pgid``."""
    r = Run(rid, root)
    r.create({"id": rid, "created": time.time(), "state": state, "backend": "local",
              "job": {"name": "hello", "resolved": {"name": "hello", "hang_timeout_s": 300,
                                                    "startup_timeout_s": 900, "stop_on_hang": False}},
              "inventory": to_plain(load_inventory()),
              "plan": {"world_size": 1, "rdzv_endpoint": "127.0.0.1:29500", "nodes": [{"host": HOST, "nprocs": 1}]},
              "handle": {"pgids": {HOST: pgid}}})
    return r


def env_for(root: Path) -> dict:
    env = {**os.environ, "CLUSTER_RUNS_DIR": str(root), "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    env.pop("CLUSTER_RUN_ID", None)
    return env


# each writer sets fields of its own, many times (n, or until the run has ended and then n more),
# and logs an event each time
WRITER = """
import sys
from cluster.run.records import Run
rid, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
until_end = sys.argv[4:] == ["until-end"]
k = after = 0
while after < n:
    Run(rid).update(**{f"{name}_{k % 7}": k, f"{name}_last": k})
    Run(rid).event("tick", writer=name, k=k)
    k += 1
    after += not until_end or bool(Run(rid).data.get("final"))
print(k)
"""

# as the watcher does (cluster/backends/watcher.py): poll the run's status, record what it did
WATCHER = """
import sys
from cluster.backends import backend_for
from cluster.run.records import Run
rid, n = sys.argv[1], int(sys.argv[2])
be = backend_for(Run(rid))
k = 0
while True:
    run = Run(rid)
    state, _ = be.status(run)
    run.update(**{f"watcher_{k % 7}": k, "watcher_last": k})
    run.event("tick", writer="watcher", k=k)
    k += 1
    if state.is_terminal() and k >= n:
        break
print(state.value, k)
"""

# `status`, over and over, in one process (the CLI's own code), until the run has ended and then some
STATUS = """
import sys
from cluster.cli import main
from cluster.run.records import Run
rid = sys.argv[1]
after = 0
while after < 5:
    assert main(["status", rid]) == 0
    assert main(["status"]) == 0
    after += bool(Run(rid).data.get("final"))
"""


def test_the_watcher_logs_f_and_status_at_once_lose_no_update_as_the_run_ends(tmp_path):
    root = tmp_path / "runs"
    env = env_for(root)
    # the node: a process group of the run (as the agent is), ended below as the agent ends a run
    node = subprocess.Popen(["sleep", "600"], start_new_session=True, env={**env, "CLUSTER_RUN_ID": "r-ends"})
    procs = []
    try:
        run = local_run(root, "r-ends", node.pid)
        (run.dir / "state" / f"{HOST}.pid").write_text(json.dumps({"pid": node.pid, "pgid": node.pid}))
        n = 120
        py = [sys.executable, "-c"]
        writers = {name: subprocess.Popen(py + [WRITER, run.id, name, str(n)], env=env, cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for name in ("a", "b", "c")}
        watcher = subprocess.Popen(py + [WATCHER, run.id, "40"], env=env, cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        status = subprocess.Popen(py + [STATUS, run.id], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        follow = subprocess.Popen([sys.executable, "-m", "cluster", "logs", "-f", run.id], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        named = {**writers, "watcher": watcher, "status": status, "logs -f": follow}
        procs = list(named.values())
        # the run ends while they all record: as its agent does, the exit record, then the group is gone
        deadline = time.time() + 60
        while Run(run.id, root).state != State.RUNNING or \
                sum(e["event"] == "tick" for e in Run(run.id, root).events()) < n:
            assert time.time() < deadline, "the writers made no progress"
            time.sleep(0.05)
        (run.dir / "state" / f"{HOST}.exit").write_text(json.dumps({"code": 0, "time": time.time()}))
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()
        outs = {name: p.communicate(timeout=120) for name, p in named.items()}
        for name, p in named.items():
            assert p.returncode == 0, (name, outs[name][1][-2000:])
    finally:
        for p in procs + [node]:
            if p.poll() is None:
                p.kill()
                p.wait()

    rec = json.loads(run.path.read_text())
    # every field each writer set is there, with the last value it set
    for name in ("a", "b", "c"):
        assert rec[f"{name}_last"] == n - 1, (name, rec)
        for j in range(7):
            assert rec[f"{name}_{j}"] == max(k for k in range(n) if k % 7 == j), (name, j, rec)
    wk = int(outs["watcher"][0].split()[1])
    assert rec["watcher_last"] == wk - 1 and all(f"watcher_{j}" in rec for j in range(min(7, wk)))
    # the end is recorded once, and nothing recorded a stale RUNNING over it
    assert rec["state"] == "SUCCEEDED" and rec["final"] is True and rec["ended"] >= rec["created"]
    assert rec["nodes_final"][0]["host"] == HOST and rec["nodes_final"][0]["exit_code"] == 0
    events = Run(run.id, root).events()
    assert len(events) == len((run.dir / "events.jsonl").read_text().splitlines())   # every line whole
    assert sum(e["event"] == "tick" for e in events) == 3 * n + wk
    states = [e["state"] for e in events if e["event"] == "state"]
    assert states == ["RUNNING", "SUCCEEDED"], states
    # what the readers showed
    assert outs["watcher"][0].split()[0] == "SUCCEEDED"
    assert f"-- run {run.id} SUCCEEDED" in outs["logs -f"][1]
    shown = subprocess.run([sys.executable, "-m", "cluster", "status", run.id], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert f"run {run.id}: SUCCEEDED" in shown.stdout, shown.stdout + shown.stderr
    # the record before the last write reads, and no temporary file is left
    assert json.loads(run.prev_path.read_text())["id"] == run.id
    assert [p.name for p in run.dir.iterdir() if p.name.startswith(".")] == []


def test_a_writer_that_read_the_record_before_the_end_does_not_undo_it(tmp_path):
    r = local_run(tmp_path, "r-stale", 2**22 - 7)
    stale = Run(r.id, tmp_path)
    assert stale.state == State.STARTING                      # read before the run ended
    other = Run(r.id, tmp_path)
    assert other.set_state(State.SUCCEEDED, final=True, ended=1.0, nodes_final=[])
    stale.update(checkpoint_dir="/x")                         # its own field: recorded, the end kept
    assert not stale.set_state(State.RUNNING)                 # its stale view of the state: refused
    assert stale.state == State.SUCCEEDED                     # and it now sees the end
    stale.update(state="RUNNING", final=False, note="late")   # even written as plain fields
    rec = json.loads(r.path.read_text())
    assert rec["state"] == "SUCCEEDED" and rec["final"] is True and rec["ended"] == 1.0
    assert rec["checkpoint_dir"] == "/x" and rec["note"] == "late"
    assert [e["state"] for e in r.events() if e["event"] == "state"] == ["SUCCEEDED"]


def test_a_damaged_record_is_not_written_over(tmp_path):
    r = local_run(tmp_path, "r-bad", 2**22 - 7)
    r.path.write_text('{"id": "r-b')
    with pytest.raises(DamagedRecord, match="is damaged"):
        Run(r.id, tmp_path).update(state="RUNNING")
    assert r.path.read_text() == '{"id": "r-b'                 # left for the user (and 'stop')


@pytest.mark.slow
def test_a_real_local_run_ending_under_logs_f_status_and_a_writer(tmp_path):
    """The same on the real local backend: a 2-rank torchrun run ends while `logs -f`, `status` and a
    writer of its own fields record at once."""
    root = tmp_path / "runs"
    env = {**env_for(root), "CUDA_VISIBLE_DEVICES": ""}
    job = tmp_path / "hello.yaml"
    job.write_text("name: hello\nmodule: tests.fixtures.hello\ncpu_procs_per_node: 2\nenv:\n  HELLO_SLEEP_S: '4'\n")
    sub = subprocess.run([sys.executable, "-m", "cluster", "submit", str(job)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    rid = sub.stdout.split()[1]
    py = [sys.executable, "-c"]
    procs = {"writer": subprocess.Popen(py + [WRITER, rid, "w", "20", "until-end"], env=env, cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             "status": subprocess.Popen(py + [STATUS, rid], env=env, cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             "logs -f": subprocess.Popen([sys.executable, "-m", "cluster", "logs", "-f", rid], env=env, cwd=REPO,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
    try:
        outs = {name: p.communicate(timeout=120) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run([sys.executable, "-m", "cluster", "stop", rid, "--grace-s", "2"], env=env, cwd=REPO,
                       capture_output=True, timeout=60)
    for name, p in procs.items():
        assert p.returncode == 0, (name, outs[name][1][-2000:])
    assert "hello from rank 1/2" in outs["logs -f"][0] and f"-- run {rid} SUCCEEDED" in outs["logs -f"][1]
    rec = json.loads((root / rid / "run.json").read_text())
    n = int(outs["writer"][0])          # its updates, the last 20 of them after the run's end was recorded
    assert rec["w_last"] == n - 1 and all(rec[f"w_{j}"] == max(k for k in range(n) if k % 7 == j) for j in range(7))
    assert rec["state"] == "SUCCEEDED" and rec["final"] and rec["handle"]["pgids"]       # submit's fields too
    states = [e["state"] for e in Run(rid, root).events() if e["event"] == "state"]
    assert states[-1] == "SUCCEEDED" and states.count("SUCCEEDED") == 1, states


def make(root, rid, job, created):
    r = Run(rid, root)
    r.create({"id": rid, "job": {"name": job}, "created": created, "state": "SUCCEEDED"})
    return r


@pytest.fixture
def runs(tmp_path):
    make(tmp_path, "resnet50-20261128-100000-aaaa", "resnet50", 1)
    make(tmp_path, "resnet50-20261128-110000-bbbb", "resnet50", 2)
    make(tmp_path, "resnet50-tiny-20261128-120000-cccc", "resnet50-tiny", 3)
    make(tmp_path, "hello-20261128-130000-dddd", "hello", 4)
    return tmp_path


def test_run_is_an_id_a_job_name_meaning_its_latest_run_a_unique_prefix_or_the_latest(runs):
    assert resolve("resnet50", runs).id == "resnet50-20261128-110000-bbbb"     # README: "its latest run"
    assert resolve("resnet50-tiny", runs).id == "resnet50-tiny-20261128-120000-cccc"
    assert resolve("resnet50-20261128-10", runs).id == "resnet50-20261128-100000-aaaa"
    assert resolve(None, runs).id == resolve("latest", runs).id == "hello-20261128-130000-dddd"
    with pytest.raises(UserError, match="'resnet50-2026' matches 2 runs"):
        resolve("resnet50-2026", runs)
    with pytest.raises(UserError, match="no run 'nope'"):
        resolve("nope", runs)


def test_a_damaged_record_is_found_by_id_and_passed_over_as_the_latest(runs, capsys):
    bad = Run("hello-20261128-130000-dddd", runs)
    bad.path.write_text('{"id": "hello-2026')
    assert [r.id for r in all_runs(runs)][-1] == bad.id and all_runs(runs)[-1].damaged
    assert resolve(None, runs).id == "resnet50-tiny-20261128-120000-cccc"
    assert f"passing over {bad.id}" in capsys.readouterr().err
    r = resolve(bad.id, runs)
    e = r.damaged
    assert e is not None and bad.id in e.message and "damaged" in e.message
    with pytest.raises(UserError, match="is damaged"):
        r.data


def test_a_write_keeps_the_record_before_it(tmp_path):
    r = make(tmp_path, "j-1", "j", 1)
    r.update(state="RUNNING")
    assert json.loads(r.prev_path.read_text())["state"] == "SUCCEEDED"
    assert json.loads(r.path.read_text())["state"] == "RUNNING"
    assert sorted(p.name for p in r.dir.iterdir() if p.name.startswith(".")) == []     # no temp files left
