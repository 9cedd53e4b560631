"""Run records under runs/<run-id>/: the one place a run's state lives (every verb reads it)."""
from __future__ import annotations

import enum
import json
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from .config import REPO
from .errors import UserError

RUNS_DIR = Path(os.environ.get("CLUSTER_RUNS_DIR", REPO / "runs"))


class State(str, enum.Enum):
    """One job-state enum; each backend maps its own states onto it."""

    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    HUNG = "HUNG"
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
    """runs/<id>/run.json plus events.jsonl; writes are atomic so readers never see half a file."""

    def __init__(self, run_id: str, root: Path = None):
        self.id = run_id
        self.dir = (root or RUNS_DIR) / run_id
        self.path = self.dir / "run.json"
        self._data: Optional[dict] = None

    @property
    def data(self) -> dict:
        if self._data is None:
            try:
                self._data = json.loads(self.path.read_text())
            except FileNotFoundError:
                raise UserError(f"run '{self.id}' has no record ({self.path} is missing)",
                                hint="see 'python -m cluster status' for known runs") from None
        return self._data

    def create(self, data: dict) -> None:
        for sub in ("logs", "checkpoints", "metrics", "state"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._data = data
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(f".run.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self._data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    @property
    def state(self) -> State:
        return State(self.data.get("state", "UNKNOWN"))

    def set_state(self, state: State, **extra: Any) -> None:
        if self.data.get("state") != state.value:
            self.event("state", state=state.value, **extra)
        self.update(state=state.value, **extra)

    def event(self, event: str, **fields: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "events.jsonl", "a") as f:
            f.write(json.dumps({"t": round(time.time(), 3), "event": event, **fields}) + "\n")

    def events(self) -> list[dict]:
        try:
            return [json.loads(l) for l in (self.dir / "events.jsonl").read_text().splitlines() if l.strip()]
        except FileNotFoundError:
            return []


def all_runs(root: Path = None) -> list[Run]:
    root = root or RUNS_DIR
    if not root.is_dir():
        return []
    runs = [Run(p.name, root) for p in root.iterdir() if (p / "run.json").is_file()]
    return sorted(runs, key=lambda r: r.data.get("created", 0))


def resolve(arg: Optional[str], root: Path = None) -> Run:
    """A run by id, unique prefix, job name (its latest run), or the latest run when omitted."""
    runs = all_runs(root)
    if not runs:
        raise UserError("no runs yet", hint="start one with 'make submit JOB=resnet50'")
    if not arg or arg == "latest":
        return runs[-1]
    exact = [r for r in runs if r.id == arg]
    if exact:
        return exact[0]
    pref = [r for r in runs if r.id.startswith(arg)]
    if len(pref) == 1:
        return pref[0]
    by_job = [r for r in runs if r.data.get("job", {}).get("name") == arg]
    if by_job and not pref:
        return by_job[-1]
    if len(pref) > 1:
        raise UserError(f"'{arg}' matches {len(pref)} runs: " + ", ".join(r.id for r in pref[-5:]),
                        hint="give more of the run id")
    raise UserError(f"no run '{arg}'", hint="see 'python -m cluster status' for known runs")
