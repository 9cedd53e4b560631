"""The cluster in a box itself: real sshd, real SLURM, real rsync/podman/torchrun across hosts.

The first tests (sacct stand-in parsing) need nothing; the rest use the session `testbed`
fixture from conftest.py (root; skipped elsewhere, a failure in CI)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.testbed import BRIDGE, down, health, leftovers, removed_containers, up
from tests.testbed import sacct as standin

# ------------------------------------------------------------------ sacct stand-in, no testbed

SCONTROL_SAMPLE = textwrap.dedent("""\
    JobId=3 JobName=wrap UserId=root(0) GroupId=root(0) Account=(null) JobState=COMPLETED Reason=None ExitCode=0:0 RunTime=00:00:01 Partition=debug NodeList=node[1-2] NumNodes=2 NumCPUs=2 NumTasks=2 WorkDir=/work/my dir
    JobId=4 JobName=wrap UserId=root(0) GroupId=root(0) Account=(null) JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0 Partition=debug NodeList=node1 NumNodes=1 NumCPUs=1
    JobId=5 JobName=wrap UserId=alice(1000) GroupId=alice(1000) Account=(null) JobState=CANCELLED Reason=None ExitCode=0:0 Partition=debug NodeList=(null) NumNodes=1-1 NumCPUs=1
    JobId=6 JobName=wrap UserId=root(0) GroupId=root(0) JobState=PENDING Reason=JobHeldUser ExitCode=0:0 Partition=debug NodeList=(null) NumNodes=1-1 NumCPUs=1
    JobId=7 ArrayJobId=7 ArrayTaskId=2-3%2 ArrayTaskThrottle=2 JobName=wrap UserId=root(0) JobState=PENDING Reason=JobArrayTaskLimit ExitCode=0:0 Partition=debug NodeList= NumNodes=1
    JobId=9 ArrayJobId=7 ArrayTaskId=1 ArrayTaskThrottle=2 JobName=wrap UserId=root(0) JobState=RUNNING Reason=None ExitCode=0:0 Partition=debug NodeList=node3 NumNodes=1
    JobId=8 ArrayJobId=7 ArrayTaskId=0 ArrayTaskThrottle=2 JobName=wrap UserId=root(0) JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15 Partition=debug NodeList=node2 NumNodes=1
    JobId=10 ArrayJobId=10 ArrayTaskId=0-4 ArrayTaskThrottle=0 JobName=arr UserId=root(0) JobState=PENDING Reason=Priority ExitCode=0:0 NodeList=(null) NumNodes=1
    """)


def _standin(args):
    opts = standin._parse_args(args)
    return standin.render(standin.select(standin.parse_scontrol(SCONTROL_SAMPLE), opts), opts)


def test_sacct_standin_submitit_format():
    out = _standin(["-o", "JobID,State,NodeList", "--parsable2", "-j", "3", "-j", "4", "-j", "5",
                    "-j", "6", "-j", "7", "-j", "10"])
    assert out.splitlines() == [
        "JobID|State|NodeList",
        "3|COMPLETED|node[1-2]",
        "4|FAILED|node1",
        "5|CANCELLED by 1000|None assigned",
        "6|PENDING|None assigned",
        "7_[2-3%2]|PENDING|None assigned",
        "7_0|TIMEOUT|node2",
        "7_1|RUNNING|node3",
        "10_[0-4]|PENDING|None assigned",
    ]


def test_sacct_standin_read_by_submitit():
    slurm = pytest.importorskip("submitit.slurm.slurm")
    out = _standin(["-o", "JobID,State,NodeList", "--parsable2", "-j", "3", "-j", "5", "-j", "7",
                    "-j", "10"])
    info = slurm.SlurmInfoWatcher().read_info(out)
    assert info["3"]["State"] == "COMPLETED"
    assert info["5"]["State"].startswith("CANCELLED")
    assert info["7_0"]["State"] == "TIMEOUT"
    assert info["7_1"]["State"] == "RUNNING"
    assert info["7_3"]["State"] == "PENDING"
    assert {f"10_{i}" for i in range(5)} <= set(info)


def test_sacct_standin_options():
    assert _standin(["-j", "4,3", "-P", "-n", "-X", "--format=JobID,ExitCode,JobName"]).splitlines() == [
        "3|0:0|wrap", "4|3:0|wrap"]
    assert _standin(["-j", "7_1", "-P", "-n", "-o", "JobID,State"]) == "7_1|RUNNING\n"
    assert _standin(["-s", "PD", "-P", "-n", "-o", "JobIDRaw"]).split() == ["6", "7", "10"]
    assert _standin(["-j", "3", "-p", "-o", "JobID,WorkDir"]).splitlines()[1] == "3|/work/my dir|"
    assert _standin(["-j", "999", "-P", "-o", "JobID,State"]) == "JobID|State\n"   # unknown: header only
    wide = _standin(["-j", "3"]).splitlines()
    assert wide[0].split() == ["JobID", "JobName", "Partition", "Account", "AllocCPUS", "State", "ExitCode"]
    assert wide[2].split() == ["3", "wrap", "debug", "2", "COMPLETED", "0:0"]
    with pytest.raises(SystemExit):
        _standin(["-o", "JobID,NoSuchField"])


# ------------------------------------------------------------------ the testbed


def _wait_for(pred, timeout=30.0, every=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


@pytest.mark.testbed
def test_inventory_shape(testbed):
    inv = yaml.safe_load(testbed.inventory.read_text())
    sd = str(testbed.state_dir)
    assert list(inv) == ["backend", "defaults", "ssh", "hosts", "slurm"]
    assert inv["backend"] == "ssh"
    assert inv["defaults"] == {"user": "root", "port": 22, "identity_file": f"{sd}/client_key",
                               "python": testbed.python, "gpus": 0}
    assert os.path.isabs(testbed.python) and os.access(testbed.python, os.X_OK)
    assert inv["ssh"] == {"known_hosts": f"{sd}/known_hosts", "connect_timeout_s": 5}
    assert inv["slurm"] == {"partition": testbed.partition, "time_min": 10}
    n = len(testbed.hosts)
    assert n >= 3 and [h["name"] for h in inv["hosts"]] == [f"node{i}" for i in range(1, n + 1)]
    for i, h in enumerate(inv["hosts"], 1):
        assert h == {"name": f"node{i}", "hostname": f"node{i}", "address": f"10.213.0.{10 + i}",
                     "workdir": f"{sd}/hosts/node{i}/work"}
        assert Path(h["workdir"]).is_dir()
        assert socket.gethostbyname(h["hostname"]) == h["address"]


@pytest.mark.testbed
def test_inventory_loads_with_project_loader(testbed):
    try:
        from cluster.spec.config import load_inventory
    except ImportError as e:  # the loader is another part of the project
        pytest.skip(f"cluster.spec.config.load_inventory not importable: {e}")
    inv = load_inventory(testbed.inventory)
    names = [h.name for h in inv.hosts]
    assert names == testbed.host_names
    assert [h.address for h in inv.hosts] == [h["address"] for h in testbed.hosts]


@pytest.mark.testbed
def test_ssh_every_host_returns_its_own_hostname(testbed):
    for h in testbed.hosts:
        p = testbed.run(h["name"], ["hostname"])
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == h["name"]


@pytest.mark.testbed
def test_ssh_with_the_inventory_alone(testbed):
    """What a backend does with a user's inventory: key, known_hosts, strict host keys."""
    inv = yaml.safe_load(testbed.inventory.read_text())
    for h in inv["hosts"]:
        argv = ["ssh", "-F", "/dev/null", "-i", inv["defaults"]["identity_file"], "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={inv['ssh']['known_hosts']}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-p", str(inv["defaults"]["port"]),
                f"{inv['defaults']['user']}@{h['hostname']}", "hostname; hostname -i; ip route"]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
        name, addr, *routes = p.stdout.split("\n")
        assert name == h["name"] and addr.strip() == h["address"]
        assert not any(r.startswith("default") for r in routes), "hosts must have no default route"


