"""Your own training script on the cluster in a box: examples/ddp/train.py, a plain torchrun DDP
script with a sibling import and a snapshot file in its working directory, run through the shipped
jobs (jobs/ddp-script.yaml: ``command:`` with {python}; jobs/ddp-module.yaml: ``module:``).

What a user checks: the runs succeed over SSH and SLURM; the job writes into its own run directory
(never into the code, which is synced to every host, nor into the next run); ``--resume`` puts the
synced snapshot on every host so that every rank continues from the same epoch, also after a
kill -9; a job without heartbeats is judged by its output and CPU, not marked HUNG while it prints,
and HUNG when it is silent and idle.
"""
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.test_slurm_testbed import Slurm

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.testbed
START = re.compile(r"^\[(\S+) (\d+)\] rank \d+/(\d+) starts at epoch (\d+) in (\S+)$", re.M)


def shipped(name: str, **changes) -> str:
    """jobs/<name>.yaml as shipped, with ``changes`` on top (args, settings)."""
    job = yaml.safe_load((REPO / "jobs" / f"{name}.yaml").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            job.setdefault(key, {}).update(value)
        else:
            job[key] = value
    return yaml.safe_dump(job)


def starts(logs: str) -> dict[int, tuple[str, int, str]]:
    """rank -> (host, epoch it started at, its working directory)."""
    return {int(m[2]): (m[1], int(m[4]), m[5]) for m in START.finditer(logs)}


def untouched(path: Path, since: float) -> bool:
    return not path.exists() or path.stat().st_mtime < since


# ---------------------------------------------------------------- ssh
def test_script_via_command_runs_in_its_run_directory_and_resumes_every_rank(client):
    t0 = time.time()
    job = client.job(shipped("ddp-script", args=["--epochs", "3"], cpu_procs_per_node=2,
                          checkpoint={"sync_every_s": 2}))
    rid, p = client.submit(job)
    st = client.wait(rid)
    logs = client.cli("logs", rid).stdout
    assert st["state"] == "SUCCEEDED", client.cli("status", rid).stdout + logs[-4000:]
    first = starts(logs)
    assert sorted(first) == list(range(6)), logs[-3000:]                  # 3 hosts x 2 ranks
    for rank, (host, epoch, cwd) in first.items():
        assert host == client.testbed.host_names[rank // 2] and epoch == 0
        assert cwd == str(client.workdir[host] / "runs" / rid)               # its run directory
    assert "rank 0 epoch 2 loss" in logs
    # the snapshot is in node 0's run directory, not in the code (synced to every host as such)
    assert client.host_file("node1", rid, "snapshot.pt").exists()
    for h in client.testbed.host_names:
        assert untouched(client.workdir[h] / "snapshot.pt", t0)
    assert untouched(REPO / "snapshot.pt", t0)
    # ... and synced to storage here once the run is over
    deadline = time.time() + 90
    while (cs := client.state(rid)["checkpoints"])["state"] == "syncing":
        assert time.time() < deadline, cs
        time.sleep(1)
    assert cs["state"] == "synced" and cs["latest"] == "snapshot.pt", cs
    assert (client.runs / rid / "checkpoints" / "snapshot.pt").is_file()
    # exec --run (make exec RUN=...) works in the run's directory on each of its hosts
    p = client.cli("exec", "--run", rid, "--no-fold", "--", "sh", "-c", "pwd; ls")
    assert p.returncode == 0, p.stderr
    for h in client.testbed.host_names:
        assert f"[{h}] {client.workdir[h] / 'runs' / rid}" in p.stdout.splitlines()
    assert "[node1] snapshot.pt" in p.stdout and "[node2] snapshot.pt" not in p.stdout

    # a second run of the same job starts fresh: nothing of the first leaked into it
    rid2, _ = client.submit(job)
    st2 = client.wait(rid2)
    logs2 = client.cli("logs", rid2).stdout
    assert st2["state"] == "SUCCEEDED", logs2[-4000:]
    assert {r: e for r, (_, e, _) in starts(logs2).items()} == {r: 0 for r in range(6)}

    # --resume: the synced snapshot goes to every host (every_node), every rank continues at epoch 3
    job5 = client.job(shipped("ddp-script", args=["--epochs", "5"], cpu_procs_per_node=2), "job5.yaml")
    rid3, p = client.submit(job5, "--resume", rid)
    assert "resume: checkpoint copied to node[1-3] (snapshot.pt)" in p.stderr, p.stderr
    st3 = client.wait(rid3)
    logs3 = client.cli("logs", rid3).stdout
    assert st3["state"] == "SUCCEEDED", logs3[-4000:]
    assert {r: e for r, (_, e, _) in starts(logs3).items()} == {r: 3 for r in range(6)}, logs3[-3000:]
    assert "rank 0 epoch 4 loss" in logs3 and "epoch 0 loss" not in logs3
    assert not any(client.left_anywhere(r) for r in (rid, rid2, rid3))


def test_module_job_kill9_of_one_rank_then_resume_from_the_synced_snapshot(client):
    job = client.job(shipped("ddp-module", args=["--epochs", "40", "--epoch-s", "1"],
                          checkpoint={"sync_every_s": 2}))
    rid, _ = client.submit(job)
    client.wait_lines(rid, "rank 0 epoch 3 loss", 1)           # from toy import ...: the sibling was found
    deadline = time.time() + 60                             # a snapshot past epoch 0 has come here
    while (cs := client.state(rid)["checkpoints"])["latest"] != "snapshot.pt":
        assert time.time() < deadline, cs
        time.sleep(1)
    worker = [line.split()[0] for line in client.run_pids("node2", rid)
              if "-m examples.ddp.train" in line and "torch.distributed.run" not in line]
    assert len(worker) == 1, client.run_pids("node2", rid)
    assert client.testbed.run("node2", ["kill", "-9", worker[0]]).returncode == 0
    st = client.wait(rid, timeout=90)
    assert st["state"] == "FAILED"
    assert st["failure"]["host"] == "node2" and st["failure"]["rank"] == 1, st["failure"]
    ids = {f["pattern_id"] for f in st["failure"]["findings"]}
    assert "dataloader-slow" not in ids, ids
    deadline = time.time() + 60
    while client.state(rid)["checkpoints"]["state"] == "syncing":
        assert time.time() < deadline
        time.sleep(1)
    import torch
    saved = torch.load(client.runs / rid / "checkpoints" / "snapshot.pt")["epoch"]
    assert saved >= 1

    rid2, p = client.submit(client.job(shipped("ddp-module", args=["--epochs", str(saved + 2)]), "resume.yaml"),
                         "--resume", rid)
    st2 = client.wait(rid2)
    logs2 = client.cli("logs", rid2).stdout
    assert st2["state"] == "SUCCEEDED", logs2[-4000:]
    assert {r: e for r, (_, e, _) in starts(logs2).items()} == {0: saved, 1: saved, 2: saved}, logs2[-3000:]
    assert not client.left_anywhere(rid) and not client.left_anywhere(rid2)


def test_a_snapshot_on_node_0_only_is_named_as_the_ranks_disagreeing(client):
    """The failure this issue began with: resumed with the snapshot on node 0 only (every_node off),
    rank 0 has nothing left to do while the others start over; their errors are a peer's death."""
    job = client.job(shipped("ddp-script", args=["--epochs", "2"], checkpoint={"every_node": False}))
    rid, _ = client.submit(job)
    assert client.wait(rid)["state"] == "SUCCEEDED"
    rid2, p = client.submit(job, "--resume", rid)
    assert "resume: checkpoint copied to node1 (snapshot.pt)" in p.stderr, p.stderr
    st = client.wait(rid2, timeout=120)
    assert st["state"] == "FAILED"
    ids = [f["pattern_id"] for f in st["failure"]["findings"]]
    assert ids[0] == "ranks-out-of-step" and "dataloader-slow" not in ids, (ids, st["failure"])
    assert re.match(r"ranks out of step: node[23] rank [12] lost its connection to node1 \(10\.213\.0\.11\)",
                    st["failure"]["error"]), st["failure"]
    assert not client.left_anywhere(rid2)


def test_no_heartbeats_judged_by_output_and_cpu_printing_is_not_hung_silent_is(client):
    limits = {"startup_timeout_s": 2, "hang_timeout_s": 12}
    printing, _ = client.submit(client.job(shipped("ddp-script", args=["--epochs", "1", "--epoch-s", "30"], **limits),
                                     "printing.yaml"))
    silent, _ = client.submit(client.job(shipped("ddp-script", args=["--epochs", "3", "--hang-at", "1"], **limits),
                                   "silent.yaml"))
    client.wait_lines(printing, "rank 0 epoch 0 working", 1)
    seen = set()
    deadline = time.time() + 120
    while True:           # the printing run stays RUNNING (well past both limits) until it ends
        st = client.state(printing)
        seen.add(st["state"])
        if st["state"] in ("SUCCEEDED", "FAILED", "CANCELLED", "HUNG"):
            break
        if st["state"] == "RUNNING":
            text = client.cli("status", printing).stdout
            if f"{printing}: RUNNING" in text:      # (it may have ended between the two looks)
                assert "write no heartbeat: judged by their output and CPU" in text, text
        assert time.time() < deadline
        time.sleep(2)
    assert st["state"] == "SUCCEEDED" and "HUNG" not in seen, (seen, st)
    st = client.wait(silent, states=("HUNG", "FAILED", "SUCCEEDED"), timeout=120)
    assert st["state"] == "HUNG", st
    assert "no output and no CPU for" in st["watch"]["reason"]
    assert sorted(st["watch"]["behind"]) == [0, 1, 2]
    assert client.cli("stop", silent).returncode == 0
    assert not client.left_anywhere(silent)


# ---------------------------------------------------------------- slurm
@pytest.mark.slow
def test_slurm_command_and_module_jobs_run_in_the_run_directory_and_resume_every_rank(testbed, tmp_path):
    s = Slurm(testbed, tmp_path, gpus_per_node=2)
    t0 = time.time()
    first, _ = s.submit(s.job("script", shipped("ddp-script", args=["--epochs", "3"], nodes=3,
                                                 time_limit_min=10)))
    s.wait_state(first, ("SUCCEEDED",), timeout=240)
    logs = s.logs(first)
    got = starts(logs)
    assert sorted(got) == list(range(6)), logs[-3000:]                    # 3 nodes x 2 tasks
    assert {e for _, e, _ in got.values()} == {0}
    assert {cwd for _, _, cwd in got.values()} == {str(s.runs / first)}
    assert (s.runs / first / "snapshot.pt").is_file() and untouched(REPO / "snapshot.pt", t0)

    second, _ = s.submit(s.job("module", shipped("ddp-module", args=["--epochs", "5"], nodes=3,
                                                  time_limit_min=10)), "--resume", first)
    s.wait_state(second, ("SUCCEEDED",), timeout=240)
    logs2 = s.logs(second)
    assert {r: e for r, (_, e, _) in starts(logs2).items()} == {r: 3 for r in range(6)}, logs2[-3000:]
    assert "rank 5 epoch 4 loss" in logs2 and "epoch 0 loss" not in logs2
