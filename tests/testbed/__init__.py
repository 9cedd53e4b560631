"""Cluster in a box for the tests: N SSH hosts and a SLURM cluster in network namespaces.

    python -m tests.testbed up --nodes 3     # as root; writes .testbed/inventory.yaml
    python -m tests.testbed status
    python -m tests.testbed down             # idempotent; leaves nothing behind
    python -m tests.testbed install-deps     # apt-get the Debian packages that are missing

One module per concern, each read in one sitting (README.md beside this file has the picture):
  common.py     names, addresses, errors, .testbed/state.json
  procs.py      start a daemon in a host, find and stop a testbed's processes, wait for one
  network.py    bridge, a network namespace per host, /etc/hosts lines
  sshd.py       keys, an sshd per host, .testbed/ssh_config
  slurm.py      munged, slurmctld, a slurmd per host, slurm.conf/gres.conf, the sacct stand-in
  packages.py   the programs and Debian packages needed (install-deps)
  lifecycle.py  up and down, in order; .testbed/inventory.yaml and env
  check.py      status, health, leftovers
  sacct.py      the sacct stand-in itself (copied to <state>/bin/sacct)
Standard library only.
"""

from .check import health, leftovers, status
from .common import (
    BRIDGE,
    CONTROLLER,
    PARTITION,
    REPO_ROOT,
    TestbedError,
    TestbedUnavailable,
    load_state,
    node_names,
)
from .lifecycle import down, removed_containers, up
from .packages import install_deps, missing_packages, unavailable_reason

__all__ = ["BRIDGE", "CONTROLLER", "PARTITION", "REPO_ROOT", "TestbedError", "TestbedUnavailable", "down",
           "health", "install_deps", "leftovers", "load_state", "missing_packages", "node_names",
           "removed_containers", "status", "unavailable_reason", "up"]
