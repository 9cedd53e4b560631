"""Containers: the job's torchrun inside docker, podman, apptainer or enroot (pyxis) on every node.

One ``container:`` section in the job, mapped per runtime. Pure functions that return argv lists
(one shell hop later quotes them once); only ``preflight_local`` and ``remove_local`` run anything.

    docker     sh -c 'r=$1; shift; exec "$0" "$r" --user "$(id -u):$(id -g)" "$@"'
               docker run --rm --init --name N --label cluster.run_id=ID --label cluster.host=H
               --network host [--gpus all] --shm-size Gg (or --ipc host when shm_gb is 0)
               --ulimit memlock=-1:-1 --ulimit stack=67108864:67108864 --pull never
               -v WD:WD -w WD -e K=V ... [--cpus N] [--memory Mm --memory-swap Mm] --pids-limit P
               ARGS IMAGE [sh -c OOM_SCRIPT GB] python3 -m torch.distributed.run ...
    podman     the same; GPUs through CDI (--device nvidia.com/gpu=all); image ``rootfs:/PATH``
               runs the host directory PATH as an overlay (``--rootfs PATH:O``, no image, no pull:
               for tests and air-gapped hosts)
    apptainer  env APPTAINERENV_K=V ... apptainer exec [--nv] --bind WD:WD --pwd WD ARGS IMAGE python3 ...
    enroot     SLURM only, through pyxis: ``srun_args`` (--container-image, --container-mounts, ...)

Only torchrun goes inside; the node agent stays outside and keeps the process group, the pid/exit
files and the log prefixes. docker/podman run attached: the client is in the agent's process group,
so the TERM of a stop reaches it and it passes the signal on to the container (sig-proxy, --init
forwards it to torchrun). The container itself belongs to the daemon/conmon, not to the group:
stop also removes it by name (``remove_argv``) and verifies by label (``list_argv``) that none of
the run's containers is left. apptainer runs as a plain child, inside the group: nothing to remove.

The workdir (code and runs/) and, when it lies elsewhere, the run directory are mounted at the same
path inside, so sync, ``logs -f``, checkpoints and resume work as without a container. The job runs
in its run directory, as without a container, with the agent's CLUSTER_RUN_DIR, CLUSTER_CODE_DIR,
CLUSTER_CHECKPOINT_DIR and PYTHONPATH. Two things are known only on the host, so ``sh -c`` there
adds them after ``run`` (``host_script``, the one deliberate shell expression): the submitting
user's uid:gid (``user: self``, the default: files written to mounts are theirs; ``user: root``
gives --user 0:0 instead) and, for a workdir under ``~`` (the ssh default), ``-v
"$CLUSTER_CODE_DIR:$CLUSTER_CODE_DIR" -w "$PWD"``: the code's directory the agent set
(cluster/node/agent.py) and the run directory it starts in.

Quotas (``cpus``, ``memory_gb``, ``pids``) map to each runtime's flags (``limits``); pyxis gets
SLURM's (--cpus-per-task, --mem). With a memory limit, OOM_SCRIPT in the image waits for torchrun
and turns the container cgroup's oom_kill count into one log line that diagnose knows.
"""
from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

from cluster.errors import UserError
from cluster.node.containers import remove_argv
from cluster.image import compare as compare_digests, digest_argv, digest_of
from cluster.spec.container import ROOTFS, RUNTIMES, URI, Mount, check_spec, limits, parse_mount

