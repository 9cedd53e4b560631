"""One image on every host (cluster/image.py): ``image push`` and the preflight's digest check,
with real podman over real ssh on the cluster in a box.

The testbed's hosts share this machine's filesystem, hence one podman image store. So that each
host has a store of its own, as separate machines do, this module starts a second sshd per host
(in that host's namespace, on a free port) whose sessions get ``CONTAINERS_STORAGE_CONF`` naming
that host's own storage (vfs driver, under the test's temp dir): every podman command that cluster
runs over ssh on "node2" then sees node2's images only. Stopped and removed at the end.
"""
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from tests.testbed.procs import port_open, spawn

from .test_container_podman import _podman_problem

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.testbed, pytest.mark.slow]


class Stores:
    """Per-host podman stores behind per-host sshds; ``inventory`` points at them."""

    def __init__(self, testbed, root: Path, sshd_extra: dict = {}):
        """``sshd_extra``: host -> {keyword: value} that replace the testbed's sshd settings there."""
        self.testbed, self.root = testbed, root
        self.port = _free_port()
        self.pids, self.conf = [], {}
        known = []
        sshd_config = (testbed.state_dir / "etc" / "sshd_config").read_text()
        for i, h in enumerate(testbed.hosts, start=1):
            name = h["name"]
            d = root / f"store-{name}"
            (d / "graph").mkdir(parents=True)
            (d / "run").mkdir()
            conf = d / "storage.conf"
            conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{d}/graph"\nrunroot = "{d}/run"\n')
            self.conf[name] = conf
            cfg = d / "sshd_config"
            extra = sshd_extra.get(name, {})
            kept = [l for l in sshd_config.splitlines() if (l.split() or [""])[0] not in extra]
            cfg.write_text("\n".join([f"{k} {v}" for k, v in extra.items()] + kept +
                                     [f"SetEnv CONTAINERS_STORAGE_CONF={conf}", ""]))
            key = testbed.state_dir / "hosts" / name / "ssh_host_ed25519_key"
            self.pids.append(spawn(["/usr/sbin/sshd", "-D", "-f", cfg, "-h", key, "-o", f"Port={self.port}",
                                     "-o", f"ListenAddress={h['address']}", "-o", f"PidFile={d}/sshd.pid",
                                     "-E", d / "sshd.log"], d / "sshd.out", netns=name, hostname=name))
            known.append(f"[{h['hostname']}]:{self.port} " + Path(str(key) + ".pub").read_text().strip())
        (root / "known_hosts").write_text("\n".join(known) + "\n")
        inv = yaml.safe_load(Path(testbed.inventory).read_text())
        inv["defaults"]["port"] = self.port
        inv["defaults"]["container_runtime"] = "podman"
        inv["ssh"]["known_hosts"] = str(root / "known_hosts")
        for h in inv["hosts"]:
            h["workdir"] = str(root / "disk" / h["name"])
        self.inventory = root / "inventory.yaml"
        self.inventory.write_text(yaml.safe_dump(inv))
        deadline = time.time() + 15
        while not all(port_open(h["address"], self.port) for h in testbed.hosts):
            assert time.time() < deadline, [(d / "sshd.log").read_text() for d in root.glob("store-*")]
            time.sleep(0.1)

    def podman(self, host, *args, stdin=None):
        """podman in ``host``'s own store (what a session of its sshd runs)."""
        env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(self.conf[host])}
        return subprocess.run(["podman", *args], capture_output=True, text=True, env=env, input=stdin, timeout=120)

    def close(self):
        for name in self.conf:
            self.podman(name, "system", "reset", "--force")      # vfs layers are plain directories
        for pid in self.pids:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_image(tmp: Path, tag: str, text: str) -> str:
    """A one-file image made here with podman import (no registry, no base image)."""
    src = tmp / f"rootfs-{secrets.token_hex(3)}.tar"
    f = tmp / "hello.txt"
    f.write_text(text)
    with tarfile.open(src, "w") as t:
        t.add(f, arcname="hello.txt")
    p = subprocess.run(["podman", "import", str(src), tag], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return tag


@pytest.fixture(scope="module")
def stores(testbed, tmp_path_factory):
    problem = _podman_problem()
    if problem:
        pytest.fail(problem) if os.environ.get("CI") else pytest.skip(problem)
    s = Stores(testbed, tmp_path_factory.mktemp("stores"))
    yield s
    s.close()


@pytest.fixture
def image(tmp_path):
    tag = f"localhost/ddp-push-test:{secrets.token_hex(4)}"
    yield _tiny_image(tmp_path, tag, "the image every host must have\n")
    subprocess.run(["podman", "rmi", "--force", tag], capture_output=True)


def cli(testbed, *args, runs=None, timeout=180):
    env = testbed.env(**({"CLUSTER_RUNS_DIR": str(runs)} if runs else {}))
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, text=True, capture_output=True,
                          timeout=timeout, env=env)


