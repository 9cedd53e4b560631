"""Cluster in a box for the tests: N SSH hosts and a SLURM cluster in network namespaces.

    python -m tests.testbed up --nodes 3     # as root; writes .testbed/inventory.yaml
    python -m tests.testbed status
    python -m tests.testbed down             # idempotent; leaves nothing behind
    python -m tests.testbed install-deps     # apt-get the Debian packages that are missing

See README.md beside this file. Standard library only.
"""

from .bed import (  # noqa: F401
    BRIDGE,
    CONTROLLER,
    PARTITION,
    REPO_ROOT,
    TestbedError,
    TestbedUnavailable,
    down,
    health,
    install_deps,
    leftovers,
    load_state,
    missing_packages,
    node_names,
    status,
    unavailable_reason,
    up,
)
