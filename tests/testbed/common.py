"""What every part of the testbed shares: its names and addresses, errors, the state file
(.testbed/state.json), and running a command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

SUBNET_PREFIX = "10.213.0."
BRIDGE = "ddptb0"
BRIDGE_ADDR = SUBNET_PREFIX + "1"
VETH_PREFIX = "tbveth"
CONTROLLER = "tbctl"
PARTITION = "debug"
GPUS_PER_NODE = 2
STATE_PREFIX = "ddp-testbed-"
TMP_ROOT = "/tmp"
MARKER = "ddp-testbed"  # tags /etc/hosts lines and /etc/slurm files we own
NETNS_DIR = Path("/run/netns")
NODE_RE = re.compile(r"^node\d+$")


class TestbedError(RuntimeError):
    """The testbed could not be brought up (or torn down)."""


class TestbedUnavailable(TestbedError):
    """This machine cannot run the testbed at all (not root, not Linux, no ip netns, no packages)."""


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[testbed] {msg}", flush=True)


def run(argv, check=True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 30)
    p = subprocess.run(argv, **kw)
    if check and p.returncode != 0:
        raise TestbedError(f"command failed ({p.returncode}): {' '.join(map(str, argv))}\n"
                           f"{(p.stderr or '').strip()}")
    return p


def node_names(n: int) -> list[str]:
    return [f"node{i}" for i in range(1, n + 1)]


def node_addr(i: int) -> str:
    return f"{SUBNET_PREFIX}{10 + i}"


def testbed_dir(root: Path = REPO_ROOT) -> Path:
    return Path(root) / ".testbed"


def state_file(root: Path = REPO_ROOT) -> Path:
    return testbed_dir(root) / "state.json"


def venv_python(root: Path = REPO_ROOT) -> str:
    """The repo venv's python (not resolved: resolving a venv's symlink leaves the venv)."""
    cand = Path(root) / ".venv" / "bin" / "python"
    if cand.exists():
        return str(cand)
    return sys.executable


def load_state(root: Path = REPO_ROOT) -> dict | None:
    try:
        return json.loads(state_file(root).read_text())
    except (OSError, ValueError):
        return None


def write_state(state: dict, root: Path) -> None:
    d = testbed_dir(root)
    d.mkdir(exist_ok=True)
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, d / "state.json")
