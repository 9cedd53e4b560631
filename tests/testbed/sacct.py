#!/usr/bin/env python3
"""`sacct` stand-in for the testbed (test scaffolding, standard library only).

The testbed runs SLURM without slurmdbd, so the real `sacct` has nothing to read. This script
answers the subset of `sacct` that submitit and the slurm backend use, from
`scontrol show job -o` (slurmctld keeps finished jobs for MinJobAge, a day in the testbed):

    sacct -o JobID,State,NodeList --parsable2 -j 12 -j 13        (what submitit runs)
    sacct -j 12,13 --format=JobID,State,ExitCode -P -n -X

Output is sacct's: a header line (unless -n/--noheader), one line per job allocation,
fields joined by '|' (-P/--parsable2; -p/--parsable adds a trailing '|'), fixed-width columns
otherwise. Job ids as sacct prints them: `12`, array tasks `12_3`, a pending array's rest
`12_[4-9%2]`. States as sacct prints them (CANCELLED is `CANCELLED by <uid>`). Pending jobs
have NodeList `None assigned`. Unknown job ids are silently left out (like sacct).

Not done: job steps (12.batch, 12.0) are never listed (as with -X); jobs older than MinJobAge
are gone; -S/-E/-u/-a/-L/-M/--noconvert are accepted and ignored.
"""

from __future__ import annotations

import re
import subprocess
import sys

DEFAULT_FORMAT = "JobID,JobName,Partition,Account,AllocCPUS,State,ExitCode"
BRIEF_FORMAT = "JobID,State,ExitCode"

# sacct field -> function(job dict) -> str
def _first(v: str) -> str:
    return v.split("-")[0] if v else v


def _user(v: str) -> str:  # "root(0)" -> "root"
    return v.split("(")[0] if v else v


def _uid(v: str) -> str:  # "root(0)" -> "0"
    m = re.search(r"\((\d+)\)", v or "")
    return m.group(1) if m else ""


def _time(v: str) -> str:
    return "Unknown" if v in ("", "(null)", "None") else v


def _nodes(v: str) -> str:
    return "None assigned" if v in ("", "(null)") else v


FIELDS = {
    "jobid": lambda j: job_id(j),
    "jobidraw": lambda j: j.get("JobId", ""),
    "jobname": lambda j: j.get("JobName", ""),
    "state": lambda j: state(j),
    "exitcode": lambda j: j.get("ExitCode", ""),
    "derivedexitcode": lambda j: j.get("DerivedExitCode", ""),
    "nodelist": lambda j: _nodes(j.get("NodeList", "")),
    "nnodes": lambda j: _first(j.get("NumNodes", "")),
    "ncpus": lambda j: _first(j.get("NumCPUs", "")),
    "alloccpus": lambda j: _first(j.get("NumCPUs", "")),
    "ntasks": lambda j: j.get("NumTasks", ""),
    "partition": lambda j: j.get("Partition", ""),
    "account": lambda j: "" if j.get("Account") == "(null)" else j.get("Account", ""),
    "qos": lambda j: j.get("QOS", ""),
    "user": lambda j: _user(j.get("UserId", "")),
    "uid": lambda j: _uid(j.get("UserId", "")),
    "group": lambda j: _user(j.get("GroupId", "")),
    "gid": lambda j: _uid(j.get("GroupId", "")),
    "submit": lambda j: _time(j.get("SubmitTime", "")),
    "eligible": lambda j: _time(j.get("EligibleTime", "")),
    "start": lambda j: _time(j.get("StartTime", "")),
    "end": lambda j: _time(j.get("EndTime", "")),
    "elapsed": lambda j: j.get("RunTime", ""),
    "timelimit": lambda j: j.get("TimeLimit", ""),
    "reason": lambda j: j.get("Reason", ""),
    "priority": lambda j: j.get("Priority", ""),
    "restarts": lambda j: j.get("Restarts", ""),
    "workdir": lambda j: j.get("WorkDir", ""),
    "comment": lambda j: "" if j.get("Comment") == "(null)" else j.get("Comment", ""),
    "reqtres": lambda j: j.get("ReqTRES", ""),
    "alloctres": lambda j: j.get("AllocTRES", ""),
    "reqnodes": lambda j: _first(j.get("NumNodes", "")),
    "allocnodes": lambda j: _first(j.get("NumNodes", "")) if j.get("NodeList", "(null)") != "(null)" else "0",
    "arrayjobid": lambda j: j.get("ArrayJobId", ""),
    "arraytaskid": lambda j: j.get("ArrayTaskId", ""),
}
WIDTH = {"jobid": 12, "jobidraw": 12, "state": 10, "exitcode": 8, "nodelist": 15,
         "submit": 19, "start": 19, "end": 19, "workdir": 20}

