"""bench_slurm_launch.py --trace: every Python process started with this directory on PYTHONPATH
and LAUNCH_TRACE set appends a line to that file at its start, and when it begins importing a few
modules that mark the way to step 1 (torch's import begins, train.loop's begins once torch is in).
One write per line on an O_APPEND file: lines of processes on several nodes do not mix. A Python
started without site (-S: ours' SLURM task) never reads this file."""
import os
import sys
import time

_TRACE = os.environ.get("LAUNCH_TRACE")
_MARKED = ("torch", "train.loop", "cluster.node.slurm_task", "submitit")


def _mark(what: str) -> None:
    line = "%.4f %s %s %d %d %s\n" % (time.time(), os.environ.get("SLURMD_NODENAME", "-"),
                                       os.environ.get("SLURM_PROCID", "-"), os.getpid(), os.getppid(), what)
    fd = os.open(_TRACE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _on_import(event: str, args: tuple) -> None:
    if event == "import" and args[0] in _MARKED and args[0] not in _seen:
        _seen.add(args[0])
        _mark("import " + args[0])


if _TRACE:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            _argv = " ".join(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
    except OSError:
        _argv = " ".join(sys.argv)
    _seen: set = set()
    _mark("python " + _argv[:200])
    sys.addaudithook(_on_import)
