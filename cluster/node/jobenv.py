"""The job's view of a host, shared by the node agent (local, ssh) and the SLURM task.

Its own module, with nothing but ``os``: the SLURM task imports it on the way to starting its
payload, and the agent's imports (argparse, the gang, warm start), and pathlib's, took each task
a few milliseconds of CPU before that start (bench/bench_slurm_launch.py).
"""
from __future__ import annotations

import os


def run_environment(code_dir: str, run_dir, module_dirs: list[str], payload: list[str],
                    environ=os.environ) -> list[str]:
    """The job's view of the host, set in ``environ``; returns the payload with ``{code}`` filled in.

    The job runs in its run directory (runs/<id>/, never synced as code, new for every run), with
    the code on its path: the code's directory, after a module job's own directory (as
    ``python pkg/script.py`` would have it), and the inventory's python with its ``~/`` expanded
    (the payload is started without a shell). CLUSTER_RUN_DIR, CLUSTER_CODE_DIR and
    CLUSTER_CHECKPOINT_DIR (synced from node 0 to storage, put back by ``submit --resume``) name them."""
    paths = [os.path.join(code_dir, d) for d in module_dirs] + [code_dir]
    if environ.get("PYTHONPATH"):
        paths.append(environ["PYTHONPATH"])
    environ["PYTHONPATH"] = os.pathsep.join(paths)
    environ["CLUSTER_RUN_DIR"] = str(run_dir)
    environ["CLUSTER_CODE_DIR"] = code_dir
    environ["CLUSTER_CHECKPOINT_DIR"] = os.path.join(str(run_dir), "checkpoints")
    python = payload[0] if payload else ""
    return [code_dir + a[len("{code}"):] if a == "{code}" or a.startswith("{code}/")
            # the inventory's python (``~/venv/bin/python``): no shell expands it on this side
            else os.path.expanduser(a) if a == python and a.startswith("~/") else a
            for a in payload]
