"""Warm workers: torchrun's workers forked from a server that has imported torch already.

A cold node spends most of its start in ``import torch``: once in torchrun, then once more in every
worker (``python -u -m MODULE ...``, a fresh interpreter per rank). A parked agent (cluster/node/agent.py,
``--park-fd``) forks torchrun early; that fork starts a multiprocessing fork server, which imports
torch (and the job's ``--preload`` modules) while the preflight still runs. At GO, torchrun runs as
``torchrun.config_from_args`` configures it, with two changes: the entrypoint is :func:`run_module`
instead of the interpreter, and the start method is "forkserver" (as ``torchrun --run-path`` does for
scripts). Each worker then starts in milliseconds and runs the module as ``python -m`` would:
``__main__``, ``sys.argv``, exit codes (``os._exit`` too), tracebacks on stderr, atexit handlers; ps shows it as
``python -u -m MODULE ...``.

Used only where the payload is ``-m MODULE`` under this python with a fixed rendezvous
(``--master-port``, as every plan has); anything else runs torchrun unchanged.

Standard library at import time: the fork server and every worker import this module.
"""
from __future__ import annotations

import os
import sys


def retitle(argv: list[str]) -> None:
    """Show ``argv`` as this process's command line (ps, pgrep -f), as setproctitle does: rewrite
    the original argv area in place (never longer than it: the rest is cleared)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])     # arg_start, arg_end (fields 48, 49)
        import ctypes
        new = b"\0".join(a.encode() for a in argv)[:end - start - 1]
        buf = new + b"\0" * (end - start - len(new))
        ctypes.memmove(start, buf, len(buf))
    except (OSError, ValueError, IndexError, AttributeError):
        pass


def start_server(preload: list[str]) -> bool:
    """Start the fork server, which imports torch and ``preload`` (in that order) in the background.
    Returns False where it cannot start; torchrun then starts its workers fresh."""
    import multiprocessing
    from multiprocessing import forkserver
    try:
        multiprocessing.set_forkserver_preload([__name__, "torch", *preload])
        forkserver.ensure_running()
        return True
    except Exception:   # noqa: BLE001 -- no warm workers then, nothing else changes
        return False


def launch(torchrun, argv: list[str]) -> bool:
    """Run torchrun ``argv`` with warm workers (see above); False, having started nothing, where the
    argv is not one they apply to (the caller runs ``torchrun.main(argv)`` then)."""
    args = torchrun.parse_args(argv)
    if args.standalone or args.master_port is None or args.no_python or args.run_path or not args.module:
        return False
    config, cmd, cmd_args = torchrun.config_from_args(args)
    if cmd != sys.executable or cmd_args[:2] != ["-u", "-m"]:
        return False
    from torch.distributed.elastic.multiprocessing.errors import record
    from torch.distributed.launcher.api import elastic_launch
    config.start_method = "forkserver"
    print(f"workers fork from a server that imported torch (warm start): -m {cmd_args[2]}", flush=True)
    run_module.__name__ = cmd_args[2]   # torchrun's summary names the module ("train FAILED"), as
    # in a cold start; the workers find the function by its __qualname__, which stays
    record(elastic_launch(config=config, entrypoint=run_module))(*cmd_args[2:])
    return True


def run_module(module: str, *args: str) -> None:
    """One worker: ``python -u -m module args``, in a fork of the server that imported torch."""
    import atexit
    import runpy
    retitle([sys.executable, "-u", "-m", module, *args])
    # as a fresh interpreter started by torchrun would be: in the run directory, with PYTHONPATH
    # (the code, a module job's own directory) on the path; the server began in the code's directory
    if os.environ.get("CLUSTER_RUN_DIR"):
        os.chdir(os.environ["CLUSTER_RUN_DIR"])
    for p in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
        if p and p not in sys.path:
            sys.path.insert(0, p)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        # a fresh interpreter's OpenMP reads it when torch loads; the server loaded torch without it
        sys.modules["torch"].set_num_threads(int(threads))
    sys.argv = [module, *args]
    real_exit, me = os._exit, os.getpid()

    def leave(code=0):
        # a job's os._exit (to skip the interpreter's teardown) ends the worker through torchrun's
        # wrapper, which must still hand back the worker's result: without it torchrun waits for
        # it forever. A child of the worker (a DataLoader's forked worker) exits for real
        if os.getpid() != me:
            real_exit(code)
        raise SystemExit(code)
    os._exit = leave
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        raise
    except Exception as e:
        import traceback           # what the interpreter prints for an uncaught exception (from
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)   # runpy on), and exit 1
        raise SystemExit(1) from None
    finally:
        os._exit = real_exit
        atexit._run_exitfuncs()    # multiprocessing's children end with os._exit, which skips them
