"""What runs in each SLURM task (one per GPU, started by srun from the sbatch script).

Two layers, both in every task:

* ``python -m cluster.node.slurm_task PY -u -m submitit.core._submit FOLDER`` (``main``): a line
  prefixer around submitit's task process. Every line the task prints -- submitit's own, the
  payload's stdout and stderr, a traceback -- reaches srun's per-task file
  (``<job>_<task>_log.out``) as ``[<host> <rank>] text``. It ignores the signals SLURM sends to
  the whole step (USR2 warning, TERM) and exits with its child's code.
* ``SlurmTask`` (the callable submitit unpickles and calls): sets RANK/LOCAL_RANK/WORLD_SIZE from
  SLURM's variables (MASTER_ADDR/MASTER_PORT come from the sbatch script), runs the plan's
  payload and waits. On the time-limit warning or a preemption, submitit calls ``checkpoint()``
  in task 0, which returns the same task for the requeued job (submitit pickles it and runs
  ``scontrol requeue``); the payload resumes from its latest checkpoint when it starts again.
  A run whose payload finished is marked done and never runs again, whatever requeues it.

Standard library only at import time (submitit is imported where it is needed).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

DONE = "slurm.done"     # in runs/<id>/state/: the payload finished; a requeued job does nothing
LINGER_S = 10.0         # a task waits this long for a requeue signal after its payload got TERM


def _host() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def _ignore_usr2() -> None:
    # SLURM signals every process of the step: the payload must outlive the warning (task 0
    # requeues the job), and SIGUSR2's default action would end it at once
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class SlurmTask:
    """The per-task callable; ``spec`` is plain data from the plan (argv, workdir, run_dir, ...)."""

    def __init__(self, spec: dict, attempt: int = 0):
        self.spec = dict(spec)
        self.attempt = attempt
        self._proc: subprocess.Popen | None = None

    def __getstate__(self):
        return {"spec": self.spec, "attempt": self.attempt}

    def __setstate__(self, state):
        self.__init__(state["spec"], state["attempt"])

    @property
    def run_dir(self) -> Path:
        return Path(self.spec["workdir"]) / self.spec["run_dir"]

    def __call__(self) -> int:
        env = os.environ
        rank, host = int(env.get("SLURM_PROCID", 0)), _host()
        done = self.run_dir / "state" / DONE
        if done.exists():
            print(f"run already finished ({done}); not running it again", flush=True)
            return 0
        restarts = int(env.get("SLURM_RESTART_COUNT", 0) or 0)
        (self.run_dir / "state").mkdir(parents=True, exist_ok=True)
        _write_json(self.run_dir / "state" / f"task{rank}.json", {
            "rank": rank, "host": host, "pid": os.getpid(), "job_id": env.get("SLURM_JOB_ID"),
            "restarts": restarts, "attempt": self.attempt, "started": time.time()})
        child_env = dict(env)
        child_env.update(
            RANK=str(rank), LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
            WORLD_SIZE=env.get("SLURM_NTASKS", "1"), GROUP_RANK=env.get("SLURM_NODEID", "0"),
            LOCAL_WORLD_SIZE=str(_local_world(env)))
        # as on the other backends (cluster/node/agent.py): the run directory as cwd, the code on the path
        from cluster.node.agent import run_environment
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        argv = run_environment(self.spec["workdir"], self.run_dir, self.spec.get("module_dirs", []),
                               list(self.spec["argv"]), child_env)
        gpus = f", GPUs {env['CUDA_VISIBLE_DEVICES']}" if env.get("CUDA_VISIBLE_DEVICES") else ""
        print(f"task {rank}/{child_env['WORLD_SIZE']} on {host} (job {env.get('SLURM_JOB_ID')}, "
              f"restart {restarts}{gpus}), rendezvous {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}: "
              + " ".join(argv), flush=True)
        _one_submitit_log_stream()
        self._proc = subprocess.Popen(argv, cwd=self.run_dir, env=child_env, stdin=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT, preexec_fn=_ignore_usr2)
        # submitit logs every TERM/CONT it ignores. SLURM sends CONT with the warning signal, and
        # when USR2's handler runs inside that logging call, logging swallows its "not requeued"
        # exception: ignore them without a word (a Python handler, not SIG_IGN: not inherited)
        for sig in (signal.SIGTERM, signal.SIGCONT):
            signal.signal(sig, _quiet)
        from submitit.core.utils import UncompletedJobError
        try:
            code = self._proc.wait()
            if code in (-signal.SIGTERM, 128 + signal.SIGTERM):
                # scancel, or a preemption: SLURM's TERM, then USR2, on which task 0 requeues
                # (submitit's handler, during this wait; no task may end the step before it).
                # After a scancel, SLURM's KILL ends the wait.
                time.sleep(LINGER_S)
            if code == 0:
                signal.signal(signal.SIGUSR2, signal.SIG_IGN)   # nothing left to requeue for
                if rank == 0:
                    _write_json(done, {"time": time.time(), "job_id": env.get("SLURM_JOB_ID")})
                print("payload finished (exit code 0)", flush=True)
                return 0
        except UncompletedJobError as e:
            # raised by submitit's signal handler when it does not requeue
            if self._finished():
                return 0
            print(f"{e} Stopping.", flush=True)
            self._stop_payload()
            os._exit(1)
        except BaseException:
            # requeued (submitit exits) or any other end: no payload outlives its task (an
            # orphan would also escape SLURM's process tracking)
            self._stop_payload()
            raise
        # the task ends with the payload's status (srun then stops the other tasks: gang semantics);
        # nobody reads submitit's result pickle, and its traceback would only hide the payload's
        code = code if code > 0 else 128 - code
        print(f"payload exited with code {code}", flush=True)
        sys.stderr.flush()
        os._exit(code)

    def _stop_payload(self, grace_s: float = 10.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _finished(self) -> bool:
        return self._proc is not None and self._proc.poll() == 0

    def checkpoint(self):
        """Called by submitit in task 0 on the time-limit warning or a preemption signal.

        The payload keeps its own checkpoints (ckpt_dir, ``latest``); what travels to the requeued
        job is this task, unchanged but for the attempt count. None = do not requeue.
        """
        if not self.spec.get("requeue", True) or self._finished():
            return None
        from submitit.helpers import DelayedSubmission
        _event(self.run_dir, "checkpoint", job_id=os.environ.get("SLURM_JOB_ID"), attempt=self.attempt + 1,
               host=_host())
        print(f"checkpoint: a requeued job runs this task again (attempt {self.attempt + 1}) and the "
              "payload resumes from its latest checkpoint", flush=True)
        return DelayedSubmission(SlurmTask(self.spec, self.attempt + 1))


def _quiet(signum, frame) -> None:
    pass


def _one_submitit_log_stream() -> None:
    """submitit logs warnings to stdout and stderr; the prefixer merges both, so keep one."""
    import logging
    lg = logging.getLogger("submitit")
    for h in list(lg.handlers):
        if getattr(h, "stream", None) is sys.stderr:
            lg.removeHandler(h)


def _local_world(env) -> int:
    """Tasks on this node, from SLURM_TASKS_PER_NODE ('2(x3),1') and SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    counts: list[int] = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * int(rep.rstrip(")") or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else counts[-1]


def _event(run_dir: Path, event: str, **fields) -> None:
    with open(run_dir / "events.jsonl", "a") as f:
        f.write(json.dumps({"t": round(time.time(), 3), "event": event, **fields}) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run argv (submitit's task process), prefixing each of its lines with ``[host rank] ``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m cluster.node.slurm_task COMMAND ...", file=sys.stderr)
        return 2
    prefix = f"[{_host()} {os.environ.get('SLURM_PROCID', '0')}] ".encode()
    # the step's signals are for the task below; this process ends when its output does
    for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    out = sys.stdout.buffer
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL)
                                                    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)])
    except OSError as e:
        out.write(prefix + f"cannot start {argv[0]}: {e}\n".encode())
        out.flush()
        return 127

    def copy() -> None:
        for line in iter(proc.stdout.readline, b""):
            out.write(prefix + (line if line.endswith(b"\n") else line + b"\n"))
            out.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    code = proc.wait()
    # the task is over when its process is: a stray grandchild holding the pipe must not keep
    # it (and so the whole job step) alive
    reader.join(timeout=5)
    out.flush()
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    sys.exit(main())
