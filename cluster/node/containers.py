"""Removing a run's docker/podman container on its node (standard library only: the agent uses it).

A docker/podman container belongs to the daemon (or conmon), not to the agent's process group, so
killing the group does not remove it; the argv rendered by cluster/container.py names it, and this
turns that payload back into the remove command.
"""
from __future__ import annotations

from typing import Optional, Sequence


def remove_argv(runtime: str, name: str) -> Optional[list[str]]:
    """Remove the container now (kill if running); None where nothing outlives the process group.
    Its exit status is no verdict (the container may be gone already, --rm): verify with list_argv."""
    if runtime == "podman":
        return ["podman", "rm", "--force", "--ignore", "--time", "0", name]
    if runtime == "docker":
        return ["docker", "rm", "--force", name]
    return None


def remove_argv_of_payload(payload: Sequence[str]) -> Optional[list[str]]:
    """For the node agent (which knows only its payload): remove_argv of the docker/podman
    container the payload runs, None when the payload is not one of ours."""
    p = list(payload)
    if p[:2] == ["sh", "-c"] and len(p) > 3 and p[2].startswith('r=$1; shift; exec "$0" "$r" '):
        p = p[3:]
    if len(p) < 4 or p[0] not in ("docker", "podman") or p[1] != "run" or "--name" not in p:
        return None
    return remove_argv(p[0], p[p.index("--name") + 1])
