"""The node agent: the one process each node starts for a run (standard library only).

Started detached (``setsid``, stdin from /dev/null) by the local and ssh backends, it

* records its pid, which is also the run's process-group id on this node, in state/<host>.pid;
* runs the payload (torchrun ...) in that group, in the run's directory (its working directory:
  what a job writes stays in the run), with the code on its path (:func:`run_environment`),
  reading everything it prints;
* writes each line, prefixed ``[host rank]`` (from torchrun's ``[default<local>]:``), into logs/<host>.log and the
  rank's own logs/<host>.rank<R>.log (lines that torchrun itself prints get ``[host agent]``);
* when the payload ends, ends whatever it left in the group (TERM, then KILL), and writes the exit
  code, the time the payload ended and, if the gang stopped it, why, to state/<host>.exit.

A TERM to the group reaches torchrun, which stops its workers; the agent then records the exit.

Warm start (``--park-fd FD``, used by the ssh backend's preflight probe, cluster/node/probe.py): the
agent is started while the preflight still runs, writes nothing and binds nothing, and waits for a
line on FD. When the payload is ``<this python> -m torch.distributed.run``, it forks torchrun at
once; the fork imports torchrun, and starts a fork server that imports torch for the workers
(cluster/node/warmworker.py), then waits. ``GO <json>`` starts the node exactly as the shell line would
(output to the agent log), except that torchrun and its workers start with torch imported: the
imports overlap the rest of the preflight instead of following it. Anything else on FD, or its end
(the probe was told to start nothing, or is gone), and the agent's whole group is killed, having
done nothing.

Gang semantics (``--gang ADDR:PORT --gang-nodes N``, multi-node runs): one failed node stops every
node of the run, with no controller watching. Node 0's agent serves a tiny line protocol on PORT;
the other agents connect to it:

    peer -> node 0   HELLO <host> <node_rank> | PING | FAIL <host> <code> | DONE <host>
    node 0 -> peer   PING | ABORT <origin host> <reason>

Node 0 sends ABORT to everyone when a peer reports FAIL, when a peer's connection ends before
DONE, when a peer is silent for ``--gang-timeout-s``, when not every peer arrived within
``--gang-connect-s``, or when its own payload fails. A peer aborts on ABORT, and on losing node 0
(connection closed, or silent for the timeout). To abort, an agent TERMs torchrun, waits
``--kill-grace-s``, then KILLs the rest of its group: every node is down well within 30 s.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from cluster.node.shm import remove_left_semaphores

_PREFIX = re.compile(rb"^\[(?P<host>[^\] ]+) (?P<rank>\d+)\] ")
# torchrun --tee's own prefix, "[default3]:" (role + local rank); every torch 2.x prints it, while
# --log-line-prefix-template is newer than some hosts' torch
_TEE = re.compile(rb"^\[[A-Za-z_]*?(?P<local>\d+)\]:")


def _nproc(payload: list[str]) -> int:
    for i, a in enumerate(payload):
        for flag in ("--nproc-per-node", "--nproc_per_node"):
            if a.startswith(flag + "="):
                return int(a.split("=", 1)[1]) if a.split("=", 1)[1].isdigit() else 1
            if a == flag and i + 1 < len(payload) and payload[i + 1].isdigit():
                return int(payload[i + 1])
    return 1
PING_EVERY_S = 2.0


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def _proc_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, ppid, pgid) of every process, from /proc (Linux)."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            table[int(name)] = (fields[0], int(fields[1]), int(fields[2]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def run_members() -> list[int]:
    """Live processes of this node's run, the agent aside: its process group and every descendant.

    torchrun starts each worker in a session of its own, so the group alone misses the workers;
    the agent is their subreaper (set in main), so a worker whose torchrun died is still its
    descendant."""
    me, pgid = os.getpid(), os.getpgrp()
    table = _proc_table()
    kids: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_, _, pg) in table.items() if pg == pgid}
    stack, seen = [me], {me}
    while stack:
        for child in kids.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                found.add(child)
                stack.append(child)
    return sorted(p for p in found if p != me and table.get(p, ("Z",))[0] != "Z")


def end_group(grace_s: float) -> list[int]:
    """TERM everything else of this node's run, wait up to ``grace_s``, KILL the rest."""
    others = run_members()
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        for pid in others:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + wait_s
        while others and time.time() < deadline:
            time.sleep(0.1)
            others = run_members()
        if not others:
            break
    return others


