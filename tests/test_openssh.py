"""cluster/backends/openssh.py: the one OpenSSH argv (rsync, staging, shell, image push), read back
by the real ssh client (``ssh -G`` prints the settings it would use, connecting nowhere) and, for
jump hosts, run for real up to the first name lookup."""
import os
import shlex
import shutil
import subprocess

import pytest

from cluster.backends import attach
from cluster.backends.openssh import parse_hop, rsync_rsh, ssh_argv, ssh_options
from cluster.spec.config import Host, Inventory, SSHSettings

SSH = shutil.which("ssh")
pytestmark = pytest.mark.skipif(SSH is None, reason="the OpenSSH client is not installed")


def host(**kw) -> Host:
    d = dict(name="gpu1", hostname="gpu1.example", address="10.0.0.1", user=None, port=None, identity_file=None,
             jump_host=None, interface=None, workdir="~/ddp", python="python3", gpus=0, container_runtime=None)
    return Host(**{**d, **kw})


def effective(argv: list[str]) -> dict[str, list[str]]:
    """What ssh makes of ``argv`` (``ssh -G``: the resolved settings, no connection)."""
    i = argv.index("--")
    p = subprocess.run([SSH, "-G", *argv[1:i], *argv[i:]], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    out: dict[str, list[str]] = {}
    for line in p.stdout.splitlines():
        key, _, value = line.partition(" ")
        out.setdefault(key, []).append(value)
    return out


def test_ssh_reads_the_inventory_settings_as_fabric_does(tmp_path):
    key = tmp_path / "id rack"               # a blank in a path the user wrote
    key.write_text("not a key\n")
    known = tmp_path / "known hosts"
    h = host(user="ml", port=2222, identity_file=str(key))
    got = effective(ssh_argv(h, SSHSettings(known_hosts=str(known), connect_timeout_s=2.5, config_file=None)))
    assert got["hostname"] == ["gpu1.example"] and got["user"] == ["ml"] and got["port"] == ["2222"]
    assert got["identityfile"] == [str(key)] and got["identitiesonly"] == ["yes"]
    assert got["userknownhostsfile"] == [str(known)]          # one file, not two split at the blank
    assert got["stricthostkeychecking"] == ["true"]           # unknown hosts refused
    assert got["connecttimeout"] == ["3"]                     # whole seconds, rounded up as in the pool
    assert got["batchmode"] == ["yes"] and got["passwordauthentication"] == ["no"]
    assert got["kbdinteractiveauthentication"] == ["no"] and "proxycommand" not in got
    tofu = effective(ssh_argv(h, SSHSettings(known_hosts=str(known), accept_new_host_keys=True)))
    assert tofu["stricthostkeychecking"] == ["accept-new"]
    # the interactive shell may ask for a key's passphrase, never for a password
    shell = effective(ssh_argv(h, SSHSettings(known_hosts=str(known)), tty=True, batch=False))
    assert shell["batchmode"] == ["no"] and shell["passwordauthentication"] == ["no"]
    assert shell["requesttty"] == ["true"]


def test_the_ssh_config_file_is_the_inventorys(tmp_path):
    cfg = tmp_path / "ssh config"
    cfg.write_text("Host gpu1.example\n  HostName 10.9.9.9\n  User cfguser\n  Port 2022\n")
    got = effective(ssh_argv(host(), SSHSettings(config_file=str(cfg))))
    assert (got["hostname"], got["user"], got["port"]) == (["10.9.9.9"], ["cfguser"], ["2022"])
    # the inventory's user and port win over the file's, as in Fabric (arguments before config)
    got = effective(ssh_argv(host(user="ml", port=22), SSHSettings(config_file=str(cfg))))
    assert (got["hostname"], got["user"], got["port"]) == (["10.9.9.9"], ["ml"], ["22"])
    # config_file: null reads no file at all; the default (~/.ssh/config) is ssh's own choice: no -F
    none = ssh_argv(host(), SSHSettings(config_file=None))
    assert none[1:3] == ["-F", "none"] and effective(none)["hostname"] == ["gpu1.example"]
    assert "-F" not in ssh_argv(host(), SSHSettings())


def test_every_hop_of_a_jump_chain_gets_the_same_key_and_known_hosts(tmp_path):
    """'root@a.invalid:2200,b': the real ssh runs the ProxyCommands; a recording 'ssh' on PATH
    (which then execs the real one) shows each hop's argv, down to the lookup of a.invalid."""
    bindir, log = tmp_path / "bin", tmp_path / "log"
    bindir.mkdir(), log.mkdir()
    (bindir / "ssh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{log}/$$"\nexec {SSH} "$@"\n')
    (bindir / "ssh").chmod(0o755)
    key = tmp_path / "id_rack"
    key.write_text("not a key\n")
    h = host(user="ml", port=2222, identity_file=str(key), jump_host="root@a.invalid:2200,b%x")
    s = SSHSettings(known_hosts=str(tmp_path / "kh"), connect_timeout_s=2, config_file=None)
    argv = ssh_argv(h, s)
    assert "-J" not in argv        # ssh -J would reach the hops with ssh's default keys and known_hosts
    p = subprocess.run([SSH, *argv[1:], "true"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}, stdin=subprocess.DEVNULL)
    assert p.returncode == 255
    hops = {}
    for f in log.iterdir():
        words = f.read_text().splitlines()
        hops[words[-1]] = words
    assert set(hops) == {"b%x", "a.invalid"}, hops
    b, a = hops["b%x"], hops["a.invalid"]
    # each hop is asked for the next one by name and port ('-W [%h]:%p' expanded by the ssh before it)
    assert b[-4:] == ["-W", "[gpu1.example]:2222", "--", "b%x"]
    assert a[-4:] == ["-W", "[b%x]:22", "--", "a.invalid"]
    for words in (a, b):
        line = " ".join(words)
        assert f"UserKnownHostsFile={tmp_path / 'kh'}" in line and "StrictHostKeyChecking=yes" in line
        assert ["-i", str(key)] == words[words.index("-i"):words.index("-i") + 2] and "BatchMode=yes" in line
        assert words[:3] == ["-F", "none", "-o"]
    # a hop's user and port are its own, never the host's (as ssh -J and Fabric's gateways)
    assert "-l" not in b and "-p" not in b
    assert a[a.index("-l") + 1] == "root" and a[a.index("-p") + 1] == "2200"
    assert "a.invalid" in p.stderr


def test_rsync_and_shell_use_the_one_builder():
    h = host(user="ml", port=2222, identity_file="~/.ssh/id_x", jump_host="bastion")
    s = SSHSettings(known_hosts="/k/known")
    assert shlex.split(rsync_rsh(h, s)) == ssh_options(h, s)      # rsync splits -e as a shell would
    inv = Inventory(path="inv.yaml", backend="ssh", hosts=(h,), ssh=s, slurm=None, shared_fs=False, storage=None)
    argv = attach.ssh_client_argv(h, inv, tty=True)
    assert argv == ssh_argv(h, s, tty=True, batch=False, keepalive_s=15)
    assert argv[:2] == ["ssh", "-t"] and argv[-2:] == ["--", "gpu1.example"]


@pytest.mark.parametrize("hop,want", [
    ("bastion", (None, None, "bastion")),
    ("ml@bastion:2200", ("ml", 2200, "bastion")),
    ("a@b@bastion", ("a@b", None, "bastion")),
    ("[fd00::1]:22", (None, 22, "fd00::1")),
    ("fd00::1", (None, None, "fd00::1")),
])
def test_a_hop_reads_as_ssh_reads_it(hop, want):
    assert parse_hop(hop) == want