LABEL = "cluster.run_id"                 # docker/podman labels: the run id (stop verifies by it) ...
HOST_LABEL = "cluster.host"              # ... and the inventory's host name (hosts may share storage)
PYTHON = "python3"                       # in the image: present in NGC, pytorch/pytorch and Debian images
# NVIDIA's settings for PyTorch in docker: pinned memory for RDMA, large thread stacks
ULIMITS = (("memlock", "-1:-1"), ("stack", "67108864:67108864"))
# The two deliberate shell expressions of a docker/podman line, resolved on the host by ``sh -c``
# (argv: runtime, "run", options...): the submitting user's uid:gid there (the default identity
# inside), and for a ``~`` workdir the code's directory the agent set (CLUSTER_CODE_DIR) mounted, with
# the run directory the agent starts in as the working directory.
SELF_USER = '--user "$(id -u):$(id -g)"'
TILDE_MOUNT = '-v "$CLUSTER_CODE_DIR:$CLUSTER_CODE_DIR" -w "$PWD"'
APPTAINER_CGROUPS = '[ "$(id -u)" = 0 ] || [ -f /sys/fs/cgroup/cgroup.controllers ]'   # root, or cgroups v2
# Run inside the container around torchrun when memory is limited: forwards TERM/INT/HUP (sh would
# not), then reads the container's own cgroup: a kill by the memory limit becomes one plain log line.
OOM_LINE = "container: out of memory"
OOM_SCRIPT = ('"$@" & p=$!; trap \'kill -TERM $p 2>/dev/null\' TERM INT HUP; '
              'while :; do wait $p; rc=$?; kill -0 $p 2>/dev/null || break; done; '
              'n=$(cat /sys/fs/cgroup/memory.events /sys/fs/cgroup/memory/memory.oom_control 2>/dev/null '
              '| sed -n "s/^oom_kill //p" | head -n 1); '
              f'if [ "${{n:-0}}" -gt 0 ]; then echo "{OOM_LINE}: the kernel killed $n process(es) at the '
              'container memory limit ($0 GB, container.memory_gb)" >&2; fi; exit $rc')


def host_script(user: str, tilde: bool) -> Optional[str]:
    """The ``sh -c`` script that runs ``runtime run OPTIONS...`` with the host's expressions added."""
    extra = ([SELF_USER] if user == "self" else []) + ([TILDE_MOUNT] if tilde else [])
    return 'r=$1; shift; exec "$0" "$r" ' + " ".join(extra) + ' "$@"' if extra else None


# set by the agent on the host (cluster/node/agent.py: run_environment), passed through by name
PASS_ENV = ("CLUSTER_RUN_DIR", "CLUSTER_CODE_DIR", "CLUSTER_CHECKPOINT_DIR", "PYTHONPATH")


@dataclass(frozen=True)
class ContainerRef:
    """What the plan records per node: enough for preflight and stop, from run.json alone."""

    runtime: str
    name: str        # docker/podman container name ("" for apptainer: nothing outside the group)
    image: str       # as the runtime takes it
    pull: bool
    run_id: str
    quotas: bool = False   # container.cpus/memory_gb/pids asked for (apptainer: preflight checks cgroups)


@dataclass(frozen=True)
class Check:
    """One preflight command for a host; it must exit 0, else ``problem`` (and what to do)."""

    argv: tuple[str, ...]
    problem: str
    hint: str
    digest: bool = False     # it prints the image's digest: every host of the run must print the same
    compare_only: bool = False   # nothing but the digest (one host alone has nothing to compare it with)


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def resolve_runtime(spec, host) -> str:
    """The job's runtime, else the one the inventory says the host offers."""
    runtime = spec.runtime or getattr(host, "container_runtime", None)
    if not runtime:
        raise UserError(f"the job runs in a container but no runtime is known for host {host.name}",
                        where="job", key="container.runtime",
                        hint="set container.runtime in the job, or container_runtime for the host in the inventory")
    if spec.image.startswith(ROOTFS) and runtime != "podman":
        raise UserError(f"image '{spec.image}' (a host directory as the root) works with podman only, "
                        f"not {runtime}", where="job", key="container.image", hint="use runtime: podman")
    return runtime


def container_name(run_id: str, host: str) -> str:
    """Per run and host, so stop removes exactly the run's containers (docker's name rules)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"ddp-{run_id}-{host}")


def inner_python(spec, host) -> str:
    """The interpreter inside: the spec's ``python`` if the job gives one ('host': the inventory's),
    the host's own for a rootfs image (the host's files are the container's), else python3."""
    py = getattr(spec, "python", None)
    if py == "host" or (py is None and spec.image.startswith(ROOTFS)):
        return host.python
    return py or PYTHON


def docker_image(image: str) -> str:
    return image[len("docker://"):] if image.startswith("docker://") else image


def apptainer_image(image: str) -> str:
    """Paths (.sif, sandbox directories) and URIs as given; a registry reference gets docker://."""
    if URI.match(image) or image.startswith(("/", "./", "../")) or image.endswith((".sif", ".simg", ".img")):
        return image
    return "docker://" + image


def enroot_image(image: str) -> str:
    """pyxis/enroot write the registry host before '#': nvcr.io/nvidia/pytorch:24.05 -> nvcr.io#nvidia/pytorch:24.05."""
    image = docker_image(image)
    if "#" in image or image.startswith(("/", "./")):
        return image
    first, sep, rest = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return f"{first}#{rest}"
    return image


