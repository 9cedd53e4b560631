"""The job's data: section and the node-side check of cluster/backends/stage.py, without hosts (the
testbed tests in test_stage_testbed.py copy for real)."""

import json
import os
import subprocess
import sys

import pytest

from bench.imageset import make
from cluster.spec.config import load_job
from cluster.errors import UserError
from cluster.backends.stage import STAMP, describe, node_check
from tests.conftest import REPO_ROOT
from train.pack import pack

JOB = """name: withdata
train:
  model: train.model:tiny_cnn
data:
  source: /datasets/set
  path: data/set
"""


def test_data_section_gives_train_its_path_and_data_override_stays_the_train_setting(tmp_path):
    f = tmp_path / "j.yaml"
    f.write_text(JOB)
    job = load_job(str(f)).job
    assert (job.data.source, job.data.path, job.data.fanout) == ("/datasets/set", "data/set", 4)
    assert job.train["data"] == "data/set"
    # data=PATH on the command line is train's data, as before the section existed
    assert load_job(str(f), ["data=synthetic"]).job.train["data"] == "synthetic"
    assert load_job(str(f), ["data.fanout=2"]).job.data.fanout == 2
    f.write_text(JOB + "  fanout: 0\n")
    with pytest.raises(UserError, match="must be at least 1"):
        load_job(str(f))
    f.write_text(JOB.replace("  path: data/set\n", ""))
    with pytest.raises(UserError, match="path"):
        load_job(str(f))


