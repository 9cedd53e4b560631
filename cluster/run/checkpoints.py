"""Where a run's checkpoint copy stands, read from its record (run.json, events) and the storage
directory: for ``status``, ``logs -f`` and ``submit --resume``. The copying itself is the
watcher's (cluster/backends/watcher.py)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from cluster.run.records import RELAUNCHERS, runs_for


def checkpoint_path(run_data: dict) -> Optional[str]:
    """The job's ``checkpoint.path`` (relative to the run directory), from run.json; None where it
    lies in checkpoints/ (CLUSTER_CHECKPOINT_DIR), which is synced whole anyway."""
    path = (((run_data.get("job") or {}).get("resolved") or {}).get("checkpoint") or {}).get("path")
    path = path.strip("/") if path else None
    return None if not path or path.split("/")[0] == "checkpoints" else path


def _latest(dest: Path, own: Optional[str] = None) -> Optional[str]:
    """The newest checkpoint kept in ``dest``: what ``latest`` names, else the job's own file."""
    try:
        return (dest / "latest").read_text().strip() or None
    except OSError:
        return own if own and (dest / own).exists() else None


def checkpoint_sync(run) -> Optional[dict]:
    """Where the run's checkpoint copy stands, for runs that have a watcher (ssh): ``state`` is
    ``syncing`` (the watcher is still at work; after the run ends it makes one last pass), ``synced``,
    ``failed`` (with ``error``) or ``stopped`` (the watcher is gone without a last pass)."""
    handle = run.data.get("handle") or {}
    if "watcher_pid" not in handle:
        return None
    dest = Path(run.data.get("checkpoint_dir") or run.dir / "checkpoints")
    done = [e for e in run.events() if e.get("event") == "checkpoints-synced"]
    if done:
        e = done[-1]
        return {"state": "synced" if e.get("ok") else "failed", "dir": str(dest),
                "latest": e["latest"] if "latest" in e else _latest(dest, checkpoint_path(run.data)),
                "error": e.get("error")}
    cs = {"state": "syncing", "dir": str(dest), "latest": _latest(dest, checkpoint_path(run.data))}
    if not runs_for(handle.get("watcher_pid"), RELAUNCHERS["watcher_pid"], run.id):
        cs.update(state="stopped", error="the checkpoint watcher ended before its last pass "
                                         f"(see {run.dir / 'state' / 'watcher.log'})")
    return cs


def describe_checkpoint_sync(cs: dict) -> str:
    where = cs["dir"]
    try:
        where = str(Path(where).relative_to(Path.cwd()))
    except ValueError:
        pass
    latest = f"latest {cs['latest']} in {where}" if cs.get("latest") else f"none yet in {where}"
    if cs["state"] == "syncing":
        return f"checkpoints: syncing from node 0 ({latest})"
    if cs["state"] == "synced":
        return f"checkpoints: synced ({latest})"
    return f"checkpoints: {cs['state']}: {cs.get('error')} ({latest})"


def wait_checkpoint_sync(run, timeout_s: float = 300.0, progress=None) -> Optional[dict]:
    """After the run has ended: wait (bounded) for the watcher's last pass; the final state."""
    cs = checkpoint_sync(run)
    if cs is None or cs["state"] != "syncing":
        return cs
    if progress:
        progress("-- waiting for the last checkpoint sync from node 0")
    deadline = time.time() + timeout_s
    while cs["state"] == "syncing" and time.time() < deadline:
        time.sleep(0.5)
        cs = checkpoint_sync(run)
    return cs
