"""Step-level progress from your own script (standard library only; optional).

A run is watched without it: a rank that writes no heartbeat is alive while its node prints or
uses CPU, and hangs only after ``hang_timeout_s`` without either. With it, ``status`` shows each
rank's step and rate, and a rank that stops advancing is named as behind::

    from cluster.node import heartbeat
    for epoch in range(start, epochs):
        train_one_epoch()
        heartbeat.beat(epoch + 1, total=epochs)

Call it at least once per ``hang_timeout_s``: once a rank has sent one, its heartbeat is what
counts. It writes ``$CLUSTER_RUN_DIR/metrics/heartbeat-rank$RANK.json`` (what train/ writes);
outside a cluster run (no CLUSTER_RUN_DIR) it does nothing.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Optional


def beat(step: int, total: Optional[int] = None, done: bool = False, **fields: Any) -> None:
    """Record that this rank reached ``step`` (of ``total``); ``done=True`` when it has finished."""
    run_dir = os.environ.get("CLUSTER_RUN_DIR")
    if not run_dir:
        return
    rank = int(os.environ.get("RANK", "0"))
    d = os.path.join(run_dir, "metrics")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"heartbeat-rank{rank}.json")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"step": int(step), "time": round(time.time(), 3), "rank": rank,
                   "host": socket.gethostname(), "done": done, "steps_total": total, **fields}, f)
    os.replace(tmp, path)      # status never reads half a file
