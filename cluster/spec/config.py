"""Inventory and job specs: frozen, typed, strict (unknown keys are errors naming the valid ones)."""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from cluster.spec import hostlist
from cluster.errors import UserError
from cluster.spec.schema import build, did_you_mean, dotted
from cluster.spec.yamlsrc import Source, load, parse_scalar, show

REPO = Path(__file__).resolve().parents[2]
DEFAULT_INVENTORY = REPO / "inventory.yaml"
JOBS_DIR = REPO / "jobs"
Runtime = Literal["docker", "podman", "apptainer", "enroot"]
_HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------- inventory
@dataclass(frozen=True)
class HostDefaults:
    """Per-host settings; ``defaults:`` gives them for every host, a host entry overrides."""

    hostname: Optional[str] = None      # what ssh connects to (or a ~/.ssh/config alias)
    address: Optional[str] = None       # cluster-network address used for the rendezvous
    user: Optional[str] = None
    port: Optional[int] = None
    identity_file: Optional[str] = None
    jump_host: Optional[str] = None     # ProxyJump, e.g. user@bastion:22
    interface: Optional[str] = None     # NIC for NCCL/Gloo (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)
    workdir: Optional[str] = None       # where the code is synced and runs/ lives on the host
    python: Optional[str] = None        # interpreter with torch on the host
    gpus: Union[int, Literal["auto"], None] = None
    container_runtime: Optional[Runtime] = None


@dataclass(frozen=True)
class HostEntry(HostDefaults):
    name: str = ""


@dataclass(frozen=True)
class Host:
    """One resolved host (ranges expanded, defaults applied)."""

    name: str
    hostname: str
    address: str
    user: Optional[str]
    port: Optional[int]
    identity_file: Optional[str]
    jump_host: Optional[str]
    interface: Optional[str]
    workdir: str
    python: str
    gpus: Union[int, str]
    container_runtime: Optional[str]

    @property
    def is_local(self) -> bool:
        return self.hostname in ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class SSHSettings:
    known_hosts: str = "~/.ssh/known_hosts"
    accept_new_host_keys: bool = False   # trust-on-first-use must be asked for explicitly
    config_file: Optional[str] = "~/.ssh/config"
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 120.0
    fanout: int = 64
    warm_start: bool = True              # torchrun and its workers import torch while the preflight runs (ssh)


@dataclass(frozen=True)
class SlurmSettings:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: Optional[int] = None
    constraint: Optional[str] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    gpus_per_node: Optional[int] = None
    nodes: Optional[int] = None
    signal_delay_s: int = 120
    sbatch: dict[str, Union[str, int, bool]] = field(default_factory=dict)
    # SLURM from a machine without it (cluster/backends/login.py): every verb runs on this host,
    # named as one of hosts: or given as a host entry (user, port, identity_file, jump_host, python)
    login: Union[str, HostEntry, None] = None
    remote_dir: Optional[str] = None    # on the login node's shared filesystem: code, venv, runs


@dataclass(frozen=True)
class InventoryFile:
    hosts: list[HostEntry]
    backend: Optional[Literal["local", "ssh", "slurm"]] = None
    defaults: HostDefaults = HostDefaults()
    ssh: SSHSettings = SSHSettings()
    slurm: Optional[SlurmSettings] = None
    shared_fs: bool = False
    storage: Optional[str] = None
    # ssh: hosts (named under hosts:, ranges allowed) that no job is placed on; automatic recovery
    # puts one in place of a host that failed a run (cluster/run/recovery.py next_hosts)
    spares: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Inventory:
    path: str
    backend: str
    hosts: tuple[Host, ...]
    ssh: SSHSettings
    slurm: Optional[SlurmSettings]
    shared_fs: bool
    storage: Optional[str]
    login: Optional[Host] = None        # slurm.login, resolved as any host is
    spares: tuple[str, ...] = ()        # names of hosts kept for recovery (ssh), in the file's order

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def job_hosts(self) -> tuple[Host, ...]:
        """The hosts a job's nodes are chosen from: every host but the spares."""
        return tuple(h for h in self.hosts if h.name not in self.spares)


def load_inventory(path: Path | str | None = None) -> Inventory:
    path = Path(path) if path else DEFAULT_INVENTORY
    src = load(path)
    hosts_in = src.data.get("hosts") if isinstance(src.data, dict) else None
    if isinstance(hosts_in, list) and len(hosts_in) > hostlist.MAX_HOSTS:    # before building 10,000s of entries
        raise UserError(f"the inventory lists more than {hostlist.MAX_HOSTS:,} hosts ({len(hosts_in):,} entries)",
                        where=src.where(("hosts", hostlist.MAX_HOSTS)), key=f"hosts[{hostlist.MAX_HOSTS}]",
                        hint="list the hosts one inventory works on; past a rack, use backend: slurm with the login host")
    raw: InventoryFile = build(InventoryFile, src.data, src)
    if not raw.hosts:
        raise UserError("no hosts listed", where=src.where(("hosts",)), key="hosts",
                        hint="list at least one host, e.g. '- name: localhost'")
    _check_host_fields(raw.defaults, src, ("defaults",))
    for i, entry in enumerate(raw.hosts):
        _check_host_fields(entry, src, ("hosts", i))
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw.hosts):
        where = src.where(("hosts", i, "name"))
        if not entry.name:
            raise UserError("host entry has no name", where=src.where(("hosts", i)),
                            key=f"hosts[{i}].name", hint="add 'name: <hostname or range like gpu[01-04]>'")
        _check_text(entry.name, src, ("hosts", i, "name"))
        try:
            names = hostlist.expand(entry.name)
        except ValueError as e:
            raise UserError(f"bad host range: {e}", where=where, key=f"hosts[{i}].name",
                            hint="write ranges as SLURM does: gpu[01-16] or node[1-3,7]") from None
        if len(hosts) + len(names) > hostlist.MAX_HOSTS:
            raise UserError(f"the inventory lists more than {hostlist.MAX_HOSTS:,} hosts "
                            f"({len(hosts):,} before this entry, {len(names):,} in it)", where=where,
                            key=f"hosts[{i}].name", hint="list the hosts one inventory works on; "
                            "past a rack, use backend: slurm with the login host")
        for name in names:
            if not _HOSTNAME.fullmatch(name):
                raise UserError(f"{show(name)} is not a valid host name", where=where, key=f"hosts[{i}].name",
                                hint="use letters, digits, '.', '-' and '_' only")
            if name in seen:
                raise UserError(f"duplicate host '{name}' (also in hosts[{seen[name]}])", where=where,
                                key=f"hosts[{i}].name", hint="list every host once")
            seen[name] = i
            hosts.append(_resolve_host(name, entry, raw.defaults, len(names) > 1, src, i))
    _check_inventory(raw, src)
    backend = raw.backend or ("local" if len(hosts) == 1 and hosts[0].is_local else "ssh")
    if backend == "local" and (len(hosts) != 1 or not hosts[0].is_local):
        raise UserError("backend 'local' runs on this machine only", where=src.where(("backend",)),
                        key="backend", hint="list one host named localhost, or use backend: ssh")
    if backend == "slurm" and raw.slurm is None:
        raise UserError("backend 'slurm' needs a 'slurm:' section", where=src.where(("backend",)),
                        key="slurm", hint="add 'slurm:' with at least 'partition:'")
    login = _resolve_login(raw, hosts, src)
    spares = _resolve_spares(raw, hosts, backend, src)
    return Inventory(str(path), backend, tuple(hosts), raw.ssh, raw.slurm, raw.shared_fs, raw.storage, login,
                     spares)


