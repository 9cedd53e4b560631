"""Run records under runs/<run-id>/: the one place a run's state lives (every verb reads it)."""
from __future__ import annotations

import enum
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from cluster.node import record
from cluster.spec.config import REPO
from cluster.errors import UserError

RUNS_DIR = Path(os.environ.get("CLUSTER_RUNS_DIR", REPO / "runs"))


class State(str, enum.Enum):
    """One job-state enum; each backend maps its own states onto it."""

    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    HUNG = "HUNG"
    RESTARTING = "RESTARTING"   # an attempt failed; the next one starts (cluster/run/recovery.py)
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"

    def is_terminal(self) -> bool:
        return self in (State.SUCCEEDED, State.FAILED, State.CANCELLED)


def new_run_id(job: str) -> str:
    return f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def git_commit(repo: Path = REPO) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty else "")


class Run:
    """runs/<id>/run.json plus events.jsonl.

    One writer: every change of the record goes through :meth:`change` (``create``, ``update``,
    ``set_state``, ``event`` are built on it), which holds an exclusive fcntl lock on
    runs/<id>/run.lock while it re-reads run.json, applies the change and writes the result
    atomically; events.jsonl is appended under the same lock. So processes that record at the same
    time (the watcher, ``logs -f``, ``status``, ``stop``, submit) never lose each other's fields.
    Once the record is final (a terminal state recorded by whoever saw the end first), that end
    stands: a later writer's state is not recorded over it (see :data:`FINAL_KEYS`).
    Readers read without the lock: run.json is only ever replaced whole."""

    def __init__(self, run_id: str, root: Path = None):
        self.id = run_id
        self.dir = (root or RUNS_DIR) / run_id
        self.path = self.dir / "run.json"
        self._data: Optional[dict] = None

    @property
    def data(self) -> dict:
        if self._data is None:
            self._data = self._read()
        return self._data

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise UserError(f"run '{self.id}' has no record ({self.path} is missing)",
                            hint="see 'python -m cluster status' for known runs") from None
        except (ValueError, UnicodeDecodeError) as e:       # JSONDecodeError is a ValueError
            raise DamagedRecord(self, e) from None
        if not isinstance(data, dict):
            raise DamagedRecord(self, ValueError(f"a JSON {type(data).__name__}, not an object"))
        return data

    def reload(self) -> "Run":
        """Forget what was read: the next ``data`` is the record as it is on disk now."""
        self._data = None
        return self

    @property
    def damaged(self) -> Optional["DamagedRecord"]:
        """The error reading run.json, if it is damaged (None if it reads, or is missing)."""
        try:
            self.data
        except DamagedRecord as e:
            return e
        except UserError:
            return None
        return None

    def last_good(self) -> Optional[dict]:
        """The record as it was before its last write (run.json.prev), if that one reads."""
        try:
            data = json.loads(self.prev_path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    @property
    def prev_path(self) -> Path:
        return self.dir / "run.json.prev"

    def locked(self, name: str = "run.lock"):
        """One of the run's locks (exclusive, across processes; released if the holder dies):
        run.lock for run.json and events.jsonl; another name for another file of the run (not
        re-entrant: never take the same one twice in one process). cluster/node/record.py."""
        return record.locked(self.dir, name)

    # ---- the one writer
    def change(self, apply: Callable[[dict], Optional[list]], create: bool = False) -> None:
        """Change the record: under the run's lock, re-read run.json, call ``apply(data)`` on that
        fresh copy (it changes it in place and may return events, ``[(name, fields), ...]``, to
        append to events.jsonl), and write the result atomically. Keys of :data:`FINAL_KEYS` that a
        final record already has are kept as they are. ``data`` is then the record as written.
        A damaged record is never written over (DamagedRecord: 'stop' and the user deal with it)."""
        with self.locked():
            data = {} if create else self._read()
            before = json.dumps(data, sort_keys=True)
            kept = {k: data[k] for k in FINAL_KEYS if k in data} if data.get("final") else None
            events = apply(data) or []
            if kept is not None:
                for k in FINAL_KEYS:
                    data.pop(k, None)
                data.update(kept)
            if create or json.dumps(data, sort_keys=True) != before:
                self._write(data)
            for name, fields in events:
                self._append_event(name, fields)
            self._data = data

    def create(self, data: dict) -> None:
        for sub in ("logs", "checkpoints", "metrics", "state"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.change(lambda d: d.update(data), create=True)

    def update(self, **fields: Any) -> None:
        """Set ``fields`` in the record, keeping every other writer's."""
        self.change(lambda d: d.update(fields))

    @property
    def state(self) -> State:
        return State(self.data.get("state", "UNKNOWN"))

    def set_state(self, state: State, **extra: Any) -> bool:
        """Record ``state`` (and ``extra``), with a 'state' event where it changes. Once the record
        is final, its end stands: nothing is recorded and False is returned (``data`` is then the
        final record)."""
        refused = []

        def apply(d: dict) -> list:
            if d.get("final"):
                refused.append(True)
                return []
            events = [("state", {"state": state.value, **extra})] if d.get("state") != state.value else []
            d.update(state=state.value, **extra)
            return events
        self.change(apply)
        return not refused

    def event(self, event: str, **fields: Any) -> None:
        """Append one line to events.jsonl (under the run's lock: lines never interleave)."""
        with self.locked():
            self._append_event(event, fields)

    def _append_event(self, event: str, fields: dict) -> None:
        record.append_event(self.dir, event, fields)

    def events(self) -> list[dict]:
        try:
            lines = (self.dir / "events.jsonl").read_text().splitlines(keepends=True)
        except FileNotFoundError:
            return []
        # a line being appended right now is not whole yet: it is read next time
        return [json.loads(l) for l in lines if l.strip() and l.endswith("\n")]

    def _write(self, data: dict) -> None:
        """Atomic and durable, run.json.prev kept (cluster/node/record.py)."""
        record.write(self.dir, data)

    def damaged_on_disk(self) -> bool:
        return record.damaged_on_disk(self.path)


# what the first writer to record a run's end wrote; no later writer changes it
FINAL_KEYS = ("state", "final", "ended", "nodes_final", "failure")


class DamagedRecord(UserError):
    """runs/<id>/run.json does not read (a partial write, a full disk, an edit): the run is named,
    the other runs go on."""

    def __init__(self, run: "Run", err: Exception):
        self.run = run
        prev = " (its previous version, run.json.prev, reads)" if run.last_good() is not None else ""
        super().__init__(f"run '{run.id}': its record {run.path} is damaged ({err}){prev}",
                         hint=f"'python -m cluster stop {run.id}' still stops its processes; "
                              f"{'cp ' + str(run.prev_path) + ' ' + str(run.path) + ' restores the record before its last write; ' if prev else ''}"
                              f"or remove {run.dir} if the run is over")


def _created(r: Run) -> float:
    if r.damaged:
        try:
            return r.path.stat().st_mtime
        except OSError:
            return 0.0
    return r.data.get("created", 0)


def all_runs(root: Path = None) -> list[Run]:
    """Every run under ``root``, oldest first; those with a damaged record too (``Run.damaged``)."""
    root = root or RUNS_DIR
    if not root.is_dir():
        return []
    runs = [Run(p.name, root) for p in root.iterdir() if (p / "run.json").is_file()]
    return sorted(runs, key=_created)


def resolve(arg: Optional[str], root: Path = None) -> Run:
    """A run by id, job name (its latest run), unique prefix, or the latest run when omitted.
    A run whose record is damaged is found by its id or prefix (so that 'stop' can end it), and
    passed over, with a note, as the latest run or a job's latest."""
    runs = all_runs(root)
    if not runs:
        raise UserError("no runs yet", hint="start one with 'make submit JOB=resnet50'")
    exact = [r for r in runs if r.id == arg]
    if exact:
        return exact[0]
    good = [r for r in runs if not r.damaged]
    latest = not arg or arg == "latest"
    by_job = [r for r in good if latest or r.data.get("job", {}).get("name") == arg]
    if latest or by_job:
        if not by_job:
            raise UserError("no run has a readable record", hint="see 'python -m cluster status'")
        newer = runs[runs.index(by_job[-1]) + 1:]
        for r in newer:      # damaged, or another job's: which damaged ones might have been meant
            if r.damaged and (latest or r.id.startswith(f"{arg}-")):
                print(f"note: passing over {r.id}: its record {r.path} is damaged", file=sys.stderr)
        return by_job[-1]
    pref = [r for r in runs if r.id.startswith(arg)]
    if len(pref) == 1:
        return pref[0]
    if len(pref) > 1:
        raise UserError(f"'{arg}' matches {len(pref)} runs: " + ", ".join(r.id for r in pref[-5:]),
                        hint="give more of the run id")
    raise UserError(f"no run '{arg}'", hint="see 'python -m cluster status' for known runs")


def submitter() -> dict:
    """Who is launching (this process): a later `status` that finds it gone before the launch was
    recorded knows the launch was interrupted (see Backend.status)."""
    import os
    import socket
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid())}


