"""SLURM launch: submit -> every rank at step 1, ours against a hand-written sbatch script and plain submitit.

    flock /tmp/ddp-testbed.lock .venv/bin/python bench/bench_slurm_launch.py [--reps 5] [--out DIR] [--trace DIR]

On the cluster in a box's real SLURM (.testbed/, `python -m tests.testbed up`), as root, from this
machine (the login node's view: the shared filesystem, SLURM's clients). The same job each time:
2 nodes x 2 tasks, ``python -m train`` with a two-conv model at 32x32 on CPU, 5 steps, a metrics
record every step. Interleaved (ours, sbatch, submitit, ours, ...), each job waited for to its
end (out of the queue, its nodes idle, SETTLE_S more) before the next, so every one meets the
same idle cluster:

  * ours: ``python -m cluster submit`` in a fresh process (the sbatch --test-only preflight,
    submitit's submit, the sbatch script; per task one interpreter besides the payload);
  * sbatch: a hand-written script, ``sbatch`` of ``srun python -m train ...`` (train reads
    SLURM_PROCID/SLURM_NTASKS itself), MASTER_ADDR/MASTER_PORT set as ours sets them;
  * submitit: a fresh python that submits, with plain ``submitit.SlurmExecutor``, a function
    that runs train in its task's own interpreter (runpy, what a submitit user writes).

Every command runs with Python's bytecode cache on, as a user's Python has it (this box's
PYTHONDONTWRITEBYTECODE=1 is dropped, and the repo compiled once before the first repetition):
without it each process compiles every module it imports from source, which weighs on ours
(the submit command and each task import the project's modules) and not on the script.

Reported: the median and min over the repetitions of the time from the start of the submit
command to the last rank's step-1 metrics record (its own timestamp), of the submit command's
own time, and of SLURM's part: from sbatch's submission to the job's allocation (slurmctld's
log), which no way's launch path takes part in, and the first less the last: what each way's own
path takes. One cluster in a box on 2 shared cores: absolute numbers are this box's.

``--trace DIR``: each job's timeline in DIR/<way>-<rep>.txt (the submit command, SLURM's log lines
of the job, every Python process's start and its torch import, each rank's step 1: every Python
of the job starts with bench/launch_trace/ on its path; ours' task interpreter starts without site,
so only its payload is marked), and the median time between its marks.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = 5
# after a job's end, before the next submission: the end (its nodes freed) starts a scheduling
# pass; a job submitted during it is placed at once, one submitted just after it waits for the next
# pass (about 3 s here). Without a pause the way whose submission comes later (ours: its command
# takes 0.2 s, the script's sbatch 0.01 s) lost that race most of the time (bench/README.md).
SETTLE_S = 4.0
TRAIN = {"model": "train.model:tiny_cnn", "num_classes": 10, "image_size": 32, "batch_size": 8,
         "steps": STEPS, "log_every": 1, "ckpt_every": 0, "val_every": -1, "lr": 0.01}
JOB = "name: benchslurm\nnodes: 2\ncpu_procs_per_node: 2\ntrain:\n" + "".join(f"  {k}: {v}\n" for k, v in TRAIN.items())


def train_args(out_dir: Path) -> list[str]:
    return ["-m", "train", f"out_dir={out_dir}", f"ckpt_dir={out_dir}/ckpt"] + [f"{k}={v}" for k, v in TRAIN.items()]


def step1_time(out_dir: Path, ranks: int = 4) -> float | None:
    """When the last rank wrote its step-1 record (None until every rank has)."""
    times = []
    for r in range(ranks):
        f = out_dir / f"metrics-rank{r}.jsonl"
        try:
            recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        except (OSError, ValueError):
            return None
        t = next((rec["time"] for rec in recs if rec.get("step") == 1 and "time" in rec), None)
        if t is None:
            return None
        times.append(t)
    return max(times)


def allocation_s(log: Path, jid: str) -> float | None:
    """Seconds from sbatch's submission to SLURM's allocation of the job (slurmctld's log, ms
    stamps): SLURM's own part of the time, the same whichever way submitted the job."""
    sub = alloc = None
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(rf"\[(\S+)\] .*JobId={jid}\b", line)
        if m and "submit_batch_job" in line:
            sub = datetime.datetime.fromisoformat(m[1]).timestamp()
        elif m and alloc is None and ("sched: Allocate" in line or "_start_job" in line):
            alloc = datetime.datetime.fromisoformat(m[1]).timestamp()
    return round(alloc - sub, 3) if sub and alloc else None


