"""Warm start of the node agent (``--park-fd FD``, used by the ssh backend's preflight probe,
cluster/node/probe.py): the agent is started while the preflight still runs, writes nothing and binds nothing, and waits for a
line on FD. When the payload is ``<this python> -m torch.distributed.run``, it forks torchrun at
once; the fork imports torchrun, and starts a fork server that imports torch for the workers
(cluster/node/warmworker.py), then waits. ``GO <json>`` starts the node exactly as the shell line would
(output to the agent log), except that torchrun and its workers start with torch imported: the
imports overlap the rest of the preflight instead of following it. Anything else on FD, or its end
(the probe was told to start nothing, or is gone), and the agent's whole group is killed, having
done nothing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional

from cluster.node.group import run_members


def _torchrun_here(payload: list[str]) -> bool:
    """The payload is torchrun under this very interpreter (not a container, not another python)."""
    if len(payload) < 3 or payload[1:3] != ["-m", "torch.distributed.run"]:
        return False
    import shutil
    exe = payload[0] if os.sep in payload[0] else shutil.which(payload[0])
    return bool(exe) and os.path.abspath(exe) == os.path.abspath(sys.executable)


def park(fd: int, payload: list[str], preload: list[str]) -> Optional["ForkedTorchrun"]:
    """Wait for the probe's word on ``fd``. If the payload is torchrun here, fork it at once (it is
    returned): the fork imports torchrun, and starts the warm workers' fork server, while the
    preflight runs. Unless the word is ``GO``, everything is killed (this agent, in its own group,
    and whatever it forked) having written nothing; on ``GO {"out": PATH}`` stdout and stderr go to
    PATH, as the shell line's would."""
    forked = ForkedTorchrun(payload, preload, close=fd) if _torchrun_here(payload) else None
    with os.fdopen(fd, "rb") as f:
        line = f.readline()
    if not line.startswith(b"GO"):
        if forked is not None:
            import shutil
            others, deadline = run_members(), time.time() + 5     # the fork and its fork server
            while others and time.time() < deadline:
                for pid in others:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.02)
                others = run_members()
            shutil.rmtree(forked.tmp, ignore_errors=True)
            os.killpg(os.getpgrp(), signal.SIGKILL)    # anything left, and us
        os._exit(0)
    go = json.loads(line[2:] or b"{}")
    if go.get("out"):
        os.makedirs(os.path.dirname(go["out"]) or ".", exist_ok=True)
        out = os.open(go["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
    return forked


class ForkedTorchrun:
    """torchrun in a fork of the parked agent (see park): a Popen look-alike (pid, stdout, wait,
    send_signal). Forked before the agent has opened anything of the run, it imports torchrun and
    starts the warm workers' fork server (cluster/node/warmworker.py), then waits for its argv on a
    pipe; :meth:`start` sends the argv."""

    def __init__(self, payload: list[str], preload: list[str], close: int):
        out_r, out_w = os.pipe()
        gate_r, self._gate = os.pipe()
        # multiprocessing's temporary directory (the fork server's socket), made here so that the
        # agent removes it when the run ends: a fork server killed with the group cannot
        import tempfile
        self.tmp = tempfile.mkdtemp(prefix="pymp-")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(out_r)
            os.close(self._gate)
            os.close(close)
            import multiprocessing.process
            multiprocessing.process.current_process()._config["tempdir"] = self.tmp   # util.get_temp_dir()
            self._child(gate_r, out_w, payload, preload)
        os.close(gate_r)
        os.close(out_w)
        self.pid = pid
        self.stdout = os.fdopen(out_r, "rb")
        self.returncode = None

    @staticmethod
    def _child(gate: int, out: int, payload: list[str], preload: list[str]) -> None:
        code = 1
        try:
            from cluster.node import warmworker
            warmworker.retitle(payload)     # ps: torchrun, from the start
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out, 1)     # the fork server's and the import's output too: read from GO on
            os.dup2(out, 2)
            os.close(null)
            os.close(out)
            server = warmworker.start_server(preload)   # first: its import is the longer one
            try:
                import torch.distributed.run as torchrun
            except Exception:   # noqa: BLE001 -- torchrun then starts fresh below and reports it
                torchrun = None
            data = b""
            while chunk := os.read(gate, 1 << 16):
                data += chunk
            os.close(gate)
            if not data:
                os._exit(0)     # the agent did not get as far as starting us
            argv, cwd = json.loads(data)
            os.chdir(cwd)
            if torchrun is None:
                os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run"] + argv)
            sys.argv = [torchrun.__file__] + argv
            warmworker.retitle(payload[:3] + argv)     # as the cold start shows it: the plan's python
            try:
                if not (server and warmworker.launch(torchrun, argv)):
                    torchrun.main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except BaseException:   # noqa: BLE001 -- as an uncaught exception ends `python -m ...`
                import traceback
                traceback.print_exc()
                code = 1
            import atexit
            atexit._run_exitfuncs()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def start(self, argv: list[str], cwd: str) -> None:
        os.write(self._gate, json.dumps([argv, cwd]).encode())
        os.close(self._gate)
        self._gate = None

    def abandon(self) -> None:
        """The agent gave up before starting torchrun: the fork ends without running anything."""
        if self._gate is not None:
            os.close(self._gate)
            self._gate = None
            os.waitpid(self.pid, 0)
            import shutil
            shutil.rmtree(self.tmp, ignore_errors=True)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() >= deadline:
                raise subprocess.TimeoutExpired("torchrun", timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)


