"""Failure diagnosis: known failures matched in the logs, and hangs/stragglers from the heartbeats.

The known failures are data (cluster/run/failures.yaml): each has regular expressions, a cause and a
remedy in plain words. ``diagnose(lines)`` matches one log; ``diagnose_hosts`` matches every
host's log, the failing host first, and compares versions across hosts.

``watch(...)`` reads the ranks' heartbeats (runs/<id>/metrics/heartbeat-rank<R>.json: step, time,
done) and says which ranks progress, at what rate, which lag behind (stragglers) and which made
no progress for ``hang_timeout_s`` (a hang). What it must remember between two ``status`` calls
(the previous heartbeat of each rank, for the rate) lives in runs/<id>/progress.json.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Optional

import yaml

FAILURES = Path(__file__).with_name("failures.yaml")
_PREFIX = re.compile(r"^\[(?P<host>[^\] ]+) (?P<rank>\d+|agent)\] ")
_RANK_TAG = re.compile(r"\[rank(\d+)\]")
_MAX_LINE = 400                       # characters of a matched line kept in run.json
_KEYS = {"id", "title", "match", "compare", "check", "cause", "remedy", "restart"}

# stragglers: a rank this many steps behind the leader (after allowing for heartbeats written at
# different moments), or progressing at less than this fraction of the median rate
# findings that a rank's death causes in its peers (failures.yaml ids): symptoms, never the cause
PEER_SYMPTOMS = frozenset({"nccl-network", "collective-timeout"})
STRAGGLER_STEPS = 50
STRAGGLER_FRACTION = 0.5


# ---------------------------------------------------------------- known failures (logs)
@dataclass(frozen=True)
class Pattern:
    id: str
    title: str
    cause: str
    remedy: str
    match: Optional[re.Pattern] = None
    compare: Optional[re.Pattern] = None
    check: Optional[str] = None
    restart: Optional[str] = None   # yes | no | after-progress (cluster/run/recovery.py)


@dataclass(frozen=True)
class Finding:
    """One known failure found: which, why, what to do, and the log line that shows it."""

    pattern_id: str
    title: str
    cause: str
    remedy: str
    line: str
    host: Optional[str] = None
    rank: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=4)
def patterns(path: Path = FAILURES) -> tuple[Pattern, ...]:
    """The known failures of ``path`` (failures.yaml), validated; a bad entry is a ValueError."""
    entries = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of failures")
    out, seen = [], set()
    for i, e in enumerate(entries):
        where = f"{path}: entry {i} ({e.get('id', '?') if isinstance(e, dict) else e!r})"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected a mapping")
        unknown = set(e) - _KEYS
        missing = {"id", "title", "cause", "remedy"} - set(e)
        if unknown or missing:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
        if e["id"] in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(e["id"])
        if not (e.get("match") or e.get("compare") or e.get("check")):
            raise ValueError(f"{where}: needs match, compare or check")
        match = e.get("match") or []
        if not isinstance(match, list) or not all(isinstance(m, str) and m for m in match):
            raise ValueError(f"{where}: match must be a list of regular expressions")
        try:
            rx = re.compile("|".join(f"(?:{m})" for m in match)) if match else None
            cmp = re.compile(e["compare"]) if e.get("compare") else None
        except re.error as err:
            raise ValueError(f"{where}: bad regular expression: {err}") from None
        if cmp is not None and cmp.groups != 1:
            raise ValueError(f"{where}: compare needs exactly one group")
        if e.get("restart") not in (None, "yes", "no", "after-progress"):
            raise ValueError(f"{where}: restart must be yes, no or after-progress")
        out.append(Pattern(e["id"], e["title"], " ".join(e["cause"].split()),
                           " ".join(e["remedy"].split()), rx, cmp, e.get("check"), e.get("restart")))
    return tuple(out)


def pattern(pattern_id: str) -> Pattern:
    for p in patterns():
        if p.id == pattern_id:
            return p
    raise KeyError(pattern_id)


def _where(line: str) -> tuple[Optional[str], Optional[int], str]:
    """(host, rank, text) of a node-log line '[host rank] text' (rank None for agent lines)."""
    m = _PREFIX.match(line)
    host = m.group("host") if m else None
    text = line[m.end():] if m else line
    rank = int(m.group("rank")) if m and m.group("rank").isdigit() else None
    if rank is None:
        t = _RANK_TAG.search(text)
        rank = int(t.group(1)) if t else None
    return host, rank, text


def _finding(p: Pattern, line: str, host=None, rank=None) -> Finding:
    line = line.rstrip()
    if len(line) > _MAX_LINE:
        line = line[:_MAX_LINE] + " ..."
    return Finding(p.id, p.title, p.cause, p.remedy, line, host, rank)


def diagnose(lines: Iterable[str], rank: Optional[int] = None) -> list[Finding]:
    """Known failures in ``lines`` (one log), in the order of failures.yaml, one per failure,
    each with the first line that matched (the first of ``rank``'s own lines, if it has one)."""
    parsed = [(line, *_where(line)) for line in lines]
    found = []
    for p in patterns():
        if p.match is None:
            continue
        hits = [(line, h, r) for line, h, r, text in parsed if p.match.search(text)]
        if hits:
            line, h, r = next((hit for hit in hits if rank is not None and hit[2] == rank), hits[0])
            found.append(_finding(p, line, h, r))
    return found


def diagnose_hosts(logs: Mapping[str, list[str]], first: Optional[str] = None,
                   rank: Optional[int] = None) -> list[Finding]:
    """Known failures across hosts: ``first`` (the failing host) is searched first, so its lines
    are the ones shown; versions named by a ``compare`` expression must agree across hosts.
    Findings on the failing ``rank`` come first (its error is the root cause; the others' are
    often what its death did to them), then the order of failures.yaml."""
    order = sorted(logs, key=lambda h: (h != first,))
    by_id: dict[str, Finding] = {}
    for host in order:
        for f in diagnose(logs[host], rank if host == first else None):
            if f.pattern_id not in by_id:
                by_id[f.pattern_id] = f if f.host else Finding(**{**f.to_dict(), "host": host})
    for p in patterns():
        if p.compare is None or p.id in by_id:
            continue
        seen: dict[str, str] = {}
        for host in order:
            for line in logs[host]:
                m = p.compare.search(_where(line)[2])
                if m:
                    seen.setdefault(host, m.group(1))
                    break
        if len(set(seen.values())) > 1:
            detail = ", ".join(f"{h}: {v}" for h, v in seen.items())
            by_id[p.id] = _finding(p, f"differs across hosts: {detail}")
    order_of = {p.id: i for i, p in enumerate(patterns())}
    return sorted(by_id.values(), key=lambda f: (rank is None or f.rank != rank or f.host != first,
                                                 order_of[f.pattern_id]))


def findings_of(failure: Optional[Mapping]) -> list[Finding]:
    """The findings recorded in a run's ``failure`` (run.json), or found now in what it kept
    (its log tail, its error text) for runs recorded before diagnosis existed."""
    if not failure:
        return []
    if failure.get("findings") is not None:
        return [Finding(**f) for f in failure["findings"]]
    lines = list(failure.get("log_tail") or []) + str(failure.get("error") or "").splitlines()
    return diagnose(lines)


def scaling_finding(img_s: float, world_size: int, base_img_s: float, base_world_size: int,
                    base_run: str = "") -> Optional[Finding]:
    """The 'multi-GPU slower than one GPU' check: a run on more ranks with less total img/s than
    a run of the same job on fewer ranks."""
    p = next((p for p in patterns() if p.check == "scaling"), None)
    if p is None or world_size <= base_world_size or img_s >= base_img_s:
        return None
    ref = f" ({base_run})" if base_run else ""
    return _finding(p, f"{world_size} ranks: {img_s:.0f} img/s in total; {base_world_size} rank(s){ref}: "
                       f"{base_img_s:.0f} img/s")


_PEER_ADDR = re.compile(r"(?:closed|reset) by peer \[?([0-9A-Fa-f:.]+?)\]?:\d+")


def out_of_step_finding(tail: Iterable[str], first_host: Optional[str], rank: Optional[int],
                        nodes, address_of: Mapping[str, str], peer_errors) -> Optional[Finding]:
    """The failing rank's peer (named by address in "Connection closed by peer [ADDR]:PORT") is a
    node that did not fail by itself and whose log shows no error: the ranks were out of step.
    ``nodes``: NodeStatus-like; ``address_of``: host -> address; ``peer_errors(host)``: the known
    failures found in that host's log (a peer's death included: then it was a victim too)."""
    p = next((p for p in patterns() if p.check == "out-of-step"), None)
    m = next((m for m in map(_PEER_ADDR.search, reversed(list(tail))) if m), None)
    if p is None or m is None:
        return None
    host = next((h for h, a in address_of.items() if a == m.group(1)), None)
    node = next((n for n in nodes if n.host == host), None)
    if node is None or host == first_host or node.exit_code not in (0, None) and "gang" not in node.detail \
            or peer_errors(host):
        return None
    how = "had finished (exit code 0)" if node.exit_code == 0 else "showed no error (stopped by the gang)"
    who = f"{first_host}" + (f" rank {rank}" if rank is not None else "")
    return _finding(p, f"{who} lost its connection to {host} ({m.group(1)}), whose ranks {how}", host=host)


def run_throughput(run) -> Optional[float]:
    """Median total img/s of a train run, from rank 0's metrics (runs/<id>/metrics), if kept here."""
    try:
        text = (run.dir / "metrics" / "metrics-rank0.jsonl").read_text()
    except OSError:
        return None
    vals = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind", "train") == "train" and isinstance(rec.get("img_s_total"), (int, float)):
            vals.append(float(rec["img_s_total"]))
    vals = vals[1:] or vals          # the first interval holds start-up (compile, warm caches)
    return statistics.median(vals) if vals else None


def scaling_for_run(run, runs) -> Optional[Finding]:
    """Compare a finished train run with the latest finished run of the same job and training
    settings on fewer ranks: more GPUs and less throughput is the 'multi-GPU slower' failure."""
    def key(r):
        job = (r.data.get("job") or {}).get("resolved") or {}
        train = dict(job.get("train") or {})
        for k in ("out_dir", "ckpt_dir", "steps", "epochs", "resume", "log_every", "ckpt_every", "val_every"):
            train.pop(k, None)
        return job.get("name"), json.dumps(train, sort_keys=True)

    world = (run.data.get("plan") or {}).get("world_size") or 0
    if world < 2 or not ((run.data.get("job") or {}).get("resolved") or {}).get("train"):
        return None
    mine = run_throughput(run)
    if mine is None:
        return None
    for other in reversed(list(runs)):
        ow = (other.data.get("plan") or {}).get("world_size") or 0
        if other.id == run.id or other.data.get("state") != "SUCCEEDED" or not 0 < ow < world \
                or key(other) != key(run):
            continue
        base = run_throughput(other)
        if base is not None:
            return scaling_finding(mine, world, base, ow, other.id)
    return None


def render_findings(findings: list[Finding], indent: str = "  ") -> list[str]:
    out = []
    for f in findings:
        where = f" on {f.host}" + (f" rank {f.rank}" if f.rank is not None else "") if f.host else ""
        out.append(f"{indent}known failure [{f.pattern_id}]: {f.title}{where}")
        out.append(f"{indent}  log:    {f.line}")
        out.append(f"{indent}  cause:  {f.cause}")
        out.append(f"{indent}  remedy: {f.remedy}")
    return out


def render_failure(failure: Optional[Mapping], tail: int = 15) -> list[str]:
    """What status and logs print for a failed run: first failing host/rank, log tail, findings."""
    if not failure:
        return []
    head = "first failure:"
    if failure.get("host"):
        head += f" host {failure['host']}"
    if failure.get("rank") is not None:
        head += f" rank {failure['rank']}"
    if failure.get("exit_code") is not None:
        head += f" exit code {failure['exit_code']}"
    if failure.get("error"):
        head += f" ({failure['error']})"
    out = [head]
    for a in failure.get("attempts") or []:     # automatic recovery (cluster/run/recovery.py)
        out.append(f"  attempt {a['attempt']}: {a['cause']}")
    if failure.get("recovery") and not failure["recovery"].get("restart"):
        out.append(f"  not restarted: {failure['recovery']['reason']}")
    out += ["  | " + line for line in (failure.get("log_tail") or [])[-tail:]] if tail else []
    findings = findings_of(failure)
    if failure.get("hint"):
        out.append(f"  hint: {failure['hint']}")
    elif findings:
        out += render_findings(findings)
    else:
        out.append("  no known failure matched the log; see 'cluster logs RUN' for the whole log")
    return out


# ---------------------------------------------------------------- hangs and stragglers (heartbeats)
@dataclass(frozen=True)
class RankProgress:
    rank: int
    host: Optional[str]
    step: Optional[int]            # None: no heartbeat yet
    steps_total: Optional[int]
    rate: Optional[float]          # steps/s between the last two heartbeats seen with new steps
    img_s: Optional[float]
    stalled_s: Optional[float]     # since the rank's last heartbeat (its clock) or since start
    done: bool
    flag: str = ""                 # "", "starting", "hung", "straggler", "done"
    proc: Optional[str] = None     # the rank's process state where status could read it (T: stopped)


@dataclass
class Watch:
    ranks: list[RankProgress]
    hung: list[int] = field(default_factory=list)        # ranks without progress for too long
    behind: list[int] = field(default_factory=list)      # of those (or of all), the ones behind
    stragglers: list[int] = field(default_factory=list)
    reason: str = ""
    memo: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"hung": self.hung, "behind": self.behind, "stragglers": self.stragglers,
                "reason": self.reason, "ranks": [asdict(r) for r in self.ranks]}


