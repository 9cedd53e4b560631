"""doctor warns (never fails) about root logins: the inventory's ``user: root``, and a host whose
sshd lets root log in with a password (a second sshd on node2 with that config, as in
test_image_testbed.py; the testbed's own sshd refuses root passwords)."""
import subprocess
import sys

import pytest
import yaml

from .test_image_testbed import REPO, Stores

pytestmark = [pytest.mark.testbed, pytest.mark.slow]


def test_doctor_warns_about_root_logins_and_still_passes(testbed, tmp_path):
    s = Stores(testbed, tmp_path, sshd_extra={"node2": {"PermitRootLogin": "yes", "PasswordAuthentication": "yes"}})
    try:
        job = tmp_path / "hello.yaml"
        job.write_text(yaml.safe_dump({"name": "hello", "module": "tests.fixtures.hello", "cpu_procs_per_node": 1}))
        p = subprocess.run([sys.executable, "-m", "cluster", "doctor", str(job), "-i", str(s.inventory)], cwd=REPO,
                           text=True, capture_output=True, timeout=240, env=testbed.env())
    finally:
        s.close()
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "warning: node[1-3]: the inventory logs in as root (user: root)" in out
    assert "set user: <name> in the inventory" in out
    assert f"warning: node2: sshd lets root log in with a password ({tmp_path}/store-node2/sshd_config)" in out
    assert "PermitRootLogin prohibit-password" in out and "PasswordAuthentication no" in out
    assert "node1: sshd" not in out and "node3: sshd" not in out      # prohibit-password there
    assert out.rstrip().splitlines()[-1].startswith("ok: 3 node(s)")
