"""What runs in each SLURM task (one per GPU, started by srun from the sbatch script).

One process per task besides the payload: ``python -S -u -m cluster.node.slurm_task FOLDER``
(``main``; FOLDER is submitit's: the scripts, pickles and per-task logs), which

* starts the payload at once, from the task's spec as plain data (``task.spec`` in FOLDER, written
  by the backend before sbatch: ``write_spec``), with RANK/LOCAL_RANK/WORLD_SIZE from SLURM's variables
  (MASTER_ADDR/MASTER_PORT come from the sbatch script), and waits for it;
* prefixes every line of the task -- its own, the payload's stdout and stderr, submitit's
  warnings, a traceback -- with ``[<host> <rank>] `` in this same process: fds 1 and 2 are a pipe
  that a thread copies, line by line and prefixed, to srun's per-task file
  (``<job>_<task>_log.out``); the payload has a pipe of its own, copied the same way;
* keeps the task's records: ``state/task<rank>.json`` (its pid, for ``status``), RUNNING in
  run.json (task 0), the done marker (a run whose payload finished never runs again, whatever
  requeues it);
* beats for its node, if it is the node's first task (SLURM_LOCALID 0): a thread rewrites
  ``state/alive-<job>-<host>`` every ALIVE_S (``_start_beat``) until the task ends, then marks it
  ended. The ranks cannot tell which node died (they all hang in the collective with it); this
  process, beside the payload, keeps beating whatever the payload does, and the run's follower on
  the login node finds a node whose beat stopped sooner than SLURM does
  (cluster/backends/slurm_follower.py, ``silent_hosts``);
* on the time-limit warning or a preemption (USR2) hands over to submitit's own signal handler:
  in task 0 it calls ``SlurmTask.checkpoint()``, which returns the same task for the requeued job
  (submitit pickles it beside the first and runs ``scontrol requeue``); the payload resumes from
  its latest checkpoint when it starts again.

submitit is imported only when that signal comes (with the pickled task, which holds what the
requeued job needs: the attempt, the time-outs left). Importing it at start (numpy, cloudpickle:
about half a second of CPU per task) took that CPU from the payload's own start where tasks share
cores, and the launch is compared with a hand-written ``srun python -m train`` in
bench/bench_slurm_launch.py. The payload is the only process that imports torch, once per task.

The way to the payload's start is kept short, since every task's interpreter takes it at once on
the node's cores beside the payloads' own starts: the interpreter starts without site (``-S``:
site-packages' .pth files took each task about 20 ms of CPU; they are added with submitit, on
the signal), and only what starting the payload needs is imported before it; the records come
after it. Standard library only, and of it only modules built into the interpreter (``os``,
``_signal``, ``_thread``, ``marshal``, ``time``): json (with re), pathlib, subprocess (with
selectors), threading and signal's enums took each task about 25 ms of CPU more, on the way to
its payload and after it. So the payload starts by ``os.fork`` and ``os.execvpe``
(``Payload``), the spec is marshal's, a task's records are written by ``_json``, and only task 0
imports json and the record module, after its payload's start, for run.json.
"""
from __future__ import annotations

import _signal as signal     # the C module: ``signal`` imports enum (the docstring's last paragraph)
import _thread
import marshal
import os
import sys
import time

from cluster.node.jobenv import run_environment

DONE = "slurm.done"     # in runs/<id>/state/: the payload finished; a requeued job does nothing
LINGER_S = 10.0         # a task waits this long for a requeue signal after its payload got TERM
ALIVE_S = 2.0           # the node's beat (``_start_beat``); the follower's silent_s is many of these


def _host() -> str:
    return os.environ.get("SLURMD_NODENAME") or os.uname().nodename


def _json(data: dict) -> str:
    """A flat record (numbers, None, strings) as JSON, without the json module (the docstring's
    last paragraph): host names, job ids and times are all a task writes in the common case."""
    def value(v) -> str:
        if v is None or isinstance(v, bool):
            return {None: "null", True: "true", False: "false"}[v]
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + "".join(c if c >= " " and c not in '"\\' else f"\\u{ord(c):04x}" for c in str(v)) + '"'
    return "{" + ", ".join(f"{value(k)}: {value(v)}" for k, v in data.items()) + "}"


