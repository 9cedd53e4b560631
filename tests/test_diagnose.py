"""Diagnosis: known failures (cluster/run/failures.yaml) matched on real log excerpts (tests/logs),
shown by `status` and `logs` for a failed run; hangs and stragglers from the heartbeats."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.run import diagnose as dg
from cluster.run import records
from cluster.cli import main
from cluster.spec.config import load_inventory
from cluster.run.records import Run
from cluster.spec.schema import to_plain

LOGS = Path(__file__).parent / "logs"
REPO = Path(__file__).resolve().parent.parent


def log(name):
    return (LOGS / f"{name}.txt").read_text().splitlines()


# ---------------------------------------------------------------- the patterns, on real logs
# file -> the failures it must show, the first one being what the run is reported to have died of
EXPECTED = {
    "address_in_use": ["address-in-use"],
    "rendezvous_client_timeout": ["master-unreachable"],
    "rendezvous_server_timeout": ["rendezvous-timeout"],
    "rendezvous_c10d_timeout": ["rendezvous-timeout"],
    "ddp_unused_parameters": ["ddp-unused-parameters"],
    "gloo_collective_timeout": ["collective-timeout"],
    "host_oom_killed": ["host-oom-killed", "nccl-network"],
    "container_oom_killed": ["container-oom-killed", "host-oom-killed"],
    "dataloader_workers": ["dataloader-slow"],
    "missing_module": ["missing-module"],
    "disk_full": ["disk-full", "nccl-network"],
    "cuda_oom_resnet": ["cuda-oom"],
    "nccl_watchdog_multinode": ["collective-timeout"],
    "nccl_socket_wrong_interface": ["nccl-network"],
    "nccl_version_mismatch": ["version-mismatch", "nccl-invalid-usage"],
    "dataloader_bus_error": ["dataloader-shm"],
    "ssh_fabric_auth_failed": ["ssh-auth"],
    "ssh_openssh_denied": ["ssh-auth", "ssh-host-key"],
    "ssh_paramiko_unknown_host": ["ssh-host-key"],
    "ssh_openssh_unreachable": ["ssh-unreachable"],
    "node_lost": ["node-lost"],
    # made on a 2-GPU host by generate.py gpu
    "torch_too_old": ["version-mismatch"],
    "cuda_oom": ["cuda-oom"],
    "nccl_watchdog_timeout": ["collective-timeout"],
    "nccl_duplicate_gpu": ["nccl-invalid-usage"],
    "cuda_device_assert": ["cuda-device-assert"],
    "teardown_abort": ["teardown-abort"],
}
CLEAN = ["clean_run", "clean_train_run", "nccl_version_info"]
PRESENT = {n: ids for n, ids in EXPECTED.items() if (LOGS / f"{n}.txt").exists()}


def test_failures_yaml_is_valid_and_covers_the_issue():
    ids = {p.id for p in dg.patterns()}
    for needed in ("cuda-oom", "collective-timeout", "nccl-network", "ddp-unused-parameters",
                   "rendezvous-timeout", "master-unreachable", "address-in-use", "ssh-auth",
                   "version-mismatch", "dataloader-slow"):
        assert needed in ids
    for p in dg.patterns():
        assert p.title and len(p.cause) > 40 and len(p.remedy) > 40, p.id
    assert any(p.check == "scaling" for p in dg.patterns())


def test_every_pattern_is_tested_on_a_real_excerpt():
    assert PRESENT == EXPECTED
    shown = {i for ids in EXPECTED.values() for i in ids}
    assert {p.id for p in dg.patterns() if p.match is not None} <= shown


@pytest.mark.parametrize("name", sorted(PRESENT))
def test_known_failure_found_in_real_log(name):
    found = dg.diagnose_hosts({"h": log(name)}, "h")
    assert [f.pattern_id for f in found] == PRESENT[name]
    for f in found:
        assert f.line and f.cause and f.remedy


@pytest.mark.parametrize("name", [n for n in CLEAN if (LOGS / f"{n}.txt").exists()])
def test_clean_logs_show_nothing(name):
    assert dg.diagnose(log(name)) == []


def test_finding_names_host_and_rank_of_the_line():
    (f,) = dg.diagnose(log("cuda_oom_resnet"))
    assert (f.host, f.rank) == ("gpu03", 21)
    assert "Tried to allocate 1.53 GiB" in f.line
    assert "batch" in f.remedy and "grad_accum" in f.remedy
    (f,) = dg.diagnose(log("nccl_watchdog_multinode"))
    assert f.host == "gpu01" and f.rank == 0 and "NCCL_SOCKET_IFNAME" in f.remedy


def test_failing_rank_first():
    """The root-cause rank's own error leads; what its death did to the others follows."""
    lines = log("host_oom_killed")
    found = dg.diagnose_hosts({"gpu02": lines}, "gpu02", rank=0)
    assert found[0].pattern_id == "nccl-network" and found[0].rank == 0
    found = dg.diagnose_hosts({"gpu02": lines}, "gpu02", rank=1)
    assert found[0].pattern_id == "host-oom-killed"


