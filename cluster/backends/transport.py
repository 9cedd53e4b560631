"""SSH fan-out: one connection per host, commands on many hosts at once, per-host results.

    pool = Pool(inv.hosts, inv.ssh)
    res = pool.run({"node1": "uname -r", "node2": "uname -r"})   # GroupResult: host -> Result
    res.check("uname")                                            # GroupError naming every bad host
    print(render_folded({h: r.stdout for h, r in res.items()}))   # as `clush -b` folds output

* Connections are Fabric ``Connection`` objects (``~/.ssh/config`` aliases, ``ProxyJump`` and the
  inventory's jump_host become gateways), opened lazily, kept for the life of the pool, and at
  most ``ssh.fanout`` hosts are worked on at a time.
* Host keys are checked against ``ssh.known_hosts`` (and the system's list): Fabric itself would
  accept any key, so each connection (gateways too) gets a policy that refuses unknown hosts, or
  appends them when the inventory says ``accept_new_host_keys: true`` (OpenSSH's accept-new).
* Never a prompt: no pty is ever requested, stdin is closed at once unless the caller sends
  data, and authentication is by key or agent only (paramiko has no interactive password path).
* Every call has a timeout: connect (TCP, banner, auth: ``connect_timeout_s``) and command
  (``command_timeout_s`` unless the caller gives one).
* Commands are strings: the caller renders argv lists with :func:`quote_argv` (one
  ``shlex.quote`` per word for the one shell hop, the login shell on the host).
"""
from __future__ import annotations

import logging
import math
import os
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Union

from cluster.spec import hostlist
from cluster.spec.config import Host, SSHSettings
from cluster.errors import RemoteError

DEFAULT_SSH_CONFIG = "~/.ssh/config"
# paramiko logs every failed handshake with a traceback from its own thread; failures reach the
# user once, as a Result.error or GroupError, instead
logging.getLogger("paramiko").setLevel(logging.CRITICAL + 1)


# ---------------------------------------------------------------- results
@dataclass
class Result:
    """One host's answer. ``error`` is set when the command did not run to its end."""

    host: str
    command: str
    exit_code: Optional[int] = None
    stdout: str = ""
    stderr: str = ""
    error: Optional[str] = None        # cannot connect, host key, timeout ... in words
    duration_s: float = 0.0
    label: str = ""                    # what to call the command in messages (default: itself)

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code == 0

    def describe(self, lines: int = 5) -> str:
        """Invoke's UnexpectedExit, shortened: what failed, the exit code, the last stderr lines."""
        if self.error:
            return f"{self.host}: {self.error}"
        cmd = self.label or (self.command if len(self.command) <= 100 else self.command[:97] + "...")
        text = f"{self.host}: exit code {self.exit_code}: {cmd}"
        tail = [l for l in (self.stderr or self.stdout).splitlines() if l.strip()][-lines:]
        return text + "".join(f"\n    | {l}" for l in tail)


class GroupResult(dict):
    """host name -> Result, like Fabric's GroupResult: one bad host never hides the others."""

    @property
    def failed(self) -> dict[str, Result]:
        return {h: r for h, r in self.items() if not r.ok}

    @property
    def succeeded(self) -> dict[str, Result]:
        return {h: r for h, r in self.items() if r.ok}

    @property
    def unreachable(self) -> dict[str, Result]:
        return {h: r for h, r in self.items() if r.error is not None}

    def check(self, what: str, hint: Optional[str] = None) -> "GroupResult":
        if self.failed:
            raise GroupError(what, self, hint)
        return self


class GroupError(RemoteError):
    """One error for a fan-out with failed hosts (Fabric's GroupException), exit code 2."""

    def __init__(self, what: str, result: GroupResult, hint: Optional[str] = None):
        self.result = result
        failed = result.failed
        names = hostlist.fold(sorted(failed))
        lines = [f"{what} failed on {len(failed)} of {len(result)} host(s): {names}"]
        lines += ["  " + r.describe() for _, r in sorted(failed.items())]
        if hint is None:
            hint = hint_for(failed.values())
        super().__init__("\n".join(lines), hint=hint)


