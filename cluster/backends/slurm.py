"""SLURM backend: one sbatch job through submitit, one task per GPU under srun.

    make submit JOB=resnet50 BACKEND=slurm        # on the login node; runs/<id>/ is on the shared fs

* The plan is an sbatch request (``SlurmPlan``); ``python -m cluster plan`` prints the exact script
  submitit submits (the same function renders both). Tasks per node = GPUs per node; every task
  runs ``python -S -u -m cluster.node.slurm_task FOLDER`` in place of submitit's own task process:
  ``cluster.node.slurm_task.SlurmTask`` from FOLDER/task.spec, RANK/LOCAL_RANK/WORLD_SIZE from
  SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, then the same payload as on the other backends, its
  lines ``[host rank]`` prefixed; submitit's signal handler (and its pickle of the task) only on
  the requeue signal. One interpreter per task besides the payload.
* Rendezvous from the allocation, set in the script: MASTER_ADDR = first host of
  SLURM_JOB_NODELIST, MASTER_PORT = 20000 + job id % 10000 (or the job's rdzv_port).
* Requeue: ``--signal=USR2@signal_delay_s``; task 0 checkpoints through submitit and runs
  ``scontrol requeue`` (at most restart.max_requeues time-outs); node failures requeue through
  ``--requeue``. The job id stays the same, so do the per-task log files (opened in append mode).
* status maps SLURM's job state (``scontrol show job``, else ``sacct``); stop is ``scancel`` and
  waits until SLURM reports every process of the job gone.
* A requeue after a node failure excludes the failed node from the next start, as a user would by
  hand (``exclude_failed``, called by ``node_status``; run.json ``excluded_nodes``). SLURM lets a
  job's ExcNodeList change only while it is pending, i.e. between the requeue and the next start
  (SLURM holds a requeued job back ~120 s, its credentials' lifetime): the batch script or task 0
  of the next start would come too late (already placed, maybe on that node), and the job
  itself has no process left between two starts. A slurmctld-side script (EpilogSlurmctld) could
  do it at once but is the site's, not a user's. So the process that observes the requeue does
  it: ``status``, ``logs -f``, ``top``, and the detached follower that ``submit`` leaves on the
  login node (``python -m cluster.backends.slurm_follower follow RUN``: one ``scontrol show job`` every
  FOLLOW_S until the job ends, every WATCH_S once the batch log shows a failure), so it happens
  with no terminal open. The trade-off: one small
  process per live run on the login node; where none runs (CLUSTER_SLURM_FOLLOW=0, the login
  node rebooted) and nobody looks before the next start, the node is not excluded and status
  says so.
* A silent node, sooner than SLURM (``restart.silent_s``, default 20 s; 0: off;
  cluster/backends/slurm_follower.py): SLURM counts a
  node down only after SlurmdTimeout (300 s by default), then KillWait, then requeues the job (and
  holds it back). Each node's first task beats instead (``cluster.node.slurm_task``:
  ``state/alive-<job>-<host>`` rewritten every 2 s by a thread of the task process, not the
  payload, whose ranks hang in a collective with a dead peer and cannot tell which node died). The
  follower reads the beats of the job's current start every WATCH_S (its batch log's start line
  names the start and its nodes) and notes, by its own clock, when each node's file last changed:
  no node's clock is compared with another's. A node that has beaten in this start but not for
  silent_s while another node beat within RECENT_S is silent (``silent_hosts``); never while
  every node is quiet (the shared filesystem's stall or the follower's own), never before a
  node's first beat (a node that dies while starting is SLURM's), never while the run is being
  stopped or SLURM is ending or requeuing the job (its own path stays: ``--requeue``,
  ``exclude_failed``). The follower then replaces the job (``replace_job``): the attempt recorded
  as recovery records it (run.json ``attempts``: the cause, "node X silent for 20 s: no beat
  from its tasks; SLURM had not noticed"), X added to ``excluded_nodes``, the job cancelled with
  KILL and a new sbatch job submitted for the same run through ``launch`` (the plan's script with X
  in its exclude list); the handle names the new job and keeps every job id (``job_ids``), so
  status, stop, logs (``job_logs``: every job's files; ``logs -f`` goes on across the change),
  report and the follower itself go on with it. The new job resumes from the latest checkpoint.
  Each replacement counts against restart.max_requeues; past it, with restart.requeue off, or
  when the submit fails, the run ends FAILED saying why. Why a new job and not ``scontrol
  requeue``: a requeued job stays COMPLETING until SLURM's own timeout marks the dead node down
  (it cannot start again before), and a user cannot mark a node down. The trade-offs: it needs
  the follower (one small process per live run on the login node, as above; where none runs,
  SLURM's path alone); a node whose tasks cannot write to the shared filesystem for silent_s
  while the others can (its mount hung, the node swapping hard) is taken for dead: the job is
  replaced without it, at the cost of a restart from the checkpoint; a one-node job is SLURM's
  alone (no other node beats); the reader relies on the shared filesystem's close-to-open
  consistency (NFS's), as the rest of runs/ does.
* Containers: pyxis/enroot as srun options around each task, or ``apptainer exec`` around the payload.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from cluster.spec import hostlist
from cluster.spec.config import REPO, SBATCH_MANAGED, SBATCH_OPTIONS, Job, node_range
from cluster.errors import UserError
from cluster.plan import RUNS, NodeLaunch, Plan, _payload, module_dirs, procs_for
from cluster.run.records import Run, State
from cluster.backends.base import Backend, LogSource, LogTails, NodeStatus, progress, start_detached
from cluster.backends.local import FileSource

# SLURM job states (scontrol / sacct) -> the project's states
STATES = {
    "PENDING": State.PENDING, "CONFIGURING": State.PENDING, "REQUEUED": State.PENDING,
    "REQUEUE_HOLD": State.PENDING, "REQUEUE_FED": State.PENDING, "RESV_DEL_HOLD": State.PENDING,
    "SUSPENDED": State.PENDING, "STOPPED": State.PENDING, "RESIZING": State.RUNNING,
    "RUNNING": State.RUNNING, "COMPLETING": State.RUNNING, "SIGNALING": State.RUNNING,
    "STAGE_OUT": State.RUNNING, "COMPLETED": State.SUCCEEDED, "CANCELLED": State.CANCELLED,
    "REVOKED": State.CANCELLED, "FAILED": State.FAILED, "NODE_FAIL": State.FAILED,
    "TIMEOUT": State.FAILED, "PREEMPTED": State.FAILED, "BOOT_FAIL": State.FAILED,
    "DEADLINE": State.FAILED, "OUT_OF_MEMORY": State.FAILED,
}
LIVE = {k for k, v in STATES.items() if not v.is_terminal()}

# sbatch options: which the backend sets itself, which slurm.sbatch may add (cluster/spec/config.py)
MANAGED, EXTRA = SBATCH_MANAGED, SBATCH_OPTIONS
PORT_BASE, PORT_SPAN = 20000, 10000
# a --requeue job that ended in one of these is requeued by SLURM (node failure, preemption with
# PreemptMode=REQUEUE); only if it is still in it this long after its end is the run over
REQUEUED_AFTER = ("NODE_FAIL", "PREEMPTED")
REQUEUE_GRACE_S = 180
_PORT_SHELL = f"$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))"
START_MARK = "start of job"   # the batch script's first line, once per start (requeues included)
_SRUN_ERROR = re.compile(r"srun: error: (?P<host>\S+): tasks? (?P<rank>\d+)[^:]*: (?P<what>.*)")
# a requeue after a node failure (exclude_failed): srun's report of it in the batch log, and each
# start's first line (which restart, on which nodes)
_NODE_FAILURE = re.compile(r"srun: error: Node failure on (\S+)\s*$")
_START_LINE = re.compile(rf"^{START_MARK} (\d+) restart (\d+) on (\S+), rendezvous ")
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")     # what may reach scontrol as a node name
EXCLUDABLE = ("PENDING", "REQUEUE_HOLD")      # SLURM changes a job's ExcNodeList only while it waits
FOLLOW_S = 20.0     # the follower's poll: well inside the ~120 s a requeued job is held back
# Between two polls the follower reads what the batch log gained (the shared filesystem, no call to
# slurmctld) every WATCH_S: an error line there (srun's "Node failure on NODE", slurmstepd's "...
# CANCELLED ... DUE TO NODE FAILURE", a task's exit) comes as SLURM requeues or ends the job, so it
# polls every WATCH_S from then until the requeue is handled (the node excluded) or BURST_S passed,
# instead of up to FOLLOW_S later. A failed batch host writes no such line: the next poll finds it.
WATCH_S = 1.0
BURST_S = 60.0


@dataclass(frozen=True)
class SlurmPlan(Plan):
    """The sbatch request: submitit parameters, its folder, and what every task runs."""

    folder: str = ""                                       # absolute; scripts, pickles, task logs
    python: str = ""                                       # the python that starts each task
    sbatch: Mapping[str, Any] = field(default_factory=dict)  # submitit SlurmExecutor parameters
    task: Mapping[str, Any] = field(default_factory=dict)    # cluster.node.slurm_task.SlurmTask spec

    def command(self) -> str:
        """What srun starts in every task, in place of submitit's own command: the task, its line
        prefixer and submitit's signal handling in one interpreter (cluster/node/slurm_task.py main),
        without site (-S: its .pth files cost each task's start; the task adds site-packages when
        it needs submitit)."""
        return " ".join([self.python, "-S -u -m cluster.node.slurm_task", shlex.quote(self.folder)])

    def render(self) -> str:
        from submitit.slurm.slurm import _make_sbatch_string
        return _make_sbatch_string(command=self.command(), folder=self.folder, **_params(self.sbatch))


def _params(sbatch: Mapping) -> dict:
    """Plain lists and dicts, as submitit wants them."""
    return {k: (list(v) if isinstance(v, (list, tuple)) else dict(v) if isinstance(v, Mapping) else v)
            for k, v in sbatch.items()}


def _output_activity(folder: Path, jid: str, tasks) -> Optional[dict]:
    """When a node's tasks last printed (their log files on the shared filesystem): what judges
    ranks that write no heartbeat (cluster/run/diagnose.py)."""
    times = []
    for t in tasks:
        try:
            times.append((folder / f"{jid}_{t}_log.out").stat().st_mtime)
        except OSError:
            pass
    return {"output_t": max(times), "cpu_s": None} if times else None


class SlurmBackend(Backend):
    name = "slurm"

    # ---------------------------------------------------------------- plan
    def select_hosts(self, job: Job):
        if node_range(job.nodes):
            # sbatch --nodes=MIN-MAX would leave the node count to the allocation, after the plan
            # (torchrun's --nnodes, the gang) is made: the ssh backend's shrinking has no SLURM form here
            raise UserError(f"a range of nodes ({job.nodes}) is for the ssh backend; SLURM needs a count",
                            where="job", key="nodes",
                            hint=f"give a count (nodes: {node_range(job.nodes)[1]}); on SLURM a failed node is "
                                 "excluded when the job is requeued (restart.requeue)")
        s = self.inv.slurm
        n = job.nodes if isinstance(job.nodes, int) else (s.nodes or len(self.inv.hosts))
        base = self.inv.hosts[0]
        return tuple(dataclasses.replace(base, name=f"slurm-node{i + 1}", hostname="", address="")
                     for i in range(n))

    def detect_gpus(self, hosts) -> dict[str, int]:
        s, first = self.inv.slurm, self.inv.hosts[0]
        if s.gpus_per_node is not None:
            gpus = s.gpus_per_node
        elif isinstance(first.gpus, int):
            gpus = first.gpus
        else:
            gpus = _partition_gpus(s.partition)
        return {h.name: gpus for h in hosts}

    def make_plan(self, job: Job, run_id: str, gpus, *, notes=(), local_runs: str = RUNS,
                  port: Optional[int] = None, workdir: Optional[str] = None,
                  python: Optional[str] = None) -> SlurmPlan:
        """``workdir``/``python``: the code and the python that run the job (default: this checkout and
        this python; the login node's for a plan made elsewhere, cluster/backends/login.py)."""
        s, where = self.inv.slurm, self.inv.path
        hosts = self.select_hosts(job)
        cap = gpus[hosts[0].name]
        ntasks = procs_for(cap, job, hint=(
            "the nodes' GPUs come from slurm.gpus_per_node in the inventory (else hosts[0].gpus, else the "
            f"partition's gres): set slurm.gpus_per_node: {job.gpus_per_node} to ask SLURM for them, or drop "
            "gpus_per_node to run cpu_procs_per_node CPU tasks per node"))
        if cap and ntasks > cap:
            raise UserError(f"job wants {ntasks} GPUs per node but the nodes have {cap}", where="job",
                            key="gpus_per_node", hint=f"set gpus_per_node={cap} or fewer")
        time_min = job.time_limit_min or s.time_min
        if not time_min:
            raise UserError("no time limit for the SLURM job", where=where, key="slurm.time_min",
                            hint="set slurm.time_min in the inventory (or time_limit_min in the job), in minutes")
        if s.signal_delay_s >= time_min * 60:
            raise UserError(f"signal_delay_s {s.signal_delay_s} is not shorter than the time limit "
                            f"({time_min} min)", where=where, key="slurm.signal_delay_s",
                            hint="the requeue warning must come before the end: lower it or raise time_min")
        workdir, run_dir, here = workdir or str(REPO), f"{local_runs}/{run_id}", python or sys.executable
        folder = str(Path(workdir, run_dir, "slurm"))
        env = {"PYTHONUNBUFFERED": "1", "CLUSTER_RUN_ID": run_id}
        if cap == 0:
            env["OMP_NUM_THREADS"] = "1"
        if hosts[0].interface:
            env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = hosts[0].interface
        env.update(job.env)
        env.update(job.container.env if job.container else {})      # the image's own variables win
        payload_python = here
        if job.container is not None:
            from cluster.container import inner_python
            payload_python = inner_python(job.container, hosts[0])
        payload = _payload(job, payload_python)
        argv = payload[1:] if payload[0] == "--no-python" else [here] + payload
        python, argv, srun_extra = _in_container(job, hosts[0], workdir, Path(workdir, run_dir), argv, env, cap, here)
        port_text = str(port or job.rdzv_port or _PORT_SHELL)
        setup = [f"# run {run_id}: job {job.name}, {len(hosts)} node(s) x {ntasks} task(s), "
                 f"world size {len(hosts) * ntasks}", *map(_comment, notes),
                 "# every task runs, as rank SLURM_PROCID of SLURM_NTASKS (cluster.node.slurm_task):",
                 _comment("  " + shlex.join(argv)),
                 *[f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())],
                 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
                 f"export MASTER_PORT={port_text}",
                 f'echo "{START_MARK} $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST, '
                 'rendezvous $MASTER_ADDR:$MASTER_PORT"']
        if job.data is not None:
            from cluster.backends.stage import split_source
            if split_source(job.data.source)[0] is not None:
                raise UserError(f"data.source {job.data.source!r} is on a host: SLURM stages from a path every "
                                "node reads (a shared filesystem)", key="data.source",
                                hint="give the source's path on the shared filesystem, or use the ssh backend")
            # the job's first step: the dataset onto each node's local disk (cluster/backends/stage.py); a node
            # that cannot hold it ends the job before any task starts
            setup += ["# data: staged on every node before the tasks start",
                      f"srun --ntasks-per-node=1 --ntasks={len(hosts)} --kill-on-bad-exit=1 "
                      f"{shlex.quote(here)} -m cluster.backends.stage "
                      f"{shlex.quote(os.path.abspath(os.path.expanduser(job.data.source)))} "
                      f"{shlex.quote(job.data.path)} || exit 1"]
        extra = _extra_sbatch(s.sbatch)
        extra.update({"chdir": workdir, "output": f"{folder}/%j_batch.log", "error": f"{folder}/%j_batch.log",
                      ("requeue" if job.restart.requeue else "no-requeue"): True})
        extra = {k: sbatch_value(v) for k, v in extra.items()}
        sbatch = {"job_name": run_id, "partition": s.partition, "account": s.account, "qos": s.qos,
                  "constraint": s.constraint, "time": time_min, "nodes": len(hosts), "ntasks_per_node": ntasks,
                  "gpus_per_node": ntasks if cap else None, "cpus_per_task": s.cpus_per_task,
                  "mem": None if s.mem_gb is None else f"{s.mem_gb}GB" if s.mem_gb else "0",   # 0: all of it
                  "signal_delay_s": s.signal_delay_s, "setup": setup,
                  "srun_args": ["--kill-on-bad-exit=1", "--open-mode=append"] + srun_extra,
                  "additional_parameters": extra}
        sbatch = {k: v for k, v in sbatch.items() if v is not None}
        sbatch["wckey"] = None   # not submitit's default: clusters that enforce wckeys reject unknown ones
        task = {"argv": argv, "workdir": workdir, "run_dir": run_dir, "requeue": job.restart.requeue,
                "max_requeues": job.restart.max_requeues, "module_dirs": module_dirs(job)}
        nodes = tuple(NodeLaunch(host=h.name, node_rank=i, hostname="", workdir=workdir, argv=tuple(argv),
                                 env=env, log_path=f"{run_dir}/slurm/%j_<task>_log.out",
                                 agent_log_path=f"{run_dir}/slurm/%j_batch.log", state_dir=f"{run_dir}/state",
                                 nprocs=ntasks) for i, h in enumerate(hosts))
        endpoint = f"first node of the allocation:{port or job.rdzv_port or f'{PORT_BASE}+job_id%{PORT_SPAN}'}"
        return SlurmPlan(run_id, job.name, "slurm", endpoint, ntasks * len(hosts), nodes, tuple(notes),
                         folder=folder, python=python, sbatch=sbatch,
                         task=task)

    # ---------------------------------------------------------------- submit
    def preflight(self, plan: SlurmPlan) -> None:
        """sbatch --test-only: SLURM itself checks partition, account, qos, constraint, GPUs, time."""
        if not shutil.which("sbatch"):
            raise UserError("sbatch is not on this machine's PATH", where=self.inv.path, key="backend",
                            hint="run on the cluster's login node (or use backend local or ssh)")
        with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="sbatch-test-") as f:
            f.write(plan.render())
            f.flush()
            p = _run(["sbatch", "--test-only", f.name], timeout=60)
        if p.returncode != 0:
            lines = [l.strip() for l in p.stderr.splitlines() if l.strip()]
            why = list(dict.fromkeys(l for l in lines if "error" in l or "failure" in l))[-3:] or lines[-3:]
            raise UserError("SLURM rejects the job: " + " / ".join(why), where=self.inv.path, key="slurm",
                            hint="check partition, account, qos, constraint, GPUs and time against "
                                 "`sinfo`; `python -m cluster plan JOB --backend slurm` prints the script")

    def launch(self, plan: SlurmPlan, run: Run, follower_pid: Optional[int] = None) -> dict:
        """Submit the plan's job. follower_pid: the run's follower, when it submits this job in
        place of one with a silent node (slurm_follower.replace_job); it goes on following the
        run, and no second one starts."""
        import submitit
        from submitit.core.utils import FailedJobError, FailedSubmissionError
        from cluster.node.slurm_task import SlurmTask
        class Executor(submitit.SlurmExecutor):
            @property
            def _submitit_command_str(self) -> str:
                return plan.command()

        ex = Executor(folder=plan.folder, python=plan.python, max_num_timeout=plan.task["max_requeues"])
        ex.update_parameters(**_params(plan.sbatch))
        if ex._make_submission_file_text(ex._submitit_command_str, "") != plan.render():
            raise RuntimeError("submitit would submit another script than the plan shows")
        from cluster.node.slurm_task import write_spec
        Path(plan.folder).mkdir(parents=True, exist_ok=True)
        # the spec as plain data too: each task starts the payload from it (submitit, and its pickle
        # of the task, only on the requeue signal)
        write_spec(plan.folder, plan.task)
        try:
            job = ex.submit(SlurmTask(dict(plan.task)))
        except (FailedJobError, FailedSubmissionError) as e:
            raise UserError(f"sbatch failed: {str(e).strip()[-600:]}", where=self.inv.path, key="slurm") from None
        n = len(plan.nodes)
        progress(f"submitted SLURM job {job.job_id}: {n} node(s) x {plan.nodes[0].nprocs} task(s)")
        handle = {"job_id": str(job.job_id), "folder": plan.folder, "tasks": plan.world_size}
        pid = follower_pid or _start_follower(run)
        return handle | ({"follower_pid": pid} if pid else {})

    # ---------------------------------------------------------------- observe
    def node_status(self, run: Run) -> list[NodeStatus]:
        jid = run.data.get("handle", {}).get("job_id")
        if not jid:
            return [NodeStatus("slurm", State.UNKNOWN, detail="no SLURM job id recorded")]
        info = job_info(jid)
        if info is None:
            done = (run.dir / "state" / "slurm.done").exists()
            return [NodeStatus(f"job {jid}", State.SUCCEEDED if done else State.UNKNOWN,
                               detail="SLURM no longer knows the job (scontrol, sacct)")]
        raw = info.get("JobState", "UNKNOWN").split()[0]
        state = STATES.get(raw, State.UNKNOWN)
        code, _, sig = info.get("ExitCode", "0:0").partition(":")      # "1:0" exit code, "0:9" signal
        restarts = int(info.get("Restarts", "0") or 0)
        if restarts > int(run.data.get("slurm_requeues_seen") or 0) and raw not in \
                ("REQUEUED", "COMPLETING", *REQUEUED_AFTER):      # those: the requeue is not done yet
            exclude_failed(run, jid, info, raw, restarts)
        detail = f"job {jid} {raw}" + (f" ({info['Reason']})" if info.get("Reason") not in (None, "None") else "")
        detail += f", requeued {restarts}x" if restarts else ""
        task = (run.data.get("plan") or {}).get("task") or {}
        if raw in REQUEUED_AFTER and task.get("requeue") and restarts < int(task.get("max_requeues", 0)):
            # SLURM shows these for a moment before it requeues a --requeue job: not final yet
            ended = _epoch(info.get("EndTime")) or time.time()
            if time.time() - ended < REQUEUE_GRACE_S:
                return [NodeStatus(f"job {jid}", State.PENDING, detail=detail + ", awaiting requeue")]
        nodelist = info.get("NodeList", "")
        hosts = hostlist.expand(nodelist, limit=None) if nodelist and nodelist not in ("(null)", "None assigned") else []
        if state == State.PENDING or not hosts:
            return [NodeStatus(f"job {jid}", state, detail=detail)]
        if state == State.RUNNING:
            port = (run.data.get("plan", {}).get("rdzv_endpoint", "").rsplit(":", 1)[-1])
            detail += f", rendezvous {hosts[0]}:{port if port.isdigit() else PORT_BASE + int(jid) % PORT_SPAN}"
        started = _epoch(info.get("StartTime"))
        if state == State.RUNNING and started and started != run.data.get("started"):
            run.update(started=started)          # this start (requeues too): the hang watch counts from it
        # heartbeats of an earlier start are not progress of this one
        beats = {r: b for r, b in _heartbeats(run.dir).items() if not started or b.get("time", 0) >= started - 5}
        exit_code = None
        if state == State.FAILED and code.isdigit():
            exit_code = int(code) or (128 + int(sig) if sig.isdigit() and int(sig) else None)
        short = lambda name: str(name).split(".")[0]      # gpu01.cluster.local is node gpu01
        gpus = self._gpus(jid, len(hosts)) if self.with_gpus and state == State.RUNNING else {}
        folder = _folder(run)
        nproc = ((run.data.get("plan") or {}).get("nodes") or [{}])[0].get("nprocs") or 1
        pids = _task_pids(run.dir, started) if state == State.RUNNING else {}
        return [NodeStatus(h, state, pid=pids.get(short(h)), exit_code=exit_code, detail=detail,
                           heartbeats={r: b for r, b in beats.items() if short(b.get("host")) == short(h)},
                           activity=_output_activity(folder, jid, range(i * nproc, (i + 1) * nproc))
                           if state == State.RUNNING else None, gpus=gpus.get(i))
                for i, h in enumerate(hosts)]

    def _gpus(self, jid: str, nodes: int) -> dict[int, list]:
        """Node index -> its GPUs' use: one ``srun --overlap`` step inside the job's allocation, one
        task per node (task i runs on node i of the allocation); {} when that fails."""
        from cluster.node.probe import _gpu_query
        from cluster.backends.ship import host_command
        argv = ["srun", f"--jobid={jid}", "--overlap", f"--nodes={nodes}", f"--ntasks={nodes}",
                "--ntasks-per-node=1", "--label", "--input=none", "--quiet",
                "sh", "-c", host_command(self.inv.hosts[0].python, _gpu_query, site=False)]
        try:
            p = _run(argv, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        out = {}
        for line in p.stdout.splitlines():
            task, _, answer = line.partition(": ")
            try:
                out[int(task)] = json.loads(answer)
            except ValueError:
                continue
        return out

    def first_failure(self, run: Run, nodes: list[NodeStatus], tails=None) -> dict:
        """srun names the first task that failed; its own log tail tells why."""
        h = run.data.get("handle", {})
        folder, jid = _folder(run), h.get("job_id")
        batch = _read_lines(folder / f"{jid}_batch.log")
        starts = [i for i, l in enumerate(batch) if l.startswith(START_MARK)]
        batch = batch[starts[-1]:] if starts else batch        # the latest start only
        m = next((m for m in map(_SRUN_ERROR.search, batch) if m), None)
        rank = int(m["rank"]) if m else None
        tail = (_read_lines(folder / f"{jid}_{rank}_log.out")[-30:] +
                _read_lines(folder / f"{jid}_{rank}_log.err")[-10:]) if m else []
        code = next((n.exit_code for n in nodes if n.exit_code is not None), None)
        host = m["host"] if m else None
        return {"host": host, "rank": rank, "exit_code": code, "slurm": nodes[0].detail if nodes else "",
                "log_tail": tail or batch[-30:],
                "findings": self._diagnose(nodes, host, LogTails(self, run, {host: tail}), rank) if host else []}

    def log_sources(self, run: Run) -> list[LogSource]:
        folder = _folder(run)
        return [PrefixedSource(name, folder / file, b"[slurm agent] ") if batch else FileSource(name, folder / file)
                for name, file, batch in job_logs(run.data.get("handle") or {})]

    def log_tail(self, run: Run, host: str, lines: int) -> list[str]:
        out = []
        for src in self.log_sources(run):
            out += [l for l in src.read(0).decode(errors="replace").splitlines() if l.startswith(f"[{host} ")]
        return out[-lines:]

    # ---------------------------------------------------------------- stop
    def stop_nodes(self, run: Run, grace_s: float) -> list[str]:
        """scancel (SLURM: TERM, KillWait, KILL on every node); done when SLURM reports no process left."""
        jid = run.data.get("handle", {}).get("job_id")
        if not jid:
            return []
        _run(["scancel", jid])
        if _wait_gone(jid, max(grace_s, 5.0) + 30):
            return []
        _run(["scancel", "--full", "--signal=KILL", jid])
        if _wait_gone(jid, 15):
            return []
        info = job_info(jid) or {}
        return [f"SLURM job {jid}: still {info.get('JobState')} on {info.get('NodeList')}"]


class PrefixedSource(LogSource):
    """A file whose lines have no ``[host rank]`` prefix (the batch script's own): whole lines, prefixed.

    ``path``: a file here, or a LogSource (the file on the login node, cluster/backends/login.py).
    Offsets count the prefixed bytes this source has returned; a reader that starts over gets
    the same bytes again."""

    def __init__(self, name: str, path, prefix: bytes):
        self.name, self.path, self.prefix = name, path, prefix
        self._raw = self._out = 0

    def read(self, offset: int) -> bytes:
        if offset != self._out:
            self._raw = self._out = 0
            return self.read(0)[offset:]
        if isinstance(self.path, LogSource):
            data = self.path.read(self._raw)        # OSError while unreachable: the caller retries
        else:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._raw)
                    data = f.read()
            except FileNotFoundError:
                return b""
        whole = data[: data.rfind(b"\n") + 1]
        self._raw += len(whole)
        out = b"".join(self.prefix + l + b"\n" for l in whole.split(b"\n")[:-1])
        self._out += len(out)
        return out


