"""Real podman on this machine (local backend): train, resume, env and mounts byte-exact, stop
removes the container, preflight refuses a missing image before anything starts.

The image is ``rootfs:/`` (podman --rootfs /:O: the host's root as an overlay, so no registry is
needed and the venv with torch is inside). Everything the run writes must reach the host through
the mounts: writes to the overlay itself vanish with the container.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .test_local import cli, rank_logs, run_pids, submit, wait_state

pytestmark = pytest.mark.slow


def podman_args() -> list[str]:
    """Flags this kind of machine needs (tests/testbed/README.md): podman's default nofile and an
    unlimited memlock are refused here, so ask for what the process may have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return ["--ulimit", "nofile=1000:1000", "--ulimit", "nproc=1000:1000", "--ulimit", f"memlock={soft}:{hard}"]


def _podman_problem():
    if not shutil.which("podman"):
        return "podman is not installed (python -m tests.testbed install-deps)"
    p = subprocess.run(["podman", "run", "--rm", "--network", "host", *podman_args(), "--rootfs", "/:O", "true"],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        return f"podman cannot run a container here: {p.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def podman():
    problem = _podman_problem()
    if problem:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(problem)
        pytest.skip(problem)


def write_job(tmp_path, name, **fields):
    fields.setdefault("container", {})
    c = {"image": "rootfs:/", "runtime": "podman", "args": podman_args(), **fields["container"]}
    data = {"name": name, "cpu_procs_per_node": 2, **fields, "container": c}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def containers(run_id):
    out = subprocess.run(["podman", "ps", "--all", "--filter", f"label=cluster.run_id={run_id}",
                          "--format", "{{.Names}}"], capture_output=True, text=True, check=True).stdout
    return out.split()


TRAIN = {"model": "resnet18", "data": "synthetic-learnable", "image_size": 32, "batch_size": 8,
         "num_classes": 10, "steps": 6, "ckpt_every": 3, "log_every": 3}


def test_train_in_podman_checkpoints_reach_the_host_and_resume(podman, tmp_path):
    runs = tmp_path / "runs"
    job = write_job(tmp_path, "ctrain", train=TRAIN)
    rid = submit(runs, job)
    st = wait_state(runs, rid, {"SUCCEEDED", "FAILED"}, timeout=180)
    logs = cli(runs, "logs", rid).stdout
    assert st["state"] == "SUCCEEDED", logs[-3000:]
    assert "[localhost 0] " in logs and "summary:" in logs
    assert "podman run --rm --init --name ddp-" in logs          # the agent's own start line
    ckpts = runs / rid / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "ckpt_6.pt" and (ckpts / "ckpt_6.pt").stat().st_size > 1000
    assert len(list((runs / rid / "metrics").glob("heartbeat-rank*.json"))) == 2   # both ranks wrote
    assert containers(rid) == [] and run_pids(rid) == []
    # resume: a new containerized run continues from the old run's checkpoint
    rid2 = submit(runs, job, "--resume", rid, "train.steps=9")
    st2 = wait_state(runs, rid2, {"SUCCEEDED", "FAILED"}, timeout=180)
    logs2 = cli(runs, "logs", rid2).stdout
    assert st2["state"] == "SUCCEEDED", logs2[-3000:]
    assert "start_step=6" in logs2 and "step 9/9" in logs2
    assert containers(rid2) == []


PROBE = """
import json, os, socket
d = os.environ["PROBE_DIR"]
print("PROBE " + json.dumps({"rank": os.environ["RANK"], "env": {k: os.environ.get(k) for k in
      ("WEIRD", "NL", "JOBVAR", "CLUSTER_RUN_ID", "PYTHONUNBUFFERED")},
      "files": sorted(os.listdir(d)), "in_container": os.path.exists("/run/.containerenv"),
      "cwd": os.getcwd(), "hostname": socket.gethostname()}), flush=True)
"""


def test_env_and_hostile_mounts_arrive_byte_exact(podman, tmp_path):
    runs = tmp_path / "runs"
    src = tmp_path / "da ta'; touch pwned $(id)"
    src.mkdir()
    (src / "f `id`.txt").write_text("x")
    env = {"WEIRD": "a'; touch /tmp/pwned-podman $(id) `id` ${HOME} \"q\"", "NL": "line1\nline2  "}
    inside = "/mnt/in side $(id)"
    job = write_job(tmp_path, "probe", command=[sys.executable, "-c", PROBE], env={"JOBVAR": "j v"},
                    container={"env": {**env, "PROBE_DIR": inside}, "mounts": [f"{src}:{inside}:ro"]})
    rid = submit(runs, job)
    st = wait_state(runs, rid, {"SUCCEEDED", "FAILED"}, timeout=120)
    logs = cli(runs, "logs", rid).stdout
    assert st["state"] == "SUCCEEDED", logs[-3000:]
    probes = [json.loads(l.split("PROBE ", 1)[1]) for l in logs.splitlines() if "] PROBE " in l]
    assert sorted(p["rank"] for p in probes) == ["0", "1"]
    for p in probes:
        assert p["in_container"] is True
        assert p["env"] == {**env, "JOBVAR": "j v", "CLUSTER_RUN_ID": rid, "PYTHONUNBUFFERED": "1"}
        assert p["files"] == ["f `id`.txt"]
        assert p["cwd"] == str(runs / rid)      # the job runs in its run directory, in the container too
    # torchrun inside the container keeps its per-rank files in the run directory, as outside
    ranks = rank_logs(runs / rid, "localhost")
    assert sorted(ranks) == [0, 1] and all("PROBE " in text for text in ranks.values()), ranks
    assert not Path("/tmp/pwned-podman").exists() and not (tmp_path / "pwned").exists()
    assert containers(rid) == []


def _wait_ranks(runs, rid):
    deadline = time.time() + 90
    while "hello from rank 1" not in cli(runs, "logs", rid).stdout:
        assert time.time() < deadline, cli(runs, "logs", rid).stdout[-3000:]
        time.sleep(0.5)


def test_stop_removes_the_container(podman, tmp_path):
    runs = tmp_path / "runs"
    rid = submit(runs, write_job(tmp_path, "hello", module="tests.fixtures.hello", env={"HELLO_SLEEP_S": "120"}))
    _wait_ranks(runs, rid)
    assert containers(rid) == [f"ddp-{rid}-localhost"]
    # the ranks run inside the container, yet the host sees them by the run's id
    assert len(run_pids(rid)) >= 5           # agent, podman client, init, torchrun, two ranks
    t0 = time.time()
    p = cli(runs, "stop", rid, "--grace-s", "10")
    assert p.returncode == 0, p.stderr
    assert time.time() - t0 < 10             # the TERM reached torchrun through podman's sig-proxy
    assert "nothing of the run is left running" in p.stdout
    assert containers(rid) == [] and run_pids(rid) == []
    assert json.loads(cli(runs, "status", rid, "--json").stdout)["state"] == "CANCELLED"


def test_stop_removes_a_container_whose_client_was_killed(podman, tmp_path):
    """KILL the agent's whole group: the container lives on (conmon owns it) until stop removes it."""
    runs = tmp_path / "runs"
    rid = submit(runs, write_job(tmp_path, "hello", module="tests.fixtures.hello", env={"HELLO_SLEEP_S": "120"}))
    _wait_ranks(runs, rid)
    pgid = json.loads((runs / rid / "run.json").read_text())["handle"]["pgids"]["localhost"]
    os.killpg(pgid, signal.SIGKILL)
    time.sleep(1)
    assert containers(rid) == [f"ddp-{rid}-localhost"]
    p = cli(runs, "stop", rid, "--grace-s", "2")
    assert p.returncode == 0, p.stderr
    assert containers(rid) == [] and run_pids(rid) == []


def test_preflight_refuses_a_missing_image_before_anything_starts(podman, tmp_path):
    runs = tmp_path / "runs"
    job = write_job(tmp_path, "hello", module="tests.fixtures.hello",
                    container={"image": "localhost/ddp-no-such-image:0"})
    p = cli(runs, "submit", job)
    assert p.returncode == 2, p.stderr
    assert "localhost: container: image localhost/ddp-no-such-image:0 is not present" in p.stderr
    assert "podman pull localhost/ddp-no-such-image:0" in p.stderr and "Traceback" not in p.stderr
    assert not runs.exists() or not any(runs.iterdir())


# ---------------------------------------------------------------- quotas and identity (issue 20)
def _limits_job(tmp_path, name, out, **env):
    return write_job(tmp_path, name, module="tests.fixtures.limits", cpu_procs_per_node=1,
                     env={"LIMITS_OUT": "/out", **env},
                     container={"cpus": 1, "memory_gb": 1, "mounts": [f"{out}:/out"]})


def test_quotas_and_the_submitting_users_identity_inside(podman, tmp_path):
    """cpus=1, memory_gb=1: the container's own cgroup files say so; the rank runs as the
    submitting uid/gid and the file it writes to a mounted volume belongs to that user."""
    runs, out = tmp_path / "runs", tmp_path / "vol"
    out.mkdir()
    out.chmod(0o777)
    rid = submit(runs, _limits_job(tmp_path, "quota", out))
    st = wait_state(runs, rid, {"SUCCEEDED", "FAILED"}, timeout=120)
    logs = cli(runs, "logs", rid).stdout
    assert st["state"] == "SUCCEEDED", logs[-3000:]
    seen = json.loads(next(l for l in logs.splitlines() if "] LIMITS " in l).split("LIMITS ", 1)[1])
    quota, period = map(int, seen["cpu_max"].split())
    assert quota == period                                   # one core's worth of time per period
    assert int(seen["memory_max"]) == 1 << 30
    assert seen["pids_max"] == "16384"                        # the default
    assert (seen["uid"], seen["gid"]) == (os.getuid(), os.getgid())
    f = out / "written-by-rank0.txt"
    assert (f.stat().st_uid, f.stat().st_gid) == (os.getuid(), os.getgid())
    assert containers(rid) == []


def test_over_the_memory_limit_is_oom_killed_and_diagnosed(podman, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "vol"
    out.mkdir()
    # podman's conmon (2.1 here) writes an empty file 'oom' into its working directory, the run's
    # workdir, when the container hit its memory limit: remove what this test made
    stray = Path(__file__).resolve().parent.parent / "oom"
    ours = not stray.exists()
    rid = submit(runs, _limits_job(tmp_path, "oom", out, LIMITS_EAT_MB="1500"))
    st = wait_state(runs, rid, {"SUCCEEDED", "FAILED"}, timeout=120)
    if ours:
        stray.unlink(missing_ok=True)
    logs = cli(runs, "logs", rid).stdout
    assert st["state"] == "FAILED", logs[-3000:]
    assert "still alive after eating" not in logs
    assert "container: out of memory: the kernel killed" in logs
    ids = [f["pattern_id"] for f in st["failure"]["findings"]]
    assert ids[0] == "container-oom-killed", ids
    assert containers(rid) == []