STOPPED_STATES = ("T", "t")      # /proc/<pid>/stat: stopped by a signal, stopped by a tracer


def watch(heartbeats: Mapping[int, Mapping], memo: Optional[dict] = None, *, now: Optional[float] = None,
          started: Optional[float] = None, world_size: Optional[int] = None, hang_timeout_s: float = 300,
          startup_timeout_s: float = 900, straggler_steps: int = STRAGGLER_STEPS,
          straggler_fraction: float = STRAGGLER_FRACTION,
          activity: Optional[Mapping[int, Optional[float]]] = None) -> Watch:
    """Progress of every rank from its heartbeat; a pure function of its arguments.

    ``memo`` is what the previous call returned in ``Watch.memo`` (empty the first time);
    ``started`` is when the ranks were started (default: the first call).
    A rank hangs when its heartbeat is older than ``hang_timeout_s``. While it may still be
    starting up -- no heartbeat yet, or still at the first step seen of it with a heartbeat
    written within ``startup_timeout_s`` of the start (the first step compiles, warms caches) --
    the limit is ``startup_timeout_s`` instead. A rank that is done never hangs.

    ``activity`` (rank -> when its node last showed life: its log grew or its ranks used CPU;
    None: not known) judges the ranks without a heartbeat, as a script need not write any: such
    a rank hangs only after ``hang_timeout_s`` without output and CPU, never for lack of the file.
    Without ``activity`` at all, a rank without a heartbeat hangs after ``startup_timeout_s``.
    """
    now = time.time() if now is None else now
    memo = json.loads(json.dumps(memo or {}))          # a copy, JSON-shaped
    since = memo.setdefault("since", now) if started is None else started
    seen: dict = memo.setdefault("ranks", {})
    ranks = sorted(set(heartbeats) | set(range(world_size or 0)))
    out: list[RankProgress] = []
    hung: list[int] = []
    for r in ranks:
        hb = heartbeats.get(r)
        if not hb or not isinstance(hb.get("step"), int):
            stalled = now - since
            flag = "hung" if stalled > startup_timeout_s else "starting"
            if activity is not None:        # judged by output and CPU (see above)
                seen_at = activity.get(r)
                stalled = now - max(seen_at, since) if seen_at is not None else 0.0
                flag = "hung" if seen_at is not None and stalled > hang_timeout_s else "quiet"
            out.append(RankProgress(r, None, None, None, None, None, round(stalled, 1), False, flag))
            if flag == "hung":
                hung.append(r)
            continue
        step, t = hb["step"], float(hb.get("time") or now)
        m = seen.setdefault(str(r), {"first": step, "last": [step, t]})
        if step < m["last"][0]:
            # a new attempt (a requeue, a restart) resumed from an earlier checkpoint: its rate
            # starts over, from this attempt's heartbeats alone (never a negative rate)
            m.clear()
            m.update(first=step, last=[step, t])
        if t > m["last"][1] and step != m["last"][0]:
            m["prev"], m["last"] = m["last"], [step, t]
        m["first"] = min(m["first"], step)
        rate = None
        if m.get("prev") and m["last"][1] > m["prev"][1]:
            rate = (m["last"][0] - m["prev"][0]) / (m["last"][1] - m["prev"][1])
        stalled = max(0.0, now - t)
        done = bool(hb.get("done"))
        starting = step == m["first"] and t - since < startup_timeout_s
        limit = max(hang_timeout_s, startup_timeout_s) if starting else hang_timeout_s
        flag = "done" if done else ("hung" if stalled > limit else "")
        if flag == "hung":
            hung.append(r)
        out.append(RankProgress(r, hb.get("host"), step, hb.get("steps_total"),
                                None if rate is None else round(rate, 3), hb.get("img_s"),
                                round(stalled, 1), done, flag, hb.get("proc")))
    w = Watch(out, hung=hung, memo=memo)
    live = [p for p in out if p.step is not None and not p.done]
    if hung:
        steps = [p.step for p in live]
        low = min(steps) if steps else None
        # a rank whose process is stopped (SIGSTOP, Ctrl-Z, a debugger) holds every other rank in
        # the next collective at the same step: its process state names it, the steps cannot
        stopped = [p.rank for p in live if p.rank in hung and p.proc in STOPPED_STATES]
        w.behind = stopped or [p.rank for p in out if p.step is None and p.flag == "hung"] or \
                   ([p.rank for p in live if p.step == low] if steps and low < max(steps) else list(hung))
        parts = []
        for p in out:
            if p.rank in w.behind:
                parts.append(f"rank {p.rank}" + (f" ({p.host})" if p.host else "") +
                             (f" is stopped (process state {p.proc}: SIGSTOP, Ctrl-Z or a debugger)"
                              if p.rank in stopped else "") +
                             (f" at step {p.step}, no progress for {p.stalled_s:.0f}s" if p.step is not None
                              else f" has not sent a heartbeat in {p.stalled_s:.0f}s" if activity is None
                              else f" no output and no CPU for {p.stalled_s:.0f}s (no heartbeats)"))
        others = sorted({p.step for p in live if p.rank not in w.behind})
        w.reason = "; ".join(parts) + (
            f" (the others wait for it at step {others[-1]})" if stopped and others else
            f" (others at step {others[-1]})" if others else "")
    else:
        w.stragglers = _stragglers(live, straggler_steps, straggler_fraction)
        w.ranks = [replace(p, flag="straggler") if p.rank in w.stragglers else p for p in out]
    return w


