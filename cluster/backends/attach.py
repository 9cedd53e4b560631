"""Working next to a run by hand: ``shell`` (an interactive shell on one of its nodes) and
``jupyter`` (a server on a node's loopback, forwarded to this machine through an SSH tunnel).

Both start from a :class:`Target`: one node of a recorded run (its host, working directory,
environment and container, all from run.json), or an inventory host when no run is named.

* shell, local backend: the user's shell in the workdir, with the run's environment.
  ssh backend: the system ``ssh -t`` (terminal handling, resizes and escapes as users know them)
  with the inventory's settings: user, port, key, jump host, known_hosts policy, ssh config.
  slurm backend: ``srun --jobid J --overlap --pty --relative N``, inside the job's allocation.
  With a docker/podman container: ``RUNTIME exec -it`` into the run's container when it runs,
  else a new container of the same image with the same mounts.
* jupyter: :func:`cluster.node.probe._serve` runs on the node (inside the run's container when there
  is one), picks a loopback port, starts the server with a fresh token and stops it when the
  session ends (Ctrl-C here, this process killed, or the connection lost: its stdin closes) or the
  run ends. Fabric's ``forward_local`` carries the port here; the local URL is printed.
  slurm backend through the login node (``slurm.login``): the watcher runs inside the job's
  allocation (``srun --overlap`` on the login node) and the tunnel goes through the login node
  to the node's loopback (``_SlurmSession``).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from cluster import container as ctr
from cluster.spec.config import Host, Inventory, inventory_from_plain, load_inventory
from cluster.errors import UserError
from cluster.plan import cd_line
from cluster.quoting import quote_argv
from cluster.run.records import Run, resolve

SHELL_HINT = "python -m cluster shell RUN --node 1"


@dataclass
class Target:
    """One node: of a run (``run`` set) or an inventory host."""

    inventory: Inventory
    host: Host
    backend: str
    workdir: str
    node_rank: int = 0
    env: dict = field(default_factory=dict)
    run: Optional[Run] = None
    node: Optional[dict] = None          # the plan's node record
    container: Optional[ctr.ContainerRef] = None
    node_host: Optional[str] = None       # a SLURM run's node, once a job step runs there

    @property
    def label(self) -> str:
        if self.run and self.backend == "slurm":
            return (f"{self.node_host} " if self.node_host else "") + f"(node {self.node_rank} of run {self.run.id})"
        where = f"{self.host.name} (node {self.node_rank} of run {self.run.id})" if self.run else self.host.name
        return where

    @property
    def cwd(self) -> str:
        """Where a shell or command next to a run starts: the run's directory (its job's working
        directory, cluster/node/agent.py), else the host's workdir."""
        state_dir = (self.node or {}).get("state_dir")
        if not self.run or not state_dir:
            return self.workdir
        if self.backend == "local":
            return str(self.run.dir)
        run_dir = os.path.dirname(state_dir.rstrip("/"))
        return run_dir if run_dir.startswith("/") else self.workdir.rstrip("/") + "/" + run_dir

    def end_file(self) -> Optional[str]:
        return f"{self.node['state_dir']}/{self.host.name}.exit" if self.node else None


def target(run_arg: Optional[str], node: Optional[str], inventory: Optional[str] = None,
           host: Optional[str] = None, need_run: bool = True) -> Target:
    if run_arg is None and not need_run:
        inv = load_inventory(inventory)
        names = [h.name for h in inv.hosts]
        name = host or node or names[0]
        if name.isdigit() and name not in names:
            if int(name) >= len(names):
                raise UserError(f"the inventory has {len(names)} host(s); there is no host {name}",
                                where="--node", hint="hosts: " + ", ".join(names))
            name = names[int(name)]
        if name not in names:
            raise UserError(f"'{name}' is not in the inventory", where="--host", hint="hosts: " + ", ".join(names))
        h = inv.host(name)
        return Target(inv, h, inv.backend, h.workdir, names.index(name))
    run = resolve(run_arg)
    inv = inventory_from_plain(run.data["inventory"])
    nodes = (run.data.get("plan") or {}).get("nodes") or []
    backend = run.data["backend"]
    if backend == "slurm":
        n = _node_index(node, [h.name for h in inv.hosts], len(nodes) or 1, run)
        return Target(inv, inv.hosts[0], backend, os.getcwd(), n, run=run,
                      node=nodes[n] if n < len(nodes) else None)
    n = _node_index(node, [nd["host"] for nd in nodes], len(nodes), run)
    nd = nodes[n]
    ref = ctr.ContainerRef(**nd["container"]) if nd.get("container") else None
    return Target(inv, inv.host(nd["host"]), backend, nd["workdir"], n, dict(nd.get("env") or {}), run, nd, ref)


