"""``cluster top [RUN]``: a live view of a run, one row per rank, refreshed every few seconds.

Each refresh is one ``Backend.status`` call with ``with_gpus`` set: the same heartbeat reader as
``status`` (ssh: the status probe over the kept connections, which also runs nvidia-smi on the
host, so one round trip per host; SLURM: the shared run directory plus one ``srun --overlap``
step in the job's allocation; local: files and nvidia-smi here). The hang and straggler watch is
``cluster.run.diagnose``'s, as ``status`` shows it. A run that has ended shows its final state.

Keys: ``s`` sort by the next column, ``r`` reverse, up/down (``j``/``k``) select a rank, Enter
(or ``l``) its log tail and back, ``q`` quits.
"""
from __future__ import annotations

import os
import select
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from cluster.run.diagnose import saved_watch
from cluster.run.records import Run

SORTS = ("rank", "img_s", "step_ms", "data_share", "gpu_util")
SLOW_FACTOR = 1.5        # a rank whose own time per step is this many times the median is waited for


@dataclass
class Row:
    host: str
    rank: int
    step: Optional[int] = None
    steps_total: Optional[int] = None
    img_s: Optional[float] = None
    step_ms: Optional[float] = None
    data_share: Optional[float] = None
    comm_share: Optional[float] = None
    gpu: Optional[dict] = None           # {util, mem_used, mem_total, power}; None: no GPU (or unknown)
    age_s: Optional[float] = None        # since the rank's last heartbeat
    flag: str = ""                       # "", "starting", "done", "hung", "straggler"

    @property
    def gpu_util(self) -> Optional[float]:
        return (self.gpu or {}).get("util")


@dataclass
class Snapshot:
    run_id: str
    state: str
    backend: str
    hosts: int
    rows: list[Row] = field(default_factory=list)
    fetch_s: float = 0.0
    reason: str = ""

    @property
    def live(self) -> list[Row]:
        return [r for r in self.rows if r.step is not None and r.flag != "done"]

    def totals(self) -> dict:
        rows = [r for r in self.rows if r.step is not None]
        step = min((r.step for r in rows), default=None)
        total = max((r.steps_total or 0 for r in rows), default=0) or None
        pace = [r.step_ms for r in self.live if r.step_ms]
        eta = (total - step) * max(pace) / 1000 if pace and step is not None and total else None
        return {"step": step, "steps_total": total, "img_s": sum(r.img_s or 0 for r in self.live) or None,
                "eta_s": eta}


def fetch(run_id: str, be, root=None) -> Snapshot:
    """One refresh, through the run's backend ``be`` (kept between refreshes: its ssh connections stay open)."""
    run = Run(run_id, root)          # read afresh: the watcher and other shells update run.json
    t0 = time.monotonic()
    state, nodes = be.status(run)
    snap = Snapshot(run.id, state.value, run.data.get("backend", "?"), len(nodes), fetch_s=time.monotonic() - t0)
    watch = saved_watch(run) or {}
    flags = {p["rank"]: p.get("flag", "") for p in watch.get("ranks", [])}
    planned = (run.data.get("plan") or {}).get("nodes") or [{}]
    nprocs = planned[0].get("nprocs") or 1        # ranks are node-major: local rank = rank % nprocs = GPU
    now = time.time()
    seen = set()
    for n in nodes:
        for rank in sorted(int(r) for r in n.heartbeats):
            hb = n.heartbeats.get(rank, n.heartbeats.get(str(rank))) or {}
            gpus = n.gpus or []
            snap.rows.append(Row(n.host, rank, hb.get("step"), hb.get("steps_total"), hb.get("img_s"),
                                 hb.get("step_ms"), hb.get("data_share"), hb.get("comm_share"),
                                 gpus[rank % nprocs] if rank % nprocs < len(gpus) else None,
                                 max(0.0, now - hb["time"]) if hb.get("time") else None,
                                 "done" if hb.get("done") else flags.get(rank, "")))
            seen.add(rank)
    for rank, flag in flags.items():         # ranks without a heartbeat yet
        if rank not in seen and not state.is_terminal():
            snap.rows.append(Row("?", rank, flag=flag or "starting"))
    for rank in waited_for(snap.rows):
        for r in snap.rows:
            if r.rank == rank and r.flag == "":
                r.flag = "straggler"
    if watch.get("hung") and state.value == "HUNG":
        snap.reason = "hung: " + watch.get("reason", "")
    elif any(r.flag == "straggler" for r in snap.rows):
        snap.reason = "stragglers: the highlighted ranks hold the others back"
    return snap


