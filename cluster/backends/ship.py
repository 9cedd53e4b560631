"""A node function (cluster/node/probe.py) as one ``python -c`` command for a host's shell.

The function, the helpers it uses and a line that reads its argument as JSON from the first line of
stdin and prints the result as JSON: nothing needs to be installed on the host but a python, not
even our code (the probe runs before the code is synced).
"""
from __future__ import annotations

import functools
import inspect

from cluster.node import probe
from cluster.node.shm import remove_left_semaphores
from cluster.node.probe import (_activity, _gpu_count, _gpu_query, _group_alive, _job_python, _other_runs, _park,
                                _probe, parked_argv, _rank_states, _run_processes, stale_files)
from cluster.quoting import quote_argv

_HELPERS = {"_probe": (_gpu_count, _run_processes, _other_runs, stale_files, _job_python),
            "_probe_then_launch": (_gpu_count, _run_processes, _other_runs, stale_files, _job_python, _probe,
                                   parked_argv, _park),
            "_stop": (_run_processes, _group_alive, remove_left_semaphores),
            "_status": (_group_alive, _run_processes, _activity, _gpu_query, _rank_states),
            "_gpu_count": (), "_gpu_query": (), "_serve": (_group_alive,)}


def host_command(python: str, func, site: bool = True) -> str:
    """``python -c <func's source>``: the function reads its argument as JSON on stdin, prints JSON."""
    return quote_argv([python] + ([] if site else ["-S"]) + ["-c", _host_source(func.__name__)], home=[python])


@functools.lru_cache(maxsize=None)
def _host_source(name: str) -> str:
    func = getattr(probe, name)
    src = "import json, os, signal, socket, subprocess, sys, time\n"
    src += "".join(inspect.getsource(f) + "\n" for f in _HELPERS[name] + (func,))
    return src + f"print(json.dumps({name}(json.loads(sys.stdin.readline() or '{{}}'))))\n"


def module_command(python: str, func) -> str:
    """``python -c``: a node module whole (standard library at import, as cluster/node/deep.py),
    then ``func`` called as host_command's functions are (JSON in on stdin, JSON out)."""
    import sys
    src = inspect.getsource(sys.modules[func.__module__])
    src += f"\nimport json, sys\nprint(json.dumps({func.__name__}(json.loads(sys.stdin.readline() or '{{}}'))))\n"
    return quote_argv([python, "-c", src], home=[python])