def _node_index(node: Optional[str], hosts: list[str], count: int, run: Run) -> int:
    if node is None:
        return 0
    if node in hosts:
        return hosts.index(node)
    if node.isdigit() and int(node) < count:
        return int(node)
    listing = ", ".join(f"{i} ({h})" for i, h in enumerate(hosts)) if hosts else f"0-{count - 1}"
    raise UserError(f"run {run.id} has no node '{node}'", where="--node",
                    hint=f"give a node rank or host name: {listing}")


# ---------------------------------------------------------------- ssh client command line
def ssh_client_argv(host: Host, inv: Inventory, *, tty: bool) -> list[str]:
    """The system ssh with the inventory's settings (cluster/backends/openssh.py), prompts allowed
    for a key's passphrase; the remote command is appended."""
    if not shutil.which("ssh"):
        raise UserError("the ssh client is not installed on this machine", hint="install openssh-client")
    from cluster.backends.openssh import ssh_argv
    return ssh_argv(host, inv.ssh, tty=tty, batch=False, keepalive_s=15)


# ---------------------------------------------------------------- shell
INTERACTIVE = 'if command -v bash >/dev/null 2>&1; then exec bash -i; else exec sh -i; fi'


def _container_running(t: Target) -> bool:
    argv = [t.container.runtime, "container", "inspect", "--format", "{{.State.Running}}", t.container.name]
    if t.host.is_local or t.backend == "local":
        p = subprocess.run(argv, capture_output=True, text=True)
        return p.returncode == 0 and p.stdout.strip() == "true"
    from cluster.backends.transport import Pool
    with Pool([t.host], t.inventory.ssh) as pool:
        r = pool.exec(t.host.name, quote_argv(argv), timeout_s=30)
    return r.ok and r.stdout.strip() == "true"


def shell_argv(t: Target, running: Optional[bool] = None) -> tuple[list[str], list[str]]:
    """(argv on the node, env assignments) for an interactive shell of ``t``."""
    env = dict(t.env)
    if t.run:
        env.setdefault("CLUSTER_RUN_ID", t.run.id)
    inner = ["sh", "-c", INTERACTIVE]
    c = t.container
    if c is None or c.runtime not in ("docker", "podman", "apptainer"):
        return inner, [f"{k}={v}" for k, v in sorted(env.items())]
    wd = os.path.expanduser(t.workdir) if t.backend == "local" else t.workdir
    if c.runtime == "apptainer":
        return ctr.apptainer_exec(_spec_of(t), inner, workdir=wd, env=env, gpus=0,
                                  mounts=[], own_mounts=False), []
    running = _container_running(t) if running is None else running
    if running:
        cwd = os.path.expanduser(t.cwd) if t.backend == "local" else t.cwd
        argv = [c.runtime, "exec", "-it", "-w", cwd if cwd.startswith("/") else wd]
        for k, v in sorted(env.items()):
            argv += ["-e", f"{k}={v}"]
        return argv + [c.name] + inner, []
    # a fresh container, as the run's would be: the submitting user's uid/gid unless user: root
    # (``exec`` into the running one needs nothing: it keeps the user the container started as)
    user = getattr(_spec_of(t), "user", "self") if t.run else "self"
    script = ctr.host_script(user, False)
    argv = (["sh", "-c", script] if script else []) + [c.runtime, "run", "--rm", "-it", "--network", "host",
                                                       "-v", f"{wd}:{wd}", "-w", wd]
    for k, v in sorted(env.items()):
        argv += ["-e", f"{k}={v}"]
    if c.image.startswith(ctr.ROOTFS):
        argv += ["--runtime", "runc"] if c.runtime == "podman" else []
        return argv + ["--rootfs", c.image[len(ctr.ROOTFS):] + ":O"] + inner, []
    return argv + [c.image] + inner, []