def _stragglers(live: list[RankProgress], lag_steps: int, fraction: float) -> list[int]:
    if len(live) < 2:
        return []
    rates = [p.rate for p in live if p.rate]
    med = statistics.median(rates) if len(rates) >= 2 else None
    lead = max(live, key=lambda p: p.step)
    out = []
    for p in live:
        # heartbeats are written every few seconds: allow for the time between the two
        allowance = (med or 0.0) * max(0.0, p.stalled_s - lead.stalled_s)
        slow = med is not None and p.rate is not None and p.rate < fraction * med
        if lead.step - p.step - allowance > lag_steps or slow:
            out.append(p.rank)
    return out


def watch_run(run, nodes, now: Optional[float] = None) -> Watch:
    """``watch`` for a run: the job's limits, the nodes' heartbeats, the memo in progress.json.

    Records a 'hang' event the first time a hang is seen; keeps the result in progress.json for
    ``status`` to show."""
    job = (run.data.get("job") or {}).get("resolved") or {}
    planned = (run.data.get("plan") or {}).get("nodes") or []
    nproc = (planned[0].get("nprocs") if planned else None) or 0
    heartbeats: dict[int, dict] = {}
    for n in nodes:
        for r, hb in (n.heartbeats or {}).items():
            r = int(r)
            # the node's name in the inventory (its log is kept by it), not the rank's hostname;
            # ranks are node-major (node_rank * nprocs + local_rank), also where a shared
            # filesystem lets every node see every heartbeat
            host = planned[r // nproc].get("host", n.host) if nproc and r // nproc < len(planned) else n.host
            heartbeats[r] = {**hb, "host": host}
    path = run.dir / "progress.json"
    # status, top and the watcher may refresh at once: progress.json is read, updated and written
    # under its own lock (the memo of the ranks' progress is not lost), the event under run.json's
    with run.locked("progress.lock"):
        w, hung_now = _watch_saved(run, path, heartbeats, job, nodes, nproc, now)
    if hung_now:
        run.event("hang", ranks=w.behind, reason=w.reason)
    return w


def _watch_saved(run, path: Path, heartbeats: dict, job: dict, nodes, nproc: int, now: Optional[float]):
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    t = time.time() if now is None else now
    cpu = saved.get("cpu") or {}
    active = node_activity(nodes, cpu, t)
    world = (run.data.get("plan") or {}).get("world_size") or 0
    per_node = nproc or (world // max(1, len(nodes)))
    # ranks are node-major: node i's are i*nproc ... (i+1)*nproc - 1
    activity = {r: active[nodes[r // per_node].host] if per_node and r // per_node < len(nodes) else None
                for r in range(world)}
    w = watch(heartbeats, saved.get("memo"), now=now, started=run.data.get("started") or run.data.get("created"),
              world_size=world or None, hang_timeout_s=job.get("hang_timeout_s", 300),
              startup_timeout_s=job.get("startup_timeout_s", 900), activity=activity)
    _write_json(path, {"memo": w.memo, "watch": w.to_dict(), "cpu": cpu, "time": t})
    return w, bool(w.hung and not (saved.get("watch") or {}).get("hung"))


CPU_ACTIVE_S = 0.5          # CPU seconds (and at least 2% of a core since the last count) = alive


def node_activity(nodes, cpu_memo: dict, now: float) -> dict[str, Optional[float]]:
    """host -> when the node last showed life: its log grew, or its ranks' CPU time rose (by
    CPU_ACTIVE_S and 2% of a core since it last did; updates ``cpu_memo``). None: not known."""
    out: dict[str, Optional[float]] = {}
    for n in nodes:
        a = getattr(n, "activity", None)
        if not a:
            out[n.host] = None
            continue
        t = a.get("output_t") or 0.0
        if a.get("cpu_s") is not None:
            prev = cpu_memo.get(n.host)
            if prev is None or a["cpu_s"] - prev[0] >= max(CPU_ACTIVE_S, 0.02 * (now - prev[1])):
                cpu_memo[n.host] = prev = [a["cpu_s"], now]
            t = max(t, prev[1])
        out[n.host] = t or None
    return out


def saved_watch(run) -> Optional[dict]:
    """The last ``watch`` result of a run (progress.json), for display."""
    try:
        return json.loads((run.dir / "progress.json").read_text()).get("watch")
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass   # a read-only run dir: status still works, only the rate is lost
