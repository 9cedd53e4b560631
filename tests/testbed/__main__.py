"""python -m tests.testbed {up,down,status,install-deps,leftovers}  (run from the repo root, as root)."""

from __future__ import annotations

import argparse
import sys

from . import TestbedError, TestbedUnavailable, down, install_deps, leftovers, status, up


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.testbed",
                                 description="Cluster in a box: SSH hosts and SLURM in network namespaces.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="bring the testbed up (tears down an earlier one first)")
    p_up.add_argument("--nodes", type=int, default=3, help="number of hosts (default 3)")
    p_up.add_argument("--timeout", type=float, default=60, help="seconds to wait for the daemons")
    p_down = sub.add_parser("down", help="tear everything down (idempotent)")
    p_down.add_argument("--keep-state", action="store_true",
                        help="keep the state directory (logs) instead of deleting it")
    sub.add_parser("status", help="show the testbed; exit 0 healthy, 1 down, 3 unhealthy")
    sub.add_parser("install-deps", help="apt-get install the missing Debian packages (root)")
    sub.add_parser("leftovers", help="list anything of a testbed that exists; exit 1 if any")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "up":
            up(nodes=a.nodes, timeout=a.timeout)
            return 0
        if a.cmd == "down":
            down(keep_state=a.keep_state)
            return 0
        if a.cmd == "status":
            return status()
        if a.cmd == "install-deps":
            return install_deps()
        if a.cmd == "leftovers":
            left = leftovers()
            for x in left:
                print(x)
            return 1 if left else 0
    except TestbedUnavailable as e:
        print(f"testbed: unavailable: {e}", file=sys.stderr)
        return 2
    except TestbedError as e:
        print(f"testbed: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("testbed: interrupted; tearing down", file=sys.stderr)
        down(quiet=True)
        return 130
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `... status | head`
        sys.exit(0)