def hint_for(results: Iterable[Result]) -> Optional[str]:
    errors = " ".join(r.error or "" for r in results)
    if "not in known_hosts" in errors:
        return ("add the host keys to the known_hosts file (ssh-keyscan HOST >> FILE, after checking "
                "the fingerprint), or set 'ssh: {accept_new_host_keys: true}' in the inventory")
    if "host key changed" in errors:
        return "the host key differs from known_hosts: if the host was reinstalled, remove the old key (ssh-keygen -R HOST)"
    if "authentication failed" in errors:
        return "check the inventory's user and identity_file (or the ~/.ssh/config entry) and that the key is in the host's authorized_keys"
    if "cannot connect" in errors or "timed out" in errors:
        return "check that the host is up and sshd listens (ssh HOST true), or remove it from the inventory"
    return None


# ---------------------------------------------------------------- folding (clush -b)
def fold(outputs: Mapping[str, str]) -> list[tuple[list[str], str]]:
    """Group hosts with identical output; biggest group first."""
    groups: dict[str, list[str]] = {}
    for host, text in outputs.items():
        groups.setdefault(text, []).append(host)
    return sorted(((sorted(hosts), text) for text, hosts in groups.items()),
                  key=lambda g: (-len(g[0]), g[0][0]))


def render_folded(outputs: Mapping[str, str]) -> str:
    """``clush -b`` style: one block per distinct output, headed by its hosts."""
    out = []
    for hosts, text in fold(outputs):
        head = f"{hostlist.fold(hosts)} ({len(hosts)})"
        bar = "-" * max(15, len(head))
        out += [bar, head, bar, text.rstrip("\n")]
    return "\n".join(out) + ("\n" if out else "")


# ---------------------------------------------------------------- host keys
class UnknownHostKey(Exception):
    pass


_known_hosts_lock = threading.Lock()


def _policies():
    import paramiko

    class Reject(paramiko.MissingHostKeyPolicy):
        def __init__(self, path: str):
            self.path = path

        def missing_host_key(self, client, hostname, key):
            where = self.path if os.path.isfile(self.path) else f"{self.path}, which does not exist"
            raise UnknownHostKey(f"host key of {hostname} ({key.get_name()} "
                                 f"{_fingerprint(key)}) is not in known_hosts ({where})")

    class AcceptNew(paramiko.MissingHostKeyPolicy):
        """OpenSSH's StrictHostKeyChecking=accept-new: append, under a lock, one line per new host."""

        def __init__(self, path: str):
            self.path = path

        def missing_host_key(self, client, hostname, key):
            client.get_host_keys().add(hostname, key.get_name(), key)
            with _known_hosts_lock:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")

    return Reject, AcceptNew


def _fingerprint(key) -> str:
    import base64
    import hashlib
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


# ---------------------------------------------------------------- connections
class ConnectError(Exception):
    pass


def _connect_error(host: Host, e: BaseException) -> str:
    import paramiko
    target = f"{host.user + '@' if host.user else ''}{host.hostname}{':' + str(host.port) if host.port else ''}"
    inner = getattr(e, "errors", None)    # paramiko's NoValidConnectionsError: one error per address
    if isinstance(inner, dict) and inner:
        e = next(iter(inner.values()))
    if isinstance(e, UnknownHostKey):
        return str(e)
    if isinstance(e, paramiko.BadHostKeyException):
        return f"host key changed for {host.hostname} (got {_fingerprint(e.key)}, known_hosts has {_fingerprint(e.expected_key)})"
    if isinstance(e, paramiko.AuthenticationException):
        how = f"key {host.identity_file}" if host.identity_file else "the agent and default keys"
        return f"authentication failed for {target} with {how} ({e})"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return f"cannot connect to {target}: timed out"
    if isinstance(e, socket.gaierror):
        return f"cannot connect to {target}: unknown host name ({e.strerror})"
    if isinstance(e, OSError):
        return f"cannot connect to {target}: {e.strerror or e}"
    return f"cannot connect to {target}: {type(e).__name__}: {e}"


OPTIONAL_WAIT_S = 1.0   # Pool.run(optional=...): a host back on the network reconnects well within it


