"""The OpenSSH client's argv for a host, from the inventory: one builder for every ``ssh`` this
machine starts (rsync's ``-e``, checkpoint staging, ``shell``/``jupyter``, ``image push``).

The inventory's ssh settings mean here what they mean to the Fabric pool (cluster/backends/transport.py):

* ``ssh.config_file``: ``~/.ssh/config`` (the default) is read as ssh reads it (no ``-F``; the
  system file too); another file is the only one read (``-F FILE``); none: no file (``-F none``).
* ``ssh.known_hosts`` / ``ssh.accept_new_host_keys``: the one known_hosts file (beside the system
  one); an unknown host is refused (``StrictHostKeyChecking=yes``) unless the inventory asks for
  trust on first use (``accept-new``, which appends it to that file).
* ``identity_file``: that key only (``IdentitiesOnly=yes``; the agent may still offer it).
* ``jump_host`` (``[user@]host[:port]``, or ``a,b`` for a chain): every hop is reached with the
  same key, known_hosts policy, config file and timeouts as the host itself, as Fabric's gateways
  are. ``ssh -J`` would reach the hops with ssh's defaults instead (default keys and known_hosts,
  a prompt for an unknown key), so each hop is a ``ProxyCommand`` built by this same function.
  A hop's user and port are its own (from the hop, else the ssh config, else ssh's defaults),
  never the host's, as with ``ssh -J`` and Fabric.
* ``connect_timeout_s``: ``ConnectTimeout`` in whole seconds, rounded up as Fabric rounds it.
* Key or agent only, never a password prompt (as Fabric, which has no interactive path).
"""
from __future__ import annotations

import math
import os
import shlex
from dataclasses import replace
from typing import Optional

from cluster.spec.config import Host, SSHSettings

DEFAULT_CONFIG = "~/.ssh/config"


def ssh_options(host: Host, ssh: SSHSettings, *, batch: bool = True, keepalive_s: int = 5) -> list[str]:
    """``ssh`` and its options for ``host`` (no destination: rsync's ``-e`` appends it).

    ``batch``: no prompt at all (``BatchMode``: not even a key's passphrase), for commands nobody
    watches; an interactive ``shell`` passes False. ``keepalive_s``: a silent peer is given up after
    three unanswered keepalives."""
    argv = ["ssh"]
    if ssh.config_file is None:
        argv += ["-F", "none"]
    elif os.path.expanduser(ssh.config_file) != os.path.expanduser(DEFAULT_CONFIG):
        argv += ["-F", os.path.expanduser(ssh.config_file)]
    argv += ["-o", "StrictHostKeyChecking=" + ("accept-new" if ssh.accept_new_host_keys else "yes"),
             "-o", "UserKnownHostsFile=" + _path_value(os.path.expanduser(ssh.known_hosts)),
             "-o", f"ConnectTimeout={max(1, math.ceil(ssh.connect_timeout_s))}",
             "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
             "-o", f"ServerAliveInterval={keepalive_s}", "-o", "ServerAliveCountMax=3",
             "-o", "LogLevel=ERROR"]       # no "Permanently added ..." lines in rsync's or the shell's output
    if batch:
        argv += ["-o", "BatchMode=yes"]
    if host.port:
        argv += ["-p", str(host.port)]
    if host.user:
        argv += ["-l", host.user]
    if host.identity_file:
        argv += ["-i", os.path.expanduser(host.identity_file), "-o", "IdentitiesOnly=yes"]
    if host.jump_host:
        # 'a,b': a is reached directly, b through a, the host through b (ProxyJump's order)
        *before, last = host.jump_host.split(",")
        user, port, name = parse_hop(last)
        hop = replace(host, hostname=name, user=user, port=port, jump_host=",".join(before) or None)
        # ssh expands %-tokens in a ProxyCommand: only '-W [%h]:%p' is this ssh's (the host and port
        # to reach, as ssh -J writes it); the rest, a chain's inner ProxyCommand too, is kept as written
        words = ssh_options(hop, ssh, batch=batch, keepalive_s=keepalive_s)
        proxy = " ".join(shlex.quote(a) for a in words).replace("%", "%%")
        argv += ["-o", f"ProxyCommand={proxy} -W '[%h]:%p' -- {shlex.quote(name).replace('%', '%%')}"]
    return argv


def ssh_argv(host: Host, ssh: SSHSettings, *, tty: Optional[bool] = None, batch: bool = True,
             keepalive_s: int = 5) -> list[str]:
    """``ssh [-t|-T] OPTIONS -- HOSTNAME``: append the remote command (one string, read by the
    host's login shell). ``tty``: True asks for a terminal, False refuses one, None: ssh decides."""
    argv = ssh_options(host, ssh, batch=batch, keepalive_s=keepalive_s)
    if tty is not None:
        argv.insert(1, "-t" if tty else "-T")
    return argv + ["--", host.hostname]


def rsync_rsh(host: Host, ssh: SSHSettings) -> str:
    """rsync's ``-e`` value (rsync splits it into words as a shell would, then appends the host)."""
    return " ".join(shlex.quote(a) for a in ssh_options(host, ssh))


def parse_hop(hop: str) -> tuple[Optional[str], Optional[int], str]:
    """``[user@]host[:port]`` -> (user, port, host), as ssh -J and Fabric read a hop."""
    user, _, rest = hop.strip().rpartition("@")
    name, port = rest, None
    if rest.startswith("[") and "]" in rest:             # [v6::addr]:port
        name, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else None
    elif rest.count(":") == 1:
        name, _, port = rest.partition(":")
    return user or None, int(port) if port and port.isdigit() else None, name


def _path_value(path: str) -> str:
    """A file name as ssh's ``-o`` reads it: the value is split at blanks (several files), so a
    name with a blank is quoted."""
    return f'"{path}"' if any(c.isspace() for c in path) else path