def _resolve_spares(raw: InventoryFile, hosts: list, backend: str, src: Source) -> tuple[str, ...]:
    """spares: names of hosts listed under hosts: (where their settings are), each once, with at
    least one host left for jobs; the ssh backend's (SLURM picks its own nodes)."""
    if not raw.spares:
        return ()
    if backend != "ssh":
        raise _bad(f"spares are for the ssh backend, not {backend!r}", src, ("spares",),
                   "remove 'spares:' (SLURM chooses the nodes itself; the local backend has one host)")
    names = {h.name for h in hosts}
    out: dict[str, int] = {}
    for i, item in enumerate(raw.spares):
        _check_text(item, src, ("spares", i))
        try:
            expanded = hostlist.expand(item)
        except ValueError as e:
            raise _bad(f"bad host range: {e}", src, ("spares", i),
                       "write ranges as SLURM does: gpu[01-16] or node[1-3,7]") from None
        for name in expanded:
            if name not in names:
                raise _bad(f"'{name}' is not one of hosts:", src, ("spares", i),
                           did_you_mean(name, sorted(names)) +
                           "list the spare under hosts: too (its user, python, gpus, ...), then name it here")
            if name in out:
                raise _bad(f"duplicate spare '{name}' (also in spares[{out[name]}])", src, ("spares", i),
                           "name every spare once")
            out[name] = i
    if len(out) == len(hosts):
        raise _bad("every host is a spare: no host is left for jobs", src, ("spares",),
                   "name as spares only the hosts kept for recovery; jobs run on the others")
    return tuple(h.name for h in hosts if h.name in out)


def _resolve_login(raw: InventoryFile, hosts: list, src: Source) -> Optional[Host]:
    """slurm.login: one of hosts: by name, or an entry of its own (with defaults: applied, and
    checked as every host is); it needs slurm.remote_dir."""
    sl = raw.slurm
    if sl is None or sl.login is None:
        if sl is not None and sl.remote_dir is not None:
            raise _bad("is set but slurm.login is not", src, ("slurm", "remote_dir"),
                       "add 'login: <host>' (the cluster's login node), or remove remote_dir")
        return None
    if sl.remote_dir is None:
        raise _bad("needs slurm.remote_dir", src, ("slurm", "login"),
                   "add 'remote_dir: <dir>' on the cluster's shared filesystem (code, venv and runs go there)")
    _check_text(sl.remote_dir, src, ("slurm", "remote_dir"))
    rd = sl.remote_dir
    if rd == "" or rd.startswith("-") or (rd.startswith("~") and rd != "~" and not rd.startswith("~/")):
        raise _bad(f"{show(rd)} is not a usable directory", src, ("slurm", "remote_dir"),
                   "give an absolute path, or ~/PATH (the login user's home), on the shared filesystem")
    if isinstance(sl.login, str):
        for h in hosts:
            if h.name == sl.login:
                return h
        raise _bad(f"'{sl.login}' is not one of hosts:", src, ("slurm", "login"),
                   did_you_mean(sl.login, [h.name for h in hosts]) +
                   "name a host listed under hosts:, or give an entry (hostname:, user:, port:, ...)")
    _check_host_fields(sl.login, src, ("slurm", "login"))
    if sl.login.port is not None and not 0 < sl.login.port < 65536:
        raise _bad(f"port {sl.login.port} is out of range 1-65535", src, ("slurm", "login", "port"))
    name = sl.login.name or sl.login.hostname
    if not name or not _HOSTNAME.fullmatch(name):
        raise _bad("needs a hostname", src, ("slurm", "login"), "e.g. 'login: {hostname: login.cluster.org, user: me}'")
    return _resolve_host(name, sl.login, raw.defaults, False, src, 0)