def waited_for(rows: list[Row]) -> list[int]:
    """Ranks the others wait for. Under DDP every rank runs at the pace of the slowest, so steps and
    rates agree (the watch's lag test cannot see it); what differs is where the time goes: the slow
    rank computes or waits for its data while its peers wait in the all-reduce. Its own time per
    step (without that wait; without its data wait where communication is not measured, on GPU)
    stands out from the median."""
    live = [r for r in rows if r.step_ms and r.flag not in ("done", "hung")]
    own = {r.rank: r.step_ms * (1 - r.comm_share) for r in live if r.comm_share is not None}
    if len(own) < 2:
        own = {r.rank: r.step_ms * (r.data_share or 0.0) for r in live if r.data_share is not None}
    if len(own) < 2:
        return []
    med = statistics.median(own.values())
    return [rank for rank, ms in own.items() if ms > SLOW_FACTOR * med and ms - med > 5.0]


# ---------------------------------------------------------------- drawing (rich)
STYLES = {"hung": "bold white on red", "straggler": "bold black on yellow", "done": "dim", "starting": "dim"}


def _num(v, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale if scale != 1.0 else v, fmt)


def _duration(s: Optional[float]) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render(snap: Snapshot, sort: str = "rank", reverse: bool = False, selected: Optional[int] = None):
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    t = snap.totals()
    step = "-" if t["step"] is None else f"{t['step']}" + (f"/{t['steps_total']}" if t["steps_total"] else "")
    head = Text.assemble((f"run {snap.run_id}  ", "bold"), (snap.state, "bold red" if snap.state in ("HUNG", "FAILED")
                                                                else "bold green"),
                         f"  {snap.backend}, {snap.hosts} host(s), {len(snap.rows)} rank(s)")
    totals = Text(f"step {step}   {_num(t['img_s'], ',.1f')} img/s in all   ETA {_duration(t['eta_s'])}"
                  f"   refreshed in {snap.fetch_s:.2f} s")
    table = Table(box=box.SIMPLE_HEAD, expand=False, header_style="bold", pad_edge=False)
    for col, just in (("HOST", "left"), ("RANK", "right"), ("STEP", "right"), ("IMG/S", "right"),
                      ("STEP MS", "right"), ("DATA %", "right"), ("COMM %", "right"), ("GPU %", "right"),
                      ("MEM GiB", "right"), ("POWER W", "right"), ("BEAT", "right"), ("", "left")):
        table.add_column(col, justify=just, no_wrap=True)
    key = {"rank": lambda r: r.rank}.get(sort) or (lambda r: (getattr(r, sort) is None, getattr(r, sort) or 0))
    for r in sorted(snap.rows, key=key, reverse=reverse):
        g = r.gpu or {}
        mem = "-" if g.get("mem_used") is None else f"{g['mem_used'] / 1024:.1f}/{(g.get('mem_total') or 0) / 1024:.0f}"
        style = STYLES.get(r.flag, "")
        if r.rank == selected:
            style = (style + " reverse").strip()
        table.add_row(r.host, str(r.rank), _num(r.step, "d"), _num(r.img_s, ",.1f"), _num(r.step_ms, ".1f"),
                      _num(r.data_share, ".0f", 100), _num(r.comm_share, ".0f", 100), _num(g.get("util"), ".0f"),
                      mem, _num(g.get("power"), ".0f"), _duration(r.age_s), r.flag.upper(), style=style)
    foot = Text(f"sort: {sort}{' (reversed)' if reverse else ''}   s sort  r reverse  up/down select  "
                "enter log tail  q quit", style="dim")
    parts = [head, totals] + ([Text(snap.reason, style="bold yellow")] if snap.reason else []) + [table, foot]
    return Group(*parts)