def remove_container(payload: list[str], note) -> None:
    """A docker/podman payload's container belongs to the daemon, not to our group: remove it
    (its client may have been killed before it could; cluster/container.py names it)."""
    try:
        from cluster.container import remove_argv_of_payload
    except ImportError:
        return
    argv = remove_argv_of_payload(payload)
    if argv:
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            note(f"could not remove the container ({e})")


def become_subreaper() -> None:
    """Orphaned descendants (workers whose torchrun died) are re-parented to us, not to init."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def run_environment(code_dir: str, run_dir: Path, module_dirs: list[str], payload: list[str],
                    environ=os.environ) -> list[str]:
    """The job's view of the host, set in ``environ``; returns the payload with ``{code}`` filled in.

    The job runs in its run directory (runs/<id>/, never synced as code, new for every run), with
    the code on its path: the code's directory, after a module job's own directory (as
    ``python pkg/script.py`` would have it). CLUSTER_RUN_DIR, CLUSTER_CODE_DIR and
    CLUSTER_CHECKPOINT_DIR (synced from node 0 to storage, put back by ``submit --resume``) name them."""
    paths = [os.path.join(code_dir, d) for d in module_dirs] + [code_dir]
    if environ.get("PYTHONPATH"):
        paths.append(environ["PYTHONPATH"])
    environ["PYTHONPATH"] = os.pathsep.join(paths)
    environ["CLUSTER_RUN_DIR"] = str(run_dir)
    environ["CLUSTER_CODE_DIR"] = code_dir
    environ["CLUSTER_CHECKPOINT_DIR"] = str(run_dir / "checkpoints")
    return [code_dir + a[len("{code}"):] if a == "{code}" or a.startswith("{code}/") else a for a in payload]


# ---------------------------------------------------------------- warm start
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
            warmworker.retitle([sys.executable, "-m", "torch.distributed.run"] + argv)
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


# ---------------------------------------------------------------- gang
class Gang:
    """The gang link of one agent: node 0 serves, the others connect (see the module docstring)."""

    def __init__(self, host: str, node_rank: int, addr: str, port: int, nodes: int,
                 note, on_abort, timeout_s: float, connect_s: float):
        self.host, self.node_rank, self.addr, self.port, self.nodes = host, node_rank, addr, port, nodes
        self.note, self.on_abort = note, on_abort
        self.timeout_s, self.connect_s = timeout_s, connect_s
        self.finished = threading.Event()       # our payload has ended (set by the agent)
        self.own_failure = None                 # node 0: our payload's exit code, if it failed
        self.aborted = False
        self.lock = threading.Lock()
        self.server = None
        self.sock = None
        self.thread = None

    def listen(self) -> None:
        """Node 0 binds before the payload starts, so that early peers find the port open."""
        if self.node_rank == 0:
            self.server = socket.socket(socket.AF_INET6 if ":" in self.addr else socket.AF_INET)
            self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.server.bind(("", self.port))
            self.server.listen(max(16, self.nodes))
            self.server.setblocking(False)

    def start(self) -> None:
        target = self._serve if self.node_rank == 0 else self._client
        self.thread = threading.Thread(target=target, name="gang", daemon=True)
        self.thread.start()

    def _abort(self, origin: str, reason: str) -> None:
        with self.lock:
            if self.aborted:
                return
            self.aborted = True
        self.on_abort(origin, reason)

    # ---- node 0
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ)
        peers: dict[socket.socket, dict] = {}
        started = last_ping = time.time()
        expected, arrived = self.nodes - 1, 0
        broadcast = None          # (origin, reason) once the gang is aborted

        def abort(origin, reason):
            nonlocal broadcast
            if broadcast is None:
                broadcast = (origin, reason)
                self.note(f"gang: {reason}; stopping every node")
                for s in list(peers):
                    _send(s, f"ABORT {origin} {reason}")
                self._abort(origin, reason)

        def drop(s):
            sel.unregister(s)
            s.close()
            return peers.pop(s)

        while True:
            for key, _ in sel.select(timeout=0.5):
                if key.fileobj is self.server:
                    try:
                        conn, _ = self.server.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                    peers[conn] = {"name": "?", "seen": time.time(), "buf": b"", "done": False}
                    arrived += 1
                    if broadcast is not None:
                        _send(conn, f"ABORT {broadcast[0]} {broadcast[1]}")
                    continue
                s = key.fileobj
                p = peers[s]
                lines, closed = _read_lines(s, p)
                for line in lines:
                    word, *rest = line.split(" ", 2)
                    if word == "HELLO" and rest:
                        p["name"] = rest[0]
                    elif word == "FAIL":
                        p["done"] = True
                        name = rest[0] if rest else p["name"]
                        abort(name, f"{name} failed (exit code {rest[1] if len(rest) > 1 else '?'})")
                    elif word == "DONE":
                        p["done"] = True
                if closed:
                    drop(s)
                    if not p["done"]:
                        abort(p["name"], f"lost node {p['name']} (its agent's connection closed)")
            now = time.time()
            if self.own_failure is not None:
                abort(self.host, f"{self.host} failed (exit code {self.own_failure})")
            if arrived < expected and now - started > self.connect_s:
                abort(self.host, f"only {arrived} of {expected} other node(s) joined within {self.connect_s:g} s")
            for s, p in list(peers.items()):
                if not p["done"] and now - p["seen"] > self.timeout_s:
                    drop(s)
                    abort(p["name"], f"lost node {p['name']} (silent for {self.timeout_s:g} s)")
            if now - last_ping > PING_EVERY_S:
                last_ping = now
                for s in list(peers):
                    _send(s, "PING")
            if self.finished.is_set() and not peers and (arrived >= expected or broadcast is not None):
                break
        sel.close()
        self.server.close()

    # ---- other nodes
    def _client(self) -> None:
        deadline = time.time() + self.connect_s
        s = None
        while s is None:
            try:
                s = socket.create_connection((self.addr, self.port), timeout=2.0)
            except OSError as e:
                if self.finished.is_set():
                    return
                if time.time() > deadline:
                    self.note(f"gang: cannot reach node 0 at {self.addr}:{self.port} ({e}); stopping this node")
                    self._abort("?", f"cannot reach node 0's gang port {self.addr}:{self.port}")
                    return
                time.sleep(0.5)
        s.settimeout(0.2)
        self.sock = s
        _send(s, f"HELLO {self.host} {self.node_rank}")
        state = {"seen": time.time(), "buf": b""}
        last_ping = 0.0
        while not self.finished.is_set():
            now = time.time()
            lines, closed = _read_lines(s, state)
            for line in lines:
                word, *rest = line.split(" ", 2)
                if word == "ABORT":
                    origin = rest[0] if rest else "?"
                    reason = rest[1] if len(rest) > 1 else "aborted by node 0"
                    self.note(f"gang: {reason}; stopping this node")
                    self._abort(origin, reason)
            if closed:
                if not self.finished.is_set():
                    self.note("gang: lost node 0 (connection closed); stopping this node")
                    self._abort("?", "lost node 0 (its agent's connection closed)")
                return
            if now - state["seen"] > self.timeout_s:
                self.note(f"gang: node 0 silent for {self.timeout_s:g} s; stopping this node")
                self._abort("?", f"lost node 0 (silent for {self.timeout_s:g} s)")
                return
            if now - last_ping > PING_EVERY_S:
                last_ping = now
                _send(s, "PING")

    # ---- the agent's side
    def payload_ended(self, code: int, failed: bool) -> None:
        """Tell the gang how our payload ended: a failure aborts every node."""
        if self.node_rank == 0:
            if failed:
                self.own_failure = code
            self.finished.set()
            return
        self.finished.set()
        if self.sock is None and failed:
            # failed before reaching node 0: still tell it, or it would wait out gang_connect_s
            deadline = time.time() + 10.0
            while self.sock is None and time.time() < deadline:
                try:
                    self.sock = socket.create_connection((self.addr, self.port), timeout=2.0)
                    _send(self.sock, f"HELLO {self.host} {self.node_rank}")
                except OSError:
                    time.sleep(0.5)
        if self.sock is not None:
            _send(self.sock, f"FAIL {self.host} {code}" if failed else f"DONE {self.host}")
            try:
                self.sock.close()
            except OSError:
                pass

    def wait(self, timeout_s) -> None:
        if self.thread is not None:
            self.thread.join(timeout_s)


def _send(s: socket.socket, line: str) -> None:
    try:
        s.sendall(line.encode() + b"\n")
    except OSError:
        pass


def _read_lines(s: socket.socket, state: dict) -> tuple[list[str], bool]:
    """Whole lines received so far (and the time they came); ``closed`` when the other side went away."""
    try:
        data = s.recv(4096)
    except (socket.timeout, BlockingIOError):
        return [], False
    except OSError:
        return [], True
    if not data:
        return [], True
    state["seen"] = time.time()
    *lines, state["buf"] = (state["buf"] + data).split(b"\n")
    return [l.decode(errors="replace").strip() for l in lines if l.strip()], False


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.node.agent")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--gang", metavar="ADDR:PORT", help="node 0's gang endpoint (multi-node runs)")
    ap.add_argument("--gang-nodes", type=int, default=1)
    ap.add_argument("--gang-timeout-s", type=float, default=15.0, help="silence after which a node counts as lost")
    ap.add_argument("--gang-connect-s", type=float, default=120.0, help="how long nodes may take to join")
    ap.add_argument("--kill-grace-s", type=float, default=10.0, help="from TERM to KILL when stopping")
    ap.add_argument("--park-fd", type=int, help="warm start: wait for 'GO' on this descriptor (see above)")
    ap.add_argument("--preload", default="", metavar="MOD,...",
                    help="warm start: modules the workers' fork server imports after torch")
    ap.add_argument("--module-dir", action="append", default=[], metavar="DIR",
                    help="a module job's own directory (relative to the code), put on the path first")
    ap.add_argument("payload", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    payload = args.payload[1:] if args.payload[:1] == ["--"] else args.payload
    if os.getpgrp() != os.getpid():
        os.setpgrp()   # stop must be able to signal everything of the run through one group
    run_dir = Path(os.path.abspath(args.run_dir))
    payload = run_environment(os.getcwd(), run_dir, args.module_dir, payload)
    forked = None
    if args.park_fd is not None:
        forked = park(args.park_fd, payload, [m for m in args.preload.split(",") if m])
    state, logs = run_dir / "state", run_dir / "logs"
    for d in (state, logs, run_dir / "metrics", run_dir / "checkpoints"):
        d.mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir)       # what the job writes stays in this run (see run_environment)
    become_subreaper()
    host = args.host
    exit_file = state / f"{host}.exit"
    if exit_file.exists():
        exit_file.unlink()
    write_json_atomic(state / f"{host}.pid", {
        "pid": os.getpid(), "pgid": os.getpgrp(), "host": host, "hostname": socket.gethostname(),
        "node_rank": args.node_rank, "started": time.time(), "argv": payload})

    node_log = open(logs / f"{host}.log", "ab", buffering=0)
    rank_logs: dict[bytes, object] = {}
    tag = f"[{host} agent] ".encode()

    def note(text: str) -> None:
        node_log.write(tag + text.encode() + b"\n")

    def record_exit(code: int, **extra) -> None:
        write_json_atomic(exit_file, {"code": code, "time": time.time(), **extra})

    abort: dict = {}
    abort_event = threading.Event()

    def on_abort(origin: str, reason: str) -> None:
        abort.update(origin=origin, reason=reason, time=time.time())
        abort_event.set()

    gang = None
    if args.gang and args.gang_nodes > 1:
        addr, _, port = args.gang.rpartition(":")
        gang = Gang(host, args.node_rank, addr.strip("[]"), int(port), args.gang_nodes, note, on_abort,
                    args.gang_timeout_s, args.gang_connect_s)
        try:
            gang.listen()
        except OSError as e:
            note(f"gang: cannot listen on port {port} ({e}); not starting")
            record_exit(1, error=f"gang port {port}: {e}")
            if forked is not None:
                forked.abandon()
            return 1

    note(f"starting on {socket.gethostname()} (pid {os.getpid()}): " + " ".join(payload))
    try:
        if forked is not None:
            note(f"torchrun from a warm interpreter (pid {forked.pid}; imported while the preflight ran)")
            forked.start(payload[3:], str(run_dir))
            proc = forked
        else:
            proc = subprocess.Popen(payload, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
    except OSError as e:
        note(f"cannot start: {e}")
        if gang is not None:
            gang.start()
            gang.payload_ended(127, failed=True)
            gang.wait(5.0)
        record_exit(127, error=str(e))
        return 127

    stopping = {"signal": None}

    def forward(signum, _frame):
        stopping["signal"] = signum
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    first_rank = args.node_rank * _nproc(payload)
    host_b = host.encode()

    def copy_output() -> None:
        for line in iter(proc.stdout.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            t = _TEE.match(line)
            if t:   # static rendezvous: global rank = node_rank * nproc + local_rank
                rank = str(first_rank + int(t.group("local"))).encode()
                line = b"[" + host_b + b" " + rank + b"] " + line[t.end():]
            m = _PREFIX.match(line)
            if m:
                node_log.write(line)
                rank = m.group("rank")
                f = rank_logs.get(rank)
                if f is None:
                    f = rank_logs[rank] = open(logs / f"{host}.rank{rank.decode()}.log", "ab", buffering=0)
                f.write(line)
            else:
                node_log.write(tag + line)

    # a thread reads, so that a worker still holding the pipe never keeps the agent from noticing
    # that torchrun is gone
    reader = threading.Thread(target=copy_output, name="output", daemon=True)
    reader.start()
    if gang is not None:
        gang.start()
    term_at = None
    while True:
        try:
            code = proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if abort_event.is_set() and term_at is None:
            term_at = time.time()
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        elif term_at is not None and time.time() - term_at > args.kill_grace_s:
            note(f"still running {args.kill_grace_s:g} s after TERM; KILL")
            end_group(0.0)
            term_at = float("inf")
    ended = time.time()
    aborted = dict(abort) if abort_event.is_set() else None   # before our own report can abort us
    failed = code != 0 and not stopping["signal"] and not aborted
    if gang is not None:
        gang.payload_ended(code, failed)
    if code != 0:       # a clean exit removed its container itself (--rm)
        remove_container(payload, note)
    left = end_group(grace_s=1.0 if aborted else 3.0)
    if left:
        note(f"could not end pid(s) {', '.join(map(str, left))} of this run's process group")
    elif forked is not None:
        import shutil
        shutil.rmtree(forked.tmp, ignore_errors=True)
    remove_left_semaphores(str(state))      # what killed processes of the run left in /dev/shm
    reader.join(5.0)
    extra: dict = {"signal": stopping["signal"]}
    if aborted:
        extra["gang_abort"] = {"origin": aborted["origin"], "reason": aborted["reason"]}
        note(f"stopped by the gang ({aborted['reason']}); exit code {code}")
    elif stopping["signal"]:
        note(f"stopped by signal {stopping['signal']}; exit code {code}")
    else:
        note(f"exit code {code}")
    write_json_atomic(exit_file, {"code": code, "time": ended, **extra})
    if gang is not None and gang.node_rank == 0:
        gang.wait(None)   # node 0 keeps serving until every peer has reported or is gone
    node_log.close()
    for f in rank_logs.values():
        f.close()
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