def test_bad_data_section_is_one_message_exit_2_nothing_launched(tmp_path):
    f = tmp_path / "j.yaml"
    f.write_text(JOB.replace("source: /datasets/set", "sorce: /datasets/set"))
    p = subprocess.run([sys.executable, "-m", "cluster", "submit", str(f), "--dry-run"], cwd=REPO_ROOT,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "j.yaml:5:" in p.stderr and "data.sorce" in p.stderr, p.stderr


def test_node_check_stamps_a_verified_copy_and_finds_a_changed_shard(tmp_path):
    make(str(tmp_path / "src"), 12, 4, 2, small=True)
    pack(str(tmp_path / "src"), str(tmp_path / "packed"), shard_mb=1, log=lambda _: None)
    src = describe(str(tmp_path / "packed"))
    assert src.packed and all(f[2] for f in src.files)
    copy = tmp_path / "copy"
    args = {"path": str(copy), "digest": src.digest, "files": src.files, "stamp": STAMP}
    s = node_check({**args, "mode": "check"})
    assert (s["state"], s["missing"], s["present_bytes"]) == ("missing", len(src.files), 0) and s["free"] > 0
    subprocess.run(["cp", "-r", str(tmp_path / "packed"), str(copy)], check=True)
    # copied by something else: not current until verified
    assert node_check({**args, "mode": "check"})["state"] == "stale"
    assert node_check({**args, "mode": "verify"})["state"] == "current"
    assert json.loads((copy / STAMP).read_text())["digest"] == src.digest
    assert node_check({**args, "mode": "check"})["state"] == "current"
    # one byte changed in place: same size, new mtime, checksum differs
    shard = copy / "train" / "shard-00000.tar"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 1
    shard.write_bytes(bytes(raw))
    s = node_check({**args, "mode": "check"})
    assert s["state"] == "stale" and s["bad"] == ["train/shard-00000.tar"]
    # a file touched but unchanged is checked once and stays current
    raw[100] ^= 1
    shard.write_bytes(bytes(raw))
    assert node_check({**args, "mode": "check"})["state"] == "current"
    # shared filesystems: presence and size only
    (copy / "val" / "index.json").unlink()
    s = node_check({**args, "mode": "presence"})
    assert s["state"] == "stale" and s["missing"] == 1


def rounds(n_hosts, fanout, peers, holders=()):
    """Run the Schedule with every copy taking one round: [[(host, giver), ...] per round]."""
    from cluster.backends.stage import Schedule
    s = Schedule([f"n{i}" for i in range(1, n_hosts + 1)], list(holders), fanout, peers)
    out, flight = [], []
    while True:
        for host, giver in flight:
            s.done(host, giver, True)
        flight = s.assign()
        if not flight:
            return out
        out.append(flight)


def test_schedule_fanout_1_with_peers_is_a_doubling_tree():
    r = rounds(7, 1, True)
    assert r == [[("n1", "")],
                 [("n2", ""), ("n3", "n1")],
                 [("n4", ""), ("n5", "n1"), ("n6", "n2"), ("n7", "n3")]]


def test_schedule_uses_no_peer_while_the_source_can_take_every_waiting_host():
    # 3 hosts, fanout 4: all from the source at once, as without peers
    assert rounds(3, 4, True) == [[("n1", ""), ("n2", ""), ("n3", "")]]
    # without peers: fanout at a time, every copy from the source
    assert rounds(5, 2, False) == [[("n1", ""), ("n2", "")], [("n3", ""), ("n4", "")], [("n5", "")]]
    # with peers, each holder serves at most fanout at once, the least busy first
    r = rounds(8, 2, True)
    assert r[0] == [("n1", ""), ("n2", "")]
    assert r[1] == [("n3", ""), ("n4", ""), ("n5", "n1"), ("n6", "n2"), ("n7", "n1"), ("n8", "n2")]


def test_schedule_a_host_current_from_the_start_serves_while_the_source_is_busy():
    assert rounds(2, 1, True, holders=["old"]) == [[("n1", ""), ("n2", "old")]]
    assert rounds(2, 1, False, holders=["old"]) == [[("n1", "")], [("n2", "")]]


def test_schedule_a_failed_copy_between_hosts_goes_back_to_the_source_and_peers_stop():
    from cluster.backends.stage import Schedule
    s = Schedule(["n1", "n2", "n3", "n4"], [], 1, True)
    assert s.assign() == [("n1", "")]
    s.done("n1", "", True)
    assert s.assign() == [("n2", ""), ("n3", "n1")]
    s.retry_from_source("n3", "n1")          # n3 cannot reach n1
    assert s.assign() == []                  # the source is busy with n2; n1 serves no more
    s.done("n2", "", True)
    assert s.assign() == [("n3", "")]
    s.done("n3", "", True)
    assert s.assign() == [("n4", "")]        # from the source, not from n1, n2 or n3


def test_peer_command_pulls_from_the_givers_address_with_the_inventorys_settings():
    import shlex
    from dataclasses import replace
    from cluster.backends.stage import peer_command
    from cluster.spec.config import Host, SSHSettings
    giver = Host("node1", "gw-node1", "10.0.0.1", "alice", 2222, "/keys/id x", "bastion", None, "~/work",
                 "python3", 0, None)
    cmd = peer_command(giver, "~/work/data/set 1", "data/set 1", SSHSettings(known_hosts="/k/known"), ["-rlt"])
    words = shlex.split(cmd)
    # ~ left for the receiving host's shell; the giver's path home-relative (rsync --protect-args)
    assert cmd.startswith("mkdir -p ~/'work/data/set 1' && rsync ") and cmd.endswith(" ~/'work/data/set 1'/")
    assert words[:4] == ["mkdir", "-p", "~/work/data/set 1", "&&"]
    rsync = words[words.index("rsync"):]
    assert rsync[-2:] == ["10.0.0.1:work/data/set 1/", "~/work/data/set 1/"]
    e = shlex.split(rsync[rsync.index("-e") + 1])
    assert e[0] == "ssh" and ["-p", "2222"] == e[e.index("-p"):e.index("-p") + 2] and "-l" in e and "alice" in e
    assert "/keys/id x" in e and "UserKnownHostsFile=/k/known" in e and not any("ProxyCommand" in w for w in e)
    # an absolute path stays absolute; an IPv6 address is bracketed for rsync
    cmd = peer_command(replace(giver, address="fd00::1"), "/scratch/set", "/scratch/set", SSHSettings(), [])
    assert "[fd00::1]:/scratch/set/" in shlex.split(cmd)


def test_a_source_on_a_host_is_host_colon_path_as_rsync_reads_it():
    from cluster.backends.stage import Stager, split_source
    from cluster.spec.config import DataSpec, Host, SSHSettings
    assert split_source("node1:/datasets/x") == ("node1", "/datasets/x")
    assert split_source("node1:sets/x") == ("node1", "sets/x")
    for here in ("/datasets/a:b", "~/sets:x", "sets/x:y", "plain", "node1:"):
        assert split_source(here) == (None, here)
    with pytest.raises(UserError, match="'node9' is not a host of the inventory") as e:
        Stager(DataSpec("node9:/x", "data/x"), [], None, SSHSettings(), False, print)
    assert e.value.key == "data.source"
    h = Host("node1", "node1", "10.0.0.1", None, None, None, None, None, "/w", "python3", 0, None)
    st = Stager(DataSpec("node1:/x", "data/x"), [], None, SSHSettings(), False, print, inventory_hosts=[h])
    assert st.source_host is h and st.source_path == "/x"


def test_the_source_on_the_receiving_host_itself_is_a_local_rsync():
    import shlex
    from cluster.backends.stage import peer_command
    from cluster.spec.config import Host, SSHSettings
    h = Host("node1", "node1", "10.0.0.1", None, None, None, None, None, "/w", "python3", 0, None)
    words = shlex.split(peer_command(h, "/w/data/x", "sets/x", SSHSettings(), ["-rlt"], local=True))
    assert words == ["mkdir", "-p", "/w/data/x", "&&", "rsync", "-rlt", "/w/sets/x/", "/w/data/x/"]


def test_peers_is_on_by_default_and_a_boolean(tmp_path):
    f = tmp_path / "j.yaml"
    f.write_text(JOB)
    assert load_job(str(f)).job.data.peers is True
    assert load_job(str(f), ["data.peers=false"]).job.data.peers is False
    f.write_text(JOB + "  peers: maybe\n")
    with pytest.raises(UserError, match="data.peers: expected true/false"):
        load_job(str(f))