def _spec_of(t: Target):
    """The job's container spec, from run.json."""
    from types import SimpleNamespace
    spec = dict((t.run.data.get("job", {}).get("resolved") or {}).get("container") or {})
    spec.setdefault("env", {})
    spec.setdefault("args", [])
    spec.setdefault("mounts", [])
    return SimpleNamespace(**spec)


def shell(t: Target) -> int:
    """Replace this process with the shell (it owns the terminal); returns only on errors."""
    if t.run and t.backend == "slurm":
        jid = (t.run.data.get("handle") or {}).get("job_id")
        if not jid:
            raise UserError(f"run {t.run.id} has no SLURM job id", hint="is it still being submitted? see status")
        if t.run.state.is_terminal():
            raise UserError(f"run {t.run.id} is {t.run.state.value}: its SLURM allocation is gone",
                            hint="a shell on a SLURM node lives inside the job's allocation: use it while the run runs")
        wd = t.cwd
        env = [f"{k}={v}" for k, v in sorted(((t.node or {}).get("env") or {}).items())]
        argv = ["srun", f"--jobid={jid}", "--overlap", "--pty", "--nodes=1", "--ntasks=1",
                f"--relative={t.node_rank}", f"--chdir={wd}"] + (["env"] + env if env else []) + ["sh", "-c", INTERACTIVE]
        print(f"shell on node {t.node_rank} of SLURM job {jid} (run {t.run.id}), in {wd}", file=sys.stderr)
        if t.inventory.login is not None:     # SLURM through the login node (cluster/backends/login.py)
            return _exec(ssh_client_argv(t.inventory.login, t.inventory, tty=True) + [quote_argv(argv)], None)
        return _exec(argv, None)
    argv, assigns = shell_argv(t)
    print(f"shell on {t.label}, in {t.cwd}" + (f" (inside {t.container.runtime} container)" if t.container else ""),
          file=sys.stderr)
    if t.backend == "local" or (t.host.is_local and t.backend != "ssh"):
        env = dict(os.environ)
        env.update(kv.split("=", 1) for kv in assigns)
        wd = os.path.expanduser(t.cwd)
        if not os.path.isdir(wd):
            raise UserError(f"the run's directory {wd} does not exist", where=t.host.name)
        os.chdir(wd)
        return _exec(argv, env)
    remote = cd_line(t.cwd) + " && exec " + quote_argv((["env"] + assigns if assigns else []) + argv,
                                                        home=[t.host.python])
    return _exec(ssh_client_argv(t.host, t.inventory, tty=sys.stdin.isatty()) + [remote], None)


