"""Per-rank metrics (metrics-rank<R>.jsonl) and heartbeat (heartbeat-rank<R>.json).

The cluster side reads both: the heartbeat for status and hang detection, the metrics for
`cluster report`. Every record is one JSON object per line, appended and flushed, so a reader
never sees more than one partial (last) line.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename: readers see the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    """Appends this rank's records and rewrites its heartbeat."""

    def __init__(self, out_dir: str, rank: int, steps_total: int):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.host = socket.gethostname()
        self.steps_total = steps_total
        self._file = open(self.dir / f"metrics-rank{rank}.jsonl", "a", encoding="utf-8")
        self._last_beat = 0.0

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), "rank": self.rank, **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def heartbeat(self, step: int, done: bool = False, every_s: float = 0.0, **extra: Any) -> None:
        """Rewrite the heartbeat, at most once per `every_s` seconds (0: always)."""
        now = time.time()
        if every_s and now - self._last_beat < every_s:
            return
        self._last_beat = now
        self._sticky = {**getattr(self, "_sticky", {}), **{k: v for k, v in extra.items() if k == "img_s"}}
        # pid: status reads the rank's process state (a rank stopped by SIGSTOP hangs every rank)
        beat = {"step": step, "time": round(now, 3), "rank": self.rank, "host": self.host, "pid": os.getpid(),
                "done": done, "steps_total": self.steps_total, **self._sticky, **extra}
        atomic_write_text(self.dir / f"heartbeat-rank{self.rank}.json", json.dumps(beat) + "\n")

    def close(self) -> None:
        self._file.close()


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now, or cut short by a crash
    return records


def read_metrics(directory: str | os.PathLike) -> dict[int, list[dict]]:
    """{rank: [record, ...]} from every metrics-rank<R>.jsonl in directory, in file order.

    Records carry "kind": "start" (step, world_size: a run began or resumed here), "train"
    (step, loss, loss_mean, lr, img_s, img_s_total, step_ms, gpu_mem_gb on GPU), "val"
    (step, top1, top5) or "summary". After a resume, steps past the checkpoint appear twice:
    the later record is the one that counts."""
    out: dict[int, list[dict]] = {}
    for path in Path(directory).glob("metrics-rank*.jsonl"):
        m = re.fullmatch(r"metrics-rank(\d+)\.jsonl", path.name)
        if m:
            out[int(m.group(1))] = _read_jsonl(path)
    return dict(sorted(out.items()))


def read_heartbeats(directory: str | os.PathLike) -> dict[int, dict]:
    """{rank: heartbeat} from every heartbeat-rank<R>.json in directory."""
    out: dict[int, dict] = {}
    for path in Path(directory).glob("heartbeat-rank*.json"):
        m = re.fullmatch(r"heartbeat-rank(\d+)\.json", path.name)
        if m:
            try:
                out[int(m.group(1))] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                pass
    return dict(sorted(out.items()))