def _write_json(path: str, data: dict) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:     # -S: the locale's encoding may be ASCII
        f.write(_json(data) + "\n")
    os.replace(tmp, path)


class NotRequeued(Exception):
    """submitit's signal handler did not requeue the job (its UncompletedJobError, whose module is
    imported only with the signal)."""


class Payload:
    """The payload's process, as much of ``subprocess.Popen`` as the task and submitit's handler
    use (poll, wait, terminate, kill, returncode), over ``os.fork``: subprocess (with selectors,
    threading, signal's enums) is most of a task's imports (the docstring's last paragraph)."""

    def __init__(self, argv: list[str], cwd: str, env: dict, out: int | None):
        """Start ``argv`` in ``cwd`` with ``env``, stdin from /dev/null, stdout and stderr on ``out``
        (None: this process's). An exec failure is the child's last line and exit code 127, as
        a shell has it."""
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:       # the child: nothing here may return into the task's code
            try:
                os.chdir(cwd)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                if out is not None:
                    os.dup2(out, 1)
                    os.dup2(out, 2)
                os.execvpe(argv[0], argv, env)
            except BaseException as e:      # noqa: BLE001 -- reported on the payload's stderr
                try:
                    os.write(2, f"cannot start the payload {argv[0]!r}: {e}\n".encode())
                finally:
                    os._exit(127)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:       # reaped by a wait() this poll interrupted
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit code (-N: ended by signal N); TimeoutError after ``timeout`` seconds."""
        if timeout is not None:
            deadline = time.monotonic() + timeout
            while self.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"payload {self.pid} still running after {timeout} s")
                time.sleep(0.05)
        while self.returncode is None:
            try:
                status = os.waitpid(self.pid, 0)[1]
            except ChildProcessError:       # a poll() in a signal handler reaped it meanwhile
                if self.returncode is None:
                    raise
                break
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class SlurmTask:
    """The per-task callable; ``spec`` is plain data from the plan (argv, workdir, run_dir, ...)."""

    def __init__(self, spec: dict, attempt: int = 0):
        self.spec = dict(spec)
        self.attempt = attempt
        self.folder: str | None = None      # submitit's folder: USR2 is handed to submitit (main sets it)
        self._proc: Payload | None = None
        self._copier = None
        self._started = time.time()

    def __getstate__(self):
        return {"spec": self.spec, "attempt": self.attempt}

    def __setstate__(self, state):
        self.__init__(state["spec"], state["attempt"])

    @property
    def run_dir(self) -> str:
        return os.path.join(self.spec["workdir"], self.spec["run_dir"])

    def start(self) -> bool:
        """Start the payload (False: the run already finished, nothing started)."""
        env = os.environ
        rank, host = int(env.get("SLURM_PROCID", 0)), _host()
        state = os.path.join(self.run_dir, "state")
        done = os.path.join(state, DONE)
        if os.path.exists(done):
            print(f"run already finished ({done}); not running it again", flush=True)
            return False
        restarts = int(env.get("SLURM_RESTART_COUNT", 0) or 0)
        child_env = dict(env)
        child_env.update(
            RANK=str(rank), LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
            WORLD_SIZE=env.get("SLURM_NTASKS", "1"), GROUP_RANK=env.get("SLURM_NODEID", "0"),
            LOCAL_WORLD_SIZE=str(_local_world(env)))
        # as on the other backends (cluster/node/agent.py): the run directory as cwd, the code on the path
        os.makedirs(os.path.join(self.run_dir, "checkpoints"), exist_ok=True)
        argv = run_environment(self.spec["workdir"], self.run_dir, self.spec.get("module_dirs", []),
                               list(self.spec["argv"]), child_env)
        gpus = f", GPUs {env['CUDA_VISIBLE_DEVICES']}" if env.get("CUDA_VISIBLE_DEVICES") else ""
        print(f"task {rank}/{child_env['WORLD_SIZE']} on {host} (job {env.get('SLURM_JOB_ID')}, "
              f"restart {restarts}{gpus}), rendezvous {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}: "
              + " ".join(argv), flush=True)
        # the payload's output through a pipe of its own (prefixed as it comes): a last line
        # without a newline stays its own line. USR2 ignored across the exec (an ignored signal
        # stays ignored): SLURM signals every process of the step, the payload must outlive the
        # warning (task 0 requeues the job), and USR2's default action would end it at once
        r = w = None
        if _out is not None:
            r, w = os.pipe()
        before = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        try:
            self._proc = Payload(argv, self.run_dir, child_env, w)
        finally:
            signal.signal(signal.SIGUSR2, before)
            if w is not None:
                os.close(w)
        _start_pumps()          # this process's own lines, started after the fork (no thread to fork with)
        if r is not None:
            self._copier = copy_lines(r)
        if env.get("SLURM_LOCALID", "0") == "0":
            _start_beat(state, host, env.get("SLURM_JOB_ID") or "0", restarts)
        # the records after the payload's start, which nothing here waits for
        os.makedirs(state, exist_ok=True)
        _write_json(os.path.join(state, f"task{rank}.json"), {
            "rank": rank, "host": host, "pid": os.getpid(), "job_id": env.get("SLURM_JOB_ID"),
            "restarts": restarts, "started": time.time()})
        if rank == 0:
            record_running(self.run_dir, job_id=env.get("SLURM_JOB_ID"), host=host, restarts=restarts)
        return True

    def __call__(self) -> int:
        env = os.environ
        rank = int(env.get("SLURM_PROCID", 0))
        done = os.path.join(self.run_dir, "state", DONE)
        if not self.start():
            return 0
        copier = self._copier
        # TERM (scancel, a preemption) and CONT (sent with the warning signal): the task stays
        # to see its payload's end and, on USR2, to requeue; quietly (a Python handler, not
        # SIG_IGN: not inherited by anything this task starts later)
        for sig in (signal.SIGTERM, signal.SIGCONT):
            signal.signal(sig, _quiet)
        if self.folder is not None:
            signal.signal(signal.SIGUSR2, self._on_usr2)
        try:
            code = self._proc.wait()
            if copier is not None:
                copier.join(timeout=5)      # its lines before ours (a stray grandchild may hold the pipe)
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
        except NotRequeued as e:
            # from submitit's signal handler (_on_usr2) when it does not requeue
            if self._finished():
                return 0
            print(f"{e} Stopping.", flush=True)
            self._stop_payload()
            _exit(1)
        except BaseException:
            # requeued (submitit exits) or any other end: no payload outlives its task (an
            # orphan would also escape SLURM's process tracking)
            self._stop_payload()
            raise
        # the task ends with the payload's status (srun then stops the other tasks: gang semantics);
        # nobody reads submitit's result pickle, and its traceback would only hide the payload's
        code = code if code > 0 else 128 - code
        print(f"payload exited with code {code}", flush=True)
        _exit(code)

    def _on_usr2(self, signum, frame) -> None:
        """The time-limit warning or a preemption: submitit's own handler decides, as in a task
        of submitit's (task 0: ``checkpoint()``, the pickle for the next start, ``scontrol
        requeue``, then it exits; the other tasks: a log line). Imported now, not at the task's
        start (the module's docstring says why)."""
        _site_packages()
        from submitit.core.job_environment import JobEnvironment, SignalHandler
        from submitit.core.utils import DelayedSubmission, JobPaths, UncompletedJobError
        _quiet_submitit_log()
        job_env = JobEnvironment()      # SUBMITIT_EXECUTOR=slurm, set by the sbatch script
        paths = JobPaths(self.folder, job_id=job_env.job_id, task_id=job_env.global_rank)
        # the task of this start as submitit pickled it (the attempt, the time-outs left), with
        # the running payload: checkpoint() does not requeue a run whose payload finished
        delayed = DelayedSubmission.load(paths.submitted_pickle)
        delayed.function._proc = self._proc
        handler = SignalHandler(job_env, paths, delayed)
        # its time-out test counts from its creation, which submitit's own task does at its start
        handler._start_time = self._started
        try:
            handler.checkpoint_and_try_requeue(signum, frame)
        except UncompletedJobError as e:
            raise NotRequeued(str(e)) from None

    def _stop_payload(self, grace_s: float = 10.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(grace_s)
        except TimeoutError:
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


def record_running(run_dir, **fields) -> bool:
    """RUNNING in the run's record (run.json on the shared filesystem, under its lock), by task 0
    once its payload started: a queued (or requeued) run's record advances without anyone running
    `status` -- a detached submit, the login node's mirror (cluster/backends/login.py). Only
    over PENDING or STARTING, never over an end. Whatever goes wrong here, the task goes on
    (`status` still finds the state from SLURM)."""
    import json                             # task 0 only, after the payload's start (the module's docstring)
    from pathlib import Path
    from cluster.node import record
    run_dir = Path(run_dir)
    try:
        with record.locked(run_dir):
            data = json.loads((run_dir / "run.json").read_text())
            if data.get("final") or data.get("state") not in ("PENDING", "STARTING"):
                return False
            data["state"] = "RUNNING"
            record.write(run_dir, data)
            record.append_event(run_dir, "state", {"state": "RUNNING", "by": "task 0", **fields})
            return True
    except (OSError, ValueError) as e:
        print(f"note: run.json not updated ({e}); `status` reads the state from SLURM", flush=True)
        return False


def _quiet(signum, frame) -> None:
    pass


def _site_packages() -> None:
    """site-packages on the path, as site would have set them at the start: the task's interpreter
    starts without (``python -S``, SlurmPlan.command), and submitit lives there. Once."""
    if sys.flags.no_site and "site" not in sys.modules:
        import site
        site.main()


def _quiet_submitit_log() -> None:
    """submitit's log as the job's log wants it: warnings only (its INFO lines are not the job's;
    ``SUBMITIT_LOG_LEVEL`` in the job's env shows them), on stdout only (it logs warnings to
    stdout and stderr, which the prefixer merges)."""
    import logging
    lg = logging.getLogger("submitit")
    if "SUBMITIT_LOG_LEVEL" not in os.environ:
        lg.setLevel(logging.WARNING)
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


def _event(run_dir: str, event: str, **fields) -> None:
    import json             # the requeue signal's path only: submitit has loaded it by then
    with open(os.path.join(run_dir, "events.jsonl"), "a") as f:
        f.write(json.dumps({"t": round(time.time(), 3), "event": event, **fields}) + "\n")


# in submitit's folder: the task's spec as plain data (main starts the payload from it), in
# marshal's format 4 (dicts, lists, strings, numbers; read by any Python 3, a container's too):
# loaded with no import, where json's own (re, its scanner) took each task about 12 ms of CPU
SPEC = "task.spec"
SPEC_FORMAT = 4


def write_spec(folder, spec: dict) -> None:
    """The spec where ``main`` reads it (the backend writes it before sbatch)."""
    with open(os.path.join(folder, SPEC), "wb") as f:
        f.write(marshal.dumps(dict(spec), SPEC_FORMAT))


def read_spec(folder) -> dict:
    with open(os.path.join(folder, SPEC), "rb") as f:
        spec = marshal.loads(f.read())
    if not isinstance(spec, dict):
        raise ValueError(f"not a task spec: {type(spec).__name__}")
    return spec


_out: int | None = None                 # srun's file (fd 1 before prefix_output)
_prefix = b""


class _Pump:
    """Copies whole lines from ``fd`` to srun's file, prefixed (a last line without a newline gets
    one), in a thread of ``_thread`` (threading's import is the task's CPU, the docstring's last
    paragraph): each line is one write, so two sources never mix inside a line."""

    def __init__(self, fd: int):
        self.fd, self.started = fd, False
        self._done = _thread.allocate_lock()
        self._done.acquire()

    def start(self) -> "_Pump":
        if not self.started:
            self.started = True
            _thread.start_new_thread(self._copy, ())
        return self

    def _copy(self) -> None:
        try:
            with open(self.fd, "rb", buffering=0) as pipe:
                pending = b""
                while True:
                    chunk = pipe.read(1 << 16)
                    if not chunk:
                        break
                    *lines, pending = (pending + chunk).split(b"\n")
                    if lines:
                        _write_all(_out, b"".join(_prefix + l + b"\n" for l in lines))
                if pending:
                    _write_all(_out, _prefix + pending + b"\n")
        finally:
            self._done.release()

    def join(self, timeout: float | None = None) -> None:
        if self.started and self._done.acquire(True, -1 if timeout is None else timeout):
            self._done.release()


_pumps: list[_Pump] = []


def prefix_output(prefix: bytes) -> None:
    """From now on, every line written to fds 1 and 2 (by this process or a child that inherits
    them) reaches the original fd 1 as ``prefix + line``: a pipe on 1 and 2, copied by a thread
    that starts with the first payload (``_start_pumps``: the payload is started by fork, which
    is for a process of one thread) or at ``_exit``, which drains it."""
    global _out, _prefix
    _out, _prefix = os.dup(1), prefix
    r, w = os.pipe()
    os.dup2(w, 1)
    os.dup2(w, 2)
    os.close(w)
    _pumps.append(_Pump(r))


def copy_lines(fd: int) -> _Pump:
    """``fd``'s lines, prefixed, to srun's file, from now on (a thread)."""
    p = _Pump(fd).start()
    _pumps.append(p)
    return p


def _start_pumps() -> None:
    for p in _pumps:
        p.start()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


_beat: dict = {}                        # the node's beat (_start_beat): its file, its fields
_beat_lock = _thread.allocate_lock()


def _start_beat(state_dir: str, host: str, job_id: str, restarts: int) -> None:
    """The node's liveness beat, by its first task: ``state/alive-<job>-<host>`` rewritten every
    ALIVE_S by a thread of this process (not the payload's: ranks stuck in a collective with a
    dead peer still beat here) as "<job> <restart> <start time> <count>", through a temp file and a
    rename (a reader never sees half of it). Only whether it changes matters to the reader, by
    its own clock: no clock of the nodes is compared with another's. Ended by ``_exit``."""
    path = os.path.join(state_dir, f"alive-{job_id}-{host.replace(os.sep, '_')}")
    _beat.update(path=path, head=f"{job_id} {restarts} {time.time():.3f}", count=0)
    os.makedirs(state_dir, exist_ok=True)

    def beat() -> None:
        while _write_beat():
            time.sleep(ALIVE_S)
    _thread.start_new_thread(beat, ())


def _write_beat(ended: bool = False) -> bool:
    """One beat (``ended``: the last one, which says the task is over, so its node going quiet is
    not a silent node). False once the beat has ended."""
    with _beat_lock:
        if not _beat or _beat.get("ended"):
            return False
        _beat["count"] += 1
        _beat["ended"] = ended
        path = _beat["path"]
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(f"{_beat['head']} {_beat['count']}{' ended' if ended else ''}\n")
            os.replace(tmp, path)
        except OSError:
            pass        # the shared filesystem's hiccup: the next beat tries again
        return not ended


def _exit(code: int) -> None:
    """End the task with ``code`` once every line is out: the pipe's write ends closed here, the
    copying thread given a moment (a stray grandchild holding the pipe must not keep the task,
    and so the whole job step, alive). The node's beat ends first."""
    _write_beat(ended=True)
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    if _out is not None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        _start_pumps()
        deadline = time.monotonic() + 5
        for t in _pumps:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
    os._exit(code & 0xFF if code >= 0 else 128 - code)


def main(argv: list[str] | None = None) -> int:
    """srun's task (FOLDER: submitit's, with the spec), every line prefixed ``[host rank] ``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m cluster.node.slurm_task SUBMITIT_FOLDER", file=sys.stderr)
        return 2
    # until the task's own handler is set (SlurmTask.__call__), a warning must not end the task
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    prefix_output(f"[{_host()} {os.environ.get('SLURM_PROCID', '0')}] ".encode())
    code = 0
    try:
        try:
            task = SlurmTask(read_spec(argv[0]))
        except (OSError, ValueError, EOFError, TypeError) as e:
            print(f"cannot read the task's spec {os.path.join(argv[0], SPEC)} ({e}); it is written when "
                  "the job is submitted: submit the run again", flush=True)
            _exit(1)
        task.folder = argv[0]
        code = task()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:   # noqa: BLE001 -- its traceback, prefixed, is the task's last word
        import traceback
        traceback.print_exc()
        code = 1
    _exit(code)
    return code


if __name__ == "__main__":
    # run as cluster.node.slurm_task, not as __main__: one copy of the module's state (srun's
    # file, the prefixing threads), whichever name imports it
    from cluster.node import slurm_task
    sys.exit(slurm_task.main())
