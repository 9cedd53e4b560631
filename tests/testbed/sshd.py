"""sshd on every host: fresh ed25519 keys (a client key, one host key per host), one sshd per host
on port 22 of its address, and the client side (known_hosts, .testbed/ssh_config)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .common import MARKER, TestbedError, node_addr
from .procs import spawn

SSHD_CONFIG = """\
# {marker}: sshd config shared by the testbed hosts; ListenAddress/PidFile/HostKey per host
Port 22
AuthorizedKeysFile {sd}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
PrintLastLog no
UseDNS no
X11Forwarding no
MaxStartups 100:30:200
MaxSessions 100
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
LogLevel INFO
"""


def start_keygens(sd: Path, names: list[str]) -> list[subprocess.Popen]:
    """The client key and one host key per host, made in parallel (start_sshd waits for them)."""
    keygens = [subprocess.Popen(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", MARKER,
                                 "-f", str(sd / "client_key")], stdout=subprocess.DEVNULL)]
    for name in names:
        keygens.append(subprocess.Popen(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{MARKER}-{name}",
             "-f", str(sd / "hosts" / name / "ssh_host_ed25519_key")], stdout=subprocess.DEVNULL))
    return keygens


def start_sshd(st: dict, sd: Path, names: list[str], keygens: list[subprocess.Popen]) -> None:
    """authorized_keys, known_hosts and the sshd config, then one sshd per host (pids into st)."""
    for p in keygens:
        if p.wait(timeout=30) != 0:
            raise TestbedError("ssh-keygen failed")
    pub = (sd / "client_key.pub").read_text()
    (sd / "authorized_keys").write_text(pub)
    kh = []
    for i, name in enumerate(names, 1):
        hk = (sd / "hosts" / name / "ssh_host_ed25519_key.pub").read_text().split()
        kh.append(f"{name},{node_addr(i)} {hk[0]} {hk[1]}")
    (sd / "known_hosts").write_text("\n".join(kh) + "\n")
    (sd / "etc" / "sshd_config").write_text(SSHD_CONFIG.format(marker=MARKER, sd=sd))
    if not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755)
        st["created_run_sshd"] = True
    for i, name in enumerate(names, 1):
        st["pids"][f"sshd-{name}"] = spawn(
            ["/usr/sbin/sshd", "-D", "-f", sd / "etc" / "sshd_config",
             "-h", sd / "hosts" / name / "ssh_host_ed25519_key",
             "-o", f"ListenAddress={node_addr(i)}", "-o", f"PidFile={sd}/run/sshd-{name}.pid",
             "-E", sd / "logs" / f"sshd-{name}.log"],
            sd / "logs" / f"sshd-{name}.out", netns=name, hostname=name)


def ssh_config(st: dict) -> str:
    """.testbed/ssh_config: `ssh -F .testbed/ssh_config node1`."""
    sd = st["state_dir"]
    out = [f"# {MARKER}: ssh -F .testbed/ssh_config node1   (valid while the testbed is up)"]
    for h in st["hosts"]:
        out += [
            f"Host {h['name']}",
            f"  HostName {h['hostname']}",
            "  User root",
            "  Port 22",
            f"  IdentityFile {sd}/client_key",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {sd}/known_hosts",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 5",
            "  LogLevel ERROR",
            "  ControlMaster auto",
            f"  ControlPath {sd}/run/cm-%h",
            "  ControlPersist 60",
            "",
        ]
    return "\n".join(out)


def run_sshd_remove(st: dict) -> None:
    """/run/sshd (sshd's privilege separation dir), if up made it."""
    if st.get("created_run_sshd"):
        try:
            os.rmdir("/run/sshd")
        except OSError:
            pass