def _exec(argv: Sequence[str], env: Optional[dict]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if env is None:
            os.execvp(argv[0], list(argv))
        os.execvpe(argv[0], list(argv), env)
    except FileNotFoundError:
        raise UserError(f"{argv[0]} is not installed on this machine", hint=f"install {argv[0]}") from None
    return 127


# ---------------------------------------------------------------- jupyter
DEFAULT_SERVER = ["{python}", "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", "--port={port}",
                  "--ServerApp.token={token}", "--ServerApp.port_retries=0"]


def server_argv(t: Target, command: Sequence[str]) -> list[str]:
    py = ctr.inner_python(_spec_of(t), t.host) if t.container else t.host.python
    if t.run and t.backend == "slurm":      # the python the run's tasks run (the login node's venv there)
        py = (t.run.data.get("login") or {}).get("python") or py
    return [a.replace("{python}", py) for a in (command or DEFAULT_SERVER)]


def _in_container(t: Target, argv: list[str]) -> list[str]:
    """The watcher's argv, inside the run's docker/podman container when it has one (stdin kept open)."""
    c = t.container
    if c is None or c.runtime not in ("docker", "podman"):
        return argv
    if not _container_running(t):
        raise UserError(f"the run's {c.runtime} container {c.name} is not running on {t.host.name}",
                        hint="start jupyter while the run runs, or without a run: python -m cluster jupyter --host HOST")
    return [c.runtime, "exec", "-i", "-w", t.workdir, c.name] + argv


def _free_port(port: int) -> int:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return s.getsockname()[1]
    except OSError:
        return 0
    finally:
        s.close()


def _wait_listening(port: int, timeout_s: float = 10.0) -> None:
    """Until something listens on 127.0.0.1:``port`` (Fabric's tunnel binds in its own thread, after
    forward_local has returned): read from /proc/net/tcp, so no connection is made to find out."""
    want = f"0100007F:{port:04X}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open("/proc/net/tcp") as f:
                if any(c[1] == want and c[3] == "0A" for c in (l.split() for l in f.readlines()[1:])):
                    return
        except (OSError, IndexError):
            return          # not Linux: no way to look, go on
        time.sleep(0.01)


class _Session:
    """The watcher process on the node: its stdout lines as parsed JSON, its stdin as the off switch."""

    def __init__(self, t: Target, spec: dict):
        import json
        from cluster.backends.ship import _host_source
        self.json = json
        src = _host_source("_serve")
        python = ctr.inner_python(_spec_of(t), t.host) if t.container else t.host.python
        argv = _in_container(t, [python, "-c", src])
        line = (json.dumps(spec) + "\n").encode()
        self.pool = None
        if t.backend == "local":
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         start_new_session=True)
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
            self.out, self.err = self.proc.stdout, self.proc.stderr
            self.chan = None
        else:
            from cluster.backends.transport import ConnectError, Pool
            self.pool = Pool([t.host], t.inventory.ssh)
            try:
                self.conn = self.pool.connection(t.host.name)
            except ConnectError as e:
                self.pool.close()
                raise UserError(str(e), where=t.host.name) from None
            self.chan = self.conn.transport.open_session(timeout=t.inventory.ssh.connect_timeout_s)
            self.chan.exec_command(cd_line(t.workdir) + " && exec " + quote_argv(argv, home=[t.host.python]))
            self.chan.sendall(line)
            self.out, self.err = self.chan.makefile("rb"), self.chan.makefile_stderr("rb")
            self.proc = None
        self.errors: list[bytes] = []
        threading.Thread(target=lambda: self.errors.extend(self.err), daemon=True).start()

    def lines(self):
        for raw in self.out:
            try:
                yield self.json.loads(raw)
            except ValueError:
                continue

    def stop(self) -> None:
        """EOF on the watcher's stdin: it stops the server's process group, reports and exits."""
        try:
            if self.chan is not None:
                self.chan.shutdown_write()
            else:
                self.proc.stdin.close()
        except OSError:
            pass

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.pool is not None:
            self.pool.close()

    def stderr_tail(self) -> str:
        return b"".join(self.errors).decode(errors="replace").strip()[-2000:]