# sacct -s/--state abbreviations
STATE_ABBREV = {
    "BF": "BOOT_FAIL", "CA": "CANCELLED", "CD": "COMPLETED", "CF": "CONFIGURING",
    "CG": "COMPLETING", "DL": "DEADLINE", "F": "FAILED", "NF": "NODE_FAIL", "OOM": "OUT_OF_MEMORY",
    "PD": "PENDING", "PR": "PREEMPTED", "R": "RUNNING", "RQ": "REQUEUED", "RS": "RESIZING",
    "RV": "REVOKED", "S": "SUSPENDED", "TO": "TIMEOUT",
}

_KEY_RE = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_scontrol(text: str) -> list[dict]:
    """Parse `scontrol show job -o` output: one job per line, Key=Value tokens."""
    jobs = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("JobId="):
            continue
        marks = list(_KEY_RE.finditer(line))
        job = {}
        for k, m in enumerate(marks):
            end = marks[k + 1].start() if k + 1 < len(marks) else len(line)
            job.setdefault(m.group(1), line[m.end():end].strip())
        jobs.append(job)
    return jobs


def job_id(j: dict) -> str:
    arr, task = j.get("ArrayJobId"), j.get("ArrayTaskId")
    if arr and task not in (None, "", "N/A"):
        if re.fullmatch(r"\d+", task):
            return f"{arr}_{task}"
        throttle = j.get("ArrayTaskThrottle", "0")
        suffix = f"%{throttle}" if "%" not in task and throttle not in ("", "0", "N/A") else ""
        return f"{arr}_[{task}{suffix}]"
    het, off = j.get("HetJobId"), j.get("HetJobOffset")
    if het and off not in (None, "", "N/A"):
        return f"{het}+{off}"
    return j.get("JobId", "")


def state(j: dict) -> str:
    s = j.get("JobState", "UNKNOWN")
    if s == "CANCELLED":
        return f"CANCELLED by {_uid(j.get('UserId', '')) or 0}"
    return s


def _matches(j: dict, wanted: list[str]) -> bool:
    if not wanted:
        return True
    for w in wanted:
        w = w.split(".")[0]  # steps: the job's allocation line
        if "_" in w:
            a, t = w.split("_", 1)
            if j.get("ArrayJobId") == a and (j.get("ArrayTaskId") == t or t.strip("[]") == j.get("ArrayTaskId")):
                return True
        elif w in (j.get("JobId"), j.get("ArrayJobId"), j.get("HetJobId")):
            return True
    return False


