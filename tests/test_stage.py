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
