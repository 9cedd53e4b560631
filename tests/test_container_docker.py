"""Docker, the seed's own runtime: the quota, identity and OOM checks of test_container_podman.py
against a real engine (Debian's docker.io). This module starts its own dockerd, as the testbed
starts its daemons: its own data-root, exec-root and socket under a temp dir, runc, the overlay2
driver (vfs where overlay2 cannot mount), no bridge or iptables (jobs use --network host), and
stops it at the end. The image is the small training image (tests/test_image_build.py), moved
from podman with ``podman save | docker load``.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .test_container_podman import podman_args
from .test_local import cli, rank_logs, wait_state

pytestmark = pytest.mark.slow


def _start(root: Path, driver: str):
    sock = root / "docker.sock"
    log = open(root / f"dockerd-{driver}.log", "wb")
    p = subprocess.Popen(["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
                          "--pidfile", str(root / "dockerd.pid"), "--host", f"unix://{sock}",
                          "--storage-driver", driver, "--iptables=false", "--ip6tables=false", "--bridge=none",
                          "--default-runtime", "runc"], stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        if subprocess.run(["docker", "version"], env=env, capture_output=True).returncode == 0:
            return p, env
        time.sleep(0.3)
    _stop(p)
    return None, (root / f"dockerd-{driver}.log").read_text()[-1500:]


def _stop(p):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)       # dockerd stops its containerd and unmounts
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def docker(small_image):
    why = None if shutil.which("dockerd") and shutil.which("docker") else "docker.io is not installed"
    if why:
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="ddpd-", dir="/tmp"))     # short: unix socket paths are short
    p, env = _start(root, "overlay2")
    if p is None:
        p, env = _start(root, "vfs")
    assert p is not None, f"dockerd did not start: {env}"
    info = subprocess.run(["docker", "info", "--format", "{{.Driver}} {{.ServerVersion}}"], env=env,
                          capture_output=True, text=True).stdout.strip()
    print(f"dockerd {info} in {root}")
    tag, _ = small_image
    save = subprocess.Popen(["podman", "save", tag], stdout=subprocess.PIPE)
    load = subprocess.run(["docker", "load"], stdin=save.stdout, env=env, capture_output=True, text=True)
    save.wait()
    assert load.returncode == 0, load.stderr
    yield env, f"localhost/{tag}" if not tag.startswith("localhost/") else tag
    _stop(p)
    shutil.rmtree(root, ignore_errors=True)


def _job(tmp_path, name, image, out, **env):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "module": "tests.fixtures.limits", "cpu_procs_per_node": 1,
        "env": {"LIMITS_OUT": "/out", **env},
        "container": {"image": image, "runtime": "docker", "cpus": 1, "memory_gb": 1,
                      "mounts": [f"{out}:/out"], "args": podman_args()}}))
    return str(path)


def _run(runs, job, env):
    p = cli(runs, "submit", job, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    rid = p.stdout.split()[1]
    st = None
    deadline = time.time() + 180
    while time.time() < deadline:
        st = json.loads(cli(runs, "status", rid, "--json", env=env).stdout)
        if st["state"] in ("SUCCEEDED", "FAILED"):
            break
        time.sleep(1)
    return rid, st, cli(runs, "logs", rid, env=env).stdout


def _containers(env, rid):
    return subprocess.run(["docker", "ps", "--all", "--filter", f"label=cluster.run_id={rid}", "--format",
                           "{{.Names}}"], env=env, capture_output=True, text=True, check=True).stdout.split()


def test_docker_quotas_and_the_submitting_users_identity_inside(docker, tmp_path):
    env, image = docker
    out = tmp_path / "vol"
    out.mkdir()
    rid, st, logs = _run(tmp_path / "runs", _job(tmp_path, "dquota", image, out), env)
    assert st["state"] == "SUCCEEDED", logs[-3000:]
    assert "docker run --rm --init --name ddp-" in logs
    seen = json.loads(next(l for l in logs.splitlines() if "] LIMITS " in l).split("LIMITS ", 1)[1])
    # torchrun in the image keeps its per-rank files in the run directory, as outside
    ranks = rank_logs(tmp_path / "runs" / rid, "localhost")
    assert list(ranks) == [0] and "LIMITS " in ranks[0], ranks
    quota, period = map(int, seen["cpu_max"].split())
    assert quota == period and int(seen["memory_max"]) == 1 << 30 and seen["pids_max"] == "16384"
    assert (seen["uid"], seen["gid"]) == (os.getuid(), os.getgid())
    # the image's own USER is nobody (65534): the file is the submitting user's because of --user
    assert subprocess.run(["docker", "image", "inspect", "--format", "{{.Config.User}}", image], env=env,
                          capture_output=True, text=True).stdout.strip() == "65534:65534"
    f = out / "written-by-rank0.txt"
    assert (f.stat().st_uid, f.stat().st_gid) == (os.getuid(), os.getgid())
    assert _containers(env, rid) == []


def test_docker_over_the_memory_limit_is_oom_killed_and_diagnosed(docker, tmp_path):
    env, image = docker
    out = tmp_path / "vol"
    out.mkdir()
    rid, st, logs = _run(tmp_path / "runs", _job(tmp_path, "doom", image, out, LIMITS_EAT_MB="1500"), env)
    assert st["state"] == "FAILED", logs[-3000:]
    assert "container: out of memory: the kernel killed" in logs
    assert st["failure"]["findings"][0]["pattern_id"] == "container-oom-killed"
    assert _containers(env, rid) == []


def test_docker_stop_removes_the_container(docker, tmp_path):
    """stop TERMs the agent's group; docker's container (the daemon's, not ours) is removed by name."""
    env, image = docker
    runs = tmp_path / "runs"
    job = tmp_path / "dhello.yaml"
    job.write_text(yaml.safe_dump({"name": "dhello", "module": "tests.fixtures.hello", "cpu_procs_per_node": 2,
                                   "env": {"HELLO_SLEEP_S": "120"},
                                   "container": {"image": image, "runtime": "docker", "args": podman_args()}}))
    p = cli(runs, "submit", str(job), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    rid = p.stdout.split()[1]
    deadline = time.time() + 120
    while cli(runs, "logs", rid, env=env).stdout.count("hello from rank") < 2:
        assert time.time() < deadline, cli(runs, "logs", rid, env=env).stdout[-3000:]
        time.sleep(0.5)
    assert _containers(env, rid) == [f"ddp-{rid}-localhost"]
    p = cli(runs, "stop", rid, "--grace-s", "10", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "nothing of the run is left running" in p.stdout
    assert _containers(env, rid) == []
    assert json.loads(cli(runs, "status", rid, "--json", env=env).stdout)["state"] == "CANCELLED"