class _SlurmSession(_Session):
    """jupyter on a node of a SLURM run from a machine without SLURM, through the login node
    (cluster/backends/login.py): the watcher runs inside the job's allocation (``srun --overlap``
    on the login node, over one SSH connection; its stdin and stdout pass through srun, so SLURM
    ends it with the job), and the tunnel goes through the login node to the compute node's
    loopback (SSH to the node with the login node as jump host, as ``ssh -J login node``: the
    inventory's hosts give the compute nodes' user, port and key). The server stays on loopback."""

    def __init__(self, t: Target, spec: dict, jid: str, python: str):
        import json
        from cluster.backends.ship import _host_source
        from cluster.backends.transport import ConnectError, Pool
        self.json, self.t, self.proc, self.node_pool = json, t, None, None
        login = t.inventory.login
        # the node's name first (its hostname: what the login node resolves), then the watcher
        argv = ["srun", f"--jobid={jid}", "--overlap", "--nodes=1", "--ntasks=1", f"--relative={t.node_rank}",
                f"--chdir={t.cwd}", "--quiet", "sh", "-c", 'printf \'{"node": "%s"}\\n\' "$(hostname)"; exec "$@"',
                "sh", python, "-c", _host_source("_serve")]
        self.pool = Pool([login], t.inventory.ssh)
        try:
            conn = self.pool.connection(login.name)
        except ConnectError as e:
            self.pool.close()
            raise UserError(f"login node {login.name}: {e}", where=t.inventory.path, key="slurm.login") from None
        self.chan = conn.transport.open_session(timeout=t.inventory.ssh.connect_timeout_s)
        self.chan.exec_command(quote_argv(argv))
        self.chan.sendall((json.dumps(spec) + "\n").encode())
        self.out, self.err = self.chan.makefile("rb"), self.chan.makefile_stderr("rb")
        self.errors: list[bytes] = []
        threading.Thread(target=lambda: self.errors.extend(self.err), daemon=True).start()

    def lines(self):
        last = None
        for msg in super().lines():
            if set(msg) == {"node"}:
                self._connect_node(msg["node"])
                continue
            last = msg
            yield msg
        if last is not None and not {"stopped", "exited", "error"} & set(last) and self.chan.recv_exit_status() > 0:
            # srun ended without the watcher's last word (not the connection: that is -1): SLURM
            # ended the job step with the job
            yield {"stopped": "the run's SLURM job ended (its allocation is gone)", "left": False}

    def _connect_node(self, node: str) -> None:
        """The SSH connection the tunnel rides: to ``node`` through the login node."""
        import dataclasses
        from cluster.backends.transport import ConnectError, Pool
        login, base = self.t.inventory.login, self.t.inventory.hosts[0]
        hop = (f"{login.user}@" if login.user else "") + login.hostname + (f":{login.port}" if login.port else "")
        host = dataclasses.replace(base, name=node, hostname=node, address=node,
                                   jump_host=",".join(filter(None, [login.jump_host, hop])))
        self.node_pool = Pool([host], self.t.inventory.ssh)
        self.t.host, self.t.node_host = host, node          # messages from here on name the node
        try:
            self.conn = self.node_pool.connection(node)
        except ConnectError as e:
            raise UserError(f"no SSH to the run's node {node} through the login node {login.name}: {e}",
                            where=self.t.inventory.path, key="hosts",
                            hint="the tunnel needs SSH from the login node to the compute nodes (with the "
                                 "inventory's user, port and key for hosts), as `ssh -J LOGIN NODE` would") from None

    def close(self) -> None:
        super().close()
        if self.node_pool is not None:
            self.node_pool.close()


def _slurm_session(t: Target, spec: dict) -> _SlurmSession:
    """Checks, then the session, for a node of a SLURM run through the login node."""
    if t.run is None or t.inventory.login is None:
        raise UserError("jupyter reaches the nodes of a SLURM run submitted through slurm.login only",
                        where="jupyter", hint="set slurm.login and remote_dir in the inventory, name an ssh "
                        "inventory host with --host, or run the server with srun --overlap yourself")
    jid = (t.run.data.get("handle") or {}).get("job_id")
    if not jid:
        raise UserError(f"run {t.run.id} has no SLURM job id", hint="is it still being submitted? see status")
    login = t.run.data.get("login") or {}
    spec = dict(spec, workdir=t.cwd, cwd=t.cwd, end_file=None, pgid=None,
                log=f"{t.cwd}/logs/jupyter-node{t.node_rank}-{os.getpid()}.log")
    return _SlurmSession(t, spec, jid, login.get("python") or t.host.python)


