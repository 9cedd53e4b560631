"""The submitting machine's process checks (psutil): is the submit that recorded a run still
running, is a run's checkpoint watcher still that watcher."""
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil

from cluster.run.checkpoints import _alive
from cluster.run.records import _proc_start, submitter, submitter_gone

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
        assert _alive(p.pid, "r1")
        assert not _alive(p.pid, "r2")               # the pid is another run's watcher
        p.kill()                                     # killed, not yet reaped: a zombie is not alive
        deadline = time.time() + 10
        while psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.time() < deadline
            time.sleep(0.01)
        assert not _alive(p.pid, "r1")
    finally:
        p.kill()
        p.wait()
    assert not _alive(p.pid, "r1")
    assert not _alive(None, "r1") and not _alive("x", "r1") and not _alive(2 ** 40, "r1")