# ---------------------------------------------------------------- hostile input
# Values that end up in ssh command lines, sbatch scripts, environment names and paths have the
# form their consumer accepts: a value that ssh would read as an option ("-oProxyCommand=..."), or
# that carries a second command ("; touch ...", a newline) or invisible characters, is an error
# here, before anything runs. Free-form values (env values, args, command) may hold anything but
# NUL: they are quoted once per shell hop (plan.NodeLaunch.shell), never interpreted.
_ADDRESS = re.compile(r"^(?!-)[A-Za-z0-9_.:%-]+$")               # DNS name, IPv4/IPv6, ssh alias
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\$?$")
_JUMP = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*@)?(?!-)([A-Za-z0-9_.%:-]+|\[[0-9A-Fa-f:.%]+\])(:\d{1,5})?$")
_IFACE = re.compile(r"^[\^=]?[A-Za-z0-9_.:@-]+(,[A-Za-z0-9_.:@-]+)*$")   # NCCL_SOCKET_IFNAME syntax
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")     # <job name>-<date>-<time>-<hex>
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")
_SLURM_WORD = re.compile(r"^[^\s'\"`$;\\]+$")
MAX_NODES = 100_000               # nodes of one job (SLURM's allocations can be larger than an inventory)
MAX_MINUTES = 366 * 24 * 60       # a year: time limits beyond it are typos
MAX_PROCS_PER_NODE = 256          # GPUs (or CPU processes) on one host; more is a typo
# set by torchrun (or the cluster) for every rank: a job's own value would break the run
RESERVED_ENV = {"CLUSTER_RUN_ID", "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE",
                "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR",
                "MASTER_PORT", "CLUSTER_RUN_DIR", "CLUSTER_CODE_DIR", "CLUSTER_CHECKPOINT_DIR", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE"}
# sbatch options the SLURM backend sets itself, and where the user sets them instead
SBATCH_MANAGED = {
    "partition": "slurm.partition", "account": "slurm.account", "qos": "slurm.qos",
    "constraint": "slurm.constraint", "time": "slurm.time_min (or the job's time_limit_min)",
    "cpus_per_task": "slurm.cpus_per_task", "mem": "slurm.mem_gb",
    "gpus_per_node": "slurm.gpus_per_node (or the job's gpus_per_node)", "gpus": "slurm.gpus_per_node",
    "gpus_per_task": "slurm.gpus_per_node", "ntasks_per_gpu": "slurm.gpus_per_node",
    "nodes": "the job's nodes (or slurm.nodes)", "ntasks": "the job's nodes and gpus_per_node",
    "ntasks_per_node": "the job's gpus_per_node", "signal": "slurm.signal_delay_s",
    "requeue": "the job's restart.requeue", "no_requeue": "the job's restart.requeue",
    "job_name": "the run id (set by the backend)", "output": "the backend (runs/<id>/slurm/)",
    "error": "the backend (runs/<id>/slurm/)", "open_mode": "the backend (append)",
    "chdir": "the backend (the repository)", "array": "nothing (one run is one job)",
    "wrap": "nothing (the backend writes the script)", "wait": "nothing (submit returns at once)",
}
# further sbatch long options accepted in slurm.sbatch (written with '_' or '-')
SBATCH_OPTIONS = sorted("""
acctg_freq begin bb bbf cluster_constraint clusters comment contiguous core_spec cores_per_socket
cpu_freq cpus_per_gpu deadline delay_boot dependency distribution exclude exclusive export
extra_node_info get_user_env gpu_bind gpu_freq gpus_per_socket gres gres_flags hint hold licenses
mail_type mail_user mcs_label mem_bind mem_per_cpu mem_per_gpu mincpus network nice no_kill
nodefile nodelist ntasks_per_core ntasks_per_socket overcommit oversubscribe power priority
profile propagate reboot reservation sockets_per_node spread_job switches thread_spec
threads_per_core time_min tmp use_min_nodes wait_all_nodes wckey""".split())
# ... of which these take no value ('true'), and these may go either way
SBATCH_FLAGS = {"contiguous", "hold", "overcommit", "oversubscribe", "reboot", "spread_job", "use_min_nodes"}
SBATCH_OPTIONAL_VALUE = {"exclusive", "get_user_env", "no_kill", "propagate"}
SBATCH_VALUE_MAX = 1000           # characters; sbatch reads each #SBATCH line into a fixed buffer
_FORMS = {
    "hostname": (_ADDRESS, "a host name, IP address or ~/.ssh/config alias: letters, digits, '.', '-', '_', ':' "
                           "(not starting with '-')"),
    "address": (_ADDRESS, "the host's IP address or DNS name on the network the hosts share"),
    "user": (_USER, "a login name: letters, digits, '.', '-', '_'"),
    "interface": (_IFACE, "a network interface name such as ens1f0 (NCCL_SOCKET_IFNAME syntax: 'eth,ib' or '^docker')"),
}


def check_run_id(text: str, where: str) -> str:
    """A run id (or a prefix of one, or a job name) as it enters from the command line: it names
    a directory under runs/ and lands in scripts' comments and SLURM's job name, so it has the form
    of a job name: letters, digits, '.', '-', '_', at most 128."""
    if not _RUN_ID.fullmatch(text):
        raise UserError(f"{show(text)} is not a run id", where=where,
                        hint="run ids are letters, digits, '.', '-' and '_' (e.g. resnet50-20260101-120000-ab12); "
                             "see 'python -m cluster status'")
    return text


def _bad(message: str, src: Source, path: tuple, hint: Optional[str] = None) -> UserError:
    return UserError(message, where=src.where(path), key=dotted(path), hint=hint)


def _check_text(value: Optional[str], src: Source, path: tuple) -> None:
    """A path or name from a file: no control or invisible characters (newline, ESC, U+202E)."""
    if value is not None and not value.isprintable():
        raise _bad(f"{show(value)} contains a control or invisible character", src, path,
                   "write it on one line, without control characters")


def _check_min(value, low, src: Source, path: tuple, unit: str = "") -> None:
    if value is not None and value < low:
        raise _bad(f"must be at least {low}{unit}; got {value}", src, path)


def _check_range(value, low, high, src: Source, path: tuple, unit: str = "") -> None:
    _check_min(value, low, src, path, unit)
    if value is not None and value > high:
        raise _bad(f"must be at most {high}{unit}; got {value}", src, path)


def _check_host_fields(d: HostDefaults, src: Source, path: tuple) -> None:
    for key, (rx, hint) in _FORMS.items():
        v = getattr(d, key)
        if v is not None and not rx.fullmatch(v):
            raise _bad(f"{show(v)} is not a valid {key}", src, path + (key,), hint)
    for key in ("hostname", "address"):
        v = getattr(d, key)
        if v is not None and ":" in v and not _is_ipv6(v):
            raise _bad(f"{show(v)} is not a valid {key}: a host name holds no port", src, path + (key,),
                       "put the port in 'port:' (e.g. hostname: gpu1, port: 2222); an IPv6 address is written bare")
    if d.jump_host is not None and not all(_JUMP.fullmatch(j) for j in d.jump_host.split(",")):
        raise _bad(f"{show(d.jump_host)} is not a valid jump_host", src, path + ("jump_host",),
                   "[user@]host[:port], several separated by ','")
    for key in ("identity_file", "workdir", "python"):
        _check_text(getattr(d, key), src, path + (key,))
        if getattr(d, key) == "":
            raise _bad("is empty", src, path + (key,))
    for key in ("workdir", "python"):       # paths on the host: ~ and ~/ are the remote user's home
        v = getattr(d, key)
        if v is not None and v.startswith("-"):
            raise _bad(f"{show(v)} starts with '-' (cd and the shell would read it as an option)", src,
                       path + (key,), "give an absolute path, or one relative to the login directory")
        if v is not None and v.startswith("~") and v != "~" and not v.startswith("~/"):
            raise _bad(f"{show(v)}: only ~ and ~/... (the remote user's home) are expanded", src, path + (key,),
                       "write ~/PATH, or an absolute path such as /home/USER/PATH")
    if isinstance(d.gpus, int) and d.gpus > MAX_PROCS_PER_NODE:
        raise _bad(f"{d.gpus} GPUs on one host is more than {MAX_PROCS_PER_NODE}", src, path + ("gpus",),
                   "give the GPU count of one host (or auto)")


def _is_ipv6(text: str) -> bool:
    import ipaddress
    try:
        ipaddress.IPv6Address(text.split("%", 1)[0])     # fe80::1%eth0: a zone index is allowed
        return True
    except ValueError:
        return False


MAX_TIMEOUT_S = 7 * 24 * 3600     # a week: longer is a typo (and Fabric's whole seconds overflow at .inf)


def check_seconds(value, src: Source, path: tuple) -> None:
    """A timeout: finite, more than 0, at most a week."""
    if not (0 < value <= MAX_TIMEOUT_S):
        raise _bad(f"must be more than 0 and at most {MAX_TIMEOUT_S} seconds; got {value}", src, path)


def _check_inventory(raw: InventoryFile, src: Source) -> None:
    _check_min(raw.ssh.fanout, 1, src, ("ssh", "fanout"))
    if raw.ssh.fanout > 4096:
        raise _bad(f"{raw.ssh.fanout} connections at once is more than 4096", src, ("ssh", "fanout"),
                   "a few hundred at most; each one is a thread and a socket")
    for key in ("connect_timeout_s", "command_timeout_s"):
        check_seconds(getattr(raw.ssh, key), src, ("ssh", key))
    for key in ("known_hosts", "config_file"):
        _check_text(getattr(raw.ssh, key), src, ("ssh", key))
    _check_text(raw.storage, src, ("storage",))
    sl = raw.slurm
    if sl is None:
        return
    for key in ("partition", "account", "qos", "constraint"):
        v = getattr(sl, key)
        if v is not None and not _SLURM_WORD.fullmatch(v):
            raise _bad(f"{show(v)} is not a valid {key}", src, ("slurm", key),
                       "one word as sbatch takes it: no spaces, quotes or control characters")
    for key, low, high in (("time_min", 1, MAX_MINUTES), ("cpus_per_task", 1, 4096), ("mem_gb", 0, 10**6),
                           ("gpus_per_node", 0, MAX_PROCS_PER_NODE), ("nodes", 1, MAX_NODES),
                           ("signal_delay_s", 0, 65535)):
        _check_range(getattr(sl, key), low, high, src, ("slurm", key))
    for k, v in sl.sbatch.items():
        _check_sbatch_option(k, v, src, ("slurm", "sbatch", k))


def _check_sbatch_option(key: str, value, src: Source, path: tuple) -> None:
    """One slurm.sbatch entry: a known option the backend does not set, with a value sbatch takes.
    Any printable text is a valid value: the SLURM backend renders it so that sbatch's #SBATCH
    parser reads it back exactly (backends/slurm.py sbatch_value)."""
    if not _SBATCH_KEY.fullmatch(key):
        raise _bad(f"{show(key)} is not an sbatch option name", src, path,
                   "write the long option without dashes, e.g. 'mail-type: END' or 'exclusive: true'")
    k = key.replace("-", "_")
    if k in SBATCH_MANAGED:
        raise _bad(f"'{key}' is set by the backend", src, path, f"set it through {SBATCH_MANAGED[k]}")
    if k not in SBATCH_OPTIONS:
        raise _bad(f"unknown sbatch option '{key}'", src, path,
                   did_you_mean(k, SBATCH_OPTIONS) + "valid options are: " + ", ".join(SBATCH_OPTIONS))
    if value is True and k not in SBATCH_FLAGS | SBATCH_OPTIONAL_VALUE:
        raise _bad(f"'{key}' needs a value", src, path, f"e.g. '{key}: VALUE' as `sbatch --{key.replace('_', '-')}=VALUE` takes it")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and k in SBATCH_FLAGS:
        raise _bad(f"'{key}' takes no value; got {value}", src, path, f"write '{key}: true' (or false to leave it out)")
    if isinstance(value, str):
        _check_text(value, src, path)
        if not value.strip():
            raise _bad("is empty", src, path, "give a value, or remove the option")
        if len(value) > SBATCH_VALUE_MAX:
            raise _bad(f"is {len(value)} characters long; sbatch takes at most {SBATCH_VALUE_MAX}", src, path)
        if k in SBATCH_FLAGS:
            raise _bad(f"'{key}' takes no value; got {show(value)}", src, path,
                       f"write '{key}: true' (or false to leave it out)")
    if isinstance(value, int) and not isinstance(value, bool) and not -2**31 < value < 2**31:
        raise _bad(f"{value} is out of range", src, path)


def _resolve_host(name, entry: HostEntry, defaults: HostDefaults, from_range: bool, src: Source, i: int) -> Host:
    def pick(key):
        v = getattr(entry, key)
        return v if v is not None else getattr(defaults, key)

    hostname = entry.hostname if (entry.hostname and not from_range) else (defaults.hostname or name)
    if entry.hostname and from_range:
        raise UserError("'hostname' cannot be set on a host range", where=src.where(("hosts", i, "hostname")),
                        key=f"hosts[{i}].hostname", hint="give each host its own entry, or drop 'hostname'")
    address = entry.address if not from_range else None
    if entry.address and from_range:
        raise UserError("'address' cannot be set on a host range", where=src.where(("hosts", i, "address")),
                        key=f"hosts[{i}].address", hint="give each host its own entry")
    is_local = hostname in ("localhost", "127.0.0.1", "::1")
    gpus = pick("gpus")
    if isinstance(gpus, int) and gpus < 0:
        raise UserError("must be 0 or more (or auto)", where=src.where(("hosts", i, "gpus")), key=f"hosts[{i}].gpus")
    port = pick("port")
    if port is not None and not 0 < port < 65536:
        raise UserError(f"port {port} is out of range 1-65535", where=src.where(("hosts", i, "port")),
                        key=f"hosts[{i}].port")
    return Host(
        name=name, hostname=hostname,
        address=address or defaults.address or ("127.0.0.1" if is_local else hostname),
        user=pick("user"), port=port, identity_file=pick("identity_file"), jump_host=pick("jump_host"),
        interface=pick("interface"),
        workdir=pick("workdir") or (str(REPO) if is_local else "~/ddp"),
        python=pick("python") or (os.environ.get("CLUSTER_PYTHON") or _default_python() if is_local else "python3"),
        gpus=gpus if gpus is not None else "auto",
        container_runtime=pick("container_runtime"),
    )


def _default_python() -> str:
    import sys
    return sys.executable


# ---------------------------------------------------------------- job
@dataclass(frozen=True)
class ContainerSpec:
    image: str
    runtime: Optional[Runtime] = None      # default: the host's container_runtime
    mounts: list[str] = field(default_factory=list)   # "src:dst[:ro]"
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)     # extra runtime arguments, passed as given
    shm_gb: int = 16
    pull: bool = False
    # quotas and identity (cluster/container.py maps them per runtime; None: the whole host)
    cpus: Optional[float] = None           # cores the container may use
    memory_gb: Optional[float] = None      # RAM, no swap beyond it; over it the kernel kills
    pids: Optional[int] = None             # processes + threads (docker/podman default: 16384)
    user: Literal["self", "root"] = "self"  # self: your uid/gid on the host; root only when asked


