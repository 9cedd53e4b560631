"""The node agent: the one process each node starts for a run (standard library only).

Started detached (``setsid``, stdin from /dev/null) by the local and ssh backends, it

* records its pid, which is also the run's process-group id on this node, in state/<host>.pid;
* runs the payload (torchrun ...) in that group, reading everything it prints;
* writes each line, already prefixed ``[host rank]`` by torchrun, into logs/<host>.log and the
  rank's own logs/<host>.rank<R>.log (lines that torchrun itself prints get ``[host agent]``);
* writes the exit code to state/<host>.exit when the payload ends.

A TERM to the group reaches torchrun, which stops its workers; the agent then records the exit.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

_PREFIX = re.compile(rb"^\[(?P<host>[^\] ]+) (?P<rank>\d+)\] ")


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.agent")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("payload", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    payload = args.payload[1:] if args.payload[:1] == ["--"] else args.payload
    run_dir = Path(args.run_dir)
    state, logs = run_dir / "state", run_dir / "logs"
    for d in (state, logs, run_dir / "metrics", run_dir / "checkpoints"):
        d.mkdir(parents=True, exist_ok=True)
    if os.getpgrp() != os.getpid():
        os.setpgrp()   # stop must be able to signal everything of the run through one group
    host = args.host
    exit_file = state / f"{host}.exit"
    if exit_file.exists():
        exit_file.unlink()
    write_json_atomic(state / f"{host}.pid", {
        "pid": os.getpid(), "pgid": os.getpgrp(), "host": host, "hostname": socket.gethostname(),
        "node_rank": args.node_rank, "started": time.time(), "argv": payload})

    node_log = open(logs / f"{host}.log", "ab", buffering=0)
    rank_logs: dict[bytes, object] = {}
    tag = f"[{host} agent] ".encode()

    def note(text: str) -> None:
        node_log.write(tag + text.encode() + b"\n")

    # torchrun keeps its own per-rank files in the run's state dir rather than in /tmp
    if payload and "torch.distributed.run" in payload[:3]:
        i = payload.index("torch.distributed.run") + 1
        payload = payload[:i] + [f"--log-dir={state}/{host}.torchrun"] + payload[i:]
    note(f"starting on {socket.gethostname()} (pid {os.getpid()}): " + " ".join(payload))
    try:
        proc = subprocess.Popen(payload, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    except OSError as e:
        note(f"cannot start: {e}")
        write_json_atomic(exit_file, {"code": 127, "time": time.time(), "error": str(e)})
        return 127

    stopping = {"signal": None}

    def forward(signum, _frame):
        stopping["signal"] = signum
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    for line in iter(proc.stdout.readline, b""):
        if not line.endswith(b"\n"):
            line += b"\n"
        m = _PREFIX.match(line)
        if m:
            node_log.write(line)
            rank = m.group("rank")
            f = rank_logs.get(rank)
            if f is None:
                f = rank_logs[rank] = open(logs / f"{host}.rank{rank.decode()}.log", "ab", buffering=0)
            f.write(line)
        else:
            node_log.write(tag + line)
    code = proc.wait()
    if stopping["signal"]:
        note(f"stopped by signal {stopping['signal']}; exit code {code}")
    else:
        note(f"exit code {code}")
    write_json_atomic(exit_file, {"code": code, "time": time.time(), "signal": stopping["signal"]})
    node_log.close()
    for f in rank_logs.values():
        f.close()
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
