"""Local backend: torchrun on this machine, detached, with the same files and verbs as remote ones."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from cluster.spec.config import REPO
from cluster.errors import UserError
from cluster.plan import Plan
from cluster.node.probe import _rank_states
from cluster.node.shm import remove_left_semaphores
from cluster.run.records import Run, State
from cluster.backends.base import Backend, LogSource, NodeStatus, progress


def detect_local_gpus() -> int:
    """GPUs visible here: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list, else none."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([d for d in vis.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for l in out.stdout.splitlines() if l.startswith("GPU "))


def pids_of_run(run_id: str) -> list[int]:
    """Every process on this machine that belongs to the run (by the CLUSTER_RUN_ID it inherited)."""
    needle = f"CLUSTER_RUN_ID={run_id}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            try:   # a zombie still holds its environ until reaped; it is not running
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            except (OSError, IndexError):
                continue
            found.append(int(d.name))
    return found


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is in process group ``pgid``."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


class FileSource(LogSource):
    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path

    def read(self, offset: int) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                return f.read()
        except FileNotFoundError:
            return b""


class LocalBackend(Backend):
    name = "local"

    def detect_gpus(self, hosts) -> dict[str, int]:
        h = hosts[0]
        return {h.name: detect_local_gpus() if h.gpus == "auto" else int(h.gpus)}

    def preflight(self, plan: Plan) -> None:
        port = int(plan.rdzv_endpoint.rsplit(":", 1)[1])
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise UserError(f"rendezvous port {port} is already in use on this machine",
                                key="rdzv_port", hint="pass rdzv_port=<free port> or stop the other run") from None
        from cluster.container import preflight_local   # containers: runtime there, image present (or pulled)
        preflight_local(plan.nodes)
        node, host = plan.nodes[0], self.inv.hosts[0]
        if node.job_python(host.python):       # a command: naming its own interpreter: check that one
            from cluster.node.probe import _job_python
            jp = _job_python(node.job_python(host.python))
            if not jp.get("torch"):
                raise UserError(f"the job's command runs {jp['argv0']!r}, which " +
                                (f"cannot run ({jp['error']})" if "error" in jp else "has no torch") +
                                " on this machine", where="job", key="command[0]",
                                hint=f"write \"{{python}}\" in 'command:' for the inventory's python ({host.python})")

    def launch(self, plan: Plan, run: Run) -> dict:
        node = plan.nodes[0]
        wd = Path(os.path.expanduser(node.workdir))
        (wd / node.state_dir).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **node.env}
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(wd / node.agent_log_path, "ab") as out:
            # setsid: the run survives this terminal; it is its own process group for stop
            # python: ~/venv/bin/python means this user's home here, as a remote host's shell reads it
            argv = [os.path.expanduser(a) if a == node.argv[0] else a for a in node.argv]
            proc = subprocess.Popen(argv, cwd=wd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        progress(f"[{node.host}] started agent pid {proc.pid}")
        return {"pgids": {node.host: proc.pid}}

    def _state_dir(self, run: Run) -> Path:
        return run.dir / "state"

    def node_status(self, run: Run) -> list[NodeStatus]:
        out = []
        for host, pgid in run.data.get("handle", {}).get("pgids", {}).items():
            exit_info = _read_json(self._state_dir(run) / f"{host}.exit")
            hb = {}
            for f in (run.dir / "metrics").glob("heartbeat-rank*.json"):
                d = _read_json(f)
                if d:   # one host: every heartbeat here is this node's
                    hb[int(d.get("rank", f.stem.rsplit("rank", 1)[1]))] = d
            _rank_states(hb, run.id)
            if exit_info is not None:
                code = exit_info.get("code")
                st = State.SUCCEEDED if code == 0 else (
                    State.CANCELLED if exit_info.get("signal") else State.FAILED)
                out.append(NodeStatus(host, st, pgid, code, exit_info.get("time"), hb))
            elif group_alive(pgid):
                st = State.RUNNING if (self._state_dir(run) / f"{host}.pid").exists() else State.STARTING
                from cluster.node.probe import _activity
                out.append(NodeStatus(host, st, pgid, heartbeats=hb, activity=_activity(
                    str(run.dir / "logs" / f"{host}.log"), pids_of_run(run.id), pgid)))
            else:
                out.append(NodeStatus(host, State.FAILED, pgid, detail="agent gone without an exit record",
                                      heartbeats=hb))
        if self.with_gpus:
            from cluster.node.probe import _gpu_query
            for n in out:
                n.gpus = _gpu_query({})
        return out

    def stop_nodes(self, run: Run, grace_s: float) -> list[str]:
        pgids = list(run.data.get("handle", {}).get("pgids", {}).values())
        for pgid in pgids:
            _killpg(pgid, signal.SIGTERM)
        deadline = time.time() + grace_s
        while time.time() < deadline and (any(group_alive(g) for g in pgids) or pids_of_run(run.id)):
            time.sleep(0.2)
        for pgid in pgids:
            _killpg(pgid, signal.SIGKILL)
        # containers (cluster/container.py): docker/podman own theirs, not our group: remove by name
        from cluster.container import remove_local
        left = remove_local(run.data)
        # anything that left the group but carries the run's id is the run's too
        for pid in pids_of_run(run.id):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        remove_left_semaphores(str(self._state_dir(run)))     # what the KILL left in /dev/shm
        return left + [f"localhost: pid {p} still alive" for p in pids_of_run(run.id)]

    def log_sources(self, run: Run) -> list[LogSource]:
        return [FileSource(h, run.dir / "logs" / f"{h}.log")
                for h in run.data.get("handle", {}).get("pgids", {})]


def stop_by_run_id(run_id: str, grace_s: float) -> list[str]:
    """Stop a run on this machine knowing only its id (its record lost): TERM every process that
    carries its CLUSTER_RUN_ID (the agents forward it to torchrun), wait, KILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        for pid in pids_of_run(run_id):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait_s
        while pids_of_run(run_id) and time.time() < deadline:
            time.sleep(0.2)
    return [f"localhost: pid {p} still alive" for p in pids_of_run(run_id)]


def _killpg(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


BACKEND = LocalBackend