@dataclass(frozen=True)
class CheckpointSpec:
    every_steps: int = 0       # 0: the train config decides (ckpt_every)
    keep: int = 3
    sync_every_s: int = 60     # how often node 0's checkpoints are rsynced to storage
    outside_workdir: bool = False   # train.ckpt_dir may lie outside the run's workdir (/scratch/...)
    path: Optional[str] = None  # a script's own file or directory (relative to the run directory), synced too
    every_node: bool = False    # resume puts it on every node, not node 0 only (each rank loads it)


@dataclass(frozen=True)
class RestartSpec:
    max_restarts: int = 0      # torchrun restarts of a failed worker group
    requeue: bool = True       # SLURM: requeue on time limit / preemption
    max_requeues: int = 3
    # ssh: the run relaunches itself (same run id, next attempt) from its latest checkpoint after a
    # failure a restart can fix (cluster/run/recovery.py); the failure after the first max_failures
    # ends it. None: 3 for a train: job that writes checkpoints, 0 (off) otherwise
    max_failures: Optional[int] = None
    backoff_s: float = 10.0    # wait between the stopped gang and the next attempt
    # SLURM: a node whose beat (its first task's, every 2 s) stopped this long while another node's
    # goes on is taken for dead; the run's follower replaces the job without it at once, before
    # SLURM notices (SlurmdTimeout). 0: off, SLURM's own requeue only (cluster/backends/slurm.py)
    silent_s: float = 20.0