def wait_job_gone(jid: str, partition: str, timeout: float = 120) -> None:
    """Until the job left the queue and no node of the partition is busy any more: a job
    submitted while the last one's nodes still complete waits for a later scheduling pass
    (seconds here), whichever way submitted it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True, text=True)
        if p.returncode != 0 or not p.stdout.strip():
            nodes = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%T"], capture_output=True, text=True)
            # a node down (another test cut it off) is no busy node: the jobs here need 2 of 3
            if nodes.returncode == 0 and not any(s.startswith(("alloc", "mix", "comp")) for s in nodes.stdout.split()):
                time.sleep(SETTLE_S)
                return
        time.sleep(0.3)
    subprocess.run(["scancel", jid])
    raise RuntimeError(f"job {jid} still queued, or its nodes not idle, after {timeout}s")


def timeline(t0: float, t1: float, jid: str, trace: Path, out: Path, logs: Path) -> list[tuple[float, str]]:
    """One job's way to step 1, in seconds from the submit command's start: the command's end,
    SLURM's log lines of the job (slurmctld, each slurmd: ms stamps), each Python process's start
    and its marked imports (bench/launch_trace/), each rank's step-1 record."""
    events = [(t0, "submit command starts"), (t1, "submit command ends")]
    for log in sorted(logs.glob("slurm*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = re.match(r"\[(\S+)\] (.*)", line)
            if m and re.search(rf"\b{jid}\b", m[2]):
                stamp = datetime.datetime.fromisoformat(m[1]).timestamp()
                if stamp >= t0 - 1:
                    events.append((stamp, f"{log.stem}: {m[2][:150]}"))
    try:
        for line in trace.read_text().splitlines():
            t, host, rank, pid, ppid, what = line.split(" ", 5)
            events.append((float(t), f"{host} rank {rank} pid {pid} (parent {ppid}): {what}"))
    except (OSError, ValueError):
        pass
    for f in sorted(out.glob("metrics-rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("step") == 1 and "time" in rec:
                events.append((rec["time"], f"{f.stem}: step 1"))
    return sorted((t - t0, what) for t, what in events)


# the marks of a timeline (the first event that matches, or the last of the ranks'): (name, pattern, which)
MARKS = [("sbatch accepted", r"_slurm_rpc_submit_batch_job", min),
         ("allocated", r"sched: Allocate|_start_job", min),
         ("srun's tasks launched", r"launch task StepId=\d+\.0 ", min),
         # the payload's interpreter: train (ours, the script) or submitit's task, which runs train in itself
         ("every payload started", r": python \S+ (-\S+ )*-m (train|submitit\.core\._submit)\b", max),
         ("every rank imports torch", r": import torch$", max),
         ("every rank has torch", r": import train\.loop$", max),
         ("every rank at step 1", r": step 1$", max)]


def phases(events: list[tuple[float, str]]) -> dict[str, float]:
    """The time from one mark to the next (seconds), named by the later mark."""
    out, last = {}, 0.0
    for name, pattern, which in MARKS:
        ts = [t for t, what in events if re.search(pattern, what)]
        if not ts:
            return out
        out[name] = round(which(ts) - last, 3)
        last = which(ts)
    return out


# ---------------------------------------------------------------- the three ways
def ours(work: Path, inventory: Path, pythonpath: str) -> tuple[float, float, Path, str]:
    job = work / "job.yaml"
    job.write_text(JOB)
    runs = work / "runs"
    env = {**os.environ, "CLUSTER_RUNS_DIR": str(runs), "PYTHONPATH": pythonpath}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "cluster", "submit", str(job), "-i", str(inventory)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    t1 = time.time()
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    run_id = p.stdout.split()[1]
    jid = json.loads((runs / run_id / "run.json").read_text())["handle"]["job_id"]
    return t0, t1, runs / run_id / "metrics", jid


def by_hand(work: Path, partition: str, pythonpath: str) -> tuple[float, float, Path, str]:
    out = work / "metrics"
    script = work / "job.sbatch"
    script.write_text("\n".join([
        "#!/bin/bash",
        f"#SBATCH --nodes=2 --ntasks-per-node=2 --partition={partition} --time=10",
        f"#SBATCH --output={work}/%j.out --chdir={work}",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000)) OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1",
        f"export PYTHONPATH={shlex.quote(pythonpath)}",
        "srun --kill-on-bad-exit=1 " + shlex.join([sys.executable] + train_args(out)), ""]))
    t0 = time.time()
    p = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    t1 = time.time()
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    return t0, t1, out, p.stdout.strip().split(";")[0]


def plain_submitit(work: Path, partition: str, pythonpath: str) -> tuple[float, float, Path, str]:
    out = work / "metrics"
    t0 = time.time()
    p = subprocess.run([sys.executable, __file__, "submitit-submit", str(work), partition], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": pythonpath}, capture_output=True, text=True, timeout=120)
    t1 = time.time()
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    return t0, t1, out, p.stdout.strip().splitlines()[-1]


def _train_in_process(argv: list[str], env: dict) -> None:
    import runpy
    os.environ.update(env)
    sys.argv = ["train"] + argv[2:]
    runpy.run_module("train", run_name="__main__", alter_sys=True)


def _submitit_submit(work: str, partition: str) -> None:
    import submitit
    ex = submitit.SlurmExecutor(folder=f"{work}/submitit")
    ex.update_parameters(nodes=2, ntasks_per_node=2, partition=partition, time=10,
                         setup=['export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
                                "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000)) OMP_NUM_THREADS=1"])
    job = ex.submit(_train_in_process, train_args(Path(work) / "metrics"), {"PYTHONUNBUFFERED": "1"})
    print(job.job_id)


WAYS = {"ours": None, "sbatch": by_hand, "submitit": plain_submitit}


def main() -> int:
    if sys.argv[1:2] == ["submitit-submit"]:
        _submitit_submit(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, help="write the figures (results.json) here")
    ap.add_argument("--trace", type=Path, help="write each job's timeline here (<way>-<rep>.txt): the submit "
                    "command, SLURM's log lines of the job, every Python process's start and its torch import, "
                    "each rank's step 1")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.testbed import load_state
    st = load_state(REPO)
    if not st:
        print("the cluster in a box is not up: python -m tests.testbed up --nodes 3", file=sys.stderr)
        return 2
    os.environ["PATH"] = f"{st['bin_dir']}{os.pathsep}{os.environ['PATH']}"    # its sacct stand-in
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)     # every way's commands and jobs: a user's Python
    subprocess.run([sys.executable, "-m", "compileall", "-q", "cluster", "train", "bench"], cwd=REPO, check=True)
    import yaml
    inv = yaml.safe_load(Path(st["inventory"]).read_text())
    inv["backend"] = "slurm"
    results: dict[str, list[dict]] = {w: [] for w in WAYS}
    with tempfile.TemporaryDirectory(prefix="bench-slurm-", dir="/tmp") as tmp:   # /tmp: every node sees it
        inventory = Path(tmp, "inventory.yaml")
        inventory.write_text(yaml.safe_dump(inv))
        for rep in range(args.reps):
            for way, fn in WAYS.items():
                work = Path(tmp, f"{way}-{rep}")
                work.mkdir()
                pythonpath = str(REPO)
                if args.trace:      # every Python of this job marks its start (bench/launch_trace/)
                    os.environ["LAUNCH_TRACE"] = str(work / "trace.txt")
                    pythonpath = f"{REPO / 'bench' / 'launch_trace'}{os.pathsep}{REPO}"
                t0, t1, out, jid = (ours(work, inventory, pythonpath) if way == "ours"
                                    else fn(work, st["partition"], pythonpath))
                deadline = time.time() + 120
                while (t := step1_time(out)) is None:
                    if time.time() > deadline:
                        raise RuntimeError(f"{way}: no step 1 from every rank after 120 s ({out})")
                    time.sleep(0.1)
                wait_job_gone(jid, st["partition"])
                alloc = allocation_s(Path(st["state_dir"], "logs", "slurmctld.log"), jid)
                results[way].append({"submit_s": round(t1 - t0, 3), "step1_s": round(t - t0, 3), "job": jid,
                                     "allocation_s": alloc,
                                     "step1_less_queue_s": None if alloc is None else round(t - t0 - alloc, 3)})
                if args.trace:
                    events = timeline(t0, t1, jid, work / "trace.txt", out, Path(st["state_dir"], "logs"))
                    args.trace.mkdir(parents=True, exist_ok=True)
                    (args.trace / f"{way}-{rep}.txt").write_text("".join(f"{t:8.3f}  {w}\n" for t, w in events))
                    results[way][-1]["phases"] = phases(events)
                print(f"rep {rep} {way:<9} submit {t1 - t0:5.2f} s  every rank at step 1 {t - t0:5.2f} s"
                      f"  (SLURM's allocation {alloc} s after sbatch)", flush=True)
    print(f"\n2 nodes x 2 tasks, {STEPS}-step CPU job, {args.reps} interleaved repetitions (median / min, seconds)")
    print(f"{'':<10} {'submit':>14} {'every rank at step 1':>22} {'SLURM allocation':>18} {'step 1 less allocation':>24}")
    summary = {}
    nan = [float("nan")]
    for way, rs in results.items():
        sub, s1 = [r["submit_s"] for r in rs], [r["step1_s"] for r in rs]
        al = [r["allocation_s"] for r in rs if r["allocation_s"] is not None] or nan
        own = [r["step1_less_queue_s"] for r in rs if r["step1_less_queue_s"] is not None] or nan
        summary[way] = {"submit_median_s": statistics.median(sub), "step1_median_s": statistics.median(s1),
                        "step1_min_s": min(s1), "allocation_median_s": statistics.median(al),
                        "step1_less_queue_median_s": statistics.median(own), "runs": rs}
        print(f"{way:<10} {statistics.median(sub):6.2f} / {min(sub):5.2f} {statistics.median(s1):12.2f} / {min(s1):5.2f}"
              f" {statistics.median(al):10.2f} / {min(al):5.2f} {statistics.median(own):14.2f} / {min(own):5.2f}")
    if args.trace:
        print("\nmedian time to each mark from the one before (seconds; --trace)")
        print(f"{'':<10}" + "".join(f" {name:>14.14}" for name, _, _ in MARKS))
        for way, rs in results.items():
            cells = [[r["phases"][n] for r in rs if n in r.get("phases", {})] for n, _, _ in MARKS]
            summary[way]["phase_medians_s"] = {n: statistics.median(c) for (n, _, _), c in zip(MARKS, cells) if c}
            print(f"{way:<10}" + "".join(f" {statistics.median(c):14.3f}" if c else f" {'-':>14}" for c in cells))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
