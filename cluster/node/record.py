"""A run's record at the file level: runs/<id>/run.json and events.jsonl, the lock, the atomic write.

cluster/run/records.py (``Run.change``) is the one writer of the record and is built on these;
a SLURM task (cluster/node/slurm_task.py) uses them too, on the shared filesystem, to record
that the job runs. Standard library only (it runs on the nodes).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

LOCK = "run.lock"       # run.json and events.jsonl change only under it


@contextlib.contextmanager
def locked(run_dir: Path, name: str = LOCK):
    """One of the run's locks (exclusive, across processes and, through the shared filesystem,
    across nodes; released if the holder dies). Not re-entrant."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)        # closing the descriptor releases the lock


def damaged_on_disk(path: Path) -> bool:
    try:
        return not isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError, UnicodeDecodeError):
        return True


def write(run_dir: Path, data: dict) -> None:
    """run.json, atomic and durable (under the lock): a crash or a full disk leaves the old record
    whole (the new one is written and synced beside it, then renamed over it), and the record
    before it is kept as run.json.prev, from which 'stop' still finds a run whose record was
    damaged all the same."""
    path, prev = run_dir / "run.json", run_dir / "run.json.prev"
    tmp = path.with_name(f".run.json.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if path.exists() and not damaged_on_disk(path):
            prev_tmp = prev.with_name(f".run.json.prev.tmp{os.getpid()}")
            prev_tmp.unlink(missing_ok=True)
            try:
                os.link(path, prev_tmp)
            except OSError:         # a filesystem without hard links
                import shutil
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, prev)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append_event(run_dir: Path, event: str, fields: dict) -> None:
    """One line of events.jsonl (under the lock: lines never interleave)."""
    with open(run_dir / "events.jsonl", "a") as f:
        f.write(json.dumps({"t": round(time.time(), 3), "event": event, **fields}) + "\n")
