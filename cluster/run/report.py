"""``cluster report RUN``: one page per run, as a PNG and an HTML page that embeds it.

From the ranks' metrics records (runs/<id>/metrics, synced from the hosts by the watcher; collected
here first for ssh runs): loss and throughput over the steps per rank, the step-time distribution,
where each rank's time goes (waiting for data, waiting for its peers in DDP's collectives, the
rest computing; train/loop.py's StepTimes), and the run's progress over wall-clock time with its
restarts (a SLURM requeue, a resume) marked. A summary table is printed too.
"""
from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from statistics import mean
from typing import Optional

from cluster.errors import UserError
from cluster.run.records import Run


def read_metrics(directory: Path) -> dict[int, list[dict]]:
    """metrics-rank<R>.jsonl -> {rank: [records]} (torn last lines of a live run are skipped)."""
    out: dict[int, list[dict]] = {}
    for f in sorted(directory.glob("metrics-rank*.jsonl")):
        rank = int(f.stem.rsplit("rank", 1)[1])
        recs = []
        for line in f.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
        out[rank] = recs
    return out


def train_records(recs: list[dict]) -> list[dict]:
    """The train records by step; after a restart the later record of a step is the one that counts."""
    by_step = {r["step"]: r for r in recs if r.get("kind", "train") == "train" and "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def shares(train: list[dict]) -> dict:
    """Mean share of the step time spent waiting for data, for peers (comm; None where not
    measured, on GPU) and computing, over the records after the first (start-up)."""
    steady = [r for r in (train[1:] or train) if r.get("step_ms")]
    if not steady:
        return {"data": None, "comm": None, "compute": None}
    data = mean(min(1.0, r.get("data_ms", 0.0) / r["step_ms"]) for r in steady)
    comm = mean(min(1.0, r["comm_ms"] / r["step_ms"]) for r in steady) if all("comm_ms" in r for r in steady) else None
    return {"data": data, "comm": comm, "compute": max(0.0, 1.0 - data - (comm or 0.0))}


def restarts(metrics: dict[int, list[dict]]) -> list[dict]:
    """Where the run (re)started, from rank 0's "start" records: {time, step, what}. The first
    start counts only when it resumed a checkpoint (a run submitted with --resume)."""
    starts = [r for r in metrics.get(min(metrics), []) if r.get("kind") == "start"] if metrics else []
    out = []
    for i, r in enumerate(starts):
        if i or r.get("step", 0):
            out.append({"time": r.get("time"), "step": r.get("step", 0),
                        "what": f"{'restart' if i else 'resumed'} at step {r.get('step', 0)}"})
    return out


def summarize(metrics: dict[int, list[dict]]) -> list[dict]:
    rows = []
    for rank in sorted(metrics):
        train = train_records(metrics[rank])
        if not train:
            continue
        # the steps train's summary averaged over (mean_from_step: start-up left out), else all but
        # the first interval; time-weighted, so that the ranks' sum is the summary's mean_img_s
        summary = next((r for r in reversed(metrics[rank]) if r.get("kind") == "summary"), {})
        since = summary.get("mean_from_step", train[0]["step"])
        steady, secs = [], []
        for prev, r in zip(train, train[1:]):
            if since <= prev["step"] < r["step"]:       # an interval wholly in the averaged steps
                steady.append(r)
                secs.append(r["step_ms"] * (r["step"] - prev["step"]) / 1000)
        img_s = sum(r["img_s"] * t for r, t in zip(steady, secs)) / sum(secs) if sum(secs) > 0 else \
            mean(r["img_s"] for r in train)
        steady = steady or train
        val = [r for r in metrics[rank] if r.get("kind") == "val"]
        rows.append({"rank": rank, "steps": train[-1]["step"], "img_s": img_s,
                     "step_ms": mean(r["step_ms"] for r in steady),
                     "final_loss": train[-1].get("loss_mean", train[-1].get("loss")),
                     "top1": val[-1]["top1"] if val else None, "top5": val[-1]["top5"] if val else None,
                     **{f"{k}_share": v for k, v in shares(train).items()}})
    return rows


def report(run: Run, be, output: Optional[str] = None) -> int:
    """``be``: the run's backend (cluster.backends.backend_for), which brings the hosts' metrics here."""
    be.collect_metrics(run)
    metrics = read_metrics(run.dir / "metrics")
    rows = summarize(metrics)
    if not rows:
        raise UserError(f"run {run.id} has no metrics yet ({run.dir / 'metrics'})",
                        hint="metrics appear after the first log interval of a train job")
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"
    # img/s: each rank's mean over the run (start-up left out, as train's summary); 'all': their sum
    print(f"{'rank':>4}  {'steps':>6}  {'img/s mean':>10}  {'ms/step':>8}  {'data':>5}  {'comm':>5}  {'loss':>8}  {'top1':>6}")
    for r in rows:
        top1 = f"{r['top1']:.3f}" if r["top1"] is not None else "-"
        print(f"{r['rank']:>4}  {r['steps']:>6}  {r['img_s']:>10.1f}  {r['step_ms']:>8.1f}  {pct(r['data_share']):>5}  "
              f"{pct(r['comm_share']):>5}  {r['final_loss']:>8.4f}  {top1:>6}")
    print(f"{'all':>4}  {max(r['steps'] for r in rows):>6}  {sum(r['img_s'] for r in rows):>10.1f}  "
          f"{mean(r['step_ms'] for r in rows):>8.1f}")
    marks = restarts(metrics)
    for m in marks:
        print(f"{m['what']} ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(m['time'])) if m['time'] else '?'})")
    try:
        state = be.status(run)[0].value       # the run's state now (run.json may be behind)
    except UserError:
        state = run.state.value
    png = Path(output) if output else run.dir / "report.png"
    _plot(metrics, png, f"{run.id} ({state})", marks)
    page = png.with_suffix(".html")
    page.write_text(_html(run, rows, marks, png))
    print(f"plot: {png}\npage: {page}")
    return 0


def _plot(metrics: dict[int, list[dict]], path: Path, title: str, marks: list[dict]) -> None:
    try:
        import matplotlib
    except ImportError:      # not a dependency of the orchestration: the `report` extra
        raise UserError("the report's plot needs matplotlib, which is not installed here",
                        hint="pip install 'ddp-cluster[report]' (or: pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    (loss, rate, ms), (dist, split, clock) = axes
    all_ms: list[float] = []
    for rank, recs in sorted(metrics.items()):
        train = train_records(recs)
        steps = [r["step"] for r in train]
        if rank == min(metrics):
            loss.plot(steps, [r.get("loss_mean", r.get("loss")) for r in train], color="black", lw=2,
                      label="mean over ranks")
        loss.plot(steps, [r.get("loss") for r in train], lw=0.8, alpha=0.6, label=f"rank {rank}")
        rate.plot(steps, [r["img_s"] for r in train], label=f"rank {rank}")
        ms.plot(steps, [r["step_ms"] for r in train], label=f"rank {rank}")
        all_ms += [r["step_ms"] for r in train[1:] or train]
    for m in marks:
        for ax in (loss, rate, ms):
            ax.axvline(m["step"], color="red", ls="--", lw=1)
    dist.hist(all_ms, bins=30, color="tab:blue")
    dist.set_xlabel("step time (ms), all ranks, after the first interval")
    dist.set_ylabel("intervals")
    _plot_split(split, metrics)
    _plot_clock(clock, metrics.get(min(metrics), []), marks)
    for ax, name in ((loss, "loss"), (rate, "images/s per rank"), (ms, "step time (ms)")):
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    dist.set_title("step time distribution")
    all_ms.sort()
    if all_ms and all_ms[-1] > 20 * all_ms[len(all_ms) // 2]:
        ms.set_yscale("log")   # the first interval holds compilation: steady steps stay readable
    if len(metrics) <= 16:
        loss.legend(fontsize=7)
        rate.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_split(ax, metrics: dict[int, list[dict]]) -> None:
    """Per rank, a bar of where its step time goes."""
    ranks = sorted(metrics)
    parts = [shares(train_records(metrics[r])) for r in ranks]
    left = [0.0] * len(ranks)
    for key, label, color in (("data", "waiting for data", "tab:orange"),
                              ("comm", "waiting for peers (communication)", "tab:red"),
                              ("compute", "compute", "tab:green")):
        vals = [100 * (p[key] or 0.0) for p in parts]
        if key == "compute" and any(p["comm"] is None for p in parts):
            label = "compute (+ communication, not measured on GPU)"
        ax.barh([str(r) for r in ranks], vals, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of step time")
    ax.set_ylabel("rank")
    ax.set_title("where the time goes")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)


def _plot_clock(ax, rank0: list[dict], marks: list[dict]) -> None:
    """Rank 0's step over wall-clock time (all records, restarts included), restarts marked."""
    recs = [r for r in rank0 if r.get("kind") in ("train", "start") and "time" in r]
    if recs:
        t0 = recs[0]["time"]
        ax.plot([(r["time"] - t0) / 60 for r in recs], [r["step"] for r in recs], ".-", ms=3)
        for m in marks:
            if m["time"]:
                x = (m["time"] - t0) / 60
                ax.axvline(x, color="red", ls="--", lw=1)
                ax.annotate(m["what"], (x, 0), rotation=90, fontsize=7, color="red", va="bottom", ha="right")
    ax.set_xlabel("minutes since the first record")
    ax.set_ylabel("step (rank 0)")
    ax.set_title("progress over time" + (f" ({len(marks)} restart(s))" if marks else ""))
    ax.grid(alpha=0.3)


def _html(run: Run, rows: list[dict], marks: list[dict], png: Path) -> str:
    """One self-contained page: the summary table, the restarts and the plot (embedded)."""
    e = html.escape
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"
    num = lambda v, f: "-" if v is None else format(v, f)
    head = ("rank", "steps", "img/s", "ms/step", "data wait", "comm wait", "compute", "final loss", "top-1", "top-5")
    body = "".join(
        "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in (
            r["rank"], r["steps"], num(r["img_s"], ".1f"), num(r["step_ms"], ".1f"), pct(r["data_share"]),
            pct(r["comm_share"]), pct(r["compute_share"]), num(r["final_loss"], ".4f"), num(r["top1"], ".2f"),
            num(r["top5"], ".2f"))) + "</tr>" for r in rows)
    total = sum(r["img_s"] for r in rows)
    job = (run.data.get("job") or {}).get("name", "?")
    restarts = "".join(f"<li>{e(m['what'])}, {e(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(m['time'])))}</li>"
                       for m in marks if m["time"]) or "<li>none</li>"
    img = base64.b64encode(png.read_bytes()).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>report {e(run.id)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} img{{max-width:100%}}</style></head>
<body><h1>Run {e(run.id)}</h1>
<p>job {e(job)}, backend {e(str(run.data.get('backend')))}, state <b>{e(run.state.value)}</b>,
world size {e(str((run.data.get('plan') or {}).get('world_size')))}; {total:,.1f} img/s in all (after the first interval)</p>
<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{body}</table>
<h2>Restarts</h2><ul>{restarts}</ul>
<img alt="loss, throughput, step time, where the time goes, progress over time" src="data:image/png;base64,{img}">
</body></html>
"""
