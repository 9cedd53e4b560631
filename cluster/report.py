"""``cluster report RUN``: loss, throughput per rank and step time as a PNG, plus a summary table."""
from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Optional

from .errors import UserError
from .runs import Run


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


def summarize(metrics: dict[int, list[dict]]) -> list[dict]:
    rows = []
    for rank in sorted(metrics):
        train = [r for r in metrics[rank] if r.get("kind", "train") == "train" and "step" in r]
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
                     "step_ms": mean(r["step_ms"] for r in steady), "final_loss": train[-1].get("loss_mean", train[-1].get("loss")),
                     "top1": val[-1]["top1"] if val else None})
    return rows


def report(run: Run, output: Optional[str] = None) -> int:
    from .submit import backend_for
    be = backend_for(run)
    if hasattr(be, "collect_metrics"):
        be.collect_metrics(run)
    metrics = read_metrics(run.dir / "metrics")
    rows = summarize(metrics)
    if not rows:
        raise UserError(f"run {run.id} has no metrics yet ({run.dir / 'metrics'})",
                        hint="metrics appear after the first log interval of a train job")
    # img/s: each rank's mean over the run (start-up left out, as train's summary); 'all': their sum
    print(f"{'rank':>4}  {'steps':>6}  {'img/s mean':>10}  {'ms/step':>8}  {'loss':>8}  {'top1':>6}")
    for r in rows:
        top1 = f"{r['top1']:.3f}" if r["top1"] is not None else "-"
        print(f"{r['rank']:>4}  {r['steps']:>6}  {r['img_s']:>10.1f}  {r['step_ms']:>8.1f}  {r['final_loss']:>8.4f}  {top1:>6}")
    print(f"{'all':>4}  {max(r['steps'] for r in rows):>6}  {sum(r['img_s'] for r in rows):>10.1f}  "
          f"{mean(r['step_ms'] for r in rows):>8.1f}")
    path = Path(output) if output else run.dir / "report.png"
    _plot(metrics, path, run.id)
    print(f"plot: {path}")
    return 0


def _plot(metrics: dict[int, list[dict]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    all_ms: list[float] = []
    for rank, recs in sorted(metrics.items()):
        train = [r for r in recs if r.get("kind", "train") == "train" and "step" in r]
        steps = [r["step"] for r in train]
        ms = [r["step_ms"] for r in train]
        all_ms += ms
        if rank == min(metrics):
            a.plot(steps, [r.get("loss_mean", r.get("loss")) for r in train], label="mean over ranks")
        b.plot(steps, [r["img_s"] for r in train], label=f"rank {rank}")
        c.plot(steps, ms, label=f"rank {rank}")
    for ax, name in ((a, "loss"), (b, "images/s per rank"), (c, "step time (ms)")):
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    all_ms.sort()
    if all_ms and all_ms[-1] > 20 * all_ms[len(all_ms) // 2]:
        c.set_yscale("log")   # the first interval holds compilation: steady steps stay readable
    if len(metrics) <= 16:
        b.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
