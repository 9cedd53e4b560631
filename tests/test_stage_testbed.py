"""Dataset staging (cluster/backends/stage.py) on the 3-host cluster in a box: a job's `data:` section is
copied to the hosts that lack it, current hosts are skipped, a corrupted shard is copied again,
a host whose disk cannot hold the set fails the preflight by name and nothing starts."""

import json
import re
import shutil
import subprocess
import uuid

import pytest

from bench.imageset import make
from cluster.backends.stage import STAMP, describe, node_check
from tests.testbed_client import HELLO
from train.pack import pack

pytestmark = pytest.mark.testbed

JOB = HELLO.format(sleep=0) + """data:
  source: {source}
  path: {path}
  fanout: 2
"""


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    make(str(root / "src"), 40, 8, 4, small=True, extras=True)
    pack(str(root / "src"), str(root / "packed"), shard_mb=1, log=lambda _: None)
    return root / "packed"


@pytest.fixture
def data_path(client):
    rel = f"data/set-{uuid.uuid4().hex[:8]}"
    yield rel
    for h in client.testbed.host_names:
        shutil.rmtree(client.workdir[h] / rel, ignore_errors=True)


def submitted(client, job, inventory=None):
    """Submit, wait for the end; (run record, the submit's stderr)."""
    rid, p = client.submit(job, inventory=inventory)
    assert client.wait(rid)["state"] == "SUCCEEDED"
    return rid, p.stderr


def same_tree(a, b) -> bool:
    files = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")  # noqa: E731
                          if p.is_file() and not p.name.startswith(".ddp-data")}
    return files(a) == files(b)


def test_staging_copies_skips_current_hosts_and_recopies_a_corrupted_shard(client, packed, data_path):
    job = client.job(JOB.format(source=packed, path=data_path))
    hosts = client.testbed.host_names
    # nothing there yet: copied to every host, verified, then the run starts
    _, err = submitted(client, job)
    n = len(json.loads((packed / "MANIFEST.json").read_text())["files"]) + 1   # and the manifest itself
    assert f"data: node[1-3]: missing ({n} of {n} files missing): copying" in err, err
    for h in hosts:
        assert f"data: {h}: copied in" in err, err
        assert same_tree(client.workdir[h] / data_path, packed)
    assert "data: copied to node[1-3] and verified" in err
    # a second submit: every host current, nothing copied
    _, err = submitted(client, job)
    assert f"data: node[1-3]: current (packed" in err and "copying" not in err, err
    # one shard on node2 damaged in place (same size), node3's copy removed
    shard = client.workdir["node2"] / data_path / "train" / "shard-00000.tar"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    shutil.rmtree(client.workdir["node3"] / data_path)
    _, err = submitted(client, job)
    assert "data: node1: current" in err and "data: node1: copied" not in err, err
    assert "data: node2: stale (1 differ (train/shard-00000.tar))" in err, err
    assert "data: node3: missing" in err and "data: copied to node[2-3] and verified" in err, err
    for h in hosts:
        assert same_tree(client.workdir[h] / data_path, packed), h
    # doctor says where the data stands, per host, and copies nothing
    shutil.rmtree(client.workdir["node1"] / data_path)
    p = client.cli("doctor", job, "-i", client.testbed.inventory)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "data: node[2-3]: current" in p.stderr and f"data: node1: missing ({n} of {n} files missing); submit " \
        "copies it" in p.stderr, p.stderr
    assert not (client.workdir["node1"] / data_path).exists()


def test_a_host_copies_from_a_peer_with_a_verified_copy_while_the_source_is_busy(client, packed, data_path):
    """fanout 1: node1 from the source; then the source serves node2 while node1 serves node3."""
    job = client.job(JOB.replace("fanout: 2", "fanout: 1").format(source=packed, path=data_path))
    _, err = submitted(client, job)
    assert re.search(r"data: node1: copied in [\d.]+ s from the source", err), err
    assert re.search(r"data: node2: copied in [\d.]+ s from the source", err), err
    assert re.search(r"data: node3: copied in [\d.]+ s from node1", err), err
    assert "data: copied to node[1-3] and verified" in err, err
    for h in client.testbed.host_names:
        assert same_tree(client.workdir[h] / data_path, packed), h
    # the peer-fed copy carries its own stamp, verified against the source: current on the next submit
    _, err = submitted(client, job)
    assert "data: node[1-3]: current (packed" in err and "copying" not in err, err
    # a shard damaged in place on node3 (fed by node1) and on node2: node1, current, serves node3
    for h in ("node2", "node3"):
        shard = client.workdir[h] / data_path / "train" / "shard-00000.tar"
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        shard.write_bytes(bytes(raw))
    _, err = submitted(client, job)
    assert "data: node[2-3]: stale (1 differ (train/shard-00000.tar))" in err, err
    assert re.search(r"data: node2: copied in [\d.]+ s from the source", err), err
    assert re.search(r"data: node3: copied in [\d.]+ s from node1", err), err
    assert "data: copied to node[2-3] and verified" in err, err
    for h in client.testbed.host_names:
        assert same_tree(client.workdir[h] / data_path, packed), h