# ---------------------------------------------------------------- wrapping (ssh and local backends)
def wrap(spec, runtime: str, *, name: str, workdir: str, run_dir: str, env: Mapping[str, str],
         payload_argv: Sequence[str], gpus: int, run_id: Optional[str] = None,
         host: Optional[str] = None) -> list[str]:
    """The node's payload (torchrun argv) run inside the job's image, as one argv list.

    ``env`` (the plan's variables: CLUSTER_RUN_ID, NCCL_SOCKET_IFNAME, job env ...) and the spec's
    own ``env`` (which wins) are passed in; ``gpus`` > 0 asks for the host's GPUs.
    """
    check_spec(spec)
    mounts = _mounts(spec, workdir, run_dir)
    inner = {**env, **spec.env}
    cwd = run_cwd(workdir, run_dir)
    if runtime in ("docker", "podman"):
        return _docker_like(spec, runtime, name, workdir, cwd, mounts, inner, list(payload_argv), gpus, run_id, host)
    if runtime == "apptainer":
        return apptainer_exec(spec, payload_argv, workdir=workdir, env=inner, gpus=gpus, mounts=mounts,
                              own_mounts=False, pwd=cwd)
    if runtime == "enroot":
        raise UserError("enroot runs under SLURM only (pyxis: srun --container-image)", where="job",
                        key="container.runtime", hint="use backend slurm, or docker, podman or apptainer over ssh")
    raise UserError(f"unknown runtime '{runtime}'", where="job", key="container.runtime",
                    hint="use one of: " + ", ".join(RUNTIMES))


def run_cwd(workdir: str, run_dir: str) -> Optional[str]:
    """The job's directory inside (its run directory), where it is known before the host: None for
    a workdir under ~ (the shell line's $PWD there, the agent having moved into it)."""
    if run_dir.startswith("/"):
        return run_dir
    return workdir.rstrip("/") + "/" + run_dir if workdir.startswith("/") else None


def _mounts(spec, workdir: str, run_dir: str) -> list[Mount]:
    """workdir (code, runs/), the run dir where it is not under the workdir, then the job's."""
    out: list[Mount] = []
    for key, path in (("workdir", workdir), ("runs directory", run_dir)):
        if ":" in path or "," in path:
            raise UserError(f"the {key} '{path}' cannot be mounted into a container (':' or ',' in it)",
                            where="inventory" if key == "workdir" else "CLUSTER_RUNS_DIR", key=key,
                            hint="use a path without ':' and ','")
    if workdir.startswith("/"):
        out.append(Mount(workdir, workdir, ""))
    if run_dir.startswith("/") and not (workdir.startswith("/") and
                                        run_dir.startswith(workdir.rstrip("/") + "/")):
        out.append(Mount(run_dir, run_dir, ""))
    for i, text in enumerate(spec.mounts):
        m = parse_mount(text, "job", f"container.mounts[{i}]")
        if m not in out:
            out.append(m)
    return out


def _docker_like(spec, runtime, name, workdir, cwd, mounts, env, payload, gpus, run_id, host) -> list[str]:
    opts = ["--rm", "--init", "--name", name]
    if run_id is not None:
        opts += ["--label", f"{LABEL}={run_id}"]
    if host is not None:
        opts += ["--label", f"{HOST_LABEL}={host}"]
    opts += ["--network", "host"]
    if gpus:
        opts += ["--gpus", "all"] if runtime == "docker" else ["--device", "nvidia.com/gpu=all"]
    # one IPC namespace per node either way; podman refuses --shm-size together with --ipc host
    opts += ["--shm-size", f"{spec.shm_gb}g"] if spec.shm_gb else ["--ipc", "host"]
    given = _ulimits_in(spec.args)
    for kind, value in ULIMITS:
        if kind not in given:          # the job's --ulimit of the same kind replaces ours
            opts += ["--ulimit", f"{kind}={value}"]
    rootfs = spec.image.startswith(ROOTFS)
    if not rootfs:
        opts += ["--pull", "never"]    # preflight made sure the image is there, on every host
    for m in mounts:
        opts += ["-v", m.text()]
    if cwd:
        opts += ["-w", cwd]
    for k, v in sorted(env.items()):
        opts += ["-e", f"{k}={v}"]
    opts += [a for k in PASS_ENV if k not in env for a in ("-e", k)]
    lim = limits(spec)
    if lim["cpus"] is not None:
        opts += ["--cpus", _num(lim["cpus"])]
    if lim["memory_gb"] is not None:       # swap = memory: the limit is the limit, not a slowdown
        mem = f"{int(lim['memory_gb'] * 1024)}m"
        opts += ["--memory", mem, "--memory-swap", mem]
        payload = ["sh", "-c", OOM_SCRIPT, _num(lim["memory_gb"])] + payload
    opts += ["--pids-limit", str(lim["pids"])]
    if getattr(spec, "user", "self") == "root":
        opts += ["--user", "0:0"]
    opts += list(spec.args)
    # --rootfs is a flag: the first word after the options is the directory, then the command
    image = ["--rootfs", spec.image[len(ROOTFS):] + ":O"] if rootfs else [docker_image(spec.image)]
    script = host_script(getattr(spec, "user", "self"), not workdir.startswith("/"))
    head = ["sh", "-c", script, runtime, "run"] if script else [runtime, "run"]
    return head + opts + image + payload


