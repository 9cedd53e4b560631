"""Per-rank metrics (metrics-rank<R>.jsonl) and heartbeat (heartbeat-rank<R>.json).

The cluster side reads both: the heartbeat for status, hang detection and `cluster top`, the
metrics for `cluster report`. Every record is one JSON object per line, appended and flushed, so
a reader never sees more than one partial (last) line.

The same records go, optionally, to TensorBoard event files (``tb/rank<R>/`` beside them: rank 0
every metric, every other rank its own throughput and step time, so the ranks are lines of one
chart) and, from rank 0, to Weights & Biases when the job names a project.
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

    def __init__(self, out_dir: str, rank: int, steps_total: int, *, tensorboard: bool = False,
                 wandb_project: str = "", config: dict | None = None):
        self._wandb = _wandb_run(wandb_project, config or {}) if wandb_project else None   # first: it may refuse
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.host = socket.gethostname()
        self.steps_total = steps_total
        self._file = open(self.dir / f"metrics-rank{rank}.jsonl", "a", encoding="utf-8")
        self._last_beat = 0.0
        self._sticky: dict[str, Any] = {}
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.dir / "tb" / f"rank{rank}"), flush_secs=10)

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), "rank": self.rank, **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = self.scalars(record)
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, record["step"], walltime=record["time"])
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=record["step"])

    # record key -> chart name; rank 0 writes them all, the others only the per-rank ones
    CHARTS = {"loss_mean": "loss", "lr": "lr", "img_s_total": "throughput/img_s_total", "top1": "val/top1",
              "top5": "val/top5", "img_s": "rank/img_s", "step_ms": "rank/step_ms", "data_ms": "rank/data_wait_ms",
              "comm_ms": "rank/comm_wait_ms", "gpu_mem_gb": "rank/gpu_mem_gb"}

    def scalars(self, record: dict[str, Any]) -> dict[str, float]:
        """The chart values of a train or val record (none for the others)."""
        if record.get("kind") not in ("train", "val") or "step" not in record:
            return {}
        return {tag: float(record[key]) for key, tag in self.CHARTS.items()
                if isinstance(record.get(key), (int, float)) and (self.rank == 0 or tag.startswith("rank/"))}

    def heartbeat(self, step: int, done: bool = False, every_s: float = 0.0, **extra: Any) -> None:
        """Rewrite the heartbeat, at most once per `every_s` seconds (0: always)."""
        now = time.time()
        if every_s and now - self._last_beat < every_s:
            return
        self._last_beat = now
        # the last interval's rates stay in every beat until the next interval replaces them
        self._sticky.update({k: v for k, v in extra.items() if k in ("img_s", "step_ms", "data_share", "comm_share")})
        # pid: status reads the rank's process state (a rank stopped by SIGSTOP hangs every rank)
        beat = {"step": step, "time": round(now, 3), "rank": self.rank, "host": self.host, "pid": os.getpid(),
                "done": done, "steps_total": self.steps_total, **self._sticky, **extra}
        atomic_write_text(self.dir / f"heartbeat-rank{self.rank}.json", json.dumps(beat) + "\n")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(project: str, config: dict):
    """A W&B run of rank 0 (named after the cluster run); a clear error when wandb is missing."""
    try:
        import wandb
    except ImportError:
        from .config import ConfigError
        raise ConfigError("wandb_project", f"is '{project}' but the wandb package is not installed on this "
                          "host: pip install wandb (and wandb login), or leave wandb_project empty") from None
    return wandb.init(project=project, name=os.environ.get("CLUSTER_RUN_ID"), config=config)


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