def test_a_host_that_cannot_reach_its_peer_copies_from_the_source(client, packed, data_path):
    """node2 (current) is the peer, but its address cannot be resolved from the hosts: node3's copy
    from it fails, is taken from the source, and this is said once."""
    inv = client.inventory(lambda t: t.replace("address: 10.213.0.12", "address: node2-peer.invalid"), "peer.yaml")
    shutil.copytree(packed, client.workdir["node2"] / data_path)
    src = describe(str(packed))         # node2's copy verified and stamped, as a submit leaves it
    assert node_check({"path": str(client.workdir["node2"] / data_path), "mode": "verify", "digest": src.digest,
                       "files": src.files, "stamp": STAMP})["state"] == "current"
    job = client.job(JOB.replace("fanout: 2", "fanout: 1").format(source=packed, path=data_path))
    _, err = submitted(client, job, inventory=inv)
    assert err.count("cannot copy from") == 1, err
    assert "data: node3: cannot copy from node2 (" in err and "copying from the source" in err, err
    assert re.search(r"data: node1: copied in [\d.]+ s from the source", err), err
    assert re.search(r"data: node3: copied in [\d.]+ s from the source", err), err
    assert "data: copied to node[1,3] and verified" in err, err
    for h in client.testbed.host_names:
        assert same_tree(client.workdir[h] / data_path, packed), h


def test_a_source_on_one_of_the_hosts_is_copied_from_there_and_between_hosts(client, packed, data_path):
    """data.source: node1:REL (relative: under node1's workdir). node1 copies it locally, node2 pulls
    it from node1's source, node3 from node1's verified copy (fanout 1)."""
    rel = f"srcset-{uuid.uuid4().hex[:8]}"
    shutil.copytree(packed, client.workdir["node1"] / rel)
    try:
        job = client.job(JOB.replace("fanout: 2", "fanout: 1").format(source=f"node1:{rel}", path=data_path))
        _, err = submitted(client, job)
        assert re.search(r"data: node1: copied in [\d.]+ s from the source on node1", err), err
        assert re.search(r"data: node2: copied in [\d.]+ s from the source on node1", err), err
        assert re.search(r"data: node3: copied in [\d.]+ s from node1\n", err), err
        for h in client.testbed.host_names:
            assert same_tree(client.workdir[h] / data_path, packed), h
        _, err = submitted(client, job)
        assert "data: node[1-3]: current (packed" in err and "copying" not in err, err
        # a source that is not there: one message, nothing started
        p = client.cli("submit", client.job(JOB.format(source="node2:no/such/set", path=data_path)),
                       "-i", client.testbed.inventory)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stdout + p.stderr
        assert "data.source 'node2:no/such/set': cannot read the set on node2" in p.stderr, p.stderr
    finally:
        shutil.rmtree(client.workdir["node1"] / rel, ignore_errors=True)


def test_a_host_whose_disk_cannot_hold_the_data_fails_the_preflight_and_nothing_starts(client, packed, data_path):
    small = client.workdir["node3"] / data_path
    small.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)], check=True)
    try:
        p = client.cli("submit", client.job(JOB.format(source=packed, path=data_path)), "-i", client.testbed.inventory)
        assert p.returncode == 2, p.stdout + p.stderr
        assert "error: data not ready on node3, nothing was started" in p.stderr, p.stderr
        assert f"node3: not enough disk at {small}" in p.stderr and "Traceback" not in p.stderr
        assert not client.runs.exists() or not any(client.runs.iterdir())     # no run recorded, none started
        for h in ("node1", "node2"):   # checked before anything is copied: all or nothing
            assert not (client.workdir[h] / data_path).exists()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_shared_fs_copies_nothing_and_names_the_hosts_without_the_data(client, packed, data_path):
    inv = client.inventory(lambda t: t + "shared_fs: true\n", "shared.yaml")
    for h in ("node1", "node2"):
        shutil.copytree(packed, client.workdir[h] / data_path)
    # code is not synced with shared_fs: the hosts run it from this checkout's copy in their workdir
    p = client.cli("doctor", client.job(JOB.format(source=packed, path=data_path)), "-i", inv)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "error: data not ready on node3" in p.stderr and "node3: missing at" in p.stderr, p.stderr
    assert "shared_fs: nothing is copied" in p.stderr and "node1:" not in p.stderr.split("error:")[1]
    assert not (client.workdir["node3"] / data_path).exists()


@pytest.mark.slow
def test_slurm_stages_the_data_on_each_node_in_the_first_step(testbed, tmp_path, packed):
    """The job's first step copies the set to each allocated node's path ($SLURMD_NODENAME keeps
    the testbed's nodes, which share one filesystem, apart), then the tasks run; a second job
    finds every copy current."""
    from tests.test_slurm_testbed import Slurm

    s = Slurm(testbed, tmp_path)
    base = tmp_path / "local"
    job = s.job("stagehello", HELLO.format(sleep=0) + f"nodes: 3\ndata:\n  source: {packed}\n"
                f"  path: {base}/$SLURMD_NODENAME/set\n")
    plan = s.cli("plan", job, "-i", str(s.inventory))
    assert "-m cluster.backends.stage " in plan.stdout and "'" + str(base) + "/$SLURMD_NODENAME/set'" in plan.stdout
    for attempt in ("copies", "current"):
        rid, jid = s.submit(job)
        assert s.wait_state(rid, ("SUCCEEDED", "FAILED"), timeout=180)["state"] == "SUCCEEDED", s.logs(rid)
        batch = (s.runs / rid / "slurm" / f"{jid}_batch.log").read_text()
        nodes = sorted(p.name for p in base.iterdir())
        assert len(nodes) == 3, nodes   # every node of the testbed: the second job has the same ones
        for n in nodes:
            assert same_tree(base / n / "set", packed)
            if attempt == "copies":
                assert f"data: {n}: copied " in batch and "verified" in batch, batch
            else:
                assert f"data: {n}: current at {base / n / 'set'}" in batch, batch