SILENT_MIN_S = 10      # restart.silent_s: at least a few of the nodes' beats (2 s) and the follower's looks


def max_failures(job: "Job") -> int:
    """The failures a run of ``job`` recovers from by itself (restart.max_failures or its default)."""
    if job.restart.max_failures is not None:
        return job.restart.max_failures
    return 3 if job.train is not None and _ckpt_every(job) > 0 else 0


def _ckpt_every(job: "Job") -> int:
    every = job.checkpoint.every_steps or (job.train or {}).get("ckpt_every", 0)
    return every if isinstance(every, int) else 0


@dataclass(frozen=True)
class DataSpec:
    """A dataset staged onto every node before the launch (cluster/backends/stage.py)."""
    source: str                # a packed set or a folder on the submitting machine, or HOST:PATH on a host
    path: str                  # where each node holds it; relative: under the host's workdir
    fanout: int = 4            # copies at once from one source (the source, and each host with a copy)
    peers: bool = True         # a host with a verified copy serves waiting hosts while the source is busy


@dataclass(frozen=True)
class Job:
    name: str
    description: str = ""
    # a count, all of the inventory's job hosts, or a range MIN-MAX (ssh): as many as the inventory
    # offers up to MAX, at least MIN; the run shrinks when a host fails and no spare is left
    nodes: Union[int, Literal["all"], str] = "all"
    gpus_per_node: Union[int, Literal["auto"]] = "auto"
    cpu_procs_per_node: int = 2            # processes per node when a host has no GPU (gloo)
    train: Optional[dict[str, Any]] = None  # config of the train package (python -m train)
    module: Optional[str] = None           # or any python module run under torchrun
    command: Optional[list[str]] = None    # or any command (torchrun --no-python)
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    container: Optional[ContainerSpec] = None
    data: Optional[DataSpec] = None        # staged to every node; train.data defaults to data.path
    checkpoint: CheckpointSpec = CheckpointSpec()
    restart: RestartSpec = RestartSpec()
    time_limit_min: Optional[int] = None
    rdzv_port: Optional[int] = None
    hang_timeout_s: int = 300             # a rank without progress this long marks the run HUNG
    startup_timeout_s: int = 900          # ... before its first progress (start-up, compile, data)
    stop_on_hang: bool = False            # stop a HUNG run (recorded as FAILED, naming the ranks)
    # deep: before the launch, GPU health and an all-reduce bandwidth test across the run's hosts
    # (cluster/backends/deepcheck.py); a host under the threshold is named and nothing starts
    preflight: Literal["basic", "deep"] = "basic"
    min_busbw_gbps: Optional[float] = None   # deep preflight's all-reduce threshold (default per GPU type)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedJob:
    job: Job
    path: str
    raw: dict                   # the data after overrides and profile, as validated
    profile: Optional[str]      # the profile applied, if any
    notes: tuple[str, ...]      # what was applied, for the user to see
    src: Optional[Source] = None   # where each key came from (file:line, or the command line)

    def where(self, key: str) -> str:
        """'jobs/x.yaml:12' (or 'command line (override ...)') for a dotted key such as 'container.runtime'."""
        return self.src.where(tuple(key.split("."))) if self.src else self.path