def _scontrol_jobs() -> list[dict]:
    p = subprocess.run(["scontrol", "show", "job", "-o"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=60)
    if p.returncode != 0:
        sys.stderr.write("sacct: error: " + (p.stderr.strip() or "scontrol failed") + "\n")
        raise SystemExit(1)
    return parse_scontrol(p.stdout)


def _parse_args(argv: list[str]) -> dict:
    opts = {"format": None, "jobs": [], "header": True, "sep": None, "trailing": False,
            "states": [], "names": []}
    takes_value = {"-S", "--starttime", "-E", "--endtime", "-u", "--user", "--uid", "-M",
                   "--clusters", "-A", "--accounts", "-r", "--partition", "-q", "--qos",
                   "-T", "--truncate", "-g", "--group", "--gid", "-N", "--nodelist"}
    i = 0
    while i < len(argv):
        a = argv[i]
        val = None
        if a.startswith("--") and "=" in a:
            a, val = a.split("=", 1)

        def value():
            nonlocal i
            if val is not None:
                return val
            i += 1
            if i >= len(argv):
                sys.stderr.write(f"sacct: option {a} requires an argument\n")
                raise SystemExit(1)
            return argv[i]

        if a in ("-o", "--format"):
            opts["format"] = value()
        elif a.startswith("-o") and len(a) > 2:
            opts["format"] = a[2:]
        elif a in ("-j", "--jobs"):
            opts["jobs"] += [x for x in value().split(",") if x]
        elif a.startswith("-j") and len(a) > 2:
            opts["jobs"] += [x for x in a[2:].split(",") if x]
        elif a in ("-s", "--state"):
            opts["states"] += [x for x in value().split(",") if x]
        elif a == "--name":
            opts["names"] += [x for x in value().split(",") if x]
        elif a in ("-P", "--parsable2"):
            opts["sep"] = opts["sep"] or "|"
        elif a in ("-p", "--parsable"):
            opts["sep"] = opts["sep"] or "|"
            opts["trailing"] = True
        elif a == "--delimiter":
            opts["sep"] = value()
        elif a in ("-n", "--noheader"):
            opts["header"] = False
        elif a in ("-b", "--brief"):
            opts["format"] = opts["format"] or BRIEF_FORMAT
        elif a in ("-e", "--helpformat"):
            print(" ".join(sorted(k for k in FIELDS)))
            raise SystemExit(0)
        elif a in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        elif a in ("-V", "--version"):
            print("sacct stand-in (ddp testbed)")
            raise SystemExit(0)
        elif a in takes_value:
            value()
        elif a.startswith("-"):
            pass  # -X, -a, -L, -D, --noconvert, -l ...: accepted, ignored
        i += 1
    return opts


def render(jobs: list[dict], opts: dict) -> str:
    fmt = opts["format"] or DEFAULT_FORMAT
    cols = []
    for f in [x.strip() for x in fmt.split(",") if x.strip()]:
        name, _, width = f.partition("%")
        key = name.lower()
        if key not in FIELDS:
            sys.stderr.write(f"sacct: error: Invalid field requested: \"{name}\"\n")
            raise SystemExit(1)
        canonical = name
        cols.append((canonical, key, int(width) if width.isdigit() else WIDTH.get(key, 10)))
    rows = [[FIELDS[k](j) for _, k, _ in cols] for j in jobs]
    out = []
    if opts["sep"] is not None:
        sep, tail = opts["sep"], (opts["sep"] if opts["trailing"] else "")
        if opts["header"]:
            out.append(sep.join(c for c, _, _ in cols) + tail)
        out += [sep.join(r) + tail for r in rows]
    else:
        if opts["header"]:
            out.append(" ".join(f"{c[:w]:>{w}}" for c, _, w in cols))
            out.append(" ".join("-" * w for _, _, w in cols))
        for r in rows:
            out.append(" ".join(f"{v[:w - 1] + '+' if len(v) > w else v:>{w}}"
                                for v, (_, _, w) in zip(r, cols)))
    return "\n".join(out) + ("\n" if out else "")


def select(jobs: list[dict], opts: dict) -> list[dict]:
    wanted_states = {STATE_ABBREV.get(s.upper(), s.upper()) for s in opts["states"]}
    out = []
    for j in jobs:
        if not _matches(j, opts["jobs"]):
            continue
        if wanted_states and j.get("JobState") not in wanted_states:
            continue
        if opts["names"] and j.get("JobName") not in opts["names"]:
            continue
        out.append(j)
    out.sort(key=lambda j: (int(j.get("ArrayJobId") or j.get("JobId") or 0),
                            int(j.get("JobId") or 0)))
    return out


def main(argv: list[str] | None = None) -> int:
    opts = _parse_args(sys.argv[1:] if argv is None else argv)
    jobs = select(_scontrol_jobs(), opts)
    sys.stdout.write(render(jobs, opts))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.exit(0)