def jupyter(t: Target, command: Sequence[str], local_port: Optional[int] = None, token: Optional[str] = None,
            ready_timeout_s: float = 120.0) -> int:
    token = token or secrets.token_hex(24)
    pgid = None
    if t.run and t.node:
        if t.run.state.is_terminal():
            raise UserError(f"run {t.run.id} is {t.run.state.value}: a server tied to it would stop at once",
                            hint="start jupyter without a run: python -m cluster jupyter --host " + t.host.name)
        pgid = ((t.run.data.get("handle") or {}).get("pgids") or {}).get(t.host.name)
    name = t.run.id if t.run else "adhoc"
    spec = {"argv": server_argv(t, command), "workdir": t.workdir, "cwd": t.cwd, "token": token,
            "env": {**t.env, **({"CLUSTER_RUN_ID": t.run.id} if t.run else {})},
            "log": f"runs/{name}/logs/jupyter-{t.host.name}-{os.getpid()}.log" if t.run else
                   f"runs/_adhoc/jupyter-{t.host.name}-{os.getpid()}.log",
            "end_file": t.end_file(), "pgid": None if t.container else pgid, "ready_timeout_s": ready_timeout_s}
    what = "Jupyter" if not command else command[0]
    print(f"starting {what} on {t.label} ...", file=sys.stderr)
    sess = _slurm_session(t, spec) if t.backend == "slurm" else _Session(t, spec)
    stopped_by_user = False
    old = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        it = sess.lines()
        first = next(it, None)
        if not first or "port" not in first:
            why = (first or {}).get("error") or sess.stderr_tail() or "the node's watcher ended without a word"
            raise UserError(f"could not start the server on {t.host.name}: {why}", where=t.host.name)
        remote_port = first["port"]
        msg = next(it, None)
        if not msg or not msg.get("ready"):
            return _ended(msg, t, what, first)
        if t.backend == "local":
            url_port, forward = remote_port, None
        else:
            url_port = local_port or _free_port(remote_port) or _free_port(0)
            if local_port and not _free_port(local_port):
                raise UserError(f"port {local_port} is in use on this machine", where="--port",
                                hint="pick another, or leave --port out to take a free one")
            forward = sess.conn.forward_local(local_port=url_port, remote_port=remote_port,
                                              remote_host="127.0.0.1", local_host="127.0.0.1")
            forward.__enter__()
            _wait_listening(url_port)
        try:
            query = f"/?token={token}" if not command or any("{token}" in a for a in command) else "/"
            print(f"{what} on {t.label}: http://127.0.0.1:{url_port}{query}", flush=True)
            print(f"  (the node's loopback port {remote_port}" +
                  (", forwarded through ssh" if forward else "") + f"; log {first.get('log')}; Ctrl-C stops it)",
                  file=sys.stderr, flush=True)
            msg = next(it, None)      # blocks until the watcher ends (run over, server exited)
            return _ended(msg, t, what, first)
        except KeyboardInterrupt:
            stopped_by_user = True
            sess.stop()
            msg = None
            for msg in it:
                pass
            print(f"{what} stopped" + (" (something was left running!)" if msg and msg.get("left") else ""),
                  file=sys.stderr)
            return 1 if msg and msg.get("left") else 0
        finally:
            if forward is not None:
                try:
                    forward.__exit__(None, None, None)
                except Exception:   # noqa: BLE001 -- a tunnel thread's error on the way out
                    pass
    except KeyboardInterrupt:
        if not stopped_by_user:
            sess.stop()
            for _ in sess.lines():
                pass
            print(f"{what} stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
        sess.stop()
        sess.close()


def _ended(msg: Optional[dict], t: Target, what: str, first: dict) -> int:
    """The watcher's last word: the run ended (0), or the server failed (1, with its log's tail)."""
    if not msg:
        print(f"lost the session with {t.host.name}; the node stops the server when it sees the "
              "connection gone", file=sys.stderr)
        return 1
    if msg.get("stopped") and "exited" not in msg and not msg.get("tail"):
        print(f"{what} stopped: {msg['stopped']}" + (" (something was left running!)" if msg.get("left") else ""),
              file=sys.stderr)
        return 1 if msg.get("left") else 0
    how = f"exited with code {msg['exited']}" if "exited" in msg else f"stopped: {msg.get('stopped')}"
    tail = msg.get("tail") or []
    print(f"{what} on {t.host.name} {how} (log {first.get('log')})" +
          "".join(f"\n    | {line}" for line in tail), file=sys.stderr)
    if any("No module named jupyter" in line for line in tail):
        print(f"  hint: install JupyterLab for the run's python on {t.host.name} (pip install jupyterlab), "
              "or name another server: python -m cluster jupyter RUN -- python3 -m http.server {port} "
              "--bind 127.0.0.1", file=sys.stderr)
    return 1