_NODE_RANGE = re.compile(r"([0-9]+)-([0-9]+)")     # ASCII digits only (\d would take '２-３')


def node_range(nodes) -> Optional[tuple[int, int]]:
    """``nodes: MIN-MAX`` as (MIN, MAX); None for a count or 'all' (validated by _check_job)."""
    m = _NODE_RANGE.fullmatch(nodes) if isinstance(nodes, str) else None
    return (int(m[1]), int(m[2])) if m else None


def min_nodes(job: "Job") -> Optional[int]:
    """The fewest nodes a run of ``job`` may go on with after a host is dropped (recovery); None:
    the job's node count is fixed (a count or 'all')."""
    r = node_range(job.nodes)
    return r[0] if r else None


def job_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or "/" in name:
        return p
    return JOBS_DIR / f"{name}.yaml"


def parse_overrides(items: list[str]) -> list[tuple[str, Any, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise UserError(f"override {show(item)} is not key=value", where="command line",
                            hint="write overrides as key=value, e.g. train.batch_size=32 nodes=2")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in key.split(".")):
            raise UserError(f"override key {show(key)} is not a dotted name", where="command line",
                            hint="e.g. train.lr=0.1")
        out.append((key, parse_scalar(text), item))
    return out


def load_job(name: str, overrides: list[str] = (), *, profile: Optional[str] = None) -> LoadedJob:
    """Load jobs/<name>.yaml, apply ``key=value`` overrides and, if asked, a profile, then validate."""
    path = job_path(name)
    if not path.exists():
        known = sorted(p.stem for p in JOBS_DIR.glob("*.yaml"))
        raise UserError(f"no job named {show(name)} ({path} does not exist)", where="JOB",
                        hint="known jobs: " + (", ".join(known) or "none"))
    src = load(path)
    data = copy.deepcopy(src.data) if isinstance(src.data, dict) else src.data
    if not isinstance(data, dict):
        raise UserError("a job file must be a mapping of keys", where=src.where())
    data.setdefault("name", path.stem)
    notes: list[str] = []
    train_keys = _train_keys()
    parsed = parse_overrides(list(overrides))
    # overrides of a profile (profiles.cpu.train.steps=60) change it before it is applied
    # (check_profile_overrides refuses one of a profile that the run does not apply)
    for key, value, item in parsed:
        parts = key.split(".")
        if parts[0] == "profiles":
            known = data.get("profiles") if isinstance(data.get("profiles"), dict) else {}
            if len(parts) < 3 or parts[1] not in known:
                raise UserError(f"override {show(item)} names no key of a profile of this job", where="command line",
                                key=key, hint="profiles here: " + (", ".join(map(str, known)) or "none") +
                                "; set one key of one, e.g. profiles.cpu.train.steps=60")
            _set(data, parts, value, key)
            src.lines[tuple(parts)] = 0
    if profile:
        profiles = data.get("profiles") or {}
        if isinstance(profiles, dict) and profile in profiles:
            prof = profiles[profile]
            if not isinstance(prof, dict):
                raise UserError("a profile must be a mapping", where=src.where(("profiles", profile)),
                                key=f"profiles.{profile}")
            _deep_merge(data, prof)
            for path in _paths(prof):      # errors in a profile's value name the profile's line
                src.lines[path] = src.lines.get(("profiles", profile) + path, src.lines.get(("profiles", profile)))
            notes.append(f"applying profile {profile}: " + " ".join(f"{k}={v}" for k, v in _flatten(prof)))
    job_fields = {f for f in Job.__dataclass_fields__}
    for key, value, item in parsed:
        parts = key.split(".")
        if parts[0] == "profiles":
            continue
        if parts == ["data"] and not isinstance(value, dict):
            parts = ["train", "data"]      # data=PATH is the train setting; the data: section is a mapping
        if parts[0] not in job_fields:
            if train_keys and parts[0] in train_keys and len(parts) == 1:
                parts = ["train", parts[0]]
            else:
                raise UserError(f"unknown key {show(parts[0])} in override {show(item)}", where="command line",
                                key=parts[0], hint=did_you_mean(parts[0], job_fields | train_keys) +
                                "valid keys: " + ", ".join(sorted(job_fields)) +
                                     (" (and train settings such as " + ", ".join(sorted(train_keys)[:6]) + ", ...)" if train_keys else ""))
        _set(data, parts, value, key)
        # overrides have no line: errors point at the command line instead of a wrong line
        src.lines[tuple(parts)] = 0
    if isinstance(data.get("data"), dict) and isinstance(data.get("train"), dict) and "path" in data["data"]:
        data["train"].setdefault("data", data["data"]["path"])   # train on the staged copy
    if notes:       # the notice shows what runs: an override of a profile's key wins over the profile
        notes[0] = f"applying profile {profile}: " + " ".join(_effective(prof, data))
    osrc = _OverrideSource(src, overrides)
    job: Job = build(Job, data, osrc)
    _check_job(job, osrc)
    return LoadedJob(job, str(path), data, profile if notes else None, tuple(notes), osrc)


def check_profile_overrides(overrides, applied: Optional[str]) -> None:
    """An override of a profile the run does not apply would change nothing: refused, not ignored."""
    for key, _, item in parse_overrides(list(overrides)):
        parts = key.split(".")
        if parts[0] == "profiles" and parts[1] != applied:
            why = f"profile {applied!r} is applied" if applied else "no profile is applied"
            raise UserError(f"override {show(item)} changes profile {show(parts[1])}, but {why} on these hosts",
                            where="command line", key=key,
                            hint=f"set {'.'.join(parts[2:])}=... instead (it applies with or without a profile)")


def _set(data: dict, parts: list, value, key: str) -> None:
    """data[a][b][c] = value for an override a.b.c=value, making sections on the way."""
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"'{p}' is not a section, cannot set '{key}'", where="command line",
                            hint=f"set the whole section in the job file, or a key inside it ({p}.KEY=...)")
        cur = nxt
    cur[parts[-1]] = value