# -------------------------------------------------------------------- node failures
def exclude_failed(run: Run, jid: str, info: dict, raw: str, restarts: int) -> None:
    """The job was requeued (``restarts`` times; run.json ``slurm_requeues_seen`` had fewer): if the
    start before the requeue ended in a node failure, that node is excluded from the job while it
    is pending (``scontrol update JobId=N ExcNodeList=...``, added to what the job excludes
    already, the user's slurm.sbatch exclude included). Recorded in run.json ``excluded_nodes``:
    one entry per node and requeue, with the line ``status`` shows."""
    alloc, failed = failed_before(_read_lines(_folder(run) / f"{jid}_batch.log"), restarts)
    if alloc and not failed:
        failed = _not_responding(alloc)     # the batch host itself failed: no srun was left to say so
    entries: list[dict] = []
    if failed and not re.fullmatch(r"\d+(_\d+)?", str(jid)):
        failed = []         # a job id run.json was edited to hold: nothing goes to scontrol
    if failed:
        partition = _partition_nodes(info.get("Partition"))
        failed = [n for n in failed if n in partition]      # only node names SLURM lists reach scontrol
        done = {e["node"] for e in run.data.get("excluded_nodes") or [] if e.get("excluded")}
        try:
            current = _nodelist(info.get("ExcNodeList"))
        except ValueError:
            current = None
        needed = len((run.data.get("plan") or {}).get("nodes") or ()) or 1
        if raw not in EXCLUDABLE:
            entries = [_entry(n, restarts, False, f"the job was {raw} already when its requeue was first seen "
                                                  "(no status, logs -f or follower ran while it waited)")
                       for n in failed if n not in done]
        elif current is None:
            entries = [_entry(n, restarts, False, f"the job's ExcNodeList {info.get('ExcNodeList')!r} could "
                                                  "not be read") for n in failed if n not in done]
        else:
            entries = decide_exclusion(failed, restarts, done, current, partition, needed)
        add = [e["node"] for e in entries if e["excluded"]]
        if add:
            value = ",".join(sorted(set(current) | set(add)))
            p = _run(["scontrol", "update", f"JobId={jid}", f"ExcNodeList={value}"])
            if p.returncode != 0:
                why = "scontrol update: " + ((p.stderr or p.stdout).strip().splitlines() or [f"exit {p.returncode}"])[-1]
                entries = [_entry(e["node"], restarts, False, why) if e["excluded"] else e for e in entries]

    def apply(d: dict) -> list:
        have = {(e.get("node"), e.get("restart")) for e in d.get("excluded_nodes") or []}
        new = [e for e in entries if (e["node"], e["restart"]) not in have]     # another poller's stands
        d["excluded_nodes"] = (d.get("excluded_nodes") or []) + new
        d["slurm_requeues_seen"] = max(restarts, int(d.get("slurm_requeues_seen") or 0))
        return [("exclude-node", e) for e in new]
    run.change(apply)