def test_versions_compared_across_hosts():
    """The real NCCL_DEBUG=INFO log of one host, and the same log from a host with another NCCL."""
    real = log("nccl_version_info")
    other = [l.replace("[gpu03 ", "[gpu04 ").replace("2.28.9+cuda13.0", "2.21.5+cuda12.4") for l in real]
    same = dg.diagnose_hosts({"gpu03": real, "gpu04": [l.replace("[gpu03 ", "[gpu04 ") for l in real]})
    assert same == []
    (f,) = dg.diagnose_hosts({"gpu03": real, "gpu04": other}, "gpu03")
    assert f.pattern_id == "version-mismatch"
    assert "gpu03: 2.28.9+cuda13.0" in f.line and "gpu04: 2.21.5+cuda12.4" in f.line


def test_bad_failures_file_is_refused(tmp_path):
    bad = tmp_path / "f.yaml"
    for text in ["- id: x\n  title: t\n  cause: c\n  remedy: r\n",                       # nothing to match
                 "- id: x\n  title: t\n  cause: c\n  remedy: r\n  match: ['(']\n",       # bad regex
                 "- id: x\n  title: t\n  cause: c\n  remedy: r\n  match: [a]\n  typo: 1\n",
                 "- id: x\n  title: t\n  cause: c\n  remedy: r\n  match: [a]\n"
                 "- id: x\n  title: t\n  cause: c\n  remedy: r\n  match: [b]\n"]:
        bad.write_text(text)
        with pytest.raises(ValueError):
            dg.patterns(bad)


def test_scaling_finding():
    assert dg.scaling_finding(900.0, 8, 1000.0, 1) is not None
    assert dg.scaling_finding(7000.0, 8, 1000.0, 1) is None
    f = dg.scaling_finding(900.0, 8, 1000.0, 1, "resnet50-1gpu")
    assert f.pattern_id == "dataloader-slow" and "workers" in f.remedy and "resnet50-1gpu" in f.line


# ---------------------------------------------------------------- hangs and stragglers (pure)
def hb(step, t, done=False, host="gpu01"):
    return {"step": step, "time": t, "done": done, "host": host, "steps_total": 1000}


def test_no_hang_during_startup_then_hang_without_heartbeat():
    w = dg.watch({}, None, now=1000.0, world_size=2, hang_timeout_s=60, startup_timeout_s=300)
    assert not w.hung and [r.flag for r in w.ranks] == ["starting", "starting"]
    w = dg.watch({0: hb(0, 1100.0)}, w.memo, now=1250.0, world_size=2, hang_timeout_s=60, startup_timeout_s=300)
    assert not w.hung          # rank 0 still at its first step: start-up limit; rank 1 within it
    w = dg.watch({0: hb(0, 1100.0)}, w.memo, now=1301.0, world_size=2, hang_timeout_s=60, startup_timeout_s=300)
    assert w.hung == [1] and w.behind == [1] and "rank 1 has not sent a heartbeat" in w.reason


