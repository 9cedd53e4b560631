"""The gang of a multi-node run's agents (``--gang ADDR:PORT --gang-nodes N``, multi-node runs): one failed node stops every
node of the run, with no controller watching. Node 0's agent serves a tiny line protocol on PORT;
the other agents connect to it:

    peer -> node 0   HELLO <host> <node_rank> | PING | FAIL <host> <code> | DONE <host>
    node 0 -> peer   PING | ABORT <origin host> <failed|lost> <reason>

Node 0 sends ABORT to everyone when a peer reports FAIL, when a peer's connection ends before
DONE, when a peer is silent for ``--gang-timeout-s``, when not every peer arrived within
``--gang-connect-s``, or when its own payload fails. A peer aborts on ABORT, and on losing node 0
(connection closed, or silent for the timeout). To abort, an agent TERMs torchrun, waits, then
KILLs the rest of its group. How long it waits depends on the kind of abort: ``failed`` (a node's
payload failed and said so) waits ``--kill-grace-s``, since the other ranks are then usually
ending by themselves, writing the errors that the diagnosis reads; ``lost`` (a node gone silent,
gone without a word, never arrived) waits only ``--lost-grace-s``: the other ranks are stuck in a
collective with it, cannot run their TERM handler, and restart from the last checkpoint anyway.

The timeout: a node is lost after ``--gang-timeout-s`` (15 s) without a line from it, pings
every 2 s, as torchelastic's rendezvous counts a node dead after 3 missed keep-alives 5 s apart.
Shorter would stop runs whose agents a loaded machine keeps off the CPU for a few seconds.
"""
from __future__ import annotations

import selectors
import socket
import threading
import time

PING_EVERY_S = 2.0


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

    def _abort(self, origin: str, reason: str, lost: bool) -> None:
        with self.lock:
            if self.aborted:
                return
            self.aborted = True
        self.on_abort(origin, reason, lost)

    # ---- node 0
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ)
        peers: dict[socket.socket, dict] = {}
        started = last_ping = time.time()
        expected, arrived = self.nodes - 1, 0
        broadcast = None          # the ABORT line, once the gang is aborted

        def abort(origin, reason, lost):
            nonlocal broadcast
            if broadcast is None:
                broadcast = f"ABORT {origin} {'lost' if lost else 'failed'} {reason}"
                self.note(f"gang: {reason}; stopping every node")
                for s in list(peers):
                    _send(s, broadcast)
                self._abort(origin, reason, lost)

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
                        _send(conn, broadcast)
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
                        abort(name, f"{name} failed (exit code {rest[1] if len(rest) > 1 else '?'})", lost=False)
                    elif word == "DONE":
                        p["done"] = True
                if closed:
                    drop(s)
                    if not p["done"]:
                        abort(p["name"], f"lost node {p['name']} (its agent's connection closed)", lost=True)
            now = time.time()
            if self.own_failure is not None:
                abort(self.host, f"{self.host} failed (exit code {self.own_failure})", lost=False)
            if arrived < expected and now - started > self.connect_s:
                abort(self.host, f"only {arrived} of {expected} other node(s) joined within {self.connect_s:g} s",
                      lost=True)
            for s, p in list(peers.items()):
                if not p["done"] and now - p["seen"] > self.timeout_s:
                    drop(s)
                    abort(p["name"], f"lost node {p['name']} (silent for {self.timeout_s:g} s)", lost=True)
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
                    self._abort("?", f"cannot reach node 0's gang port {self.addr}:{self.port}", lost=True)
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
                if line.split(" ", 1)[0] == "ABORT":    # ABORT <origin> <failed|lost> <reason>
                    parts = line.split(" ", 3)[1:]
                    origin, kind, reason = parts + ["?", "failed", "aborted by node 0"][len(parts):]
                    self.note(f"gang: {reason}; stopping this node")
                    self._abort(origin, reason, lost=kind == "lost")
            if closed:
                if not self.finished.is_set():
                    self.note("gang: lost node 0 (connection closed); stopping this node")
                    self._abort("?", "lost node 0 (its agent's connection closed)", lost=True)
                return
            if now - state["seen"] > self.timeout_s:
                self.note(f"gang: node 0 silent for {self.timeout_s:g} s; stopping this node")
                self._abort("?", f"lost node 0 (silent for {self.timeout_s:g} s)", lost=True)
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


