import json
import sys
import time

from cluster.run.diagnose import STOPPED_STATES, render_failure, saved_watch, scaling_for_run
from cluster.errors import UserError
from cluster.run.records import all_runs, resolve
from cluster.backends import backend_for
from cluster.run.checkpoints import checkpoint_sync, describe_checkpoint_sync

HELP = "show runs and their state (one run: every node and rank, with the first failure)"


def add_arguments(p):
    p.add_argument("run", nargs="?", help="run id, prefix or job name (default: a table of all runs)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _age(t):
    if not t:
        return "-"
    s = int(time.time() - t)
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _progress(nodes):
    """(last step, img/s of all ranks over their last logged interval) from the ranks' heartbeats."""
    hbs = [hb for n in nodes for hb in n.heartbeats.values()]
    if not hbs:
        return None, None
    step = min(hb.get("step", 0) for hb in hbs)
    rates = [hb.get("img_s") for hb in hbs if hb.get("img_s")]
    return step, (sum(rates) if rates else None)


def _poll(run):
    try:
        return backend_for(run).status(run)
    except UserError:   # e.g. hosts unreachable: show the recorded state
        return run.state, []


def run(args):
    if args.run:
        return _one(resolve(args.run), args.json)
    runs = all_runs()
    if not runs:
        print("no runs yet (start one: make submit JOB=resnet50)")
        return 0
    # IMG/S NOW: all ranks, each over its last logged interval (a run's mean is in its summary line)
    rows = [("RUN", "STATE", "BACKEND", "NODES", "STEP", "IMG/S NOW", "AGE")]
    out, damaged = [], []
    for r in runs:
        if r.damaged:          # named below; the other runs go on
            damaged.append(r.damaged)
            rows.append((r.id, "DAMAGED", "?", "?", "-", "-", "-"))
            out.append({"id": r.id, "state": "UNKNOWN", "damaged": r.damaged.message})
            continue
        state, nodes = _poll(r)
        step, rate = _progress(nodes)
        total = max((hb.get("steps_total") or 0 for n in nodes for hb in n.heartbeats.values()), default=0)
        rows.append((r.id, state.value, r.data.get("backend", "?"), str(len(r.data["plan"]["nodes"])),
                     "-" if step is None else (f"{step}/{total}" if total else str(step)),
                     "-" if rate is None else f"{rate:.1f}", _age(r.data.get("created"))))
        out.append({"id": r.id, "state": state.value, "step": step, "img_s": rate})
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for e in damaged:
        print(e.render().replace("error: ", "damaged: ", 1), file=sys.stderr)
    return 0


def _one(r, as_json):
    if r.damaged:
        raise r.damaged
    state, nodes = _poll(r)
    watch = saved_watch(r) if not r.data.get("final") or state.value == "HUNG" else None
    scaling = scaling_for_run(r, [o for o in all_runs() if not o.damaged]) if state.value == "SUCCEEDED" else None
    ckpts = checkpoint_sync(r)
    if as_json:
        print(json.dumps({"id": r.id, "state": state.value, "failure": r.data.get("failure"),
                          "watch": watch, "scaling": scaling and scaling.to_dict(), "checkpoints": ckpts,
                          "attempt": r.data.get("attempt", 1), "attempts": r.data.get("attempts", []),
                          "quarantined": r.data.get("quarantined", []),
                          "excluded_nodes": r.data.get("excluded_nodes", []),
                          "nodes": [n.__dict__ | {"state": n.state.value} for n in nodes]}, indent=1, default=str))
        return 0
    progress = {p["rank"]: p for p in (watch or {}).get("ranks", [])}
    plan = r.data["plan"]
    print(f"run {r.id}: {state.value}  (job {r.data['job']['name']}, backend {r.data['backend']}, "
          f"world size {plan['world_size']}, rendezvous {plan['rdzv_endpoint']}, age {_age(r.data.get('created'))})")
    from cluster.run.recovery import describe
    for line in describe(r.data):       # automatic recovery: each attempt's cause and the decision
        print("  " + line)
    for e in r.data.get("excluded_nodes") or []:    # SLURM: a node kept out of the job after its node failure
        print("  " + e["text"])
    for n in nodes:
        extra = f" exit {n.exit_code}" if n.exit_code is not None else ""
        print(f"  {n.host:<16} {n.state.value:<10} pid {n.pid}{extra} {n.detail}".rstrip())
        for rank in sorted(n.heartbeats):
            hb, p = n.heartbeats[rank], progress.get(int(rank), {})
            rate = f" {hb['img_s']:.1f} img/s (rank, last interval)" if hb.get("img_s") else ""
            rate += f" {p['rate']:.2f} step/s" if p.get("rate") is not None else ""
            total = f"/{hb['steps_total']}" if hb.get("steps_total") else ""
            flag = {"hung": "  HUNG", "straggler": "  STRAGGLER"}.get(p.get("flag"), "")
            if hb.get("proc") in STOPPED_STATES:
                flag += f"  process stopped (state {hb['proc']})"
            print(f"    rank {rank:<3} step {hb.get('step')}{total}{rate}  heartbeat {_age(hb.get('time'))} ago"
                  + ("  done" if hb.get("done") else "") + flag)
    _, now = _progress(nodes)
    if now is not None and not state.is_terminal():
        print(f"  {now:.1f} img/s now (all ranks, each over its last logged interval)")
    waiting = [p for p in progress.values() if p.get("step") is None and p.get("flag") != "quiet"]
    if waiting:
        print("  no heartbeat yet from rank(s) " + ", ".join(str(p["rank"]) for p in waiting))
    quiet = [p for p in progress.values() if p.get("flag") == "quiet"]
    if quiet:
        print("  rank(s) " + ", ".join(str(p["rank"]) for p in quiet) + " write no heartbeat: judged by their "
              f"output and CPU (last active {max(p['stalled_s'] for p in quiet):.0f}s ago)")
    if watch and watch.get("hung") and state.value == "HUNG":
        print(f"hung: {watch.get('reason')}")
        print("  hint: 'cluster logs RUN --rank R' for a rank behind; the job's stop_on_hang: true stops hung runs")
    elif watch and watch.get("stragglers"):
        print("stragglers: rank(s) " + ", ".join(map(str, watch["stragglers"])) +
              " lag behind the others (see their step and rate above)")
    if ckpts:
        print(describe_checkpoint_sync(ckpts))
    for line in render_failure(r.data.get("failure")):
        print(line)
    if scaling:
        from cluster.run.diagnose import render_findings
        print("\n".join(render_findings([scaling], indent="")))
    return 0
