"""SLURM from a machine without SLURM (a laptop): every verb through the cluster's login node.

    slurm:
      partition: gpu
      login: login1          # one of hosts:, or an entry {hostname:, user:, port:, identity_file:, jump_host:, python:}
      remote_dir: ~/ddp      # on the cluster's shared filesystem: code, venv, runs

There is one SLURM backend (cluster/backends/slurm.py), and it runs on the login node. This
machine only

* checks the login node (reachable, sbatch on its PATH, remote_dir writable), in one round trip;
* syncs the project's files there (rsync.push_code, as the ssh backend does) into
  ``remote_dir/code/<commit>``: one directory per commit (an uncommitted tree: per commit and a
  hash of its files' sizes and mtimes), so a queued or requeued job runs the code it was
  submitted with;
* picks the python there: the login host's ``python`` when it has every distribution that
  requirements.txt names (at the pinned versions), else a venv ``remote_dir/venv/<hash of
  requirements.txt>``, made once (``python -m venv``, ``pip install -r``) and reused by every later
  submit with the same requirements;
* runs ``python -m cluster VERB ... --backend slurm`` there through one Fabric connection
  (cluster/backends/transport.py), with ``CLUSTER_RUNS_DIR=remote_dir/runs`` and the inventory
  rewritten for that side (no ``login``), its progress lines streamed here;
* mirrors ``remote_dir/runs/<id>/`` (run.json, events, state, metrics; the task logs with
  ``logs --collect``) into ``runs/<id>/`` here. run.json here is the login node's, with this
  side's inventory, so ``status``, ``logs -f`` and ``stop`` from any shell go through the login
  node again. ``logs -f`` reads the task logs there over SFTP from byte offsets
  (ssh.SSHLogSource): a dropped connection is made again and nothing is lost or doubled.
* asks for a run's state through one kept process there (``StatusStream``: ``python -m
  cluster.backends.login status-stream RUN`` answers every 2 s with the state, the nodes and
  run.json), so ``logs -f`` starts one interpreter there for the whole follow, and mirrors the
  run's files (rsync) at the first look and at the end only.

``plan`` (and ``submit --dry-run``) prints the script as the login node's SLURM backend will
write it (``LoginBackend.make_plan``: remote_dir, code directory and python there, looked up,
nothing made).

``sbatch --test-only`` (the SLURM backend's preflight, run there before anything is submitted)
uses up a job id on each submit: SLURM offers no check of a request that does not.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import select
import shlex
import time
from pathlib import Path
from typing import Callable, Optional

from cluster.errors import UserError
from cluster.spec.config import REPO, Inventory
from cluster.run.records import Run, State, git_commit
from cluster.backends.base import LogSource, NodeStatus, progress
from cluster.backends.slurm import PrefixedSource, SlurmBackend
from cluster.backends.transport import ConnectError, Pool

VENV_TIMEOUT_S = 1800       # pip install of torch on a slow filesystem
VERB_TIMEOUT_S = 600        # one verb there (a submit waits for sbatch, a stop for SLURM's KILL)
STATUS_EVERY_S = 2.0        # the kept status process's answers (logs -f looks as often)
STATUS_STALE_S = 30.0       # no answer for this long on a live-looking link: it is made again

# run with the login host's python: which distributions of requirements.txt (on stdin) it lacks
_HAS_REQUIREMENTS = r"""
import re, sys
from importlib import metadata
bad = []
for line in sys.stdin.read().splitlines():
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:==\s*([^\s,;#]+))?", line.split("#")[0])
    if not m:
        continue
    try:
        have = metadata.version(m[1])
    except metadata.PackageNotFoundError:
        bad.append(m[1]); continue
    if m[2] and have != m[2]:
        bad.append(m[1] + "==" + m[2] + " (has " + have + ")")
print(" ".join(bad) or "ok")
"""


def q(word: str) -> str:
    return shlex.quote(word)


class LoginUnreachable(UserError):
    pass


class LoginError(UserError):
    """A verb that failed on the login node: its own message, as it printed it (exit code kept)."""

    def __init__(self, text: str, code: int):
        self.text = text.strip() or f"error: the command on the login node ended with exit code {code}"
        self.exit_code = code if code > 0 else 1
        super().__init__(self.text)

    def render(self) -> str:
        return self.text


class Login:
    """The login node: one Fabric connection, the remote directory, the python there."""

    def __init__(self, inv: Inventory, record: Optional[dict] = None):
        self.inv, self.host = inv, inv.login
        self.pool = Pool([self.host], inv.ssh)
        self.record = dict(record or {})        # root, code, python (a run's, from run.json)

    # ---- commands
    def exec(self, command: str, timeout_s: Optional[float] = None, stdin: Optional[bytes] = None):
        r = self.pool.exec(self.host.name, command, timeout_s, stdin)
        if r.error is None and r.exit_code in (None, -1):
            # no exit status: the connection went down under the command
            self.pool.reset(self.host.name)
            r.error = "connection lost"
        if r.error:
            raise LoginUnreachable(f"login node {self.host.name}: {r.error}", where=self.inv.path,
                                   key="slurm.login", hint="check the login node's address, user and key "
                                   "(ssh to it by hand); nothing was started")
        return r

    def stream(self, command: str, on_err: Callable[[str], None], timeout_s: float = VERB_TIMEOUT_S) -> tuple[int, str]:
        """Run ``command`` there; each stderr line goes to ``on_err`` as it comes. (exit code, stdout)."""
        try:
            conn = self.pool.connection(self.host.name)
            chan = conn.transport.open_session(timeout=self.inv.ssh.connect_timeout_s)
            chan.exec_command(command)
            chan.shutdown_write()
        except ConnectError as e:
            raise LoginUnreachable(f"login node {self.host.name}: {e}", where=self.inv.path, key="slurm.login") from None
        except Exception as e:   # noqa: BLE001 -- paramiko: the connection broke
            self.pool.reset(self.host.name)
            raise LoginUnreachable(f"login node {self.host.name}: connection lost: {e}", where=self.inv.path,
                                   key="slurm.login") from None
        out, err, deadline = [], b"", time.monotonic() + timeout_s
        try:
            while True:
                busy = False
                while chan.recv_ready():
                    out.append(chan.recv(1 << 16))
                    busy = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 16)
                    *lines, err = err.split(b"\n")
                    for line in lines:
                        on_err(line.decode(errors="replace"))
                    busy = True
                if busy:
                    continue
                if (chan.exit_status_ready() and chan.eof_received) or chan.closed:
                    break
                if time.monotonic() > deadline:
                    raise LoginUnreachable(f"login node {self.host.name}: no answer after {timeout_s:g} s",
                                           where=self.inv.path, key="slurm.login")
                select.select([chan], [], [], 0.5)
            if err:
                on_err(err.decode(errors="replace"))
            # -1 (paramiko): the channel closed without an exit status, the connection went down under it
            code = chan.recv_exit_status() if chan.exit_status_ready() else -1
            if code == -1:
                raise EOFError("the connection closed before the command ended")
        except LoginUnreachable:
            raise
        except Exception as e:   # noqa: BLE001 -- socket, paramiko and EOF errors: the link is down
            self.pool.reset(self.host.name)
            raise LoginUnreachable(f"login node {self.host.name}: connection lost: {type(e).__name__}: {e}",
                                   where=self.inv.path, key="slurm.login") from None
        finally:
            chan.close()
        return code, b"".join(out).decode(errors="replace")

    # ---- preflight, code, python
    def preflight(self) -> str:
        """Reachable, sbatch there, remote_dir made and writable: every problem in one message.
        Returns remote_dir as an absolute path there."""
        from cluster.backends.rsync import shell_path
        rd = self.inv.slurm.remote_dir
        r = self.exec("command -v sbatch >/dev/null 2>&1 || echo 'no sbatch'; "
                      f"if mkdir -p {shell_path(rd)} 2>/dev/null && cd {shell_path(rd)} && test -w .; "
                      "then echo \"root $(pwd)\"; else echo 'no dir'; fi")
        lines = r.stdout.splitlines()
        problems = []
        if "no sbatch" in lines:
            problems.append("sbatch is not on its PATH (for a non-interactive ssh command)")
        root = next((l[5:] for l in lines if l.startswith("root /")), None)
        if root is None:
            problems.append(f"slurm.remote_dir {rd} cannot be made or written there")
        if problems:
            raise UserError(f"login node {self.host.name}: " + "; ".join(problems), where=self.inv.path,
                            key="slurm.login", hint="the login node needs SLURM's clients and a writable "
                            "remote_dir on the shared filesystem; nothing was started")
        self.record["root"] = root
        return root

    def look(self) -> str:
        """remote_dir as an absolute path there, as preflight makes it, without making anything (plan)."""
        from cluster.backends.rsync import shell_path
        r = self.exec(f"cd && p={shell_path(self.inv.slurm.remote_dir)} && case $p in /*) ;; *) p=$PWD/$p ;; esac "
                      '&& if cd "$p" 2>/dev/null; then p=$(pwd); fi && echo "root $p"')
        root = next((l[5:] for l in r.stdout.splitlines() if l.startswith("root /")), None)
        if root is None:
            raise UserError(f"login node {self.host.name}: cannot read remote_dir there ({r.stderr.strip()})",
                            where=self.inv.path, key="slurm.remote_dir")
        self.record["root"] = root
        return root

    def code_dir(self, files: Optional[list] = None) -> str:
        """remote_dir/code/<commit>: the commit, and a hash of the files' sizes and mtimes if uncommitted."""
        from cluster.backends.rsync import manifest, project_files
        commit = git_commit() or "nogit"
        pin = commit[:12]
        if commit.endswith("+dirty") or commit == "nogit":
            files = project_files() if files is None else files
            pin += "-" + hashlib.sha256(json.dumps(manifest(files), sort_keys=True).encode()).hexdigest()[:10]
        self.record["code"] = f"{self.record['root']}/code/{pin}"
        return self.record["code"]

    def sync_code(self) -> str:
        from cluster.backends.rsync import project_files, push_code
        files = project_files()
        code = self.code_dir(files)
        progress(f"sync: {len(files)} project file(s) to {self.host.name}:{code}")
        r, = push_code([dataclasses.replace(self.host, workdir=code)], self.inv.ssh, files, progress)
        if not r.ok:
            raise UserError(f"code sync to the login node failed, nothing was started: {r.describe()}",
                            where=self.inv.path, key="slurm.remote_dir", hint="check free disk and permissions there")
        return code

    def python(self, make: bool = True) -> str:
        """The login host's python if it has the requirements, else the venv of this requirements.txt
        (made there unless ``make`` is False: what a submit would use, for plan)."""
        reqs = (REPO / "requirements.txt").read_bytes()
        py = self.host.python
        r = self.exec(f"{q(py)} -c {q(_HAS_REQUIREMENTS)}", stdin=reqs)
        if r.exit_code == 0 and r.stdout.strip() == "ok":
            self.record["python"] = py
            return py
        lacks = r.stdout.strip() if r.exit_code == 0 else f"{py} does not run"
        venv = f"{self.record['root']}/venv/{hashlib.sha256(reqs).hexdigest()[:12]}"
        r = self.exec(f"test -e {q(venv)}/.complete")
        if r.exit_code != 0 and not make:
            progress(f"python: {py} on {self.host.name}: {lacks}; a submit makes {venv} first")
        elif r.exit_code != 0:
            progress(f"python: {py} on {self.host.name}: {lacks}; making {venv} "
                     "(once for these requirements)")
            r = self.exec(f"rm -rf {q(venv)} && {q(py)} -m venv {q(venv)} && {q(venv)}/bin/pip install -q "
                          f"-r /dev/stdin && touch {q(venv)}/.complete", timeout_s=VENV_TIMEOUT_S, stdin=reqs)
            if r.exit_code != 0:
                raise UserError(f"cannot make the venv {venv} on {self.host.name}: " +
                                " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:]), where=self.inv.path,
                                key="slurm.login", hint="set the login host's python: to an interpreter with "
                                "the project's requirements, or let it reach the package index")
        self.record["python"] = f"{venv}/bin/python"
        return self.record["python"]

    # ---- verbs there
    def cluster_command(self, args: list[str]) -> str:
        rec = self.record
        return (f"cd {q(rec['code'])} && CLUSTER_RUNS_DIR={q(rec['root'] + '/runs')} PYTHONUNBUFFERED=1 "
                f"exec {q(rec['python'])} -m cluster " + shlex.join(args))

    def run_dir(self, run_id: str) -> str:
        return f"{self.record['root']}/runs/{run_id}"

    def mirror(self, run_id: str, logs: bool = False, record: Optional[dict] = None, files: bool = True) -> Run:
        """runs/<id>/ here from the login node's; run.json here keeps this side's inventory.
        ``record``: the login node's run.json as the caller already has it; ``files``: False for
        run.json alone (no rsync: the kept status process's answers between the first and the end)."""
        from cluster.backends.rsync import rsync
        from cluster.spec.schema import to_plain
        if record is None:
            r = self.exec(f"cat {q(self.run_dir(run_id))}/run.json")
            if r.exit_code != 0:
                raise UserError(f"run {run_id} has no record on the login node ({self.run_dir(run_id)}/run.json)",
                                where=self.inv.path, key="slurm.remote_dir")
            record = json.loads(r.stdout)
        data = dict(record)
        local = Run(run_id)
        local.dir.mkdir(parents=True, exist_ok=True)
        if files:
            extra = ["--exclude=/run.json*", "--exclude=/*.lock", "--exclude=/checkpoints/"]
            if not logs:
                extra.append("--exclude=/slurm/")
            s = rsync(self.host, self.inv.ssh, self.run_dir(run_id) + "/", str(local.dir) + "/", push=False,
                      extra=extra)
            if not s.ok:
                progress(f"mirror of {run_id}: {s.describe()}")
        data["inventory"] = to_plain(self.inv)
        data["login"] = dict(self.record, host=self.host.name, run_dir=self.run_dir(run_id))
        # the login node's record is the run's (its SLURM backend writes it): this side's copy is
        # replaced whole, through the one writer, as it is at every mirror
        local.change(lambda d: d.update(data), create=True)
        return local


def _remote_inventory(inv: Inventory) -> bytes:
    """The inventory as the login node uses it: this one, without login (SLURM runs there)."""
    import yaml
    raw = yaml.safe_load(Path(inv.path).read_text()) or {}
    raw["backend"] = "slurm"
    for key in ("login", "remote_dir"):
        raw.get("slurm", {}).pop(key, None)
    return yaml.safe_dump(raw, sort_keys=False).encode()


def submit(inv: Inventory, job: str, overrides: list[str], resume: Optional[str] = None) -> Run:
    """Preflight here, sync, then ``python -m cluster submit`` on the login node; the run mirrored here."""
    import secrets
    login = Login(inv)
    progress(f"preflight: login node {inv.login.name} ...")
    root = login.preflight()
    login.sync_code()
    login.python()
    # this submit's inputs there: the inventory for that side, and the job file if it is one here
    box = f"{root}/submits/{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    files = {"inventory.yaml": _remote_inventory(inv)}
    job_arg = job
    path = Path(job)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        files[path.name] = path.read_bytes()
        job_arg = f"{box}/{path.name}"
    for name, data in files.items():
        login.exec(f"mkdir -p {q(box)} && cat > {q(box + '/' + name)}", stdin=data)
    args = ["submit", job_arg, *overrides, "-i", f"{box}/inventory.yaml", "--backend", "slurm"]
    if resume:
        args += ["--resume", resume]
    held: list[str] = []

    def relay(line: str) -> None:
        # progress as it comes; an error (the last thing it prints) is raised here, once
        if held or line.startswith("error: "):
            held.append(line.replace(f"{box}/inventory.yaml", inv.path).replace(f"{box}/", ""))
        else:
            progress(line)
    code, out = login.stream(login.cluster_command(args), relay)
    if code != 0:
        raise LoginError("\n".join(held), code)
    run_id = next((l.split()[1] for l in out.splitlines() if l.startswith("run ") and " started " in l), None)
    if run_id is None:
        raise LoginError("error: the submit on the login node printed no run id:\n" + out, 1)
    run = login.mirror(run_id)
    run.event("login-submit", host=inv.login.name, run_dir=login.run_dir(run_id))
    return run


class StatusStream:
    """A run's status through one kept process on the login node, ``python -m
    cluster.backends.login status-stream RUN`` (``status_stream``), on the kept connection: it
    answers every STATUS_EVERY_S with one JSON line (state, nodes, the run's record), so that
    `logs -f`, which looks every 2 s, starts one interpreter there for the whole follow, not one a
    look. A dropped connection ends that process (its stdin closes); the next look starts
    another on the connection made again."""

    def __init__(self, login: Login, run_id: str):
        self.login, self.run_id = login, run_id
        self.chan = None
        self.out = self.err = b""
        self.last: Optional[dict] = None      # the newest answer of this process
        self.last_t = 0.0

    def _unreachable(self, why: str) -> LoginUnreachable:
        self.chan = None
        return LoginUnreachable(f"login node {self.login.host.name}: {why}", where=self.login.inv.path,
                                key="slurm.login")

    def _start(self) -> None:
        rec = self.login.record
        command = (f"cd {q(rec['code'])} && CLUSTER_RUNS_DIR={q(rec['root'] + '/runs')} PYTHONUNBUFFERED=1 "
                   f"exec {q(rec['python'])} -m cluster.backends.login status-stream {q(self.run_id)}")
        try:
            conn = self.login.pool.connection(self.login.host.name)
            self.chan = conn.transport.open_session(timeout=self.login.inv.ssh.connect_timeout_s)
            self.chan.exec_command(command)     # stdin stays open: its EOF tells the process to end
        except ConnectError as e:
            raise self._unreachable(str(e)) from None
        except Exception as e:   # noqa: BLE001 -- paramiko: the connection broke
            self.login.pool.reset(self.login.host.name)
            raise self._unreachable(f"connection lost: {e}") from None
        self.out = self.err = b""
        self.last, self.last_t = None, time.monotonic()

    def latest(self, wait_s: float = VERB_TIMEOUT_S) -> dict:
        """The newest answer; waits only for a new process's first one."""
        if self.chan is None:
            self._start()
        chan, deadline = self.chan, time.monotonic() + wait_s
        while True:
            try:
                while chan.recv_ready():
                    self.out += chan.recv(1 << 16)
                while chan.recv_stderr_ready():
                    self.err = (self.err + chan.recv_stderr(1 << 16))[-8000:]   # its last words, if it fails
                ended = chan.closed or (chan.exit_status_ready() and chan.eof_received)
            except Exception as e:   # noqa: BLE001 -- socket and paramiko errors: the link is down
                raise self._unreachable(f"connection lost: {type(e).__name__}: {e}") from None
            *lines, self.out = self.out.split(b"\n")
            answers = [a for a in map(_json_or_none, reversed(lines)) if isinstance(a, dict) and "state" in a]
            if answers:
                self.last, self.last_t = answers[0], time.monotonic()
                return self.last
            if ended:
                code = chan.recv_exit_status() if chan.exit_status_ready() else -1
                chan.close()
                self.chan = None
                if code == 0 and self.last is not None:
                    return self.last            # it ended after the run's end, its last answer
                if code == -1:
                    raise self._unreachable("connection lost")
                raise LoginError(self.err.decode(errors="replace"), code)
            if self.last is not None:
                if time.monotonic() - self.last_t > STATUS_STALE_S:
                    # a link that looks alive and carries nothing (a laptop that slept): make it again
                    chan.close()
                    self.login.pool.reset(self.login.host.name)
                    raise self._unreachable(f"no status for {STATUS_STALE_S:g} s")
                return self.last                # no newer one yet (they come every STATUS_EVERY_S)
            if time.monotonic() > deadline:
                chan.close()
                raise self._unreachable(f"no status after {wait_s:g} s")
            select.select([chan], [], [], 0.5)


def _json_or_none(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None         # not an answer (a stray line on stdout)


def status_stream(run_id: str, every_s: float = STATUS_EVERY_S) -> int:
    """On the login node: the run's status (the SLURM backend's), one JSON line every ``every_s``
    (state, nodes, run.json), until the run ended or the other side closed stdin."""
    import os
    import sys
    from cluster.run.records import resolve
    from cluster.spec.config import inventory_from_plain
    try:
        run = resolve(run_id)
        be = SlurmBackend(inventory_from_plain(run.data["inventory"]))    # there, the run's backend
        while True:
            state, nodes = be.status(run)
            sys.stdout.write(json.dumps({"state": state.value, "record": run.data,
                                         "nodes": [n.__dict__ | {"state": n.state.value} for n in nodes]},
                                        default=str) + "\n")
            sys.stdout.flush()
            if state.is_terminal():
                return 0
            if select.select([0], [], [], every_s)[0] and not os.read(0, 1 << 12):
                return 0                        # the channel closed: nobody looks any more
    except UserError as e:
        print(e.render(), file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


class LoginBackend(SlurmBackend):
    """A run of the SLURM backend on the login node, seen from here: its verbs run there."""
    name = "slurm"

    def __init__(self, inventory: Inventory, record: Optional[dict] = None):
        super().__init__(inventory)
        self.login = Login(inventory, record)
        self._streams: dict[str, StatusStream] = {}
        self._mirrored: set[str] = set()

    @classmethod
    def for_run(cls, run: Run, inventory: Inventory) -> "LoginBackend":
        return cls(inventory, {k: run.data.get("login", {}).get(k) for k in ("root", "code", "python")})

    def detect_gpus(self, hosts) -> dict[str, int]:
        # no sinfo here: what the inventory says (the login node's SLURM checks it at submit)
        s, first = self.inv.slurm, self.inv.hosts[0]
        gpus = s.gpus_per_node if s.gpus_per_node is not None else first.gpus if isinstance(first.gpus, int) else 0
        return {h.name: gpus for h in hosts}

    def make_plan(self, job, run_id, gpus, **kw):
        """The sbatch script as the SLURM backend on the login node will write it: its remote_dir,
        the code directory of this commit and the python there (looked up, nothing made)."""
        root = self.login.look()
        code, python = self.login.code_dir(), self.login.python(make=False)
        progress(f"as on the login node {self.login.host.name}: remote_dir {root}, code {code}, python {python}")
        return super().make_plan(job, run_id, gpus, **{**kw, "local_runs": f"{root}/runs", "workdir": code,
                                                       "python": python})

    def preflight(self, plan) -> None:
        raise UserError("a run through the login node is submitted by cluster.backends.login.submit")

    def launch(self, plan, run: Run) -> dict:
        raise UserError("a run through the login node is submitted by cluster.backends.login.submit")

    def _verb(self, run: Run, args: list[str], on_err: Callable[[str], None]) -> tuple[int, str]:
        return self.login.stream(self.login.cluster_command(args), on_err)

    def status(self, run: Run):
        if run.state.is_terminal() and run.data.get("final"):
            return super().status(run)          # the record stands (as on every backend)
        stream = self._streams.setdefault(run.id, StatusStream(self.login, run.id))
        try:
            answer = stream.latest()
            state = State(answer["state"])
            # the first look and the end bring events, heartbeats and metrics along; the looks
            # between (logs -f, every 2 s) only run.json, which the answer holds
            first = run.id not in self._mirrored
            fresh = self.login.mirror(run.id, record=answer["record"], files=first or state.is_terminal())
            self._mirrored.add(run.id)
        except LoginUnreachable as e:
            # the recorded state stands until the login node answers again (logs -f keeps going)
            return run.state, [NodeStatus(self.login.host.name, State.UNKNOWN, detail=f"unreachable: {e.message}")]
        run._data = fresh.data
        nodes = [NodeStatus(**{**n, "state": State(n["state"]),
                               "heartbeats": {int(k): v for k, v in (n.get("heartbeats") or {}).items()}})
                 for n in answer.get("nodes", [])]
        return state, nodes

    def node_status(self, run: Run) -> list[NodeStatus]:
        return self.status(run)[1]

    def stop(self, run: Run, grace_s: float = 10.0) -> list[str]:
        return self.stop_nodes(run, grace_s)

    def stop_nodes(self, run: Run, grace_s: float) -> list[str]:
        lines: list[str] = []
        code, out = self._verb(run, ["stop", run.id, "--grace-s", f"{grace_s:g}"], lines.append)
        run._data = self.login.mirror(run.id).data
        if code == 0:
            return []
        return [l for l in lines if l.strip() and not l.startswith("stopping ")] or \
            [f"the stop on the login node ended with exit code {code}"]

    def log_sources(self, run: Run) -> list[LogSource]:
        from cluster.backends.ssh import SSHLogSource
        from cluster.backends.slurm import job_logs
        h = run.data.get("handle") or {}
        at = lambda file: SSHLogSource(self.login.pool, self.login.host, f"{h['folder']}/{file}")
        return [PrefixedSource(name, at(file), b"[slurm agent] ") if batch else _Named(name, at(file))
                for name, file, batch in job_logs(h)]

    def collect_logs(self, run: Run) -> None:
        from cluster.backends.rsync import rsync
        h = run.data.get("handle", {})
        s = rsync(self.login.host, self.inv.ssh, h["folder"] + "/", str(run.dir / "logs") + "/", push=False)
        if not s.ok:
            raise UserError(f"cannot copy the logs from the login node: {s.describe()}", where=self.inv.path,
                            key="slurm.login")


class _Named(LogSource):
    """A task's log on the login node, named as the SLURM backend names it (``job_logs``)."""

    def __init__(self, name: str, inner: LogSource):
        self.name, self.inner = name, inner

    def read(self, offset: int) -> bytes:
        return self.inner.read(offset)


BACKEND = LoginBackend


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] != ["status-stream"] or len(sys.argv) != 3:
        print("usage: python -m cluster.backends.login status-stream RUN", file=sys.stderr)
        sys.exit(2)
    sys.exit(status_stream(sys.argv[2]))