class Pool:
    """Connections to a set of hosts, opened on first use and reused; fan-out of commands."""

    def __init__(self, hosts: Iterable[Host], ssh: SSHSettings):
        self.hosts = {h.name: h for h in hosts}
        self.ssh = ssh
        self._conns: dict = {}
        self._locks = {name: threading.Lock() for name in self.hosts}
        self._failed: dict[str, tuple[float, str]] = {}
        self._late: dict[str, tuple] = {}    # run(optional=...): (thread, its answer, command) not waited for
        self._config = None

    # ---- connections
    def _fabric_config(self):
        if self._config is None:
            from fabric import Config
            path = self.ssh.config_file
            if path is None:
                self._config = Config(overrides={"load_ssh_configs": False})
            elif os.path.expanduser(path) == os.path.expanduser(DEFAULT_SSH_CONFIG):
                self._config = Config()          # ~/.ssh/config and /etc/ssh/ssh_config, as ssh does
            else:
                self._config = Config(runtime_ssh_path=os.path.expanduser(path))
        return self._config

    def _new_connection(self, host: Host):
        from fabric import Connection
        timeout = max(1, math.ceil(self.ssh.connect_timeout_s))   # Fabric keeps whole seconds
        kwargs = {"allow_agent": True, "banner_timeout": timeout, "auth_timeout": timeout}
        if host.identity_file:
            kwargs["key_filename"] = [os.path.expanduser(host.identity_file)]
            kwargs["look_for_keys"] = False
        gateway = None
        if host.jump_host:
            # ProxyJump semantics: a,b means connect to a, through it to b, through b to the host
            for hop in host.jump_host.split(","):
                gateway = Connection(hop, config=self._fabric_config().clone(), gateway=gateway or False,
                                     connect_timeout=timeout, connect_kwargs=dict(kwargs))
        conn = Connection(host.hostname, user=host.user, port=host.port, config=self._fabric_config().clone(),
                          connect_timeout=timeout, connect_kwargs=dict(kwargs),
                          **({"gateway": gateway} if gateway is not None else {}))
        self._make_strict(conn)
        return conn

    def _make_strict(self, conn) -> None:
        """Known hosts on this connection and every gateway before it (Fabric accepts any key)."""
        Reject, AcceptNew = _policies()
        known = os.path.expanduser(self.ssh.known_hosts)
        while conn is not None and not isinstance(conn, (str, bool)):
            client = conn.client
            for path in ("/etc/ssh/ssh_known_hosts", known):
                if os.path.isfile(path):
                    try:
                        client.load_system_host_keys(path)
                    except (OSError, ValueError):
                        pass
            client.set_missing_host_key_policy(AcceptNew(known) if self.ssh.accept_new_host_keys else Reject(known))
            conn = conn.gateway

    def connection(self, name: str):
        """The open connection to ``name``; ConnectError (with a clear message) if it cannot be opened."""
        with self._locks[name]:
            conn = self._conns.get(name)
            if conn is not None and conn.is_connected:
                return conn
            if conn is not None:
                self._drop(name)
            failed = self._failed.pop(name, None)
            if failed and time.monotonic() - failed[0] < 1.0:   # a warm-up attempt just failed
                raise ConnectError(failed[1])
            host = self.hosts[name]
            conn = None
            try:
                # building the connection can fail too (a value Fabric or ~/.ssh/config rejects):
                # that is this host's error, as a refused connection is, never the whole command's
                conn = self._new_connection(host)
                conn.open()
                conn.transport.set_keepalive(5)   # a dead peer is noticed, idle links stay up
            except Exception as e:   # noqa: BLE001 -- paramiko raises many kinds; all mean "cannot connect"
                try:
                    if conn is not None:
                        conn.close()
                except Exception:   # noqa: BLE001
                    pass
                raise ConnectError(_connect_error(host, e)) from None
            self._conns[name] = conn
            return conn

    def _drop(self, name: str) -> None:
        conn = self._conns.pop(name, None)
        if conn is not None:
            try:
                conn.close()
            except Exception:   # noqa: BLE001
                pass

    def reset(self, name: str) -> None:
        """Forget a host's connection (after it broke); the next use reconnects."""
        with self._locks[name]:
            self._drop(name)

    def close(self) -> None:
        for name in list(self._conns):
            self._drop(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- commands
    def exec(self, name: str, command: str, timeout_s: Optional[float] = None,
             stdin: Optional[bytes] = None) -> Result:
        """Run one command on one host; never raises for remote trouble (see Result.error)."""
        t0 = time.monotonic()
        timeout_s = timeout_s or self.ssh.command_timeout_s
        try:
            conn = self.connection(name)
        except ConnectError as e:
            return Result(name, command, error=str(e), duration_s=time.monotonic() - t0)
        try:
            code, out, err = _exec(conn.transport, command, timeout_s, stdin)
        except CommandTimeout as e:
            return Result(name, command, error=f"timed out after {timeout_s:g} s", stdout=e.stdout,
                          stderr=e.stderr, duration_s=time.monotonic() - t0)
        except Exception as e:   # noqa: BLE001 -- the connection broke under us
            self.reset(name)
            return Result(name, command, error=f"connection lost: {type(e).__name__}: {e}",
                          duration_s=time.monotonic() - t0)
        return Result(name, command, code, out, err, duration_s=time.monotonic() - t0)

    def run(self, commands: Union[str, Mapping[str, str]], hosts: Optional[Iterable[str]] = None,
            timeout_s: Optional[float] = None, stdin: Union[None, bytes, Mapping[str, bytes]] = None,
            on_result: Optional[Callable[[Result], None]] = None, label: str = "",
            optional: Iterable[str] = ()) -> GroupResult:
        """The same command on every host (or one command per host), at most ``fanout`` at a time.

        Hosts in ``optional`` (ones that did not answer the last time: down, cut off) are asked
        too, but waited for only ``OPTIONAL_WAIT_S`` beyond the others: a host still cut off would
        make every call wait out its connect timeout. Their answer if it came by then, else an
        error result; a host whose last such try is still connecting is not tried again meanwhile
        (that try's answer, to the same command, counts for this call)."""
        if isinstance(commands, str):
            names = list(hosts) if hosts is not None else list(self.hosts)
            commands = {n: commands for n in names}
        names = list(commands)

        def one(name):
            data = stdin.get(name) if isinstance(stdin, Mapping) else stdin
            r = self.exec(name, commands[name], timeout_s, data)
            r.label = label
            if on_result:
                on_result(r)
            return r

        late = set(names) & set(optional)
        for name in late:
            if self._late.get(name) is None or not self._late[name][0].is_alive():
                answer: list = []      # this try's own: a later call may take its answer
                t = threading.Thread(target=lambda n=name, a=answer: a.append(one(n)), daemon=True,
                                     name=f"ssh-optional-{name}")     # daemon: never holds up the exit
                self._late[name] = (t, answer, commands[name])
                t.start()
        out = self._fan_out(one, [n for n in names if n not in late])
        deadline = time.monotonic() + OPTIONAL_WAIT_S
        for name in late:
            t, answer, asked = self._late[name]
            t.join(max(0.0, deadline - time.monotonic()))
            out[name] = answer[0] if answer and asked == commands[name] else Result(
                name, commands[name], label=label,
                error="did not answer the last time, nor now within the others' time: not waited for")
        return out

    def _fan_out(self, fn, names: list) -> GroupResult:
        """fn(name) -> Result for every name, at most ``ssh.fanout`` at a time."""
        out = GroupResult()
        width = max(1, min(self.ssh.fanout, len(names)))
        if width <= 1:
            results = [fn(n) for n in names]
        else:
            with ThreadPoolExecutor(max_workers=width, thread_name_prefix="ssh") as ex:
                results = list(ex.map(fn, names))
        for r in results:
            out[r.host] = r
        return out

    def warm(self, names: Iterable[str]) -> None:
        """Start opening connections in the background (errors show at the first command)."""
        def one(name):
            try:
                self.connection(name)
            except ConnectError as e:
                self._failed[name] = (time.monotonic(), str(e))
        for name in names:
            threading.Thread(target=one, args=(name,), daemon=True, name=f"ssh-warm-{name}").start()

    def connect_all(self, hosts: Optional[Iterable[str]] = None) -> GroupResult:
        """Open every connection in parallel; per-host errors as results."""
        return self.run(": connected", hosts=hosts)


class CommandTimeout(Exception):
    def __init__(self, stdout: str, stderr: str):
        super().__init__("timeout")
        self.stdout, self.stderr = stdout, stderr


class _Channel:
    """One exec channel: no pty; stdout and stderr drained together (neither can block the other)."""

    def __init__(self, transport, command: str, timeout_s: float):
        self.chan = transport.open_session(timeout=timeout_s)
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.chan.exec_command(command)

    def send(self, data: bytes, last: bool = True) -> None:
        if data:
            self.chan.sendall(data)
        if last:
            self.chan.shutdown_write()      # EOF: nothing on the host can wait for input

    def _pump(self, deadline: float) -> bool:
        """Read what is there (or wait for it); False once the command is over."""
        busy = False
        while self.chan.recv_ready():
            self.out.append(self.chan.recv(1 << 16))
            busy = True
        while self.chan.recv_stderr_ready():
            self.err.append(self.chan.recv_stderr(1 << 16))
            busy = True
        if busy:
            return True
        if (self.chan.exit_status_ready() and self.chan.eof_received) or self.chan.closed:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise CommandTimeout(_text(self.out), _text(self.err))
        select.select([self.chan], [], [], min(left, 0.5))
        return True

    def first_line(self, timeout_s: float) -> Optional[str]:
        """The first whole line of stdout (None if the command ended without one)."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in b"".join(self.out):
            if not self._pump(deadline):
                return None
        return b"".join(self.out).split(b"\n", 1)[0].decode(errors="replace")

    def finish(self, timeout_s: float) -> tuple[int, str, str]:
        deadline = time.monotonic() + timeout_s
        try:
            while self._pump(deadline):
                pass
            code = self.chan.recv_exit_status() if self.chan.exit_status_ready() else -1
        finally:
            self.chan.close()
        return code, _text(self.out), _text(self.err)

    def close(self) -> None:
        self.chan.close()


def _exec(transport, command: str, timeout_s: float, stdin: Optional[bytes]) -> tuple[int, str, str]:
    """exec on a fresh session channel: no pty, stdin closed (after ``stdin``), both streams drained."""
    ch = _Channel(transport, command, timeout_s)
    try:
        ch.send(stdin or b"")
    except Exception:
        ch.close()
        raise
    return ch.finish(timeout_s)


class Staged:
    """Commands started on many hosts that stop after their first line and wait for a word on
    stdin: check everywhere first, then act everywhere (or nowhere: closing sends EOF)."""

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.channels: dict[str, _Channel] = {}

    def start(self, commands: Mapping[str, str], stdin: Mapping[str, bytes], timeout_s: float,
              label: str = "") -> GroupResult:
        """Run up to the first line on every host (``fanout`` at a time); Result.stdout is that line."""
        def one(name):
            t0 = time.monotonic()
            try:
                conn = self.pool.connection(name)
            except ConnectError as e:
                return Result(name, commands[name], error=str(e), label=label)
            try:
                ch = _Channel(conn.transport, commands[name], timeout_s)
                ch.send(stdin.get(name, b""), last=False)
                line = ch.first_line(timeout_s)
            except CommandTimeout as e:
                return Result(name, commands[name], error=f"timed out after {timeout_s:g} s", stdout=e.stdout,
                              stderr=e.stderr, label=label)
            except Exception as e:   # noqa: BLE001 -- the connection broke under us
                self.pool.reset(name)
                return Result(name, commands[name], error=f"connection lost: {type(e).__name__}: {e}", label=label)
            if line is None:      # ended before its first line: a failure, with its exit code
                code, out, err = ch.finish(timeout_s)
                return Result(name, commands[name], code if code else 1, out, err, label=label,
                              duration_s=time.monotonic() - t0)
            self.channels[name] = ch
            return Result(name, commands[name], 0, line, label=label, duration_s=time.monotonic() - t0)
        return self.pool._fan_out(one, list(commands))

    def finish(self, words: Mapping[str, bytes], timeout_s: float, label: str = "") -> GroupResult:
        """Send each host its word (then EOF) and collect the rest of its output."""
        def one(name):
            ch = self.channels.pop(name)
            t0 = time.monotonic()
            try:
                ch.send(words.get(name, b""))
                code, out, err = ch.finish(timeout_s)
            except CommandTimeout as e:
                return Result(name, "", error=f"timed out after {timeout_s:g} s", stdout=e.stdout,
                              stderr=e.stderr, label=label)
            except Exception as e:   # noqa: BLE001
                self.pool.reset(name)
                return Result(name, "", error=f"connection lost: {type(e).__name__}: {e}", label=label)
            out = out.split("\n", 1)[1] if "\n" in out else ""
            return Result(name, label, code, out, err, label=label, duration_s=time.monotonic() - t0)
        return self.pool._fan_out(one, [n for n in words if n in self.channels])

    def close(self, wait_s: float = 5.0) -> None:
        """Abandon: every waiting command gets EOF and ends without acting; wait up to ``wait_s``
        for them to end (what a probe started in the meantime is gone when it has)."""
        for ch in self.channels.values():
            try:
                ch.send(b"")
            except Exception:   # noqa: BLE001
                pass
        deadline = time.monotonic() + wait_s
        for ch in self.channels.values():
            try:
                while not ch.chan.exit_status_ready() and time.monotonic() < deadline:
                    time.sleep(0.01)
                ch.close()
            except Exception:   # noqa: BLE001
                pass
        self.channels.clear()


def _text(chunks: list) -> str:
    return b"".join(chunks).decode(errors="replace")
