"""The job's ``container:`` section: what each key may hold, checked with file:line:key
(cluster/container.py turns a valid section into each runtime's argv)."""
from __future__ import annotations

import re
from typing import Callable, NamedTuple

from cluster.errors import UserError
from cluster.spec.yamlsrc import show

RUNTIMES = ("docker", "podman", "apptainer", "enroot")
ROOTFS = "rootfs:"                       # podman image "rootfs:/" -> --rootfs /:O
USERS = ("self", "root")
# quotas: key, unit, the most that makes sense (the range check also refuses nan and inf)
QUOTAS = (("cpus", "cores", 4096), ("memory_gb", "GB", 1 << 20), ("pids", "processes", 1 << 22))
DEFAULT_PIDS = 16384   # podman's own default (2048) is too few for 8 ranks x DataLoader workers x threads
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
URI = re.compile(r"^[a-z][a-z0-9+.-]*://")
# a registry reference (nvcr.io/nvidia/pytorch:24.05-py3, nvcr.io#nvidia/...), a URI (docker://...),
# a path (/images/torch.sif, ./x.sif) or rootfs:/DIR; never an option (-...), spaces or shell syntax
_IMAGE = re.compile(r"^(?!-)[A-Za-z0-9._/~][A-Za-z0-9._/:@+#=~-]*$")


class Mount(NamedTuple):
    src: str
    dst: str
    mode: str        # "", "ro" or "rw"

    def text(self) -> str:
        return f"{self.src}:{self.dst}" + (f":{self.mode}" if self.mode else "")


def check_spec(spec, where: Callable[[tuple], str] = lambda path: "job") -> None:
    """Raise UserError for a container section no runtime can take (``where`` maps a key path
    such as ("container", "mounts", 0) to 'file:line', as config's Source.where does)."""
    image = spec.image
    if not _IMAGE.fullmatch(image):
        raise UserError(f"{show(image)} is not a container image reference", where=where(("container", "image")),
                        key="container.image",
                        hint="e.g. nvcr.io/nvidia/pytorch:24.05-py3, docker://..., /images/torch.sif, rootfs:/")
    if image.startswith(ROOTFS) and not image[len(ROOTFS):].startswith("/"):
        raise UserError(f"{show(image)}: rootfs needs an absolute host directory", where=where(("container", "image")),
                        key="container.image", hint="e.g. rootfs:/ (the host's root as an overlay, podman)")
    if spec.runtime is not None and spec.runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {show(spec.runtime)}", where=where(("container", "runtime")),
                        key="container.runtime", hint="use one of: " + ", ".join(RUNTIMES))
    for i, text in enumerate(spec.mounts):
        parse_mount(text, where(("container", "mounts", i)), f"container.mounts[{i}]")
    for k in spec.env:
        if not _ENV_KEY.fullmatch(k):
            raise UserError(f"{show(k)} is not a valid environment variable name", where=where(("container", "env", k)),
                            key=f"container.env.{k}", hint="use letters, digits and '_', not starting with a digit")
    if "CLUSTER_RUN_ID" in spec.env:
        raise UserError("'CLUSTER_RUN_ID' is set by the cluster (stop finds the run's processes by it)",
                        where=where(("container", "env", "CLUSTER_RUN_ID")), key="container.env.CLUSTER_RUN_ID",
                        hint="remove it from the container's env")
    if not 0 <= spec.shm_gb <= 4096:
        raise UserError(f"must be 0 or more, at most 4096 (0: the host's /dev/shm through --ipc host); got {spec.shm_gb}",
                        where=where(("container", "shm_gb")), key="container.shm_gb")
    for key, unit, most in QUOTAS:
        v = getattr(spec, key, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= most):
            raise UserError(f"must be a number of {unit} above 0, at most {most}; got {show(v)}",
                            where=where(("container", key)), key=f"container.{key}",
                            hint="leave it out for the default (see README, Containers)")
    if getattr(spec, "pids", None) is not None and int(spec.pids) != spec.pids:
        raise UserError("must be a whole number", where=where(("container", "pids")), key="container.pids")
    if getattr(spec, "user", "self") not in USERS:
        raise UserError(f"{show(spec.user)} is not a container user", where=where(("container", "user")),
                        key="container.user",
                        hint="self (default: your uid/gid on the host, files on mounts are yours) or root")


def limits(spec) -> dict:
    """The quotas asked for, defaults applied: cpus/memory_gb None mean the whole host."""
    pids = getattr(spec, "pids", None)
    return {"cpus": getattr(spec, "cpus", None), "memory_gb": getattr(spec, "memory_gb", None),
            "pids": DEFAULT_PIDS if pids is None else int(pids)}


def parse_mount(text: str, where: str = "job", key: str = "container.mounts") -> Mount:
    """``SRC:DST[:ro|rw]`` or ``PATH`` (same path inside), both absolute. ':' and ',' cannot be in a
    path: every runtime splits on ':', and apptainer and pyxis join mounts with ','."""
    if not text.isprintable():
        raise UserError(f"mount {show(text)} contains a control or invisible character", where=where, key=key,
                        hint="write it on one line, without control characters")
    parts = text.split(":")
    mode = ""
    if len(parts) > 1 and parts[-1] in ("ro", "rw"):
        mode = parts.pop()
    if len(parts) == 1:
        parts.append(parts[0])
    bad = (len(parts) != 2 or "," in text or "\0" in text or
           not all(p.startswith("/") for p in parts))
    if bad:
        raise UserError(f"mount {show(text)} is not SRC:DST[:ro|rw] or PATH, with absolute paths", where=where, key=key,
                        hint="e.g. /data/imagenet:/data:ro; paths cannot contain ':' or ','")
    return Mount(parts[0], parts[1], mode)