def _paths(d: Mapping, prefix: tuple = ()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, Mapping):
            yield from _paths(v, prefix + (k,))


class _OverrideSource(Source):
    """Names 'command line (override ...)' for keys that came from overrides."""

    def __init__(self, src: Source, overrides):
        super().__init__(src.name, src.data, src.lines)
        self.overrides = list(overrides)

    def where(self, path: tuple = ()) -> str:
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        if p and self.lines.get(p) == 0:
            return "command line (override " + ".".join(map(str, p)) + ")"
        return super().where(path)


def _check_job(job: Job, src: Source) -> None:
    if not _JOB_NAME.fullmatch(job.name):
        raise _bad(f"{show(job.name)} is not a valid job name", src, ("name",),
                   "set 'name:' to letters, digits, '.', '-' and '_' (at most 64; it names the run directory)")
    given = [k for k in ("train", "module", "command") if getattr(job, k) is not None]
    if len(given) != 1:
        raise UserError("a job runs exactly one of 'train', 'module' or 'command'" +
                        (f" (found {', '.join(given)})" if given else ""), where=src.where(),
                        hint="use 'train:' for the train package, 'module:' for a python module, 'command:' for a program")
    if job.command is not None and not job.command:
        raise UserError("'command' is empty", where=src.where(("command",)), key="command")
    if job.command and not job.command[0]:
        raise _bad("the program name is empty", src, ("command", 0))
    if job.module is not None and not _MODULE.fullmatch(job.module):
        raise _bad(f"{show(job.module)} is not a python module name", src, ("module",),
                   "a dotted name such as 'mypkg.train' (arguments go in 'args:')")
    if isinstance(job.nodes, int) and job.nodes < 1:
        raise UserError("must be at least 1 (or all)", where=src.where(("nodes",)), key="nodes")
    _check_nodes(job.nodes, src)
    if isinstance(job.gpus_per_node, int) and job.gpus_per_node < 0:
        raise UserError("must be 0 or more (or auto)", where=src.where(("gpus_per_node",)), key="gpus_per_node")
    if job.cpu_procs_per_node < 1:
        raise UserError("must be at least 1", where=src.where(("cpu_procs_per_node",)), key="cpu_procs_per_node")
    for key in ("gpus_per_node", "cpu_procs_per_node"):
        v = getattr(job, key)
        if isinstance(v, int) and v > MAX_PROCS_PER_NODE:
            raise _bad(f"{v} processes on one host is more than {MAX_PROCS_PER_NODE}", src, (key,))
    if isinstance(job.nodes, int) and job.nodes > MAX_NODES:
        raise _bad(f"must be at most {MAX_NODES}; got {job.nodes}", src, ("nodes",))
    _check_range(job.time_limit_min, 1, MAX_MINUTES, src, ("time_limit_min",))
    _check_range(job.checkpoint.every_steps, 0, 10**12, src, ("checkpoint", "every_steps"))
    _check_range(job.checkpoint.keep, 1, 10**6, src, ("checkpoint", "keep"))
    _check_range(job.checkpoint.sync_every_s, 1, MAX_TIMEOUT_S, src, ("checkpoint", "sync_every_s"))
    cp = job.checkpoint.path
    if cp is not None:
        _check_text(cp, src, ("checkpoint", "path"))
        if not cp.strip("/") or cp.startswith(("/", "~")) or ".." in cp.split("/"):
            raise _bad(f"{show(cp)} is not a path inside the run directory", src, ("checkpoint", "path"),
                       "give it relative to the run directory (the job's working directory), e.g. snapshot.pt")
    _check_range(job.restart.max_restarts, 0, 10**6, src, ("restart", "max_restarts"))
    _check_range(job.restart.max_requeues, 0, 10**6, src, ("restart", "max_requeues"))
    _check_range(job.restart.max_failures, 0, 1000, src, ("restart", "max_failures"))
    _check_range(job.restart.backoff_s, 0, 3600, src, ("restart", "backoff_s"), " (seconds)")
    _check_range(job.restart.silent_s, 0, 3600, src, ("restart", "silent_s"), " (seconds)")
    if 0 < job.restart.silent_s < SILENT_MIN_S:
        raise _bad(f"must be 0 (off) or at least {SILENT_MIN_S} (seconds); got {job.restart.silent_s}", src,
                   ("restart", "silent_s"), "each node beats every 2 s: a shorter silence is a loaded node, "
                                            "not a dead one")
    if job.min_busbw_gbps is not None and not job.min_busbw_gbps > 0:
        raise _bad(f"must be more than 0; got {job.min_busbw_gbps}", src, ("min_busbw_gbps",),
                   "a bus bandwidth in Gbit/s, e.g. 100")
    if job.container is not None:      # one validator of the section: the one that implements it
        from cluster.spec.container import check_spec
        check_spec(job.container, src.where)
    if job.data is not None:
        for key in ("source", "path"):
            _check_text(getattr(job.data, key), src, ("data", key))
            if not getattr(job.data, key).strip():
                raise _bad("is empty", src, ("data", key), "a path (data.path: relative ones are under each host's workdir)")
        _check_min(job.data.fanout, 1, src, ("data", "fanout"))
    for key in ("hang_timeout_s", "startup_timeout_s"):
        _check_range(getattr(job, key), 1, MAX_TIMEOUT_S, src, (key,), " (seconds)")
    if job.rdzv_port is not None and not 1024 <= job.rdzv_port < 65536:
        raise UserError("must be a port in 1024-65535", where=src.where(("rdzv_port",)), key="rdzv_port")
    for k in job.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise _bad(f"{show(k)} is not a valid environment variable name", src, ("env", k),
                       "use letters, digits and '_', not starting with a digit")
        if k in RESERVED_ENV or k.startswith("TORCHELASTIC_"):
            raise _bad(f"'{k}' is set by torchrun and the cluster for every rank", src, ("env", k),
                       "remove it from the job's env")
    if job.train is not None:
        ckpt = job.train.get("ckpt_dir")
        if isinstance(ckpt, str) and not job.checkpoint.outside_workdir and _outside(ckpt):
            raise _bad(f"{show(ckpt)} is outside the run's workdir", src, ("train", "ckpt_dir"),
                       "leave ckpt_dir out (the run keeps runs/<id>/checkpoints), give a path relative to the "
                       "workdir, or set checkpoint.outside_workdir: true if rank 0 is meant to write there")
        try:
            from train import config as tcfg
        except ImportError:
            return
        try:
            tcfg.validate(dict(job.train))
        except tcfg.ConfigError as e:
            key = getattr(e, "key", None)
            message = str(getattr(e, "message", e))
            hint = None
            if key and message == "unknown key":
                message = f"unknown key {show(key)}"
                hint = did_you_mean(key, tcfg.FIELDS) + "train settings are: " + ", ".join(sorted(tcfg.FIELDS))
            raise UserError(message, where=src.where(("train", key) if key else ("train",)),
                            key=f"train.{key}" if key else "train", hint=hint) from None