def failed_before(batch: list[str], restarts: int) -> tuple[list[str], list[str]]:
    """From the batch log: the allocation of the latest start before requeue ``restarts`` (its
    START_MARK line) and the nodes of it that srun reported a node failure on during that start."""
    starts = [(i, m) for i, l in enumerate(batch) if (m := _START_LINE.match(l)) and int(m[2]) < restarts]
    if not starts:
        return [], []
    i, m = starts[-1]
    end = next((j for j in range(i + 1, len(batch)) if batch[j].startswith(START_MARK)), len(batch))
    try:
        alloc = [n for n in hostlist.expand(m[3]) if NODE_NAME.fullmatch(n)]
    except ValueError:
        return [], []
    failed = [f[1] for l in batch[i + 1:end] if (f := _NODE_FAILURE.search(l))]
    return alloc, [n for n in dict.fromkeys(failed) if n in alloc]


def decide_exclusion(failed: list[str], restart: int, done: set, excluded: list[str], partition: list[str],
                     needed: int, after: Optional[str] = None) -> list[dict]:
    """What to do with the nodes that failed before requeue ``restart``: exclude each one not
    excluded before (``done``), unless that leaves fewer of the partition's nodes than the job
    needs (then none, saying why). ``excluded``: what the job excludes already; ``after``: what
    the node is excluded after, for status (default: its node failure before that requeue)."""
    fresh = [n for n in dict.fromkeys(failed) if n not in done]
    if not fresh:
        return []
    gone = set(excluded) | set(fresh)
    left = [n for n in dict.fromkeys(partition) if n not in gone]
    if len(left) < needed:
        why = (f"excluding it would leave {len(left)} node(s) of the partition for a job of {needed}; "
               "it may land there again")
        return [_entry(n, restart, False, why, after) for n in fresh]
    return [_entry(n, restart, True, after=after) for n in fresh]