def _ulimits_in(args: Sequence[str]) -> set[str]:
    kinds, it = set(), iter(args)
    for a in it:
        value = next(it, "") if a == "--ulimit" else a[len("--ulimit="):] if a.startswith("--ulimit=") else None
        if value:
            kinds.add(value.split("=", 1)[0])
    return kinds


def apptainer_exec(spec, payload: Sequence[str], *, workdir: str, env: Mapping[str, str], gpus: int,
                   mounts: Iterable[Mount] = (), own_mounts: bool = True, pwd: Optional[str] = None) -> list[str]:
    """``apptainer exec`` around ``payload`` (also what the slurm backend runs per task).

    Variables go in as APPTAINERENV_K=V through ``env``: byte-exact for any value (apptainer's
    --env splits on ','), and they win over the image's own environment. With ``own_mounts``,
    the workdir and the spec's mounts are bound (``mounts`` come on top).
    """
    check_spec(spec)
    binds = list(mounts)
    if own_mounts:
        binds = [m for m in _mounts(spec, workdir, "") if m not in binds] + binds
    argv = ["env"] + [f"APPTAINERENV_{k}={v}" for k, v in sorted({**env, **spec.env}.items())]
    argv += ["apptainer", "exec"] + (["--nv"] if gpus else [])
    if getattr(spec, "user", "self") == "root":
        argv += ["--fakeroot"]          # apptainer runs as the user already; root only when asked
    argv += apptainer_limits(spec)
    for m in binds:
        argv += ["--bind", m.text()]
    if pwd or workdir.startswith("/"):
        argv += ["--pwd", pwd or workdir]     # a ~ workdir: apptainer binds $HOME and keeps the cwd itself
    return argv + list(spec.args) + [apptainer_image(spec.image)] + list(payload)


def apptainer_limits(spec) -> list[str]:
    """apptainer's cgroup flags (3.10+: root, or cgroups v2 with systemd for a user; preflight checks)."""
    lim, out = limits(spec), []
    if lim["cpus"] is not None:
        out += ["--cpus", _num(lim["cpus"])]
    if lim["memory_gb"] is not None:
        out += ["--memory", f"{int(lim['memory_gb'] * 1024)}M", "--memory-swap", f"{int(lim['memory_gb'] * 1024)}M"]
    if getattr(spec, "pids", None) is not None:   # no default here: it would need cgroups on every host
        out += ["--pids-limit", str(lim["pids"])]
    return out


