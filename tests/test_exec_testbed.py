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


def test_make_exec_passes_the_command_as_typed_and_runs_nothing_here(testbed, tmp_path):
    """make exec CMD="..." with single and double quotes, $ and ;: the hosts' sh gets the string as
    typed (through the environment, not re-quoted by the Makefile); nothing of it runs here. The
    hosts share this machine's files, not its hostname: where each part ran is the hostname it wrote."""
    ran = tmp_path / "ran"
    cmd = f"""printf '%s|' "it's" 'a "b"' "$(hostname)"; echo; hostname >> {ran}"""
    p = subprocess.run(["make", "-s", "exec", f"CMD={cmd}", "HOSTS=node[1-2]", f"INVENTORY={testbed.inventory}",
                        f"PY={sys.executable}"], cwd=REPO, text=True, capture_output=True, timeout=120,
                       env={**os.environ, **testbed.env()})
    assert p.returncode == 0, p.stdout + p.stderr
    for h in ("node1", "node2"):
        assert f"""it's|a "b"|{h}|""" in p.stdout, p.stdout
    assert "node3" not in p.stdout
    assert sorted(ran.read_text().split()) == ["node1", "node2"]      # and not this machine