def render_log(host: str, rank: int, lines: list[str], height: int):
    from rich.console import Group
    from rich.text import Text
    body = [Text(l, no_wrap=True, overflow="ellipsis") for l in lines[-max(1, height - 3):]] or [Text("(no lines)")]
    return Group(Text(f"log of rank {rank} on {host} (last lines)   enter/esc: back   q: quit", style="bold"),
                 *body)


# ---------------------------------------------------------------- the loop
KEYS = {b"\x1b[A": "up", b"\x1bOA": "up", b"k": "up", b"\x1b[B": "down", b"\x1bOB": "down", b"j": "down",
        b"\r": "enter", b"\n": "enter", b"l": "enter", b"\x1b": "back", b"q": "quit", b"Q": "quit",
        b"s": "sort", b"r": "reverse", b"\x03": "quit"}


def _keys(fd: int, timeout_s: float) -> Optional[list[str]]:
    """The keys typed within ``timeout_s`` (None: none); one read may hold several ("j" then Enter)."""
    ready, _, _ = select.select([fd], [], [], max(0.0, timeout_s))
    if not ready:
        return None
    data = os.read(fd, 64)
    if not data:
        return ["quit"]      # the terminal is gone
    out = []
    while data:
        seq = next((k for k in sorted(KEYS, key=len, reverse=True) if data.startswith(k)), data[:1])
        out.append(KEYS.get(seq, "other"))
        data = data[len(seq):]
    return out


def top(run_id: str, be, interval_s: float = 3.0, once: bool = False) -> int:
    from rich.console import Console
    snap = fetch(run_id, be)
    console = Console() if sys.stdout.isatty() else Console(width=150)
    if once or not sys.stdin.isatty():
        console.print(render(snap))
        return 0
    import termios
    import tty
    from rich.live import Live
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    sort, reverse, selected, log_of = "rank", False, None, None
    next_at = time.monotonic() + interval_s
    try:
        tty.setcbreak(fd)
        with Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                if log_of is None:
                    live.update(render(snap, sort, reverse, selected), refresh=True)
                elif (row := next((r for r in snap.rows if r.rank == log_of), None)) is None:
                    log_of = None
                    continue
                else:
                    lines = [l for l in be.log_tail(Run(run_id), row.host, 400)
                             if l.startswith(f"[{row.host} {row.rank}]")]
                    live.update(render_log(row.host, row.rank, lines, console.size.height), refresh=True)
                keys = _keys(fd, next_at - time.monotonic())
                if keys is None:
                    snap = fetch(run_id, be)
                    next_at = time.monotonic() + interval_s
                    continue
                for key in keys:
                    if key == "quit":
                        return 0
                    sort, reverse, selected, log_of = _on_key(key, snap, sort, reverse, selected, log_of)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        close = getattr(be, "close", None)
        if close:
            close()


def _on_key(key: str, snap: Snapshot, sort: str, reverse: bool, selected: Optional[int], log_of: Optional[int]):
    """The view's next (sort, reverse, selected rank, rank whose log is shown) after ``key``."""
    if log_of is not None:
        return sort, reverse, selected, (None if key in ("enter", "back") else log_of)
    if key == "sort":
        sort = SORTS[(SORTS.index(sort) + 1) % len(SORTS)]
    elif key == "reverse":
        reverse = not reverse
    elif key in ("up", "down") and snap.rows:
        ranks = [r.rank for r in sorted(snap.rows, key=lambda r: r.rank)]
        i = ranks.index(selected) if selected in ranks else -1
        selected = ranks[max(0, min(len(ranks) - 1, i + (1 if key == "down" else -1)))]
    elif key == "enter" and selected is not None and any(r.rank == selected for r in snap.rows):
        log_of = selected
    return sort, reverse, selected, log_of


def bench(run_id: str, be, refreshes: int) -> int:
    """What one refresh costs: ``refreshes`` fetches over the same connections (the first connects)."""
    snap = fetch(run_id, be)
    times = []
    for _ in range(refreshes):
        snap = fetch(run_id, be)
        times.append(snap.fetch_s)
    print(f"{refreshes} refreshes of run {run_id} ({snap.backend}, {snap.hosts} host(s), {len(snap.rows)} rank(s), "
          f"state {snap.state}): median {statistics.median(times):.3f} s, max {max(times):.3f} s per refresh")
    return 0