# ---------------------------------------------------------------- SLURM (pyxis/enroot)
def srun_args(spec, *, workdir: str, mounts: Iterable[str] = (), env_names: Iterable[str] = (),
              name: Optional[str] = None, tasks_per_node: int = 1) -> list[str]:
    """pyxis options for srun: every task of the step starts inside the image.

    ``env_names``: variables the host side sets that must win over the image's ENV
    (--container-env). Unnamed containers are removed when the step ends; a ``name`` keeps the
    container for later steps of the job.
    """
    check_spec(spec)
    if spec.image.startswith(ROOTFS):
        raise UserError(f"image '{spec.image}' works with podman only, not pyxis", where="job",
                        key="container.image", hint="give an image reference or a .sqsh path")
    binds = [Mount(workdir, workdir, "")] if workdir.startswith("/") else []
    for text in list(mounts) + list(spec.mounts):
        m = parse_mount(text)
        if m not in binds:
            binds.append(m)
    argv = [f"--container-image={enroot_image(spec.image)}"]
    if binds:
        argv.append("--container-mounts=" + ",".join(m.text() for m in binds))
    argv.append(f"--container-workdir={workdir}")
    if name:
        argv.append(f"--container-name={name}")
    names = sorted(set(env_names) | set(spec.env))
    if names:
        argv.append("--container-env=" + ",".join(names))
    if getattr(spec, "user", "self") == "root":
        argv.append("--container-remap-root")     # pyxis runs as the user unless asked
    # quotas are SLURM's (its cgroups): a node's cpus spread over its tasks, memory per node
    if getattr(spec, "cpus", None) is not None:
        argv.append(f"--cpus-per-task={max(1, math.ceil(spec.cpus / max(1, tasks_per_node)))}")
    if getattr(spec, "memory_gb", None) is not None:
        argv.append(f"--mem={int(spec.memory_gb * 1024)}M")
    if getattr(spec, "pids", None) is not None:
        raise UserError("SLURM/pyxis has no per-job process limit", where="job", key="container.pids",
                        hint="remove container.pids for SLURM runs (the admin sets TasksMax in cgroup.conf)")
    return argv + list(spec.args)


# ---------------------------------------------------------------- plan hook
def wrap_node(spec, host, *, run_id: str, run_dir: str, env: Mapping[str, str], payload_argv: Sequence[str],
              gpus: int) -> tuple[list[str], ContainerRef]:
    """For make_plan: the node's torchrun argv run in the image (its python), and what to record."""
    runtime = resolve_runtime(spec, host)
    name = container_name(run_id, host.name) if runtime in ("docker", "podman") else ""
    payload = [inner_python(spec, host)] + list(payload_argv[1:])
    argv = wrap(spec, runtime, name=name, workdir=host.workdir, run_dir=run_dir, env=env,
                payload_argv=payload, gpus=gpus, run_id=run_id, host=host.name)
    image = (apptainer_image(spec.image) if runtime == "apptainer" else
             spec.image if spec.image.startswith(ROOTFS) else docker_image(spec.image))
    quotas = any(getattr(spec, k, None) is not None for k in ("cpus", "memory_gb", "pids"))
    return argv, ContainerRef(runtime, name, image, spec.pull, run_id, quotas)


def refs_of_run(run_data: Mapping) -> list[tuple[str, ContainerRef]]:
    """(host, ContainerRef) of every node of a recorded run (run.json's plan)."""
    out = []
    for node in (run_data.get("plan") or {}).get("nodes", []):
        ref = node.get("container")
        if ref:
            out.append((node["host"], ContainerRef(**ref)))
    return out


# ---------------------------------------------------------------- preflight and stop
def preflight_checks(ref: ContainerRef) -> list[Check]:
    """Commands for one host, in order: the runtime is there, then the image is (or is pulled)."""
    rt, image = ref.runtime, ref.image
    where_else = "set container.runtime in the job, or container_runtime for the host, to one it has"
    if rt in ("docker", "podman"):
        checks = [Check((rt, "version", "--format", "{{.Server.Version}}" if rt == "docker" else "{{.Client.Version}}"),
                        f"{rt} is not installed or not working" + (" (is the daemon running?)" if rt == "docker" else ""),
                        f"install {rt} on the host, or {where_else}")]
        if image.startswith(ROOTFS):
            path = image[len(ROOTFS):]
            checks.append(Check(("test", "-d", path), f"rootfs directory {path} does not exist",
                                "give an existing directory (rootfs:/ is the host's root)"))
        elif ref.pull:
            checks.append(Check((rt, "pull", "-q", image), f"cannot pull image {image}",
                                f"check the name and the registry login on the host ({rt} login)"))
        else:
            exists = ("image", "inspect", "--format", "{{.Id}}", image) if rt == "docker" else ("image", "exists", image)
            checks.append(Check((rt,) + exists, f"image {image} is not present",
                                f"copy it to every host (python -m cluster image push {image}), pull it "
                                f"({rt} pull {image}) or set container.pull: true", digest=rt == "docker"))
        if not image.startswith(ROOTFS) and not checks[-1].digest:   # a tag pulled twice can differ too
            checks.append(Check(tuple(digest_argv(rt, image)), f"cannot read the digest of image {image}",
                                f"check {rt} on the host", digest=True, compare_only=True))
        return checks
    if rt == "apptainer":
        checks = [Check(("apptainer", "--version"), "apptainer is not installed",
                        f"install apptainer on the host, or {where_else}")]
        if ref.quotas:      # apptainer limits through cgroups: as root, or as a user on cgroups v2
            checks.append(Check(("sh", "-c", APPTAINER_CGROUPS),
                                "apptainer cannot apply container.cpus/memory_gb/pids here: it needs root "
                                "or cgroups v2 (this host has cgroups v1 and the run is not root)",
                                "leave the quotas out for apptainer hosts, or boot the host with cgroups v2 "
                                "(systemd.unified_cgroup_hierarchy=1)"))
        if URI.match(image):   # fetched into apptainer's cache on first use: fetch it now, everywhere
            checks.append(Check(("apptainer", "exec", image, "true"), f"cannot fetch or run image {image}",
                                "check the name and the registry login (apptainer remote login)"))
        else:
            checks.append(Check(("test", "-r", image), f"image {image} is not present",
                                "copy the .sif to the same path on every host (python -m cluster image push "
                                f"{image}, or use a shared filesystem)"))
            checks.append(Check(tuple(digest_argv(rt, image)), f"cannot checksum image {image}",
                                "install sha256sum (coreutils) on the host", digest=True,
                                compare_only=True))
        return checks
    raise UserError(f"runtime '{rt}' has no preflight outside SLURM", where="job", key="container.runtime")