@pytest.mark.testbed
def test_rsync_between_hosts(testbed):
    src = Path(testbed.hosts[0]["workdir"]) / "rsync-src"
    dst = Path(testbed.hosts[1]["workdir"]) / "rsync-dst"
    src.mkdir(exist_ok=True)
    (src / "a.txt").write_text("payload\n")
    try:
        # rsync over ssh from node1 to node2: node-to-node ssh, run on node1
        p = testbed.run("node1", ["rsync", "-a", "-e", f"ssh -F {testbed.ssh_config}",
                                  f"{src}/", f"node2:{dst}/"])
        assert p.returncode == 0, p.stderr
        assert (dst / "a.txt").read_text() == "payload\n"
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


@pytest.mark.testbed
def test_sinfo_shows_all_nodes_idle_with_fake_gpus(testbed):
    p = testbed.local(["sinfo", "-h", "-N", "-o", "%N %T %G"])
    assert p.returncode == 0, p.stderr
    rows = sorted(ln.split() for ln in p.stdout.splitlines())
    assert rows == [[n, "idle", "gpu:2"] for n in testbed.host_names]


@pytest.mark.testbed
def test_srun_two_nodes_sees_two_hostnames(testbed):
    p = testbed.local(["srun", "-N2", "-p", testbed.partition, "hostname"], timeout=60)
    assert p.returncode == 0, p.stderr
    names = p.stdout.split()
    assert len(names) == 2 and len(set(names)) == 2 and set(names) <= set(testbed.host_names), names