def digest_on(stores, host, tag):
    p = stores.podman(host, "image", "inspect", "--format", "{{.Id}}", tag)
    return p.stdout.strip() if p.returncode == 0 else None


def test_push_loads_once_per_host_and_a_second_push_copies_nothing(testbed, stores, image):
    want = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", image],
                          capture_output=True, text=True, check=True).stdout.strip()
    names = testbed.host_names
    assert all(digest_on(stores, h, image) is None for h in names)      # each store starts without it
    p = cli(testbed, "image", "push", image, "-i", str(stores.inventory), "--fanout", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"3 of 3 host(s) to copy" in p.stdout
    for h in names:
        assert p.stdout.count(f"  {h}: loaded in ") == 1, p.stdout        # one load per host
        assert f"  {h}: 100% (" in p.stdout                               # progress per host
        assert digest_on(stores, h, image) == want
    assert "copied to 3" in p.stdout
    p = cli(testbed, "image", "push", image, "-i", str(stores.inventory))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 of 3 host(s) to copy" in p.stdout and "loaded" not in p.stdout and "copied to 0" in p.stdout
    # --hosts: only those; a host that lacks it gets it
    assert stores.podman("node2", "rmi", image).returncode == 0
    p = cli(testbed, "image", "push", image, "-i", str(stores.inventory), "--hosts", "node[2-3]")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 of 2 host(s) to copy" in p.stdout and "copied to 1 (node2)" in p.stdout


def test_a_host_with_another_digest_fails_the_preflight_naming_it(testbed, stores, image, tmp_path):
    assert cli(testbed, "image", "push", image, "-i", str(stores.inventory)).returncode == 0
    # node3 gets another image under the same name (rebuilt there, or an old pull)
    other = tmp_path / "other.tar"
    f = tmp_path / "hello.txt"
    f.write_text("something else\n")
    with tarfile.open(other, "w") as t:
        t.add(f, arcname="hello.txt")
    p = stores.podman("node3", "import", str(other), image)
    assert p.returncode == 0, p.stderr
    job = tmp_path / "digest.yaml"
    job.write_text(yaml.safe_dump({"name": "digest", "module": "tests.fixtures.hello", "cpu_procs_per_node": 1,
                                   "container": {"image": image, "runtime": "podman"}}))
    runs = tmp_path / "runs"
    p = cli(testbed, "submit", str(job), "-i", str(stores.inventory), runs=runs)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "nothing was started" in p.stderr and "Traceback" not in p.stderr
    assert f"image {image} is not the same on every host (node[1-2]: sha256:" in p.stderr, p.stderr
    assert "; node3: sha256:" in p.stderr and "python -m cluster image push" in p.stderr
    assert not runs.exists() or not any(runs.iterdir())
    # no agent of any run left on any host
    for h in testbed.host_names:
        ps = testbed.run(h, ["sh", "-c", "ps -eo args | grep -c '[c]luster.agent --run-dir runs/digest' || true"])
        assert ps.stdout.strip() == "0", ps.stdout
    # the fix the message gives: push again, then the check passes (doctor runs the same preflight)
    p = cli(testbed, "image", "push", image, "-i", str(stores.inventory))
    assert p.returncode == 0 and "copied to 1 (node3)" in p.stdout, p.stdout + p.stderr
