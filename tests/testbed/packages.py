"""What the testbed needs on this machine: the programs it runs, the Debian packages they come
from (`python -m tests.testbed install-deps` apt-gets the missing ones), root and `ip netns`."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time

from .common import log


DAEMON_BINARIES = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "munged": "munged",
    "sshd": "/usr/sbin/sshd",
    "ssh": "ssh",
    "ssh-keygen": "ssh-keygen",
    "rsync": "rsync",
    "sinfo": "sinfo",
    "scontrol": "scontrol",
    "nsenter": "nsenter",
    "unshare": "unshare",
    "ip": "ip",
    "tmux": "tmux",         # the terminal `cluster top` is tested in
}

# Debian packages the testbed (and the containers work) needs; install-deps adds the missing ones.
DEB_PACKAGES = (
    "slurm-wlm", "munge", "openssh-server", "openssh-client", "rsync",
    "podman", "runc", "iproute2", "util-linux",
    "debootstrap", "docker.io",       # the small training image's base; the docker engine tests
    "tmux", "chromium",     # cluster top under a real terminal; TensorBoard and report pages in a real browser
)


def unavailable_reason() -> str | None:
    """Why this machine cannot run the testbed, or None if it can."""
    if platform.system() != "Linux":
        return f"the testbed needs Linux (this is {platform.system()})"
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces, /etc/hosts, daemons)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"`ip netns` is unavailable here: {p.stderr.strip()}"
    missing = [name for name, exe in DAEMON_BINARIES.items() if shutil.which(exe) is None]
    if missing:
        return ("missing programs: " + ", ".join(missing)
                + " (run `make testbed-deps` or `python -m tests.testbed install-deps` as root)")
    return None


def missing_packages() -> list[str]:
    missing = []
    for pkg in DEB_PACKAGES:
        p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if p.returncode != 0 or "install ok installed" not in p.stdout:
            missing.append(pkg)
    return missing


def install_deps(quiet: bool = False) -> int:
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        print("[testbed] not a Debian/Ubuntu system (no dpkg/apt-get): install slurm-wlm, munge, "
              "openssh-server, rsync, podman, runc, tmux, chromium by hand", file=sys.stderr)
        return 1
    missing = missing_packages()
    if not missing:
        log("all Debian packages present: " + " ".join(DEB_PACKAGES), quiet)
        return 0
    if os.geteuid() != 0:
        print(f"[testbed] missing packages {' '.join(missing)}; run as root to install them",
              file=sys.stderr)
        return 1
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    t0 = time.monotonic()
    log("apt-get update", quiet)
    rc = subprocess.call(["apt-get", "update", "-q"], env=env)
    if rc != 0:
        return rc
    log("apt-get install -y " + " ".join(missing), quiet)
    rc = subprocess.call(["apt-get", "install", "-y", "-q", *missing], env=env)
    if rc == 0:
        log(f"installed in {time.monotonic() - t0:.0f}s", quiet)
    return rc