def test_progress_rates_and_a_stalled_rank_is_named():
    kw = dict(world_size=2, hang_timeout_s=60, startup_timeout_s=300)
    w = dg.watch({0: hb(10, 100.0), 1: hb(10, 100.0)}, None, now=101.0, **kw)
    w = dg.watch({0: hb(20, 110.0), 1: hb(20, 110.0)}, w.memo, now=111.0, **kw)
    assert [r.rate for r in w.ranks] == [1.0, 1.0] and not w.hung and not w.stragglers
    # rank 1 stops at step 21 while rank 0 got one step further, then both wait
    w = dg.watch({0: hb(22, 112.0), 1: hb(21, 111.0)}, w.memo, now=150.0, **kw)
    assert not w.hung
    w = dg.watch({0: hb(22, 112.0), 1: hb(21, 111.0)}, w.memo, now=190.0, **kw)
    assert w.hung == [0, 1] and w.behind == [1]
    assert "rank 1 (gpu01) at step 21, no progress for 79s" in w.reason and "others at step 22" in w.reason


def test_a_stopped_rank_is_the_one_behind_though_every_rank_waits_at_its_step():
    kw = dict(world_size=3, hang_timeout_s=60, startup_timeout_s=300)
    beats = {r: hb(24, 100.0) for r in range(3)}
    w = dg.watch(beats, {"since": 0}, now=500.0, **kw)
    assert w.hung == [0, 1, 2] and w.behind == [0, 1, 2]         # the steps alone cannot tell
    beats[1] = {**beats[1], "proc": "T"}
    w = dg.watch(beats, {"since": 0}, now=500.0, **kw)
    assert w.hung == [0, 1, 2] and w.behind == [1]
    assert w.reason.startswith("rank 1 (gpu01) is stopped (process state T") and "wait for it at step 24" in w.reason


def test_rates_after_a_requeue_come_from_the_new_attempt_never_negative():
    kw = dict(world_size=1, hang_timeout_s=600, startup_timeout_s=600)
    w = dg.watch({0: hb(28, 100.0)}, None, now=100.0, **kw)
    w = dg.watch({0: hb(30, 102.0)}, w.memo, now=102.0, **kw)
    assert w.ranks[0].rate == 1.0
    # requeued: the new attempt resumed from ckpt_20 and has written one heartbeat
    w = dg.watch({0: hb(20, 400.0)}, w.memo, now=400.0, **kw)
    assert w.ranks[0].rate is None and w.ranks[0].step == 20
    w = dg.watch({0: hb(24, 402.0)}, w.memo, now=402.0, **kw)
    assert w.ranks[0].rate == 2.0


def test_done_ranks_never_hang():
    w = dg.watch({0: hb(1000, 100.0, done=True), 1: hb(1000, 100.0, done=True)}, {"since": 0}, now=10_000.0,
                 world_size=2, hang_timeout_s=60)
    assert not w.hung and [r.flag for r in w.ranks] == ["done", "done"]


def test_stragglers_by_lag_and_by_rate():
    kw = dict(world_size=3, hang_timeout_s=600)
    w = dg.watch({0: hb(100, 100.0), 1: hb(100, 100.0), 2: hb(100, 100.0)}, None, now=100.0, **kw)
    w = dg.watch({0: hb(200, 110.0), 1: hb(200, 110.0), 2: hb(140, 110.0)}, w.memo, now=110.0, **kw)
    assert w.stragglers == [2]                         # 60 steps behind and at 40% of the rate
    assert [r.flag for r in w.ranks] == ["", "", "straggler"]
    # heartbeats written at different moments are no lag: rank 2's is 5 s older at the same rate
    w = dg.watch({0: hb(100, 100.0), 1: hb(100, 100.0), 2: hb(100, 100.0)}, None, now=100.0, **kw)
    w = dg.watch({0: hb(200, 110.0), 1: hb(200, 110.0), 2: hb(150, 105.0)}, w.memo, now=110.0,
                 straggler_steps=20, **kw)
    assert w.stragglers == []