def preflight_argv(runtime: str, image: str, pull: bool = False) -> list[list[str]]:
    """The preflight commands alone (see ``preflight_checks`` for the messages that go with them)."""
    ref = ContainerRef(runtime, "", image, pull, "")
    return [list(c.argv) for c in preflight_checks(ref)]


def check_failed(host: str, check: Check, code: int, output: str) -> UserError:
    """The error for a failed preflight command: host, problem, command, exit code, last lines."""
    tail = "\n".join(output.strip().splitlines()[-5:])
    return UserError(f"{check.problem} (`{' '.join(check.argv)}` exited {code})" +
                     (":\n    " + tail.replace("\n", "\n    ") if tail else ""),
                     where=host, key="container", hint=check.hint)


def check_digests(image: str, outputs: Mapping[str, str]) -> None:
    """The digest checks' outputs (host -> stdout) must agree: else one error naming the hosts."""
    compare_digests(image, {h: digest_of(out) or None for h, out in outputs.items()})


def list_argv(runtime: str, run_id: str, host: Optional[str] = None) -> Optional[list[str]]:
    """Names of the run's containers still there (of ``host`` only, if given), one per line."""
    if runtime not in ("docker", "podman"):
        return None
    filters = ["--filter", f"label={LABEL}={run_id}"]
    if host is not None:        # several label filters: both must match (docker and podman)
        filters += ["--filter", f"label={HOST_LABEL}={host}"]
    return [runtime, "ps", "--all", *filters, "--format", "{{.Names}}"]


def preflight_local(nodes, run: Callable = subprocess.run) -> None:
    """Run every node's checks on this machine (local backend); raise on the first failure."""
    done = set()
    for node in nodes:
        ref = getattr(node, "container", None)
        if ref is None or (ref.runtime, ref.image, ref.pull) in done:
            continue
        done.add((ref.runtime, ref.image, ref.pull))
        for check in [c for c in preflight_checks(ref) if not c.compare_only]:
            try:
                p = run(list(check.argv), capture_output=True, text=True, timeout=1800)
            except FileNotFoundError:
                raise check_failed(node.host, check, 127, f"{check.argv[0]}: command not found") from None
            except subprocess.TimeoutExpired:
                raise check_failed(node.host, check, -1, "timed out after 1800 s") from None
            if p.returncode != 0:
                raise check_failed(node.host, check, p.returncode, p.stderr or p.stdout)


def remove_local(run_data: Mapping, run: Callable = subprocess.run) -> list[str]:
    """Remove the run's containers on this machine; describe any that is still there after."""
    left = []
    for host, ref in refs_of_run(run_data):
        rm, ls = remove_argv(ref.runtime, ref.name), list_argv(ref.runtime, ref.run_id, host)
        if rm is None:
            continue
        try:
            run(rm, capture_output=True, timeout=120)
            names = run(ls, capture_output=True, text=True, timeout=60).stdout.split()
        except (OSError, subprocess.TimeoutExpired) as e:
            left.append(f"{host}: cannot check container {ref.name}: {e}")
            continue
        left += [f"{host}: {ref.runtime} container {n} still there" for n in names]
    return left