def _check_nodes(nodes, src: Source) -> None:
    """``nodes:`` as a string: 'all' or a range MIN-MAX with 1 <= MIN <= MAX."""
    if not isinstance(nodes, str) or nodes == "all":
        return
    hint = "write a number of hosts (nodes: 2), all, or a range MIN-MAX (nodes: 2-4: up to 4 hosts, and the " \
           "run goes on with at least 2 when a host fails)"
    r = node_range(nodes)
    if r is None:
        raise _bad(f"must be a number of hosts, 'all' or a range MIN-MAX; got {show(nodes)}", src, ("nodes",), hint)
    lo, hi = r
    if lo < 1:
        raise _bad(f"a range of nodes starts at 1 or more; got {show(nodes)}", src, ("nodes",), hint)
    if lo > hi:
        raise _bad(f"the range's minimum is above its maximum; got {show(nodes)}", src, ("nodes",),
                   f"write it MIN-MAX: {hi}-{lo}")
    if hi > MAX_NODES:
        raise _bad(f"must be at most {MAX_NODES}; got {show(nodes)}", src, ("nodes",))


def _outside(path: str) -> bool:
    """An absolute path, ~, or one that climbs out with '..' (relative paths are under the workdir)."""
    import posixpath
    return path.startswith(("/", "~")) or posixpath.normpath(path).split("/")[0] == ".."


def _train_keys() -> set[str]:
    try:
        from train import config as tcfg
        return set(tcfg.FIELDS)
    except (ImportError, AttributeError):
        return set()


def _deep_merge(dst: dict, src: Mapping) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def _effective(prof: Mapping, data: Mapping):
    """``key=value`` of each setting of a profile as the job has it after the overrides."""
    for k, v in prof.items():
        now = data.get(k) if isinstance(data, Mapping) else None
        if isinstance(v, Mapping):
            yield from _effective(v, now if isinstance(now, Mapping) else {})
        elif now != v:
            yield f"{k}={now} (override; the profile's: {v})"
        else:
            yield f"{k}={v}"


def _flatten(d: Mapping, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, "")
        else:
            yield (prefix + k, v)



def inventory_from_plain(d: dict) -> Inventory:
    """Rebuild an Inventory from the snapshot kept in run.json."""
    slurm = d.get("slurm")
    return Inventory(
        path=d["path"], backend=d["backend"], hosts=tuple(Host(**h) for h in d["hosts"]),
        ssh=SSHSettings(**d["ssh"]),
        slurm=SlurmSettings(**slurm) if slurm else None,
        shared_fs=d["shared_fs"], storage=d.get("storage"),
        login=Host(**d["login"]) if d.get("login") else None, spares=tuple(d.get("spares") or ()))


def job_from_plain(d: dict) -> Job:
    """Rebuild a Job from the snapshot kept in run.json (the next attempt of a run: the job as it
    was submitted, whatever its file says now)."""
    job = build(Job, d, Source("run.json (job.resolved)", d))
    return dataclasses.replace(job, args=list(job.args))