@pytest.mark.testbed
def test_srun_fake_gpus(testbed):
    p = testbed.local(["srun", "-N1", "--gpus-per-node=2", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "0,1"


def _sacct(testbed, ids):
    argv = ["sacct", "-o", "JobID,State,NodeList", "--parsable2"]
    for j in ids:
        argv += ["-j", str(j)]
    p = testbed.local(argv)
    assert p.returncode == 0, p.stderr
    from submitit.slurm.slurm import SlurmInfoWatcher
    return SlurmInfoWatcher().read_info(p.stdout)


@pytest.mark.testbed
def test_sacct_standin_reports_job_states(testbed, tmp_path):
    pytest.importorskip("submitit")
    assert shutil.which("sacct", path=testbed.env()["PATH"]) == str(testbed.bin_dir / "sacct")
    assert shutil.which("sacct") == str(testbed.bin_dir / "sacct"), "fixture puts the stand-in on PATH"

    def sbatch(*args):
        p = testbed.local(["sbatch", "--parsable", "-o", str(tmp_path / "%j.out"), *args])
        assert p.returncode == 0, p.stderr
        return p.stdout.strip().split(";")[0]

    done = sbatch("-N2", "--wrap", "srun hostname")
    failed = sbatch("--wrap", "exit 3")
    running = sbatch("--wrap", "sleep 60")
    held = sbatch("--hold", "--wrap", "true")
    try:
        _wait_for(lambda: _sacct(testbed, [running]).get(running, {}).get("State") == "RUNNING",
                  what="RUNNING")
        _wait_for(lambda: _sacct(testbed, [done]).get(done, {}).get("State") == "COMPLETED",
                  what="COMPLETED")
        _wait_for(lambda: _sacct(testbed, [failed]).get(failed, {}).get("State") == "FAILED",
                  what="FAILED")
        info = _sacct(testbed, [done, failed, running, held])
        assert info[held]["State"] == "PENDING" and info[held]["NodeList"] == "None assigned"
        assert info[done]["NodeList"].startswith("node")
        ran_on = (tmp_path / f"{done}.out").read_text().split()
        assert len(set(ran_on)) == 2 and set(ran_on) <= set(testbed.host_names), ran_on
        testbed.local(["scancel", running], check=True)
        _wait_for(lambda: _sacct(testbed, [running])[running]["State"].startswith("CANCELLED"),
                  what="CANCELLED")
    finally:
        testbed.local(["scancel", running, held])


@pytest.mark.testbed
def test_submitit_two_node_job_and_cancel(testbed, tmp_path):
    submitit = pytest.importorskip("submitit")
    ex = submitit.SlurmExecutor(folder=tmp_path / "submitit", python=testbed.python)
    ex.update_parameters(partition=testbed.partition, nodes=2, ntasks_per_node=1, gpus_per_node=2,
                         time=5)
    job = ex.submit(socket.gethostname)
    results = job.results()
    assert len(set(results)) == 2 and set(results) <= set(testbed.host_names), results
    # submitit returns the results (pickles on the shared disk) before its next sacct poll is due,
    # and SLURM may still be COMPLETING (epilogs) when they are there
    _wait_for(lambda: job.watcher.get_state(job.job_id, mode="force") == "COMPLETED", timeout=30,
              every=0.5, what="submitit job COMPLETED")

    ex.update_parameters(nodes=1, gpus_per_node=0)
    job = ex.submit(time.sleep, 120)
    _wait_for(lambda: job.watcher.get_state(job.job_id, mode="force") == "RUNNING", timeout=30,
              what="submitit job RUNNING")
    job.cancel()
    # Without accounting submitit never sees the cancel, and job.result() waits forever. With the
    # stand-in it is done (job.result() would then raise UncompletedJobError, after submitit's own
    # 15 s wait for a result file, which this test spares itself).
    _wait_for(lambda: job.done(force_check=True), timeout=30, what="submitit sees the cancel")
    assert job.state.startswith("CANCELLED")


@pytest.mark.testbed
def test_podman_container_on_a_host(testbed):
    if shutil.which("podman") is None or shutil.which("runc") is None:
        msg = "podman/runc not installed (python -m tests.testbed install-deps)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(msg)
        pytest.skip(msg)
    # the flags documented in tests/testbed/README.md; --rootfs last: it is a flag, not an option
    p = testbed.run("node2", ["podman", "--runtime", "runc", "run", "--rm", "--network", "host",
                              "--ulimit", "nofile=1000:1000", "--ulimit", "nproc=1000:1000",
                              "--rootfs", "/:O", "sh", "-c", "hostname; hostname -i"], timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["node2", "10.213.0.12"]


TORCH_SCRIPT = """\
import os, socket, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank={dist.get_rank()} world={dist.get_world_size()} host={socket.gethostname()} sum={t.item()}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.testbed
@pytest.mark.slow
def test_torchrun_across_two_hosts(testbed):
    pytest.importorskip("torch")
    script = Path(testbed.hosts[0]["workdir"]) / "allreduce.py"
    script.write_text(TORCH_SCRIPT)
    tr = [testbed.python, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
          f"--log-dir={script.parent / 'torchrun-tbtest'}",        # not /tmp/torchelastic_*
          "--rdzv-backend=c10d", "--rdzv-endpoint=node1:29512", "--rdzv-id=tbtest", str(script)]
    procs = [subprocess.Popen(testbed.ssh_argv(h, tr), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, stdin=subprocess.DEVNULL) for h in ("node1", "node2")]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
        import shutil
        shutil.rmtree(script.parent / "torchrun-tbtest", ignore_errors=True)
        script.unlink(missing_ok=True)
    lines = [ln for out in outs for ln in out.splitlines() if ln.startswith("rank=")]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    assert sorted(lines) == ["rank=0 world=2 host=node1 sum=3.0", "rank=1 world=2 host=node2 sum=3.0"], outs


@pytest.mark.testbed
def test_leftovers_sees_a_live_testbed(testbed):
    """The check that down() left nothing must be able to fail: while up it sees everything."""
    left = "\n".join(leftovers())
    for what in ["network namespace node1", "network namespace node3", f"link {BRIDGE}",
                 "/etc/hosts line", "/etc/slurm file: slurm.conf", "/etc/slurm file: gres.conf",
                 f"state dir {testbed.state_dir}", ".testbed/state.json", "process "]:
        assert what in left, f"leftovers() misses {what!r}:\n{left}"


@pytest.mark.testbed
@pytest.mark.testbed_last
def test_down_leaves_nothing_and_up_again(testbed):
    # give down() something to clean: a detached process started over ssh, a running 2-node job
    # and (where podman is) a running container on a host
    assert testbed.run("node1", ["sh", "-c", "setsid sleep 600 </dev/null >/dev/null 2>&1 &"]).returncode == 0
    job = testbed.local(["sbatch", "--parsable", "-N2", "-o", "/dev/null", "--wrap", "srun sleep 600"])
    assert job.returncode == 0, job.stderr
    container = None
    if shutil.which("podman"):
        p = testbed.run("node3", ["podman", "--runtime", "runc", "run", "-d", "--network", "host",
                                  "--ulimit", "nofile=1000:1000", "--ulimit", "nproc=1000:1000",
                                  "--rootfs", "/:O", "sleep", "600"], timeout=120)
        assert p.returncode == 0, p.stderr
        container = p.stdout.strip()
    _wait_for(lambda: "RUNNING" in testbed.local(["squeue", "-h", "-o", "%T"]).stdout, what="job RUNNING")

    took_down = down(quiet=True)
    if container:
        assert container in removed_containers
        ps = subprocess.run(["podman", "ps", "-a", "--no-trunc", "-q"], capture_output=True, text=True)
        assert container not in ps.stdout
    left = leftovers()
    assert left == [], "testbed down left things behind:\n" + "\n".join(left)
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.strip() == ""
    assert down(quiet=True) >= 0  # idempotent
    t0 = time.monotonic()
    up(len(testbed.hosts), quiet=True)
    took_up = time.monotonic() - t0
    testbed.refresh()
    os.environ["PATH"] = testbed.env()["PATH"]
    ok, problems = health()
    assert ok, problems
    print(f"testbed: down {took_down:.2f}s, up {took_up:.2f}s", file=sys.stderr)
    assert took_up < 5.0, f"testbed up took {took_up:.1f}s (goal: under 5 s)"
    assert took_down < 10.0