# ---------------------------------------------------------------- through status and logs
def _run(tmp_path, monkeypatch, run_id, *, nodes=("localhost",), job=None, world_size=2, age_s=60):
    """A run record as the local backend leaves it (no process launched)."""
    root = tmp_path / "runs"
    monkeypatch.setattr(records, "RUNS_DIR", root)
    r = Run(run_id, root)
    resolved = {"name": "resnet50", "hang_timeout_s": 300, "startup_timeout_s": 900, "stop_on_hang": False,
                "train": {"model": "resnet50", "batch_size": 8}, **(job or {})}
    r.create({"id": run_id, "created": time.time() - age_s, "state": "RUNNING", "backend": "local",
              "job": {"name": "resnet50", "resolved": resolved}, "inventory": to_plain(load_inventory()),
              "plan": {"world_size": world_size, "rdzv_endpoint": "127.0.0.1:29500",
                       "nodes": [{"host": h} for h in nodes]},
              "handle": {"pgids": {h: 2**22 - 7 for h in nodes}}})
    return r


def test_failed_run_status_and_logs_show_the_diagnosis(tmp_path, monkeypatch, capsys):
    r = _run(tmp_path, monkeypatch, "resnet50-20261128-120000-aaaa")
    (r.dir / "logs" / "localhost.log").write_text((LOGS / "ddp_unused_parameters.txt").read_text()
                                                  .replace("[gpu01 ", "[localhost "))
    (r.dir / "state" / "localhost.exit").write_text(json.dumps({"code": 1, "time": time.time()}))
    assert main(["status", r.id]) == 0
    out = capsys.readouterr().out
    assert f"run {r.id}: FAILED" in out
    rec = json.loads(r.path.read_text())["failure"]
    assert rec["host"] == "localhost" and rec["rank"] in (0, 1)      # torchrun's root cause
    assert f"first failure: host localhost rank {rec['rank']} exit code 1" in out
    assert "known failure [ddp-unused-parameters]" in out and "find_unused_parameters=True" in out
    # the line shown is the failing rank's own
    assert rec["findings"][0]["pattern_id"] == "ddp-unused-parameters" and rec["findings"][0]["rank"] == rec["rank"]
    assert main(["logs", r.id]) == 0
    cap = capsys.readouterr()
    assert "Expected to have finished reduction" in cap.out and "-- diagnosis" not in cap.out
    assert "-- diagnosis" in cap.err and "[ddp-unused-parameters]" in cap.err
    assert main(["status", r.id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["failure"]["findings"][0]["pattern_id"] == "ddp-unused-parameters"


def test_old_failure_records_are_diagnosed_from_their_tail(tmp_path, monkeypatch, capsys):
    r = _run(tmp_path, monkeypatch, "resnet50-20261128-120000-bbbb")
    r.update(state="FAILED", final=True, nodes_final=[],
             failure={"error": "paramiko.ssh_exception.AuthenticationException: Authentication failed."})
    assert main(["status", r.id]) == 0
    assert "known failure [ssh-auth]" in capsys.readouterr().out


@pytest.fixture
def live_group(tmp_path):
    """A real process group standing in for a run's agent (sleeps; carries the run's id)."""
    procs = []

    def start(run_id):
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                             env={**os.environ, "CLUSTER_RUN_ID": run_id})
        procs.append(p)
        return p.pid
    yield start
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def _beat(r, rank, step, age_s, done=False, pid=None):
    (r.dir / "metrics" / f"heartbeat-rank{rank}.json").write_text(json.dumps(
        {"step": step, "time": time.time() - age_s, "rank": rank, "host": "localhost", "done": done,
         "steps_total": 500, **({"pid": pid} if pid else {})}))


def test_status_marks_hung_and_names_the_rank_behind(tmp_path, monkeypatch, capsys, live_group):
    r = _run(tmp_path, monkeypatch, "resnet50-20261128-120000-cccc", job={"hang_timeout_s": 30})
    pgid = live_group(r.id)
    r.update(handle={"pgids": {"localhost": pgid}})
    (r.dir / "state" / "localhost.pid").write_text("{}")
    _beat(r, 0, 120, 5)
    _beat(r, 1, 119, 5)
    assert main(["status", r.id]) == 0
    out = capsys.readouterr().out
    assert ": RUNNING" in out and "rank 0   step 120/500" in out
    _beat(r, 0, 121, 45)
    _beat(r, 1, 120, 44)
    assert main(["status", r.id]) == 0
    out = capsys.readouterr().out
    assert ": HUNG" in out and "hung: rank 1 (localhost) at step 120, no progress for 44s" in out
    assert [e for e in r.events() if e["event"] == "hang"][0]["ranks"] == [1]
    assert json.loads(Run(r.id, r.dir.parent).path.read_text())["state"] == "HUNG"
    # progress again: back to RUNNING
    _beat(r, 0, 130, 1)
    _beat(r, 1, 130, 1)
    assert main(["status", r.id]) == 0
    assert ": RUNNING" in capsys.readouterr().out


def test_status_names_the_rank_whose_process_is_stopped(tmp_path, monkeypatch, capsys, live_group):
    """A rank frozen by SIGSTOP: every rank stops at the same step; its process state names it."""
    r = _run(tmp_path, monkeypatch, "resnet50-20261128-120000-eeee", job={"hang_timeout_s": 30, "startup_timeout_s": 10})
    pgid = live_group(r.id)
    frozen = live_group(r.id)            # stands in for rank 1's process
    os.kill(frozen, signal.SIGSTOP)
    r.update(handle={"pgids": {"localhost": pgid}})
    (r.dir / "state" / "localhost.pid").write_text("{}")
    for rank, pid in ((0, pgid), (1, frozen)):
        _beat(r, rank, 24, 45, pid=pid)
    deadline = time.time() + 5
    while open(f"/proc/{frozen}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        assert time.time() < deadline
        time.sleep(0.05)
    assert main(["status", r.id]) == 0
    out = capsys.readouterr().out
    assert ": HUNG" in out and "hung: rank 1 (localhost) is stopped (process state T" in out, out
    assert "rank 0 (localhost)" not in out.split("hung:", 1)[1]
    assert [e for e in r.events() if e["event"] == "hang"][0]["ranks"] == [1]
    os.kill(frozen, signal.SIGCONT)


def test_stop_on_hang_stops_the_run_and_records_why(tmp_path, monkeypatch, capsys, live_group):
    r = _run(tmp_path, monkeypatch, "resnet50-20261128-120000-dddd",
             job={"hang_timeout_s": 30, "stop_on_hang": True}, age_s=3600)
    pgid = live_group(r.id)
    r.update(handle={"pgids": {"localhost": pgid}})
    (r.dir / "state" / "localhost.pid").write_text("{}")
    (r.dir / "logs" / "localhost.log").write_text((LOGS / "nccl_watchdog_multinode.txt").read_text()
                                                  .replace("[gpu01 ", "[localhost "))
    _beat(r, 0, 50, 100)
    _beat(r, 1, 51, 100)
    assert main(["status", r.id]) == 0
    out = capsys.readouterr().out
    assert ": FAILED" in out and "hung: rank 0 (localhost) at step 50" in out
    assert "known failure [collective-timeout]" in out
    from cluster.node.probe import _group_alive
    assert not _group_alive(pgid)
    data = json.loads(r.path.read_text())
    assert data["final"] and data["failure"]["rank"] == 0 and data["failure"]["hang"]["behind"] == [0]
    assert any(e["event"] == "hang-stop" for e in r.events())


def test_succeeded_multi_gpu_run_slower_than_one_gpu_is_reported(tmp_path, monkeypatch, capsys):
    def finished(run_id, world, img_s, created):
        r = _run(tmp_path, monkeypatch, run_id, world_size=world)
        r.update(state="SUCCEEDED", final=True, nodes_final=[], created=created)
        with open(r.dir / "metrics" / "metrics-rank0.jsonl", "w") as f:
            for i, v in enumerate([img_s / 3] + [img_s] * 4):
                f.write(json.dumps({"kind": "train", "step": 10 * i, "img_s_total": v}) + "\n")
        return r
    finished("resnet50-20261128-110000-0001", 1, 1000.0, time.time() - 600)
    slow = finished("resnet50-20261128-120000-0002", 4, 800.0, time.time() - 60)
    assert main(["status", slow.id]) == 0
    out = capsys.readouterr().out
    assert "known failure [dataloader-slow]" in out
    assert "4 ranks: 800 img/s in total; 1 rank(s) (resnet50-20261128-110000-0001): 1000 img/s" in out


# ---------------------------------------------------------------- a real failing run, end to end
@pytest.mark.slow
def test_real_failing_run_is_diagnosed(tmp_path):
    """A job whose ranks skip a parameter, run for real with torchrun (gloo): status names
    host, rank and the known failure, from a fresh process."""
    job = tmp_path / "unused.yaml"
    job.write_text("name: unused\nmodule: tests.logs.scenarios\nargs: [unused_parameters]\ncpu_procs_per_node: 2\n")
    env = {**os.environ, "CLUSTER_RUNS_DIR": str(tmp_path / "runs"), "CUDA_VISIBLE_DEVICES": ""}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, env=env, text=True,
                              capture_output=True, timeout=120)
    p = cli("submit", str(job))
    assert p.returncode == 0, p.stderr
    run_id = p.stdout.split()[1]
    deadline = time.time() + 90
    while time.time() < deadline:
        st = json.loads(cli("status", run_id, "--json").stdout)
        if st["state"] in ("FAILED", "SUCCEEDED"):
            break
        time.sleep(1)
    assert st["state"] == "FAILED", st
    f = st["failure"]
    assert f["host"] == "localhost" and f["rank"] in (0, 1)
    assert f["findings"][0]["pattern_id"] == "ddp-unused-parameters"
    out = cli("status", run_id).stdout
    assert "known failure [ddp-unused-parameters]" in out and "remedy:" in out


# ---------------------------------------------------------------- which node's failure is the cause
def _node_log(host, rank, own, code):
    """A node's log: its rank's own lines, then torchrun's summary naming that rank."""
    return [f"[{host} {rank}] {l}" for l in own] + [
        f"[{host} agent] Root Cause (first observed failure):",
        f"[{host} agent]   rank      : {rank} (local_rank: 0)",
        f"[{host} agent]   exitcode  : {code} (pid: 4242)"]


PEER_GONE = ["step 26/60 loss 1.93", "Traceback (most recent call last):",
             "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.213.0.12]:4711"]


class _Logs:
    """Just what Backend.first_failure reads: each node's log tail."""
    from cluster.backends.base import Backend
    first_failure, _root_failure, _diagnose = Backend.first_failure, Backend._root_failure, Backend._diagnose

    def __init__(self, logs):
        self.logs = logs

    def log_tail(self, run, host, lines):
        return self.logs[host][-lines:]


def _failed(host, t, code=1):
    from cluster.backends.base import NodeStatus
    from cluster.run.records import State
    return NodeStatus(host, State.FAILED, exit_code=code, exit_time=t)


@pytest.mark.parametrize("case", ["killed", "disk-full"])
def test_the_failed_node_is_the_cause_not_a_peer_that_ended_first(case):
    # a peer whose all-reduce lost the dead rank can end before the dead rank's own node does
    own = (["step 26/60 loss 1.91"] if case == "killed" else
           ["Traceback (most recent call last):", "OSError: [Errno 28] checkpoint: cannot write ckpt_20.pt "
            "(No space left on device; 12 kB free there); the latest good checkpoint is still ckpt_10.pt"])
    logs = {"node1": _node_log("node1", 0, PEER_GONE, 1),
            "node2": _node_log("node2", 1, own, -9 if case == "killed" else 1),
            "node3": _node_log("node3", 2, PEER_GONE, 1)}
    nodes = [_failed("node1", 100.4), _failed("node2", 100.9, 1), _failed("node3", 100.2)]
    f = _Logs(logs).first_failure(None, nodes)
    assert (f["host"], f["rank"]) == ("node2", 1), f
    if case == "disk-full":
        assert f["findings"][0]["pattern_id"] == "disk-full", f["findings"]


def test_a_log_that_cannot_be_read_leaves_the_heartbeat_error():
    # node1's log was not readable when the run was recorded; its rank's heartbeat kept the error
    logs = {"node1": [], "node2": _node_log("node2", 1, PEER_GONE, 1), "node3": _node_log("node3", 2, PEER_GONE, 1)}
    nodes = [_failed("node1", 100.9), _failed("node2", 100.4), _failed("node3", 100.2)]
    nodes[0].heartbeats = {"0": {"step": 20, "error": "OSError: [Errno 28] checkpoint: cannot write ckpt_20.pt "
                                                      "(No space left on device; 40 kB free there)"}}
    nodes[2].heartbeats = {"2": {"step": 20, "error": PEER_GONE[-1]}}
    f = _Logs(logs).first_failure(None, nodes)
    assert (f["host"], f["rank"]) == ("node1", 0), f
    assert f["findings"][0]["pattern_id"] == "disk-full", f["findings"]


def test_when_every_node_lost_its_peers_the_first_to_end_is_named():
    # the network itself failed: every rank shows the same symptom; nothing to prefer but time
    logs = {h: _node_log(h, r, PEER_GONE, 1) for r, h in enumerate(["node1", "node2", "node3"])}
    nodes = [_failed("node1", 100.4), _failed("node2", 100.9), _failed("node3", 100.2)]
    f = _Logs(logs).first_failure(None, nodes)
    assert (f["host"], f["rank"]) == ("node3", 2) and f["findings"][0]["pattern_id"] == "nccl-network", f


def test_a_node_the_gang_stopped_that_failed_by_itself_is_the_cause():
    # node1's disk filled; its peers lost it, node3 reported first, and the gang stopped node1
    # before its own failure was reported: its heartbeat still says what happened
    from cluster.backends.base import NodeStatus
    from cluster.backends.ssh import SSHBackend
    from cluster.run.records import State
    logs = {"node1": _node_log("node1", 0, ["Traceback (most recent call last):",
                                            "OSError: [Errno 28] checkpoint: cannot write ckpt_20.pt "
                                            "(No space left on device; 40 kB free there)"], 1),
            "node2": _node_log("node2", 1, PEER_GONE, 1), "node3": _node_log("node3", 2, PEER_GONE, 1)}
    stopped = "stopped by the gang: node3 failed (exit code 1)"
    nodes = [NodeStatus("node1", State.CANCELLED, exit_code=1, exit_time=100.6, detail=stopped,
                        heartbeats={"0": {"error": "OSError: [Errno 28] checkpoint: cannot write ckpt_20.pt "
                                                   "(No space left on device; 40 kB free there)"}}),
             NodeStatus("node2", State.CANCELLED, exit_code=1, exit_time=100.7, detail=stopped,
                        heartbeats={"1": {"error": PEER_GONE[-1]}}),
             NodeStatus("node3", State.FAILED, exit_code=1, exit_time=100.2, heartbeats={"2": {"error": PEER_GONE[-1]}})]

    class Run:
        data = {"plan": {"nodes": [{"host": h, "nprocs": 1} for h in ("node1", "node2", "node3")]}}

    ssh = object.__new__(SSHBackend)     # no inventory or connections: only the logs are read
    ssh.log_tail = lambda run, host, lines: logs[host][-lines:]
    f = ssh.first_failure(Run(), nodes)
    assert (f["host"], f["rank"]) == ("node1", 0), f
    assert f["findings"][0]["pattern_id"] == "disk-full", f["findings"]
    assert f["gang_stopped"] == ["node1", "node2"]


def test_a_killed_rank_on_a_node_the_gang_stopped_is_the_cause():
    # kill -9 of node2's rank; node3 lost it and reported first; the gang stopped node2 before
    # its torchrun ended: torchrun's summary still says its rank died by SIGKILL
    from cluster.backends.base import NodeStatus
    from cluster.backends.ssh import SSHBackend
    from cluster.run.records import State
    logs = {"node1": _node_log("node1", 0, PEER_GONE, 1), "node2": _node_log("node2", 1, ["step 26/60 loss 1.91"], -9),
            "node3": _node_log("node3", 2, PEER_GONE, 1)}
    stopped = "stopped by the gang: node3 failed (exit code 1)"
    nodes = [NodeStatus("node1", State.CANCELLED, exit_code=1, exit_time=100.6, detail=stopped),
             NodeStatus("node2", State.CANCELLED, exit_code=1, exit_time=100.7, detail=stopped),
             NodeStatus("node3", State.FAILED, exit_code=1, exit_time=100.2)]

    class Run:
        data = {"plan": {"nodes": [{"host": h, "nprocs": 1} for h in ("node1", "node2", "node3")]}}

    reads = []     # over ssh each read is a round trip to the host: one per host and report
    ssh = object.__new__(SSHBackend)
    ssh.log_tail = lambda run, host, lines: reads.append(host) or logs[host][-lines:]
    from types import SimpleNamespace       # the hosts' addresses, as an inventory gives them
    ssh.inv = SimpleNamespace(host=lambda h: SimpleNamespace(address=f"10.213.0.1{h[-1]}"))
    f = ssh.first_failure(Run(), nodes)
    assert (f["host"], f["rank"]) == ("node2", 1), f
    assert sorted(reads) == ["node1", "node2", "node3"], reads
    # a rank that torchrun TERMed when the gang stopped it is no cause of its own
    logs["node2"] = _node_log("node2", 1, ["step 26/60 loss 1.91"], -15)
    assert ssh.first_failure(Run(), nodes)["host"] == "node3"


def test_root_cause_reads_torchruns_summary():
    # torchrun's own summary, as a node's log holds it: other failures first, then the root cause
    from cluster.backends.base import root_cause
    summary = ["[node2 agent] Failures:", "[node2 agent] [1]:",
               "[node2 agent]   rank      : 3 (local_rank: 1)", "[node2 agent]   exitcode  : -15 (pid: 77)",
               "[node2 agent] Root Cause (first observed failure):", "[node2 agent] [0]:",
               "[node2 agent]   time      : 2026-12-05_08:01:02",
               "[node2 agent]   rank      : 2 (local_rank: 0)", "[node2 agent]   exitcode  : -9 (pid: 76)",
               "[node2 agent]   traceback : Signal 9 (SIGKILL) received by PID 76"]
    assert root_cause(summary) == (2, -9)
    assert root_cause(summary[:4]) == (3, None)     # no root-cause block: the first rank named, no code
    assert root_cause(["step 3/10 loss 1.2"]) == (None, None)

