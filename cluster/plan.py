"""The plan: a pure function of (inventory, job, run id, GPUs per host) -> one launch per node.

No I/O here. Every backend consumes the same plan; ``--dry-run`` prints it byte-exact.
"""
from __future__ import annotations

import re
import shlex
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from cluster.spec.config import Host, Inventory, Job, node_range
from cluster.errors import UserError
from cluster.quoting import quote_argv, shell_word

RUNS = "runs"
PYTHON = "{python}"     # in command: the interpreter the job runs (the inventory's, or the container's)
CODE = "{code}"         # in command: the code's directory on the host (filled in there: cluster/node/agent.py)


@dataclass(frozen=True)
class NodeLaunch:
    """What one node runs: the agent command (argv), its environment and where it writes."""

    host: str
    node_rank: int
    hostname: str
    workdir: str
    argv: tuple[str, ...]            # agent argv; the payload (torchrun ...) follows '--'
    env: Mapping[str, str]
    log_path: str                    # relative to workdir
    agent_log_path: str
    state_dir: str
    nprocs: int
    container: Optional[Any] = None  # cluster.container.ContainerRef when the job names an image

    def payload(self) -> tuple[str, ...]:
        return self.argv[self.argv.index("--") + 1:]

    def job_python(self, host_python: str) -> Optional[str]:
        """The interpreter a ``command:`` job names itself, where it is not ``host_python`` (which
        the preflight checks anyway) and not inside a container: what the preflight must check too."""
        payload = self.payload()
        if self.container is not None or "--no-python" not in payload:
            return None
        prog = payload[payload.index("--no-python") + 1]
        name = prog.rsplit("/", 1)[-1]
        return prog if prog != host_python and re.fullmatch(r"python[\d.]*", name) else None

    def shell(self) -> str:
        """The one shell line that starts this node detached; every value quoted once."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        cmd = quote_argv(self.argv, home=self.argv[:1])     # python: ~/venv/bin/python is the host's home
        return (f"{cd_line(self.workdir)} && mkdir -p {shlex.quote(self.state_dir)} && "
                f"env {env} setsid {cmd} </dev/null >{shlex.quote(self.agent_log_path)} 2>&1 &")


def cd_line(wd: str) -> str:
    """``cd WORKDIR`` for a remote shell: quoted once, a leading ``~/`` left for the shell to
    expand; ``--`` before a directory that cd would read as an option (config refuses those)."""
    return "cd " + ("-- " if wd.startswith("-") else "") + shell_word(wd, home=True)


@dataclass(frozen=True)
class Plan:
    run_id: str
    job: str
    backend: str
    rdzv_endpoint: str
    world_size: int
    nodes: tuple[NodeLaunch, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    data: Optional[Any] = None      # the job's data: section (DataSpec), staged before the launch

    def render(self, warm_start: bool = False) -> str:
        """Every node's shell line; with ``warm_start`` (the ssh backend's ssh.warm_start), also the
        argv its agent runs as when the preflight probe starts it parked (cluster/node/probe.py)."""
        lines = [f"# run {self.run_id}: job {self.job}, backend {self.backend}, "
                 f"{len(self.nodes)} node(s), world size {self.world_size}, rendezvous {self.rdzv_endpoint}"]
        lines += [f"# {n}" for n in self.notes]
        if warm_start:
            from cluster.node.probe import parked_argv
            lines.append("# warm start: where a host's code is current, its preflight probe runs the '# parked:' "
                         "argv instead of the line, in the same directory and environment; 'go' then reaches "
                         "that agent on the descriptor it names")
        for node in self.nodes:
            lines.append(f"[{node.host}] (node {node.node_rank}, {node.nprocs} proc)")
            lines.append("  " + node.shell())
            if warm_start:
                lines.append("  # parked: " + quote_argv(parked_argv(node.argv), home=node.argv[:1]))
        return "\n".join(lines) + "\n"


def default_port(run_id: str) -> int:
    """A port per run, stable for a run id, in 29500-30499 (torchrun's customary range)."""
    return 29500 + zlib.crc32(run_id.encode()) % 1000


def procs_for(host_gpus: int, job: Job, hint: str = "") -> int:
    """Processes per node: one per GPU, or ``cpu_procs_per_node`` without GPUs. A job that asks
    for GPUs (``gpus_per_node`` N > 0) on nodes with none is refused, never run on CPUs instead."""
    if host_gpus <= 0:
        if isinstance(job.gpus_per_node, int) and job.gpus_per_node > 0:
            raise UserError(f"the job asks for {job.gpus_per_node} GPU(s) per node, but the nodes have none",
                            where="job", key="gpus_per_node",
                            hint=hint or "set the hosts' gpus in the inventory (or 'auto' to detect them), or "
                                         "drop gpus_per_node to run cpu_procs_per_node CPU processes per node")
        return job.cpu_procs_per_node
    if job.gpus_per_node == "auto":
        return host_gpus
    return job.gpus_per_node


def select_hosts(inv: Inventory, job: Job) -> tuple[Host, ...]:
    """The job's hosts: the inventory's first ``nodes`` (spares are left to recovery); for a range
    ``MIN-MAX``, the first MAX of them, and at least MIN (submit leaves out the unhealthy ones first:
    cluster/submit.py)."""
    hosts = inv.job_hosts
    if job.nodes == "all":
        return hosts
    if node_range(job.nodes):
        lo, hi = node_range(job.nodes)
        if len(hosts) < lo:
            spares = f" (and {len(inv.spares)} spare(s), kept for recovery)" if inv.spares else ""
            raise UserError(f"job asks for at least {lo} nodes (nodes: {job.nodes}) but the inventory lists "
                            f"{len(hosts)}{spares}", where=inv.path, key="nodes",
                            hint=f"use nodes={len(hosts)} or a range from at most {len(hosts)}, or add hosts")
        return hosts[:hi]
    if job.nodes > len(hosts):
        spares = f" (and {len(inv.spares)} spare(s), kept for recovery)" if inv.spares else ""
        raise UserError(f"job asks for {job.nodes} nodes but the inventory lists {len(hosts)}{spares}",
                        where=inv.path, key="nodes", hint=f"use nodes={len(hosts)} or add hosts")
    return hosts[: job.nodes]


def make_plan(inv: Inventory, job: Job, run_id: str, gpus: Mapping[str, int], *,
              port: Optional[int] = None, notes: tuple[str, ...] = (),
              local_runs: str = RUNS, gang_port: Optional[int] = None,
              hosts: Optional[tuple[Host, ...]] = None) -> Plan:
    """Build the launch of every node. ``gpus`` maps host name -> detected/declared GPU count.

    ``local_runs`` is where runs/ lives on this machine, relative to the repo if inside it.
    ``gang_port``: the agents of a multi-node run keep a gang on node 0's address and this port
    (one failed node stops all; cluster/node/agent.py).
    ``hosts``: the nodes in order, where not the job's choice (the next attempt of a recovered run,
    a spare in place of a failed host: cluster/backends/relaunch.py).
    """
    hosts = tuple(hosts) if hosts else select_hosts(inv, job)
    procs = [procs_for(gpus[h.name], job) for h in hosts]
    for h, p in zip(hosts, procs):
        if gpus[h.name] > 0 and p > gpus[h.name]:
            raise UserError(f"job wants {p} GPUs per node but {h.name} has {gpus[h.name]}",
                            where="job", key="gpus_per_node", hint=f"set gpus_per_node={gpus[h.name]} or fewer")
    if len(set(procs)) != 1:
        raise UserError("hosts have different GPU counts: " +
                        ", ".join(f"{h.name}={gpus[h.name]}" for h in hosts),
                        where=inv.path, key="hosts.gpus", hint="set gpus_per_node in the job to the smallest count")
    nproc = procs[0]
    port = port or job.rdzv_port or default_port(run_id)
    master = hosts[0].address
    # remote hosts keep runs/ under their workdir; this machine keeps them where run.json is
    run_dir = f"{local_runs if hosts[0].is_local else RUNS}/{run_id}"
    base_env = {"PYTHONUNBUFFERED": "1", "CLUSTER_RUN_ID": run_id}
    if nproc and gpus[hosts[0].name] == 0:
        base_env["OMP_NUM_THREADS"] = "1"   # overwritten by train/ from the cores it may use
    base_env.update(job.env)
    nodes = []
    for rank, h in enumerate(hosts):
        env = dict(base_env)
        if h.interface:
            env["NCCL_SOCKET_IFNAME"] = h.interface
            env["GLOO_SOCKET_IFNAME"] = h.interface
        torchrun = [
            h.python, "-m", "torch.distributed.run",
            f"--nnodes={len(hosts)}", f"--nproc-per-node={nproc}", f"--node-rank={rank}",
            # static rendezvous on node 0's store: ranks are node_rank*nproc+local_rank, so
            # rank 0 (the checkpoint writer) is always on node 0, where resume puts the checkpoint
            f"--master-addr={master}", f"--master-port={port}", f"--rdzv-id={run_id}",
            f"--max-restarts={job.restart.max_restarts}",
            # per-rank stdout/stderr files and error records in the run's state dir, not
            # /tmp/torchelastic_*; relative to the run directory, torchrun's cwd on the host and
            # inside a container alike (cluster/container.py mounts it at the same path)
            "--tee=3", f"--log-dir=state/{h.name}.torchrun",
        ]
        payload_python = h.python
        if job.container is not None:
            from cluster.container import inner_python
            payload_python = inner_python(job.container, h)
        torchrun += _payload(job, payload_python)
        ref = None
        if job.container is not None:   # containers (cluster/container.py): torchrun in the image, agent outside
            from cluster.container import wrap_node
            torchrun, ref = wrap_node(job.container, h, run_id=run_id, run_dir=run_dir, env=env,
                                      payload_argv=torchrun, gpus=gpus[h.name])
        agent = [h.python, "-m", "cluster.node.agent", "--run-dir", run_dir, "--host", h.name,
                 "--node-rank", str(rank)]
        for d in module_dirs(job):
            agent += ["--module-dir", d]
        if gang_port and len(hosts) > 1:
            agent += ["--gang", f"{master}:{gang_port}", "--gang-nodes", str(len(hosts))]
        if inv.backend == "ssh" and inv.ssh.warm_start and job.container is None and _preload(job):
            agent += ["--preload", ",".join(_preload(job))]     # what a parked agent's fork server imports
        agent += ["--"]
        nodes.append(NodeLaunch(
            host=h.name, node_rank=rank, hostname=h.hostname, workdir=h.workdir,
            argv=tuple(agent + torchrun), env=env,
            log_path=f"{run_dir}/logs/{h.name}.log", agent_log_path=f"{run_dir}/state/{h.name}.agent.out",
            state_dir=f"{run_dir}/state", nprocs=nproc, container=ref))
    return Plan(run_id, job.name, inv.backend, f"{master}:{port}", nproc * len(hosts), tuple(nodes),
                tuple(notes), data=job.data)


def module_dirs(job: Job) -> list[str]:
    """The directory of a ``module:`` job's own file, relative to the code: on the path ahead of
    the code itself, as ``python pkg/script.py`` would put it (so ``from sibling import x`` works)."""
    if job.module is None or "." not in job.module:
        return []
    return ["/".join(job.module.split(".")[:-1])]


def _payload(job: Job, python: str = "python3") -> list[str]:
    if job.train is not None:
        cfg = {"out_dir": "metrics", "ckpt_dir": "checkpoints"}     # in the run directory, its cwd
        if job.checkpoint.every_steps:
            cfg["ckpt_every"] = job.checkpoint.every_steps
        cfg["keep_ckpts"] = job.checkpoint.keep
        cfg.update(job.train)
        return ["-m", "train"] + [f"{k}={_scalar(v)}" for k, v in cfg.items()] + list(job.args)
    if job.module is not None:
        return ["-m", job.module] + list(job.args)
    command = [python if a == PYTHON else a for a in job.command]
    for i, a in enumerate(command[1:], 1):
        interpreter = command[0] == python or re.fullmatch(r"python[\d.]*", command[0].rsplit("/", 1)[-1])
        if interpreter and a.endswith(".py") and not a.startswith(("/", "~", CODE)):
            raise UserError(f"the script {a!r} is a relative path, and a run starts in its own run directory",
                            where="job", key=f"command[{i}]",
                            hint=f"write '{CODE}/{a}' (the code's directory on the host), or use 'module:'")
        if not a.startswith("-"):
            break
    return ["--no-python"] + command + list(job.args)


def _preload(job: Job) -> list[str]:
    """What a warm start's fork server imports after torch, so that each worker need not
    (cluster/node/warmworker.py): train/'s modules (and torchvision for its models), or the packages
    that ``python -m pkg.mod`` imports before it runs the module anyway."""
    if job.train is not None:
        mods = ["train.loop"]
        model = str(job.train.get("model", ""))
        if ":" not in model:
            mods.append("torchvision")
        return mods
    if job.module is not None:
        parts = job.module.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]
    return []


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