def _proc_start(pid: int) -> Optional[float]:
    """When ``pid`` started (seconds since the epoch): tells a reused pid apart.

    Where /proc has it (Linux), read from there as psutil computes it, to the same float, without
    psutil's import: about 15 ms of every submit before its launch (bench/bench_slurm_launch.py).
    Elsewhere, or where /proc says nothing (not ours to see), psutil's."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            ticks = int(f.read().rpartition(b")")[2].split()[19])      # starttime, field 22
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
        return ticks / os.sysconf("SC_CLK_TCK") + boot
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None                     # gone
    except (OSError, TypeError, ValueError, IndexError, StopIteration):
        pass                                # psutil's answer, as before
    import psutil
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):     # gone, not ours to see, or not a pid
        return None


def _submitted_here(run: "Run") -> bool:
    """``run`` was submitted from this machine: the pids it records are ours to look up."""
    import socket
    return (run.data.get("submitter") or {}).get("host") == socket.gethostname()


def submitter_gone(run: "Run") -> bool:
    """The submit that created ``run`` is no longer running (on this machine; elsewhere: unknown)."""
    sub = run.data.get("submitter") or {}
    if not sub.get("pid") or not _submitted_here(run):
        return False
    return _proc_start(sub["pid"]) != sub.get("start")


RELAUNCHERS = {"watcher_pid": "cluster.backends.watcher", "follower_pid": "cluster.backends.slurm_follower"}


def runs_for(pid, module: str, run_id: str) -> bool:
    """Is ``pid`` still ``python -m MODULE ... RUN_ID`` (not a reused pid, not a zombie)?"""
    import psutil
    try:
        argv = psutil.Process(int(pid)).cmdline()     # a zombie's: ZombieProcess
    except (psutil.Error, TypeError, ValueError):
        return False
    return module in argv and run_id in argv


def relauncher_gone(run: "Run") -> Optional[int]:
    """The pid of the detached process that starts the next attempt of ``run`` (the ssh watcher,
    the SLURM follower) when it is no longer running; None while it runs, for a run without one,
    and where this is not the machine that submitted the run (its pids are not ours to read)."""
    if not _submitted_here(run):
        return None
    handle = run.data.get("handle") or {}
    for key, module in RELAUNCHERS.items():
        if handle.get(key):
            return None if runs_for(handle[key], module, run.id) else int(handle[key])
    return None
