"""The submitting machine's process checks (psutil): is the submit that recorded a run still
running, is a run's checkpoint watcher still that watcher, is the process that starts a
RESTARTING run's next attempt still there."""
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil

from cluster.run.records import RELAUNCHERS, _proc_start, relauncher_gone, runs_for, submitter, submitter_gone

WATCHER = RELAUNCHERS["watcher_pid"]

SLEEP = "import time; time.sleep(60)"


def test_a_submit_is_gone_once_its_process_is_or_its_pid_was_reused():
    me = submitter()
    assert me["host"] == socket.gethostname() and me["start"] is not None
    assert not submitter_gone(SimpleNamespace(data={"submitter": me}))
    p = subprocess.Popen([sys.executable, "-c", SLEEP])
    try:
        rec = SimpleNamespace(data={"submitter": {"pid": p.pid, "host": socket.gethostname(),
                                                  "start": _proc_start(p.pid)}})
        assert not submitter_gone(rec)
        # the same pid, started at another time: another process
        reused = SimpleNamespace(data={"submitter": {**rec.data["submitter"], "start": rec.data["submitter"]["start"] - 5}})
        assert submitter_gone(reused)
    finally:
        p.kill()
        p.wait()
    assert submitter_gone(rec)
    # another machine's submit: not this machine's to judge
    assert not submitter_gone(SimpleNamespace(data={"submitter": {**rec.data["submitter"], "host": "elsewhere"}}))


def test_a_process_start_is_psutils_to_the_same_float():
    """Read from /proc without psutil's import, the same number psutil gives (a run recorded by one
    is judged by the other across an upgrade)."""
    p = subprocess.Popen([sys.executable, "-c", SLEEP])
    try:
        for pid in (p.pid, 1, psutil.Process().pid):
            assert _proc_start(pid) == psutil.Process(pid).create_time()
    finally:
        p.kill()
        p.wait()
    assert _proc_start(p.pid) is None and _proc_start(-1) is None


def test_a_watcher_is_alive_only_as_the_runs_watcher():
    p = subprocess.Popen([sys.executable, "-c", SLEEP, "cluster.backends.watcher", "watch", "r1"])
    try:
        deadline = time.time() + 10         # until the child has exec'd: before, its argv is ours
        while "r1" not in psutil.Process(p.pid).cmdline():
            assert time.time() < deadline
            time.sleep(0.01)
        assert runs_for(p.pid, WATCHER, "r1")
        assert not runs_for(p.pid, WATCHER, "r2")               # the pid is another run's watcher
        p.kill()                                     # killed, not yet reaped: a zombie is not alive
        deadline = time.time() + 10
        while psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.time() < deadline
            time.sleep(0.01)
        assert not runs_for(p.pid, WATCHER, "r1")
    finally:
        p.kill()
        p.wait()
    assert not runs_for(p.pid, WATCHER, "r1")
    assert not any(runs_for(pid, WATCHER, "r1") for pid in (None, "x", 2 ** 40))


def test_the_process_that_starts_the_next_attempt_is_gone_once_it_ended_here():
    """The ssh watcher and the SLURM follower: None while it runs as the run's, its pid once it
    ended (or the pid is another run's); not judged for a run submitted from another machine."""
    for key, module in RELAUNCHERS.items():
        p = subprocess.Popen([sys.executable, "-c", SLEEP, module, "follow", "r1"])
        try:
            deadline = time.time() + 10         # until the child has exec'd: before, its argv is ours
            while "r1" not in psutil.Process(p.pid).cmdline():
                assert time.time() < deadline
                time.sleep(0.01)
            here = {"submitter": {"host": socket.gethostname()}, "handle": {key: p.pid}}
            assert relauncher_gone(SimpleNamespace(id="r1", data=here)) is None
            assert relauncher_gone(SimpleNamespace(id="r2", data=here)) == p.pid
        finally:
            p.kill()
            p.wait()
        assert relauncher_gone(SimpleNamespace(id="r1", data=here)) == p.pid
        elsewhere = {**here, "submitter": {"host": "elsewhere"}}
        assert relauncher_gone(SimpleNamespace(id="r1", data=elsewhere)) is None
    assert relauncher_gone(SimpleNamespace(id="r1", data={"submitter": here["submitter"], "handle": {}})) is None
