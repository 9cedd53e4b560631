"""One stream from every node's log: merged live, filterable, resumable from byte offsets."""
from __future__ import annotations

import os
import re
import sys
import time
from typing import Optional

from cluster.run.records import Run

_LINE = re.compile(r"^\[(?P<host>[^\] ]+) (?P<rank>\d+|agent)\] ")
_COLORS = ["36", "33", "35", "32", "34", "31", "96", "93", "95", "92", "94", "91"]


class Merger:
    """Keeps a byte offset and a partial-line buffer per source; only whole lines come out."""

    def __init__(self, sources, host: Optional[str] = None, rank: Optional[int] = None,
                 pattern: Optional[str] = None, color: bool = False):
        self.sources = sources
        self.offsets = {s.name: 0 for s in sources}
        self.partial = {s.name: b"" for s in sources}
        self.down: dict[str, str] = {}
        self.host, self.rank = host, rank
        self.pattern = re.compile(pattern) if pattern else None
        self.color = color
        self._hosts_seen: dict[str, str] = {}

    def add(self, sources) -> None:
        """Sources of hosts not merged yet (a spare that a recovered run's next attempt runs on)."""
        for src in sources:
            if src.name not in self.offsets:
                self.sources.append(src)
                self.offsets[src.name], self.partial[src.name] = 0, b""

    def poll(self, final: bool = False) -> list[str]:
        out: list[str] = []
        for src in self.sources:
            try:
                data = src.read(self.offsets[src.name])
            except OSError as e:
                if src.name not in self.down:
                    self.down[src.name] = str(e)
                    print(f"[{src.name}] log unreachable ({e}); will catch up when it is back",
                          file=sys.stderr, flush=True)
                continue
            if src.name in self.down:
                del self.down[src.name]
                print(f"[{src.name}] log reachable again; catching up", file=sys.stderr, flush=True)
            if not data:
                continue
            self.offsets[src.name] += len(data)
            buf = self.partial[src.name] + data
            *lines, rest = buf.split(b"\n")
            self.partial[src.name] = rest
            out.extend(self._keep(l.decode(errors="replace")) for l in lines)
            if final and rest:
                out.append(self._keep(rest.decode(errors="replace")))
                self.partial[src.name] = b""
        return [l for l in out if l is not None]

    def _keep(self, line: str) -> Optional[str]:
        m = _LINE.match(line)
        if self.rank is not None and not (m and m.group("rank") == str(self.rank)):
            return None
        # by the line's own prefix: on SLURM a log file is a task's, not a host's
        if self.host and not (m and m.group("host") == self.host):
            return None
        if self.pattern and not self.pattern.search(line):
            return None
        if self.color and m:
            host = m.group("host")
            c = self._hosts_seen.setdefault(host, _COLORS[len(self._hosts_seen) % len(_COLORS)])
            return f"\x1b[{c}m{line[:m.end()]}\x1b[0m{line[m.end():]}"
        return line


def follow_run(run: Run, be, follow: bool = False, host: Optional[str] = None, rank: Optional[int] = None,
               pattern: Optional[str] = None, interval_s: float = 0.25, out=None) -> int:
    """Print the run's merged logs (``be``: the run's backend, cluster.backends.backend_for); with
    ``follow``, keep going until the run ends."""
    out = out or sys.stdout
    color = out.isatty() and os.environ.get("NO_COLOR") is None
    merger = Merger(list(be.log_sources(run)), host, rank, pattern, color)
    last_status = 0.0
    hosts = _sources_key(run)
    while True:
        lines = merger.poll()
        if lines:
            out.write("\n".join(lines) + "\n")
            out.flush()
        if not follow:
            break
        if time.time() - last_status > 2.0:
            last_status = time.time()
            state, _ = be.status(run)
            if _sources_key(run) != hosts:      # a recovered run's next attempt: on a spare, or a new job
                hosts = _sources_key(run)
                merger.add(be.log_sources(run))
            if state.is_terminal():
                tail = merger.poll(final=True)
                if tail:
                    out.write("\n".join(tail) + "\n")
                print(f"-- run {run.id} {state.value}", file=sys.stderr, flush=True)
                from cluster.run.checkpoints import describe_checkpoint_sync, wait_checkpoint_sync
                cs = wait_checkpoint_sync(run, progress=_say)
                if cs:
                    _say("-- " + describe_checkpoint_sync(cs))
                return 0 if state.value == "SUCCEEDED" else 1
        if not lines:
            time.sleep(interval_s)
    return 0


def _sources_key(run: Run) -> tuple:
    """What the run's log sources follow from: its hosts, and its handle (SLURM's job ids)."""
    return [n.get("host") for n in (run.data.get("plan") or {}).get("nodes") or []], run.data.get("handle")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
