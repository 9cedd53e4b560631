"""The node agent: the one process each node starts for a run (standard library only).

Started detached (``setsid``, stdin from /dev/null) by the local and ssh backends, it

* records its pid, which is also the run's process-group id on this node, in state/<host>.pid;
* runs the payload (torchrun ...) in that group, in the run's directory (its working directory:
  what a job writes stays in the run), with the code on its path (:func:`run_environment`),
  reading everything it prints;
* writes each line, prefixed ``[host rank]`` (from torchrun's ``[default<local>]:``), into logs/<host>.log and the
  rank's own logs/<host>.rank<R>.log (lines that torchrun itself prints get ``[host agent]``);
* when the payload ends, ends whatever it left in the group (TERM, then KILL), and writes the exit
  code, the time the payload ended and, if the gang stopped it, why, to state/<host>.exit.

A TERM to the group reaches torchrun, which stops its workers; the agent then records the exit.

Warm start: cluster/node/warm.py. One failed node stops all: cluster/node/gang.py. The run's
processes on this node: cluster/node/group.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cluster.node.gang import Gang
from cluster.node.jobenv import run_environment
from cluster.node.group import become_subreaper, end_group
from cluster.node.shm import remove_left_semaphores
from cluster.node.warm import park

_PREFIX = re.compile(rb"^\[(?P<host>[^\] ]+) (?P<rank>\d+)\] ")
# torchrun --tee's own prefix, "[default3]:" (role + local rank); every torch 2.x prints it, while
# --log-line-prefix-template is newer than some hosts' torch
_TEE = re.compile(rb"^\[[A-Za-z_]*?(?P<local>\d+)\]:")


def _nproc(payload: list[str]) -> int:
    for i, a in enumerate(payload):
        for flag in ("--nproc-per-node", "--nproc_per_node"):
            if a.startswith(flag + "="):
                return int(a.split("=", 1)[1]) if a.split("=", 1)[1].isdigit() else 1
            if a == flag and i + 1 < len(payload) and payload[i + 1].isdigit():
                return int(payload[i + 1])
    return 1


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def remove_container(payload: list[str], note) -> None:
    """A docker/podman payload's container belongs to the daemon, not to our group: remove it
    (its client may have been killed before it could; cluster/container.py names it)."""
    from cluster.node.containers import remove_argv_of_payload
    argv = remove_argv_of_payload(payload)
    if argv:
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            note(f"could not remove the container ({e})")


class NodeLog:
    """logs/<host>.log (every line) and logs/<host>.rank<R>.log (each rank's lines), unbuffered."""

    def __init__(self, logs: Path, host: str, first_rank: int):
        self.logs, self.host, self.first_rank = logs, host, first_rank
        self.node = open(logs / f"{host}.log", "ab", buffering=0)
        self.ranks: dict[bytes, object] = {}
        self.tag = f"[{host} agent] ".encode()

    def note(self, text: str) -> None:
        self.node.write(self.tag + text.encode() + b"\n")

    def copy(self, stream) -> None:
        """Every line of ``stream`` (torchrun's output) into the logs, ``[host rank]`` prefixed."""
        host_b = self.host.encode()
        for line in iter(stream.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            t = _TEE.match(line)
            if t:   # static rendezvous: global rank = node_rank * nproc + local_rank
                rank = str(self.first_rank + int(t.group("local"))).encode()
                line = b"[" + host_b + b" " + rank + b"] " + line[t.end():]
            m = _PREFIX.match(line)
            if not m:
                self.node.write(self.tag + line)
                continue
            self.node.write(line)
            rank = m.group("rank")
            f = self.ranks.get(rank)
            if f is None:
                f = self.ranks[rank] = open(self.logs / f"{self.host}.rank{rank.decode()}.log", "ab", buffering=0)
            f.write(line)

    def close(self) -> None:
        for f in [self.node, *self.ranks.values()]:
            f.close()


class Abort:
    """Set by the gang (from its thread) when the run must stop on this node: who asked, why, and
    whether a node was lost (cluster/node/gang.py: that decides the grace before KILL)."""

    def __init__(self):
        self.event, self.info = threading.Event(), None

    def __call__(self, origin: str, reason: str, lost: bool) -> None:
        self.info = {"origin": origin, "reason": reason, "lost": lost, "time": time.time()}
        self.event.set()

    def grace_s(self, kill_grace_s: float, lost_grace_s: float) -> float:
        """From TERM to KILL: short when a node was lost (the ranks are stuck in a collective with
        it and cannot act on TERM; the run restarts from its last checkpoint anyway), the full
        grace when a node failed (the ranks are ending by themselves, printing what the
        diagnosis reads). A stop (``stop``, stop_on_hang, a recovery) is not an abort: it brings
        its own grace (cluster/node/probe.py, _stop) and the agent only forwards its TERM."""
        return lost_grace_s if self.info and self.info["lost"] else kill_grace_s


def _arguments(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cluster.node.agent")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--gang", metavar="ADDR:PORT", help="node 0's gang endpoint (multi-node runs)")
    ap.add_argument("--gang-nodes", type=int, default=1)
    ap.add_argument("--gang-timeout-s", type=float, default=15.0, help="silence after which a node counts as lost")
    ap.add_argument("--gang-connect-s", type=float, default=120.0, help="how long nodes may take to join")
    ap.add_argument("--kill-grace-s", type=float, default=10.0,
                    help="from TERM to KILL when the gang stops this node because a node failed")
    ap.add_argument("--lost-grace-s", type=float, default=2.0,
                    help="from TERM to KILL when the gang stops this node because a node was lost")
    ap.add_argument("--park-fd", type=int, help="warm start: wait for 'GO' on this descriptor (cluster/node/warm.py)")
    ap.add_argument("--preload", default="", metavar="MOD,...",
                    help="warm start: modules the workers' fork server imports after torch")
    ap.add_argument("--module-dir", action="append", default=[], metavar="DIR",
                    help="a module job's own directory (relative to the code), put on the path first")
    ap.add_argument("payload", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    args.payload = args.payload[1:] if args.payload[:1] == ["--"] else args.payload
    return args


def _enter(run_dir: Path, host: str) -> Path:
    """The run's directories, made; the agent in its run directory; the node's state dir."""
    state = run_dir / "state"
    for d in (state, run_dir / "logs", run_dir / "metrics", run_dir / "checkpoints"):
        d.mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir)       # what the job writes stays in this run (see run_environment)
    become_subreaper()
    (state / f"{host}.exit").unlink(missing_ok=True)
    return state


def _start(payload: list[str], forked, run_dir: Path, log: NodeLog):
    log.note(f"starting on {socket.gethostname()} (pid {os.getpid()}): " + " ".join(payload))
    if forked is not None:
        log.note(f"torchrun from a warm interpreter (pid {forked.pid}; imported while the preflight ran)")
        forked.start(payload[3:], str(run_dir))
        return forked
    return subprocess.Popen(payload, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _forward_signals(proc) -> dict:
    """TERM and INT go on to torchrun (which stops its workers); HUP is ignored. {'signal': the last one}"""
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
    return stopping


def _supervise(proc, abort: Abort, kill_grace_s: float, lost_grace_s: float, log: NodeLog) -> int:
    """Wait for the payload; on an abort TERM it, and KILL the group after the abort's grace
    (Abort.grace_s)."""
    term_at = grace_s = None
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        if abort.event.is_set() and term_at is None:
            term_at, grace_s = time.time(), abort.grace_s(kill_grace_s, lost_grace_s)
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        elif term_at is not None and time.time() - term_at > grace_s:
            log.note(f"still running {grace_s:g} s after TERM; KILL")
            end_group(0.0)
            term_at = float("inf")


def _finish(code: int, payload: list[str], stopping: dict, abort: Abort, gang, forked, log: NodeLog,
            reader: threading.Thread) -> dict:
    """After the payload: the gang told, the group ended, the container removed; the exit record."""
    ended = time.time()
    aborted = dict(abort.info) if abort.event.is_set() else None   # before our own report can abort us
    if gang is not None:
        gang.payload_ended(code, code != 0 and not stopping["signal"] and not aborted)
    if code != 0:       # a clean exit removed its container itself (--rm)
        remove_container(payload, log.note)
    left = end_group(grace_s=1.0 if aborted else 3.0)
    if left:
        log.note(f"could not end pid(s) {', '.join(map(str, left))} of this run's process group")
    elif forked is not None:
        shutil.rmtree(forked.tmp, ignore_errors=True)
    reader.join(5.0)    # the payload's last lines before our own
    record = {"code": code, "time": ended, "signal": stopping["signal"]}
    if aborted:
        record["gang_abort"] = {"origin": aborted["origin"], "reason": aborted["reason"]}
        log.note(f"stopped by the gang ({aborted['reason']}); exit code {code}")
    elif stopping["signal"]:
        log.note(f"stopped by signal {stopping['signal']}; exit code {code}")
    else:
        log.note(f"exit code {code}")
    return record


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if os.getpgrp() != os.getpid():
        os.setpgrp()   # stop must be able to signal everything of the run through one group
    run_dir, host = Path(os.path.abspath(args.run_dir)), args.host
    payload = run_environment(os.getcwd(), run_dir, args.module_dir, args.payload)
    forked = park(args.park_fd, payload, [m for m in args.preload.split(",") if m]) if args.park_fd is not None else None
    state = _enter(run_dir, host)
    exit_file = state / f"{host}.exit"
    write_json_atomic(state / f"{host}.pid", {
        "pid": os.getpid(), "pgid": os.getpgrp(), "host": host, "hostname": socket.gethostname(),
        "node_rank": args.node_rank, "started": time.time(), "argv": payload})
    log, abort, gang = NodeLog(run_dir / "logs", host, args.node_rank * _nproc(payload)), Abort(), None
    if args.gang and args.gang_nodes > 1:
        addr, _, port = args.gang.rpartition(":")
        gang = Gang(host, args.node_rank, addr.strip("[]"), int(port), args.gang_nodes, log.note, abort,
                    args.gang_timeout_s, args.gang_connect_s)
        try:
            gang.listen()
        except OSError as e:
            log.note(f"gang: cannot listen on port {port} ({e}); not starting")
            write_json_atomic(exit_file, {"code": 1, "time": time.time(), "error": f"gang port {port}: {e}"})
            if forked is not None:
                forked.abandon()
            return 1
    try:
        proc = _start(payload, forked, run_dir, log)
    except OSError as e:
        log.note(f"cannot start: {e}")
        if gang is not None:
            gang.start()
            gang.payload_ended(127, failed=True)
            gang.wait(5.0)
        write_json_atomic(exit_file, {"code": 127, "time": time.time(), "error": str(e)})
        return 127
    stopping = _forward_signals(proc)
    # a thread reads, so that a worker still holding the pipe never keeps the agent from noticing
    # that torchrun is gone
    reader = threading.Thread(target=log.copy, args=(proc.stdout,), name="output", daemon=True)
    reader.start()
    if gang is not None:
        gang.start()
    code = _supervise(proc, abort, args.kill_grace_s, args.lost_grace_s, log)
    record = _finish(code, payload, stopping, abort, gang, forked, log, reader)
    write_json_atomic(exit_file, record)
    remove_left_semaphores(str(state))      # what killed processes of the run left in /dev/shm
    if gang is not None and gang.node_rank == 0:
        gang.wait(None)   # node 0 keeps serving until every peer has reported or is gone
    log.close()
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
