"""Local backend: torchrun on this machine, detached, with the same files and verbs as remote ones."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from cluster.spec.config import REPO
from cluster.errors import UserError
from cluster.plan import Plan
from cluster.node.probe import _gpu_count, _group_alive, _run_processes, _status, _stop
from cluster.node.shm import remove_left_semaphores
from cluster.run.records import Run
from cluster.backends.base import Backend, LogSource, NodeStatus, node_status_of, progress


def pids_of_run(run_id: str) -> list[int]:
    """Every process on this machine that carries the run's CLUSTER_RUN_ID (any directory, any
    network namespace)."""
    return _run_processes("/", run_id, anywhere=True).get(run_id, [])


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
        return {h.name: _gpu_count({}) if h.gpus == "auto" else int(h.gpus)}

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

    def node_status(self, run: Run) -> list[NodeStatus]:
        # the same node function the ssh backend ships to its hosts, here in-process
        return [node_status_of(host, pgid, _status({"workdir": "/", "run_dir": str(run.dir), "host": host,
                                                    "pgid": pgid, "run_id": run.id, "gpus": self.with_gpus}))
                for host, pgid in run.data.get("handle", {}).get("pgids", {}).items()]

    def stop_nodes(self, run: Run, grace_s: float) -> list[str]:
        # TERM to the agents' groups only: in a container the TERM reaches torchrun through the
        # podman/docker client's sig-proxy, and torchrun stops its workers (TERM to each process,
        # as probe._stop sends on a host, measured slower here under load: the container's own
        # processes each handle it). Then KILL whatever carries the run's id, anywhere.
        pgids = list(run.data.get("handle", {}).get("pgids", {}).values())
        for pgid in pgids:
            _killpg(pgid, signal.SIGTERM)
        deadline = time.time() + grace_s
        while time.time() < deadline and (any(_group_alive(g) for g in pgids) or pids_of_run(run.id)):
            time.sleep(0.2)
        left = _stop({"workdir": "/", "run_id": run.id, "grace_s": 0, "anywhere": True,
                      "state_dir": str(run.dir / "state")})["left"] if pids_of_run(run.id) else []
        if not left:
            remove_left_semaphores(str(run.dir / "state"))     # what KILLed processes left in /dev/shm
        # containers (cluster/container.py): docker/podman own theirs, not our group: remove by name
        from cluster.container import remove_local
        return remove_local(run.data) + [f"localhost: pid {pid} still alive: {cmd}" for pid, cmd in left]

    def log_sources(self, run: Run) -> list[LogSource]:
        return [FileSource(h, run.dir / "logs" / f"{h}.log")
                for h in run.data.get("handle", {}).get("pgids", {})]


def stop_by_run_id(run_id: str, grace_s: float) -> list[str]:
    """Stop a run on this machine knowing only its id (its record lost): TERM every process that
    carries its CLUSTER_RUN_ID (the agents forward it to torchrun), wait, KILL what is left."""
    left = _stop({"workdir": "/", "run_id": run_id, "grace_s": grace_s, "anywhere": True})["left"]
    return [f"localhost: pid {pid} still alive: {cmd}" for pid, cmd in left]


BACKEND = LocalBackend


def _killpg(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
