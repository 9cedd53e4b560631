"""exec and gpus on the cluster in a box: folded output, failing hosts, byte-exact arguments."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.testbed


def cli(testbed, *args):
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, text=True, capture_output=True,
                          timeout=120, env={**os.environ, **testbed.env()})


def test_exec_folds_identical_output_and_names_failing_hosts(testbed):
    inv = str(testbed.inventory)
    p = cli(testbed, "exec", "-i", inv, "--", "sh", "-c", "echo same; hostname")
    assert p.returncode == 0, p.stderr
    # every host prints its own name: three blocks, each headed by one host
    for h in testbed.host_names:
        assert f"\n{h} (1)\n" in p.stdout
    p = cli(testbed, "exec", "-i", inv, "--", "echo", "identical")
    assert p.returncode == 0
    assert f"node[1-{len(testbed.host_names)}] ({len(testbed.host_names)})" in p.stdout
    assert p.stdout.count("identical") == 1
    # one host fails with its own exit code; the others succeed
    p = cli(testbed, "exec", "-i", inv, "--", "sh", "-c", '[ "$(hostname)" != node2 ] || exit 7')
    assert p.returncode == 1
    assert "exit code 7: node2" in p.stderr and "failed on 1 of" in p.stderr
    p = cli(testbed, "exec", "-i", inv, "--hosts", "node[1-2]", "--no-fold", "--", "hostname")
    assert sorted(p.stdout.splitlines()) == ["[node1] node1", "[node2] node2"]


def test_exec_hostile_arguments_arrive_byte_exact(testbed):
    hostile = ["a'b", 'c"d', "; touch /tmp/pwned-exec", "$(id)", "`id`", "two\nlines", " spaced ", "*"]
    p = cli(testbed, "exec", "-i", str(testbed.inventory), "--hosts", "node1", "--",
            testbed.python, "-c", "import json,sys; print(json.dumps(sys.argv[1:]))", *hostile)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == hostile
    assert not Path("/tmp/pwned-exec").exists()


def test_gpus_degrades_to_a_no_gpu_row(testbed):
    p = cli(testbed, "gpus", "-i", str(testbed.inventory))
    assert p.returncode == 0, p.stderr
    for h in testbed.host_names:
        assert any(l.startswith(h) and "no GPU" in l for l in p.stdout.splitlines()), p.stdout