def _entry(node: str, restart: int, excluded: bool, why: str = "", after: Optional[str] = None) -> dict:
    after = after or f"its node failure (restart {restart})"
    text = (f"excluded {node} after {after}" if excluded else f"did not exclude {node} after {after}: {why}")
    return {"node": node, "restart": restart, "excluded": excluded, "reason": why, "text": text}


def _nodelist(text: Optional[str]) -> list[str]:
    """scontrol's node list field (``node[1-2],gpu07``; ``(null)`` or empty: none); ValueError
    where a name is not one scontrol reads back the same in a comma-separated list."""
    names = [] if not text or text in ("(null)", "None") else hostlist.expand(text)
    bad = [n for n in names if not NODE_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a plain node name")
    return names


def _partition_nodes(partition: Optional[str]) -> list[str]:
    """The nodes of the job's partition(s), as sinfo names them."""
    p = _run(["sinfo", "-h", "-N", "-o", "%N"] + (["-p", partition] if partition else []))
    names = [l.strip() for l in p.stdout.splitlines()] if p.returncode == 0 else []
    return list(dict.fromkeys(n for n in names if NODE_NAME.fullmatch(n)))


def _not_responding(nodes: list[str]) -> list[str]:
    """Those of ``nodes`` SLURM reports down or not responding now (a '*' after the state)."""
    p = _run(["sinfo", "-h", "-N", "-n", ",".join(nodes), "-o", "%N %T"])
    out = []
    for line in p.stdout.splitlines() if p.returncode == 0 else []:
        name, _, state = line.strip().partition(" ")
        if name in nodes and (state.endswith("*") or state.startswith(("down", "fail"))):
            out.append(name)
    return list(dict.fromkeys(out))


def job_logs(handle: Mapping) -> list[tuple[str, str, bool]]:
    """(source name, file in the job's folder, whether it is the batch log) of every job of the run,
    the earliest first: each task's log, then the batch log. The first job's are named rank<t> and
    slurm, a later job's (``replace_job``) carry its id, so a reader's offsets stay each file's."""
    jids = [j for j in handle.get("job_ids") or [handle.get("job_id")] if j]
    return [(f"{name}{'' if i == 0 else '@' + jid}", f"{jid}_{file}", name == "slurm")
            for i, jid in enumerate(jids)
            for name, file in [(f"rank{t}", f"{t}_log.out") for t in range(handle.get("tasks") or 0)] +
            [("slurm", "batch.log")]]


# -------------------------------------------------------------------- the follower
def _start_follower(run: Run) -> Optional[int]:
    """The detached follower of the job (``follow``); none with CLUSTER_SLURM_FOLLOW=0. Its python
    starts FOLLOW_S / 2 later (its first poll FOLLOW_S after that, well inside the ~120 s a
    requeued job is held): its interpreter and imports (about 0.1 s of CPU) would otherwise come
    as the job may be starting, on cores a login node can share with the job's first node (the
    cluster in a box's 2, for one)."""
    if os.environ.get("CLUSTER_SLURM_FOLLOW", "1") == "0":
        return None
    return start_detached(run, "cluster.backends.slurm_follower", "follow", "follower.log", delay_s=FOLLOW_S / 2)


def _folder(run: Run) -> Path:
    """The job's folder (submitit's): its scripts, the tasks' logs, the batch log."""
    return Path((run.data.get("handle") or {}).get("folder") or run.dir / "slurm")


def _batch_log(run: Run) -> Optional[Path]:
    """The batch script's log, once the submit has recorded the job (None before)."""
    jid = (run.data.get("handle") or {}).get("job_id")
    return _folder(run) / f"{jid}_batch.log" if jid else None


# -------------------------------------------------------------------- helpers
def _run(argv, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(argv, 127, "", str(e))


def job_info(job_id: str) -> Optional[dict]:
    """The job's fields from ``scontrol show job -o`` (live and recently ended jobs), else ``sacct``."""
    p = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if p.returncode == 0 and p.stdout.startswith("JobId="):
        line = p.stdout.splitlines()[0]
        marks = list(re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=", line))
        return {m[1]: line[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(line)].strip()
                for i, m in reversed(list(enumerate(marks)))}
    p = _run(["sacct", "-X", "-P", "-n", "-j", str(job_id), "-o", "JobID,State,ExitCode,NodeList,Restarts"])
    for line in p.stdout.splitlines() if p.returncode == 0 else []:
        f = line.split("|")
        if len(f) >= 5 and f[0] == str(job_id):
            return {"JobId": f[0], "JobState": f[1], "ExitCode": f[2], "NodeList": f[3], "Restarts": f[4]}
    return None


def _wait_gone(job_id: str, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        info = job_info(job_id)
        if info is None or info.get("JobState", "").split()[0] not in LIVE:
            return True
        time.sleep(0.5)
    return False


def _epoch(stamp: Optional[str]) -> Optional[float]:
    """scontrol's local time '2026-11-28T11:46:00' -> epoch seconds (None: Unknown, N/A)."""
    try:
        return time.mktime(time.strptime(stamp or "", "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def _partition_gpus(partition: Optional[str]) -> int:
    """GPUs per node from the partition's gres (the fewest any node has); 0 when unknown."""
    p = _run(["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else []))
    counts = [int(m[1]) for l in p.stdout.splitlines() for m in [re.search(r"gpu(?::[^:,(]+)?:(\d+)", l)] if m]
    return min(counts) if p.returncode == 0 and counts else 0


def _heartbeats(run_dir: Path) -> dict:
    out = {}
    for f in (run_dir / "metrics").glob("heartbeat-rank*.json"):
        try:
            d = json.loads(f.read_text())
            out[int(d.get("rank", f.stem.rsplit("rank", 1)[1]))] = d
        except (OSError, ValueError):
            continue
    return out


def _task_pids(run_dir: Path, started: Optional[float]) -> dict[str, int]:
    """host -> the pid of its lowest-ranked task of this start (state/task<rank>.json, written by
    each task as it starts; their node-local pids, for `status`)."""
    out: dict[str, tuple[int, int]] = {}
    for f in (run_dir / "state").glob("task*.json"):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if started and d.get("started", 0) < started - 5:
            continue            # a task of an earlier start (before a requeue)
        host, rank = str(d.get("host", "")).split(".")[0], int(d.get("rank", 0))
        if host and (host not in out or rank < out[host][0]):
            out[host] = (rank, int(d["pid"]))
    return {h: pid for h, (_, pid) in out.items()}


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _comment(text: str) -> str:
    """A script comment that stays one line whatever the text holds."""
    return "# " + text.replace("\r", "\\r").replace("\n", "\\n")


def _extra_sbatch(opts: Mapping) -> dict:
    """slurm.sbatch, validated by config (_check_sbatch_option): ``false`` leaves an option out."""
    return {key.replace("-", "_"): value for key, value in opts.items() if value is not False}


def sbatch_value(value):
    """A value for submitit's ``#SBATCH --key=VALUE`` line, so that sbatch reads back ``value``.

    submitit quotes each value with shlex.quote ('...' with '"'"' for a quote), which sbatch's
    #SBATCH parser reads as a shell would, except that a backslash escapes the next character
    even inside quotes: doubled here, each reads back as one. Newlines cannot be written at all
    (config refuses every control character)."""
    return value.replace("\\", "\\\\") if isinstance(value, str) else value


def _in_container(job: Job, host, workdir: str, run_dir: Path, argv: list[str], env: dict, gpus: int,
                  python: str = sys.executable):
    """(python that starts each task, the task's argv, srun options) for the job's container section.

    enroot (pyxis): srun starts every task inside the image, so the task's own python is the
    image's (it needs submitit); apptainer: the task stays outside and runs ``apptainer exec``
    around the payload. The repository and the run dir are mounted at the same path."""
    py = shlex.quote(python)
    if job.container is None:
        return py, argv, []
    from cluster import container
    from cluster.spec.container import parse_mount
    spec = job.container
    runtime = container.resolve_runtime(spec, host)
    inner = [container.inner_python(spec, host)] + argv[1:] if argv[:1] == [python] else argv
    runs = [] if str(run_dir).startswith(workdir + "/") else [f"{run_dir}:{run_dir}"]
    if runtime == "enroot":
        names = sorted(env) + ["MASTER_ADDR", "MASTER_PORT"]
        srun = container.srun_args(spec, workdir=workdir, mounts=runs, env_names=names,
                                   tasks_per_node=procs_for(gpus, job))
        return shlex.quote(inner[0]), inner, srun
    if runtime == "apptainer":
        binds = [parse_mount(m) for m in runs]
        return py, container.apptainer_exec(spec, inner, workdir=workdir, env=env, gpus=gpus, mounts=binds,
                                               pwd=str(run_dir)), []
    raise UserError(f"container runtime '{runtime}' does not run under SLURM", where="job",
                    key="container.runtime", hint="use runtime: enroot (pyxis, srun --container-image) or apptainer")


BACKEND = SlurmBackend
