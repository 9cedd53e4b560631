"""The local backend with real torchrun processes: run, inspect from another shell, stop, fail."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def cli(runs, *args, timeout=120, env=None):
    """``python -m cluster ...`` in a new process: every verb must work from a fresh shell."""
    e = {**os.environ, "CLUSTER_RUNS_DIR": str(runs), "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, env=e, text=True,
                          capture_output=True, timeout=timeout)


def run_pids(run_id):
    """Processes carrying the run's id, read from /proc (what a user would check with ps)."""
    from cluster.backends.local import pids_of_run
    return pids_of_run(run_id)


def submit(runs, job, *overrides):
    p = cli(runs, "submit", job, *overrides)
    assert p.returncode == 0, p.stderr
    line = p.stdout.splitlines()[0]
    assert line.startswith("run ")
    return line.split()[1]


def wait_state(runs, run_id, states, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = cli(runs, "status", run_id, "--json")
        st = json.loads(p.stdout)
        if st["state"] in states:
            return st
        time.sleep(1)
    raise AssertionError(f"{run_id} not in {states} after {timeout}s: {st}")


def rank_logs(run_dir, host) -> dict[int, str]:
    """torchrun's own per-rank stdout files (its --log-dir, which the plan puts in the run's state
    dir): local rank -> text, from every attempt."""
    out: dict[int, str] = {}
    for f in sorted(Path(run_dir, "state", f"{host}.torchrun").glob("*/attempt_*/*/stdout.log")):
        out[int(f.parent.name)] = out.get(int(f.parent.name), "") + f.read_text()
    return out


def hello_job(tmp_path, **env):
    job = tmp_path / "hello.yaml"
    lines = ["name: hello", "module: tests.fixtures.hello", "cpu_procs_per_node: 2", "env:"]
    lines += [f"  {k}: '{v}'" for k, v in env.items()] or ["  {}"]
    if not env:
        lines[-2:] = ["env: {}"]
    job.write_text("\n".join(lines) + "\n")
    return str(job)


def test_train_run_to_completion_with_logs_status_checkpoint(tmp_path):
    """The default job at a small size: 2 ranks on gloo, trains, logs, checkpoints, succeeds."""
    runs = tmp_path / "runs"
    rid = submit(runs, "resnet50", "train.model=resnet18", "train.image_size=32", "train.steps=12",
                 "train.ckpt_every=6", "train.log_every=3", "train.data=synthetic-learnable")
    st = wait_state(runs, rid, {"SUCCEEDED", "FAILED"}, timeout=240)
    logs = cli(runs, "logs", rid).stdout
    assert st["state"] == "SUCCEEDED", logs[-3000:]
    # both ranks wrote prefixed lines; rank 0 printed progress and a summary
    assert "[localhost 0] " in logs and "[localhost 1] " in logs
    assert "summary:" in logs
    ckpts = runs / rid / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    assert latest == "ckpt_12.pt" and (ckpts / latest).stat().st_size > 1000
    # per-rank files, nohup style, with the same prefix
    rank1 = (runs / rid / "logs" / "localhost.rank1.log").read_text().splitlines()
    assert rank1 and all(l.startswith("[localhost 1] ") for l in rank1)
    table = cli(runs, "status").stdout
    assert rid in table and "SUCCEEDED" in table
    assert not run_pids(rid)
    # the loss went down (rank 0's metrics, learnable synthetic data)
    from cluster.run.report import read_metrics
    losses = [r["loss_mean"] for r in read_metrics(runs / rid / "metrics")[0] if r.get("kind") == "train"]
    assert losses[-1] < losses[0], losses
    # one run's mean throughput, said twice and labelled: train's summary (all ranks, from the
    # step it names) and the report's 'all' row (the sum of the ranks' means over those steps)
    summary = [r for r in read_metrics(runs / rid / "metrics")[0] if r.get("kind") == "summary"][-1]
    assert f"mean_img_s={summary['mean_img_s']} mean_from_step={summary['mean_from_step']}" in logs
    rep = cli(runs, "report", rid)
    assert rep.returncode == 0 and "img/s mean" in rep.stdout, rep.stdout + rep.stderr
    total = float(next(l for l in rep.stdout.splitlines() if l.split()[:1] == ["all"]).split()[2])
    assert abs(total - summary["mean_img_s"]) <= 0.05 * summary["mean_img_s"], (total, summary)
    # resume: a new run continues from the old run's last checkpoint, not from step 0
    rid2 = submit(runs, "resnet50", "--resume", rid, "train.model=resnet18", "train.image_size=32",
                  "train.steps=15", "train.ckpt_every=6", "train.log_every=3", "train.data=synthetic-learnable")
    st2 = wait_state(runs, rid2, {"SUCCEEDED", "FAILED"}, timeout=240)
    logs2 = cli(runs, "logs", rid2).stdout
    assert st2["state"] == "SUCCEEDED", logs2[-3000:]
    assert "start_step=12" in logs2 and "step 15/15" in logs2
    assert (runs / rid2 / "checkpoints" / "latest").read_text().strip() == "ckpt_15.pt"


def test_detached_run_survives_its_shell_and_is_inspected_from_another(tmp_path):
    runs = tmp_path / "runs"
    job = hello_job(tmp_path, HELLO_SLEEP_S=4)
    # the submitting shell is its own session; kill all of it right after submit returns
    env = {**os.environ, "CLUSTER_RUNS_DIR": str(runs), "CUDA_VISIBLE_DEVICES": ""}
    sh = subprocess.Popen(["bash", "-c", f"{sys.executable} -m cluster submit {job}; sleep 30"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    first = sh.stdout.readline()
    rid = first.split()[1]
    os.killpg(sh.pid, signal.SIGHUP)
    os.killpg(sh.pid, signal.SIGKILL)
    sh.wait()
    st = wait_state(runs, rid, {"SUCCEEDED", "FAILED"}, timeout=90)
    assert st["state"] == "SUCCEEDED"
    out = cli(runs, "logs", rid).stdout
    assert "[localhost 0] hello from rank 0/2 sum=3" in out
    assert "[localhost 1] hello from rank 1/2 sum=3" in out
    # each rank's output also in torchrun's own files in the run directory (its --log-dir)
    ranks = rank_logs(runs / rid, "localhost")
    assert sorted(ranks) == [0, 1] and all(f"hello from rank {r}/2 sum=3" in ranks[r] for r in ranks), ranks


def test_stop_mid_run_leaves_no_process(tmp_path):
    runs = tmp_path / "runs"
    rid = submit(runs, hello_job(tmp_path, HELLO_SLEEP_S=120))
    deadline = time.time() + 60
    while "hello from rank 1" not in cli(runs, "logs", rid).stdout:
        assert time.time() < deadline, "ranks never started"
        time.sleep(0.5)
    assert len(run_pids(rid)) >= 4      # agent, torchrun, two ranks
    p = cli(runs, "stop", rid, "--grace-s", "5")
    assert p.returncode == 0, p.stderr
    assert "nothing of the run is left running" in p.stdout
    assert run_pids(rid) == []
    st = json.loads(cli(runs, "status", rid, "--json").stdout)
    assert st["state"] == "CANCELLED"


def test_failing_rank_fails_the_run_and_is_named(tmp_path):
    runs = tmp_path / "runs"
    rid = submit(runs, hello_job(tmp_path, HELLO_SLEEP_S=30, HELLO_FAIL_RANK=1))
    st = wait_state(runs, rid, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=90)
    assert st["state"] == "FAILED"
    assert st["failure"]["host"] == "localhost" and st["failure"]["rank"] == 1
    assert any("failing on purpose" in l for l in st["failure"]["log_tail"])
    text = cli(runs, "status", rid).stdout
    assert "first failure: host localhost rank 1" in text
    assert run_pids(rid) == []


def test_logs_follow_ends_when_the_run_ends(tmp_path):
    runs = tmp_path / "runs"
    rid = submit(runs, hello_job(tmp_path, HELLO_SLEEP_S=3))
    p = cli(runs, "logs", rid, "--follow", timeout=90)
    assert p.returncode == 0
    assert "hello from rank 0/2" in p.stdout and "hello from rank 1/2" in p.stdout
    assert f"-- run {rid} SUCCEEDED" in p.stderr


@pytest.mark.parametrize("keep_prev", [True, False])
def test_a_damaged_record_is_named_the_others_go_on_and_stop_still_stops_it(tmp_path, keep_prev):
    """run.json cut short (a partial write, a full disk): status, logs and stop name that run and go
    on with the others; stop finds its processes through the record before its last write
    (run.json.prev) or, without one, by its CLUSTER_RUN_ID on this machine."""
    runs = tmp_path / "runs"
    ok = submit(runs, hello_job(tmp_path, HELLO_SLEEP_S=0))
    assert wait_state(runs, ok, {"SUCCEEDED", "FAILED"})["state"] == "SUCCEEDED"
    bad = submit(runs, hello_job(tmp_path, HELLO_SLEEP_S=120))
    deadline = time.time() + 60
    while "hello from rank 1" not in cli(runs, "logs", bad).stdout:
        assert time.time() < deadline, "ranks never started"
        time.sleep(0.5)
    assert len(run_pids(bad)) >= 4
    record = runs / bad / "run.json"
    record.write_text(record.read_text()[:200])
    if not keep_prev:
        (runs / bad / "run.json.prev").unlink()
    table = cli(runs, "status")
    assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
    assert any(l.split()[:2] == [ok, "SUCCEEDED"] for l in table.stdout.splitlines()), table.stdout
    assert any(l.split()[:2] == [bad, "DAMAGED"] for l in table.stdout.splitlines()), table.stdout
    assert f"run '{bad}': its record {record} is damaged" in table.stderr
    one = cli(runs, "status", bad)
    assert one.returncode == 2 and "Traceback" not in one.stderr and f"'{bad}'" in one.stderr
    assert f"stop {bad}" in one.stderr           # what to do
    logs = cli(runs, "logs")                     # the latest run is the damaged one: passed over, named
    assert logs.returncode == 0 and "hello from rank 0/2" in logs.stdout
    assert f"passing over {bad}" in logs.stderr
    stop = cli(runs, "stop", bad, "--grace-s", "5")
    assert stop.returncode == 0 and "Traceback" not in stop.stderr, stop.stdout + stop.stderr
    assert "nothing of the run is left running" in stop.stdout
    assert ("run.json.prev" in stop.stderr) == keep_prev
    assert run_pids(bad) == []
