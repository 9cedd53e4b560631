"""SLURM backend without a cluster: the sbatch script (golden), validation, state mapping, tasks.

SLURM's commands are faked at the subprocess edge (as submitit's own tests do): a fake bin dir
on PATH records every call and refuses commands it does not know. The real thing runs in
tests/test_slurm_testbed.py.
"""
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from cluster.spec.config import REPO, load_inventory, load_job  # noqa: E402
from cluster.errors import UserError  # noqa: E402
from cluster.run.records import Run, State  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
CLUSTER_INV = """
backend: slurm
hosts:
  - name: login01
slurm:
  partition: gpu
  account: ml-team
  qos: normal
  time_min: 240
  constraint: h100
  gpus_per_node: 8
  cpus_per_task: 12
  mem_gb: 0
  nodes: 2
  sbatch:
    exclusive: true
    comment: "resnet50 on 2 x 8 H100; it's fine"
"""

FAKE = r'''#!{python}
"""Fake SLURM command: logs argv, answers from FAKE_SLURM/config.json, refuses the unknown."""
import json, os, shutil, sys, time
d = os.environ["FAKE_SLURM"]
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
cfg = json.load(open(os.path.join(d, "config.json")))
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps([name] + args) + "\n")
if name == "sbatch" and args[:1] == ["--test-only"]:
    sys.stderr.write(cfg.get("test_only_stderr", "sbatch: Job 4242 to start at 2026-01-01T00:00:00\n"))
    sys.exit(cfg.get("test_only_rc", 0))
if name == "sbatch":
    if cfg.get("sbatch_rc"):
        sys.stderr.write("sbatch: error: Batch job submission failed: Invalid account\n")
        sys.exit(cfg["sbatch_rc"])
    shutil.copy(args[-1], os.path.join(d, "submitted.sh"))
    print(f"Submitted batch job {{cfg.get('next_job', 4242)}}")
    sys.exit(0)
if name == "scontrol" and args[:3] == ["show", "job", "-o"]:
    st = cfg.get("state")
    if st is None:
        sys.stderr.write("slurm_load_jobs error: Invalid job id specified\n")
        sys.exit(1)
    print(f"JobId={{args[3]}} JobName=x UserId=root(0) JobState={{st}} Reason={{cfg.get('reason', 'None')}} "
          f"Restarts={{cfg.get('restarts', 0)}} ExitCode={{cfg.get('exit', '0:0')}} NodeList={{cfg.get('nodes', 'gpu[01-02]')}} "
          f"StartTime={{time.strftime('%Y-%m-%dT%H:%M:%S')}} "
          f"EndTime={{time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(time.time() - cfg.get('ended_ago', 0)))}} "
          f"Partition=gpu ExcNodeList={{cfg.get('exclude', '(null)')}} Command=/x/y a b WorkDir=/x")
    sys.exit(0)
if name == "scontrol" and args[:1] == ["update"]:
    if cfg.get("update_rc"):
        sys.stderr.write("scontrol: error: Job is no longer pending execution\n")
        sys.exit(cfg["update_rc"])
    cfg["exclude"] = next(a.split("=", 1)[1] for a in args if a.startswith("ExcNodeList="))
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    sys.exit(0)
if name == "sinfo" and "%N %T" in args:
    print("\n".join(f"{{n}} {{s}}" for n, s in cfg.get("node_states", {{}}).items()))
    sys.exit(0)
if name == "sinfo" and "%N" in args:
    print("\n".join(cfg.get("partition_nodes", [])))
    sys.exit(0)
if name == "sacct":
    sys.exit(1)
if name == "scontrol" and args[:1] == ["requeue"]:
    sys.exit(0)
if name == "scancel":
    cfg["state"] = "CANCELLED"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    sys.exit(0)
sys.stderr.write(f"fake slurm: unexpected command {{[name] + args}}\n")
sys.exit(99)
'''


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A bin dir with sbatch, srun, scontrol, scancel, sacct, sinfo fakes first on PATH."""
    d = tmp_path / "fake-slurm"
    (d / "bin").mkdir(parents=True)
    script = FAKE.format(python=sys.executable)
    for name in ("sbatch", "srun", "scontrol", "scancel", "sacct", "sinfo"):
        p = d / "bin" / name
        p.write_text(script)
        p.chmod(0o755)
    (d / "config.json").write_text("{}")
    monkeypatch.setenv("FAKE_SLURM", str(d))
    monkeypatch.setenv("CLUSTER_SLURM_FOLLOW", "0")     # no detached follower polling the fakes
    monkeypatch.setenv("PATH", f"{d / 'bin'}{os.pathsep}{os.environ['PATH']}")

    class Fake:
        dir = d

        def configure(self, **cfg):
            (d / "config.json").write_text(json.dumps(cfg))

        def calls(self):
            p = d / "calls.jsonl"
            return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []

        def env(self):
            return {**os.environ}
    return Fake()


def write_inv(tmp_path, text=CLUSTER_INV, name="cluster.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def cli(*args, runs, env=None, timeout=120):
    e = {**os.environ, "CLUSTER_RUNS_DIR": str(runs), **(env or {})}
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, env=e, text=True,
                          capture_output=True, timeout=timeout)


def check_golden(name: str, text: str, runs: Path):
    text = text.replace(sys.executable, "<python>").replace(str(runs), "<runs>").replace(str(REPO), "<repo>")
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"sbatch script changed; if intended, rerun with UPDATE_GOLDEN=1 ({path})"


# ------------------------------------------------------------------------------------ the script
def test_golden_sbatch_script_for_resnet50(tmp_path):
    """`python -m cluster plan resnet50 --backend slurm` prints the exact sbatch script."""
    runs = tmp_path / "runs"
    p = cli("plan", "resnet50", "-i", write_inv(tmp_path), "--run-id", "resnet50-golden", runs=runs)
    assert p.returncode == 0, p.stderr
    check_golden("sbatch_resnet50.txt", p.stdout, runs)
    text = p.stdout
    assert "#SBATCH --nodes=2\n" in text and "#SBATCH --ntasks-per-node=8\n" in text
    assert "#SBATCH --gpus-per-node=8\n" in text and "#SBATCH --exclusive\n" in text
    # hostile values are quoted once, by submitit
    assert "#SBATCH --comment='resnet50 on 2 x 8 H100; it'\"'\"'s fine'\n" in text


def test_submitted_script_is_the_plan(tmp_path, fake_slurm, monkeypatch):
    """What sbatch receives is byte for byte what `plan` printed; nothing runs before --test-only."""
    import cluster.run.records
    import cluster.submit
    runs = tmp_path / "runs"
    inv = write_inv(tmp_path)
    plan = cli("plan", "resnet50", "-i", inv, "--run-id", "resnet50-same", runs=runs)
    assert plan.returncode == 0, plan.stderr
    monkeypatch.setattr(cluster.run.records, "RUNS_DIR", runs)
    monkeypatch.setattr(cluster.submit, "new_run_id", lambda job: "resnet50-same")
    run = cluster.submit.submit("resnet50", [], inventory=inv)
    calls = fake_slurm.calls()
    assert [c[:2] for c in calls if c[0] == "sbatch"] == [["sbatch", "--test-only"], ["sbatch", calls[-1][1]]]
    submitted = (fake_slurm.dir / "submitted.sh").read_text()
    assert submitted == plan.stdout
    data = json.loads((run.dir / "run.json").read_text())
    assert data["handle"]["job_id"] == "4242" and data["handle"]["tasks"] == 16
    assert data["state"] == "PENDING"      # queued: task 0 records RUNNING (cluster/node/slurm_task.py)


def test_tasks_per_node_follow_gpus_and_cpu_profile(tmp_path):
    from cluster.submit import resolve
    inv = write_inv(tmp_path, CLUSTER_INV.replace("gpus_per_node: 8", "gpus_per_node: 0"))
    _, _, loaded, plan = resolve("resnet50", ["nodes=3"], inv, None, run_id="r")
    assert plan.sbatch["nodes"] == 3 and plan.sbatch["ntasks_per_node"] == 2   # cpu profile: 2 procs
    assert "gpus_per_node" not in plan.sbatch and plan.world_size == 6
    assert loaded.profile == "cpu" and "export OMP_NUM_THREADS=1" in plan.render()
    _, _, _, plan = resolve("resnet50", ["gpus_per_node=4"], write_inv(tmp_path), None, run_id="r")
    assert plan.sbatch["ntasks_per_node"] == 4 and plan.sbatch["gpus_per_node"] == 4


def test_gpus_per_node_on_nodes_without_gpus_is_refused_not_ignored(tmp_path):
    """The inventory says the nodes have no GPU (gpus: 0, no slurm.gpus_per_node); the job asks for 2:
    one clear refusal naming the setting that gives SLURM nodes GPUs, never CPU tasks instead."""
    from cluster.submit import resolve
    inv = write_inv(tmp_path, CLUSTER_INV.replace("  gpus_per_node: 8\n", "").replace(
        "  - name: login01\n", "  - name: login01\n    gpus: 0\n"))
    with pytest.raises(UserError) as e:
        resolve("resnet50", ["gpus_per_node=2"], inv, None, run_id="r")
    text = e.value.render()
    assert "gpus_per_node: the job asks for 2 GPU(s) per node, but the nodes have none" in text
    assert "slurm.gpus_per_node: 2" in text
    _, _, _, plan = resolve("resnet50", [], inv, None, run_id="r")          # auto: CPU tasks, as before
    assert plan.sbatch["ntasks_per_node"] == 2 and "gpus_per_node" not in plan.sbatch
    p = subprocess.run([sys.executable, "-m", "cluster", "plan", "resnet50", "gpus_per_node=2", "-i", str(inv)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "slurm.gpus_per_node: 2" in p.stderr, p.stderr


def test_rendezvous_from_the_allocation_and_job_port(tmp_path):
    from cluster.submit import resolve
    inv = write_inv(tmp_path)
    text = resolve("resnet50", [], inv, None, run_id="r")[3].render()
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in text
    assert "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))" in text
    assert "export MASTER_PORT=31234" in resolve("resnet50", ["rdzv_port=31234"], inv, None, run_id="r")[3].render()


def test_container_pyxis_and_apptainer(tmp_path):
    """pyxis: srun starts each task in the image (its python3); apptainer: exec around the payload."""
    from cluster.submit import resolve
    job = tmp_path / "c.yaml"
    job.write_text("name: c\nmodule: tests.fixtures.hello\ncontainer:\n  image: nvcr.io/nvidia/pytorch:24.05-py3\n"
                   "  runtime: enroot\n  mounts: ['/data:/data:ro']\n  env: {NCCL_DEBUG: INFO}\n")
    inv = write_inv(tmp_path)
    plan = resolve(str(job), [], inv, None, run_id="r")[3]
    text = plan.render()
    srun = text.splitlines()[-1]
    assert f" '--container-image=nvcr.io#nvidia/pytorch:24.05-py3' --container-mounts={REPO}:{REPO},/data:/data:ro " \
           f"--container-workdir={REPO} --container-env=CLUSTER_RUN_ID,MASTER_ADDR,MASTER_PORT,NCCL_DEBUG," \
           "PYTHONUNBUFFERED python3 -S -u -m cluster.node.slurm_task " in srun
    assert plan.task["argv"] == ["python3", "-m", "tests.fixtures.hello"]
    assert "\nexport NCCL_DEBUG=INFO\n" in text

    job.write_text(job.read_text().replace("runtime: enroot", "runtime: apptainer"))
    plan = resolve(str(job), [], inv, None, run_id="r")[3]
    assert plan.task["argv"] == ["env", "APPTAINERENV_CLUSTER_RUN_ID=r", "APPTAINERENV_NCCL_DEBUG=INFO",
                                 "APPTAINERENV_PYTHONUNBUFFERED=1", "apptainer", "exec", "--nv",
                                 "--bind", f"{REPO}:{REPO}", "--bind", "/data:/data:ro", "--pwd", str(REPO / "runs" / "r"),
                                 "docker://nvcr.io/nvidia/pytorch:24.05-py3", "python3", "-m", "tests.fixtures.hello"]
    assert "--container-image" not in plan.render()


# ------------------------------------------------------------------------------------ errors
BAD = [
    ("  sbatch:\n    gpu_tpye: 1\n", "unknown sbatch option 'gpu_tpye'", "valid options are: acctg_freq"),
    ("  sbatch:\n    time: 10\n", "'time' is set by the backend", "slurm.time_min"),
    ("  sbatch:\n    ntasks-per-node: 3\n", "'ntasks-per-node' is set by the backend", "gpus_per_node"),
    ("  sbatch:\n    mail_user: \"a@b\\nrm -rf /\"\n", "contains a control or invisible character", None),
    ("  sbatch:\n    comment: true\n", "'comment' needs a value", "--comment=VALUE"),
    ("  sbatch:\n    hold: 'yes'\n", "'hold' takes no value", "hold: true"),
    ("  sbatch:\n    mail_usr: a@b\n", "unknown sbatch option 'mail_usr'", "did you mean 'mail_user'?"),
    ("  sbatch:\n    comment: '" + "x" * 1001 + "'\n", "sbatch takes at most 1000", None),
    ("  partiton: gpu\n", "unknown key 'partiton'", "did you mean 'partition'? valid keys here are"),
    ("  qos: high prio\n", "is not a valid qos", None),
    ("  cpus_per_task: 0\n", "must be at least 1", None),
    ("  signal_delay_s: 65535\n", "signal_delay_s 65535 is not shorter than the time limit", None),
    ("  signal_delay_s: 99999\n", "must be at most 65535", None),
]


@pytest.mark.parametrize("extra,message,hint", BAD, ids=[b[1][:24] for b in BAD])
def test_bad_slurm_settings_fail_before_anything_is_submitted(tmp_path, fake_slurm, extra, message, hint):
    key = extra.split(":")[0] + ":"
    base = "".join(l for l in CLUSTER_INV.split("  sbatch:")[0].splitlines(True) if not l.startswith(key))
    inv = write_inv(tmp_path, base + extra)
    p = cli("submit", "resnet50", "-i", inv, runs=tmp_path / "runs", env=fake_slurm.env())
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert hint is None or hint in p.stderr
    assert fake_slurm.calls() == []           # not even sbatch --test-only
    assert not (tmp_path / "runs").exists()


def test_sbatch_option_errors_name_file_line_and_key(tmp_path):
    inv = write_inv(tmp_path, CLUSTER_INV + "    wrap: 'id'\n")
    line = open(inv).read().splitlines().index("    wrap: 'id'") + 1
    p = cli("plan", "resnet50", "-i", inv, runs=tmp_path / "runs")
    assert p.returncode == 2
    assert p.stderr.startswith(f"error: {inv}:{line}: slurm.sbatch.wrap: 'wrap' is set by the backend"), p.stderr


def test_sbatch_values_are_rendered_for_sbatchs_parser(tmp_path):
    """A backslash is doubled: sbatch's #SBATCH parser reads it as an escape even inside quotes
    (proved against the real sbatch in test_sbatch_quoting_testbed.py)."""
    from cluster.submit import resolve
    inv = write_inv(tmp_path, CLUSTER_INV.replace("it's fine", "a\\\\' --chdir=/x"))
    text = resolve("resnet50", [], inv, None, run_id="r")[3].render()
    assert "#SBATCH --comment='resnet50 on 2 x 8 H100; a\\\\'\"'\"' --chdir=/x'\n" in text


def test_no_time_limit_is_an_error(tmp_path):
    inv = write_inv(tmp_path, CLUSTER_INV.replace("  time_min: 240\n", ""))
    p = cli("plan", "resnet50", "-i", inv, runs=tmp_path / "runs")
    assert p.returncode == 2 and "no time limit for the SLURM job" in p.stderr and "slurm.time_min" in p.stderr


def test_docker_is_refused_on_slurm(tmp_path):
    job = tmp_path / "d.yaml"
    job.write_text("name: d\nmodule: x\ncontainer:\n  image: img\n  runtime: docker\n")
    p = cli("plan", str(job), "-i", write_inv(tmp_path), runs=tmp_path / "runs")
    assert p.returncode == 2 and "container runtime 'docker' does not run under SLURM" in p.stderr


def test_slurm_rejection_from_test_only_is_a_clear_error(tmp_path, fake_slurm):
    fake_slurm.configure(test_only_rc=1, test_only_stderr="sbatch: error: Batch job submission failed: "
                                                          "Invalid account or account/partition combination specified\n")
    p = cli("submit", "resnet50", "-i", write_inv(tmp_path), runs=tmp_path / "runs", env=fake_slurm.env())
    assert p.returncode == 2 and "SLURM rejects the job" in p.stderr and "Invalid account" in p.stderr
    assert [c[:2] for c in fake_slurm.calls()] == [["sbatch", "--test-only"]]


def test_no_sbatch_here_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    p = subprocess.run([sys.executable, "-m", "cluster", "submit", "resnet50", "-i", write_inv(tmp_path)],
                       cwd=REPO, env={**os.environ, "CLUSTER_RUNS_DIR": str(tmp_path / "runs")},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "sbatch is not on this machine's PATH" in p.stderr


# ------------------------------------------------------------------------------------ status, stop
MAPPING = [("PENDING", State.PENDING), ("REQUEUED", State.PENDING), ("RUNNING", State.RUNNING),
           ("COMPLETING", State.RUNNING), ("COMPLETED", State.SUCCEEDED), ("CANCELLED", State.CANCELLED),
           ("FAILED", State.FAILED), ("TIMEOUT", State.FAILED), ("NODE_FAIL", State.FAILED),
           ("OUT_OF_MEMORY", State.FAILED)]


def _slurm_run(tmp_path, **handle) -> Run:
    from cluster.spec.schema import to_plain
    inv = load_inventory(write_inv(tmp_path))
    run = Run("r1", root=tmp_path / "runs")
    run.create({"id": "r1", "created": time.time(), "state": "STARTING", "backend": "slurm",
                "inventory": to_plain(inv), "plan": {"nodes": [{}, {}], "world_size": 4},
                "handle": {"job_id": "77", "folder": str(run.dir / "slurm"), "tasks": 4, **handle}})
    return run


@pytest.mark.parametrize("slurm_state,state", MAPPING, ids=[m[0] for m in MAPPING])
def test_slurm_states_map_onto_the_projects(tmp_path, fake_slurm, slurm_state, state):
    from cluster.backends import backend_for
    fake_slurm.configure(state=slurm_state, exit="3:0" if state == State.FAILED else "0:0",
                         nodes="None assigned" if state == State.PENDING else "gpu[01-02]")
    run = _slurm_run(tmp_path)
    got, nodes = backend_for(run).status(run)
    assert got == state
    if state != State.PENDING:
        assert [n.host for n in nodes] == ["gpu01", "gpu02"]
    if state == State.FAILED:
        assert run.data["failure"]["exit_code"] == 3


@pytest.mark.parametrize("slurm_state", ["NODE_FAIL", "PREEMPTED"])
def test_node_fail_and_preemption_of_a_requeue_job_are_not_final_at_once(tmp_path, fake_slurm, slurm_state):
    from cluster.backends import backend_for
    run = _slurm_run(tmp_path)
    run.update(plan={**run.data["plan"], "task": {"requeue": True, "max_requeues": 3}})
    fake_slurm.configure(state=slurm_state, exit="0:9", restarts=1, ended_ago=5)
    got, nodes = backend_for(run).status(run)
    assert got == State.PENDING and "awaiting requeue" in nodes[0].detail and not run.data.get("final")
    # still in it long after: SLURM did not requeue it (no requeues left, PreemptMode=CANCEL ...)
    fake_slurm.configure(state=slurm_state, exit="0:9", restarts=1, ended_ago=600)
    got, _ = backend_for(run).status(run)
    assert got == State.FAILED and run.data["final"]
    # no requeues left: final at once
    (tmp_path / "b").mkdir()
    run2 = _slurm_run(tmp_path / "b")
    run2.update(plan={**run2.data["plan"], "task": {"requeue": True, "max_requeues": 3}})
    fake_slurm.configure(state=slurm_state, exit="0:9", restarts=3, ended_ago=5)
    assert backend_for(run2).status(run2)[0] == State.FAILED


def test_stop_is_scancel_and_waits_for_slurm(tmp_path, fake_slurm):
    from cluster.backends import backend_for
    fake_slurm.configure(state="RUNNING")
    run = _slurm_run(tmp_path)
    assert backend_for(run).stop(run, grace_s=1) == []
    assert ["scancel", "77"] in fake_slurm.calls()
    assert run.state == State.CANCELLED


def test_first_failure_names_the_task_srun_reports(tmp_path, fake_slurm):
    from cluster.backends import backend_for
    fake_slurm.configure(state="FAILED", exit="1:0")
    run = _slurm_run(tmp_path)
    (run.dir / "slurm").mkdir()
    (run.dir / "slurm" / "77_batch.log").write_text(
        "srun: error: gpu02: task 3: Exited with exit code 7\nsrun: error: gpu01: tasks 0-1: Killed\n")
    (run.dir / "slurm" / "77_3_log.out").write_text("[gpu02 3] boom\n[gpu02 3] payload exited with code 7\n")
    state, _ = backend_for(run).status(run)
    f = run.data["failure"]
    assert state == State.FAILED and f["host"] == "gpu02" and f["rank"] == 3
    assert f["log_tail"][-1] == "[gpu02 3] payload exited with code 7"


def test_batch_log_lines_are_prefixed_and_resumable(tmp_path):
    from cluster.backends.slurm import PrefixedSource
    from cluster.run.logs import Merger
    path = tmp_path / "b.log"
    path.write_bytes(b"srun: one\nsrun: tw")
    src = PrefixedSource("slurm", path, b"[slurm agent] ")
    m = Merger([src])
    assert m.poll() == ["[slurm agent] srun: one"]
    with open(path, "ab") as f:
        f.write(b"o\nsrun: three\n")
    assert m.poll() == ["[slurm agent] srun: two", "[slurm agent] srun: three"]
    assert m.poll() == []
    # a new reader (another `logs` command) starts from the top and gets the same bytes
    again = PrefixedSource("slurm", path, b"[slurm agent] ")
    assert again.read(0) == src.read(0) and again.read(14) == src.read(0)[14:]


# ------------------------------------------------------------------------------------ the task
def test_task_checkpoint_requeues_itself_unless_finished_or_off(tmp_path, monkeypatch):
    import cloudpickle
    from cluster.node.slurm_task import SlurmTask
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    (tmp_path / "r").mkdir()
    task = SlurmTask({"argv": ["true"], "workdir": str(tmp_path), "run_dir": "r", "requeue": True})
    delayed = task.checkpoint()
    again = pickle.loads(cloudpickle.dumps(delayed))
    assert type(again.function).__name__ == "SlurmTask" and again.function.attempt == 1
    assert again.function.spec == task.spec
    assert json.loads((tmp_path / "r" / "events.jsonl").read_text())["event"] == "checkpoint"
    assert SlurmTask({**task.spec, "requeue": False}).checkpoint() is None


def test_task_of_a_finished_run_does_not_run_again(tmp_path, monkeypatch):
    from cluster.node.slurm_task import DONE, SlurmTask
    for k, v in {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "5"}.items():
        monkeypatch.setenv(k, v)
    marker = tmp_path / "ran"
    task = SlurmTask({"argv": [sys.executable, "-c", f"open({str(marker)!r}, 'w')"], "workdir": str(tmp_path),
                      "run_dir": "r", "requeue": True})
    assert task() == 0 and marker.exists()
    assert (tmp_path / "r" / "state" / DONE).exists()
    marker.unlink()
    assert task() == 0 and not marker.exists()   # e.g. `scontrol requeue` of a finished job
    assert task.checkpoint() is None


def test_task_sets_ranks_from_slurm(tmp_path, monkeypatch):
    from cluster.node.slurm_task import SlurmTask
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_NODEID": "1",
           "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "5"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "env.json"
    code = (f"import json, os; json.dump({{k: os.environ[k] for k in "
            f"('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'GROUP_RANK')}}, open({str(out)!r}, 'w'))")
    SlurmTask({"argv": [sys.executable, "-c", code], "workdir": str(tmp_path), "run_dir": "r"})()
    assert json.loads(out.read_text()) == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                                           "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}


def test_task_0_records_running_so_a_detached_run_advances_without_status(tmp_path, monkeypatch):
    """The record says RUNNING once task 0's payload started (no `status` call); task 1 leaves it;
    a run whose end is recorded keeps it."""
    from cluster.node.slurm_task import SlurmTask
    run = _slurm_run(tmp_path)
    run.update(state="PENDING")
    spec = {"argv": [sys.executable, "-c", "pass"], "workdir": str(tmp_path), "run_dir": "runs/r1"}
    for rank, want in (("1", "PENDING"), ("0", "RUNNING")):
        monkeypatch.setenv("SLURM_PROCID", rank)
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        SlurmTask(spec)()
        assert run.reload().state.value == want
    assert [(e["state"], e["by"], e["job_id"]) for e in run.events() if e["event"] == "state"][-1:] == \
        [("RUNNING", "task 0", "77")]
    run.set_state(State.SUCCEEDED, final=True)
    (run.dir / "state" / "slurm.done").unlink()
    SlurmTask(spec)()
    assert run.reload().state == State.SUCCEEDED


def test_prefixer_prefixes_every_line_and_keeps_the_exit_code(tmp_path):
    """In the task's own process (no interpreter of its own): its lines and its children's, stdout
    and stderr, a last line without a newline; the task's exit code. (The payload's own pipe:
    test_task_output_is_prefixed_and_a_last_partial_line_stays_its_own.)"""
    env = {**os.environ, "SLURMD_NODENAME": "gpu07", "SLURM_PROCID": "5"}
    child = "import sys; print('child'); print('child-err', file=sys.stderr)"
    code = ("import subprocess, sys; from cluster.node import slurm_task as t; t.prefix_output(b'[gpu07 5] '); "
            "print('out'); print('err', file=sys.stderr, flush=True); "
            f"subprocess.run([sys.executable, '-c', {child!r}]); sys.stdout.write('tail'); t._exit(3)")
    p = subprocess.run([sys.executable, "-u", "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and p.stderr == ""
    assert sorted(p.stdout.splitlines()) == ["[gpu07 5] child", "[gpu07 5] child-err", "[gpu07 5] err",
                                             "[gpu07 5] out", "[gpu07 5] tail"]


def test_heartbeats_of_an_earlier_start_are_not_a_hang(tmp_path, fake_slurm):
    """After a requeue the old heartbeats are minutes old: the run is starting again, not HUNG."""
    from cluster.backends import backend_for
    fake_slurm.configure(state="RUNNING", restarts=1)
    run = _slurm_run(tmp_path)
    run.update(created=time.time() - 3600)        # queued for an hour, then requeued
    (run.dir / "metrics").mkdir(exist_ok=True)
    for r in range(4):
        (run.dir / "metrics" / f"heartbeat-rank{r}.json").write_text(json.dumps(
            {"step": 100, "time": time.time() - 1800, "rank": r, "host": "gpu01", "done": False}))
    state, nodes = backend_for(run).status(run)
    assert state == State.RUNNING and all(not n.heartbeats for n in nodes)
    assert abs(run.data["started"] - time.time()) < 5


# ------------------------------------------------------------------- a requeue after a node failure
BATCH = """start of job 77 restart 0 on gpu[01-02], rendezvous gpu01:20077
srun: error: Node failure on gpu02
srun: error: Node failure on gpu01,gpu03
srun: Job step aborted: Waiting up to 32 seconds for job step to finish.
"""


def test_the_failed_node_is_read_from_the_start_before_the_requeue():
    from cluster.backends.slurm import failed_before
    lines = BATCH.splitlines()
    # only a name of that start's allocation counts (srun's 'gpu01,gpu03' is no node of it)
    assert failed_before(lines, 1) == (["gpu01", "gpu02"], ["gpu02"])
    again = lines + ["start of job 77 restart 1 on gpu[03-04], rendezvous gpu03:20077",
                     "srun: error: Node failure on gpu04", "srun: error: Node failure on gpu04"]
    assert failed_before(again, 1) == (["gpu01", "gpu02"], ["gpu02"])     # requeue 1: the first start's
    assert failed_before(again, 2) == (["gpu03", "gpu04"], ["gpu04"])
    assert failed_before(lines, 0) == ([], [])                               # never requeued
    assert failed_before(["start of job 77 restart 0 on gpu[01-, rendezvous x:1"], 1) == ([], [])


def test_exclusion_never_twice_and_never_below_the_nodes_the_job_needs():
    from cluster.backends.slurm import decide_exclusion
    part = ["gpu01", "gpu02", "gpu03", "gpu04"]
    [e] = decide_exclusion(["gpu02"], 1, set(), ["gpu04"], part, 2)
    assert e["excluded"] and e["text"] == "excluded gpu02 after its node failure (restart 1)"
    assert decide_exclusion(["gpu02"], 2, {"gpu02"}, ["gpu02"], part, 2) == []
    [e] = decide_exclusion(["gpu03"], 2, {"gpu02"}, ["gpu02", "gpu04"], part, 2)   # gpu01 alone would be left
    assert not e["excluded"] and e["text"] == ("did not exclude gpu03 after its node failure (restart 2): excluding "
                                               "it would leave 1 node(s) of the partition for a job of 2; it may "
                                               "land there again")


def _requeued(tmp_path, fake_slurm, batch=BATCH, **cfg):
    run = _slurm_run(tmp_path)
    run.update(job={"name": "tiny"}, plan={**run.data["plan"], "rdzv_endpoint": "first node of the allocation:20077"})
    (run.dir / "slurm").mkdir()
    (run.dir / "slurm" / "77_batch.log").write_text(batch)
    fake_slurm.configure(**{"state": "PENDING", "reason": "BeginTime", "restarts": 1, "nodes": "(null)",
                            "partition_nodes": ["gpu01", "gpu02", "gpu03", "gpu04"], **cfg})
    return run


def test_a_requeue_after_a_node_failure_excludes_the_node_once_and_status_says_so(tmp_path, fake_slurm):
    run = _requeued(tmp_path, fake_slurm, exclude="gpu04")     # the user's slurm.sbatch exclude: kept
    p = cli("status", "r1", runs=tmp_path / "runs", env=fake_slurm.env())
    assert p.returncode == 0, p.stderr
    assert "  excluded gpu02 after its node failure (restart 1)\n" in p.stdout
    updates = [c for c in fake_slurm.calls() if c[:2] == ["scontrol", "update"]]
    assert updates == [["scontrol", "update", "JobId=77", "ExcNodeList=gpu02,gpu04"]]
    st = json.loads(cli("status", "r1", "--json", runs=tmp_path / "runs", env=fake_slurm.env()).stdout)
    assert [(e["node"], e["restart"], e["excluded"]) for e in st["excluded_nodes"]] == [("gpu02", 1, True)]
    assert len([c for c in fake_slurm.calls() if c[:2] == ["scontrol", "update"]]) == 1   # looked at once
    events = [json.loads(l) for l in (run.dir / "events.jsonl").read_text().splitlines()]
    assert [e["node"] for e in events if e["event"] == "exclude-node"] == ["gpu02"]

    # it fails again on gpu02 (the job excludes it already: a stand-in for a node SLURM put back)
    # and on gpu03: gpu03 is excluded, gpu02 is not excluded a second time
    (run.dir / "slurm" / "77_batch.log").write_text(BATCH + "start of job 77 restart 1 on gpu[02-03], rendezvous x:1\n"
                                                   "srun: error: Node failure on gpu02\n"
                                                   "srun: error: Node failure on gpu03\n")
    fake_slurm.configure(state="PENDING", restarts=2, nodes="(null)", exclude="gpu[02,04]",
                         partition_nodes=["gpu01", "gpu02", "gpu03", "gpu04", "gpu05"])
    p = cli("status", "r1", runs=tmp_path / "runs", env=fake_slurm.env())
    assert "excluded gpu03 after its node failure (restart 2)" in p.stdout
    assert "gpu02 after its node failure (restart 2)" not in p.stdout
    assert [c for c in fake_slurm.calls() if c[:2] == ["scontrol", "update"]][-1][-1] == "ExcNodeList=gpu02,gpu03,gpu04"


def test_no_exclusion_that_leaves_too_few_nodes_nor_after_the_next_start(tmp_path, fake_slurm):
    _requeued(tmp_path, fake_slurm, partition_nodes=["gpu01", "gpu02"])
    p = cli("status", "r1", runs=tmp_path / "runs", env=fake_slurm.env())
    assert ("did not exclude gpu02 after its node failure (restart 1): excluding it would leave 1 node(s) of the "
            "partition for a job of 2") in p.stdout
    assert not [c for c in fake_slurm.calls() if c[:2] == ["scontrol", "update"]]

    (tmp_path / "b").mkdir()
    _requeued(tmp_path / "b", fake_slurm, state="RUNNING", nodes="gpu[01-02]")    # nobody looked while it waited
    p = cli("status", "r1", runs=tmp_path / "b" / "runs", env=fake_slurm.env())
    assert "did not exclude gpu02 after its node failure (restart 1): the job was RUNNING already" in p.stdout

    (tmp_path / "c").mkdir()
    _requeued(tmp_path / "c", fake_slurm, update_rc=1)     # SLURM refuses: said, not claimed
    p = cli("status", "r1", runs=tmp_path / "c" / "runs", env=fake_slurm.env())
    assert ("did not exclude gpu02 after its node failure (restart 1): scontrol update: scontrol: error: Job is no "
            "longer pending execution") in p.stdout


def test_a_failed_batch_host_is_found_by_its_state_and_names_are_slurms_own(tmp_path, fake_slurm):
    """No srun line (the batch host itself died): the allocation's node that SLURM reports not
    responding; a name from the log that the partition does not list never reaches scontrol."""
    run = _requeued(tmp_path, fake_slurm, batch="start of job 77 restart 0 on gpu[01-02], rendezvous gpu01:1\n",
                    node_states={"gpu01": "down*", "gpu02": "idle"})
    p = cli("status", "r1", runs=tmp_path / "runs", env=fake_slurm.env())
    assert "excluded gpu01 after its node failure (restart 1)" in p.stdout, p.stdout + p.stderr
    (tmp_path / "b").mkdir()
    _requeued(tmp_path / "b", fake_slurm, batch="start of job 77 restart 0 on x[1-2], rendezvous x1:1\n"
                                              "srun: error: Node failure on x2\n")
    before = len(fake_slurm.calls())
    p = cli("status", "r1", runs=tmp_path / "b" / "runs", env=fake_slurm.env())
    assert "exclude" not in p.stdout
    assert not [c for c in fake_slurm.calls()[before:] if c[:2] == ["scontrol", "update"]]
    assert json.loads((tmp_path / "b" / "runs" / "r1" / "run.json").read_text())["slurm_requeues_seen"] == 1
    # what the job excludes already is read back from SLURM; a name scontrol would read otherwise in
    # a comma-separated list is not written back: nothing is excluded, and status says why
    (tmp_path / "c").mkdir()
    _requeued(tmp_path / "c", fake_slurm, exclude="gpu04=x")
    before = len(fake_slurm.calls())
    p = cli("status", "r1", runs=tmp_path / "c" / "runs", env=fake_slurm.env())
    assert "did not exclude gpu02 after its node failure (restart 1): the job's ExcNodeList 'gpu04=x' could not" \
           in p.stdout
    assert not [c for c in fake_slurm.calls()[before:] if c[:2] == ["scontrol", "update"]]


def test_the_follower_polls_status_until_the_run_ends(tmp_path, fake_slurm, monkeypatch):
    """What runs with no terminal open: the exclusion happens in its first poll; it ends with the job."""
    import cluster.run.records
    from cluster.backends.slurm_follower import follow
    _requeued(tmp_path, fake_slurm)
    monkeypatch.setattr(cluster.run.records, "RUNS_DIR", tmp_path / "runs")
    config = json.loads((fake_slurm.dir / "config.json").read_text())
    polls, real_sleep = [], time.sleep

    def sleep(s):       # each poll: the job moves on (requeued and waiting, then done)
        if s != 7:
            return real_sleep(s)        # another wait (the run's lock)
        polls.append(s)
        if len(polls) == 2:
            fake_slurm.configure(**{**json.loads((fake_slurm.dir / "config.json").read_text()), "state": "COMPLETED",
                                    "nodes": "gpu[01,03]"})
    monkeypatch.setattr("cluster.backends.slurm.time.sleep", sleep)
    assert follow("r1", poll_s=7, watch_s=7) == 0 and polls == [7, 7]
    assert ["scontrol", "update", "JobId=77", "ExcNodeList=gpu02"] in fake_slurm.calls()
    assert config["state"] == "PENDING"
    assert json.loads((tmp_path / "runs" / "r1" / "run.json").read_text())["state"] == "SUCCEEDED"


def test_the_follower_asks_slurm_at_once_when_the_batch_log_reports_a_node_failure(tmp_path, fake_slurm, monkeypatch):
    """Between its polls (every 20 s) the follower only reads the batch log: srun's node failure line
    there makes it ask SLURM at the next look (1 s), so the requeued job is excluded from the failed
    node at once, not up to a poll later; then it is back to its slow poll."""
    import cluster.run.records
    from cluster.backends.slurm_follower import follow
    run = _requeued(tmp_path, fake_slurm, batch="start of job 77 restart 0 on gpu[01-02], rendezvous gpu01:1\n",
                    state="RUNNING", restarts=0, nodes="gpu[01-02]")
    monkeypatch.setattr(cluster.run.records, "RUNS_DIR", tmp_path / "runs")
    log = run.dir / "slurm" / "77_batch.log"
    looks, polled, real_sleep, real_info = [], [], time.sleep, cluster.backends.slurm.job_info

    def sleep(s):
        if s != 1:
            return real_sleep(s)        # another wait (the run's lock)
        looks.append(s)
        if len(looks) == 45:            # between two polls: the node fails, SLURM requeues the job
            with open(log, "a") as f:
                f.write("srun: error: Node failure on gpu02\n")
            fake_slurm.configure(**{**json.loads((fake_slurm.dir / "config.json").read_text()), "state": "PENDING",
                                    "restarts": 1, "nodes": "(null)"})
        if len(looks) == 100:
            fake_slurm.configure(**{**json.loads((fake_slurm.dir / "config.json").read_text()), "state": "COMPLETED",
                                    "nodes": "gpu[01,03]"})

    def job_info(jid):
        polled.append(len(looks))
        return real_info(jid)
    monkeypatch.setattr("cluster.backends.slurm.time.sleep", sleep)
    monkeypatch.setattr("cluster.backends.slurm.job_info", job_info)
    assert follow("r1", poll_s=20, watch_s=1) == 0
    assert ["scontrol", "update", "JobId=77", "ExcNodeList=gpu02"] in fake_slurm.calls()
    events = [json.loads(l) for l in (run.dir / "events.jsonl").read_text().splitlines()]
    assert [e["node"] for e in events if e["event"] == "exclude-node"] == ["gpu02"]
    # the polls: at 20 and 40 s, at once after the line (45 s), then every 20 s again (60, 80, 100)
    assert sorted(set(polled)) == [20, 40, 45, 60, 80, 100]


def test_a_delayed_detached_process_starts_later_under_the_same_pid(tmp_path):
    """start_detached(delay_s): the follower's python (its imports) comes that much later, after a
    shell's sleep, and is the process whose pid was returned (run.json's follower_pid)."""
    from cluster.backends.base import start_detached
    run = _slurm_run(tmp_path)
    t0 = time.time()
    pid = start_detached(run, "cluster.backends.slurm_follower", "no-such-verb", "later.log", delay_s=1.5)
    time.sleep(0.5)
    assert os.waitpid(pid, os.WNOHANG) == (0, 0) and (run.dir / "state" / "later.log").read_text() == ""
    _, status = os.waitpid(pid, 0)
    assert time.time() - t0 >= 1.5 and os.waitstatus_to_exitcode(status) == 2
    assert "usage: python -m cluster.backends.slurm_follower follow RUN_ID" in (run.dir / "state" / "later.log").read_text()

# ------------------------------------------------------------------- through the login node
LOGIN_BAD = [
    ("  login: login02\n  remote_dir: /shared/ddp\n", "slurm.login: 'login02' is not one of hosts:",
     "did you mean 'login01'?"),
    ("  login: login01\n", "slurm.login: needs slurm.remote_dir", "remote_dir"),
    ("  remote_dir: /shared/ddp\n", "slurm.remote_dir: is set but slurm.login is not", "login"),
    ("  login: login01\n  remote_dir: -rf\n", "'-rf' is not a usable directory", "absolute path"),
    ("  login: login01\n  remote_dir: ~bob/ddp\n", "is not a usable directory", None),
    ("  login: {hostname: -oProxyCommand=touch}\n  remote_dir: /d\n", "is not a valid hostname", None),
    ("  login: {hostname: login.x, port: 70000}\n  remote_dir: /d\n", "slurm.login.port: port 70000 is out of range", None),
    ("  login: {hostname: login.x, jump_host: '-J x'}\n  remote_dir: /d\n", "is not a valid jump_host", None),
    ("  login: {hostname: login.x, colour: red}\n  remote_dir: /d\n", "colour", None),
]


@pytest.mark.parametrize("extra,message,hint", LOGIN_BAD, ids=[b[1][:30] for b in LOGIN_BAD])
def test_login_settings_are_checked_before_anything_runs(tmp_path, fake_slurm, extra, message, hint):
    inv = write_inv(tmp_path, CLUSTER_INV.split("  sbatch:")[0] + extra)
    p = cli("submit", "resnet50", "-i", inv, runs=tmp_path / "runs", env=fake_slurm.env())
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr and p.stderr.startswith(f"error: {inv}:")
    assert hint is None or hint in p.stderr
    assert fake_slurm.calls() == [] and not (tmp_path / "runs").exists()


def test_login_is_a_host_of_the_inventory_or_an_entry_with_the_defaults(tmp_path):
    from cluster.backends import get
    from cluster.backends.login import LoginBackend, _remote_inventory
    base = CLUSTER_INV.split("  sbatch:")[0].replace("hosts:\n", "defaults:\n  user: me\n  port: 2200\nhosts:\n")
    inv = load_inventory(write_inv(tmp_path, base + "  login: login01\n  remote_dir: ~/ddp\n"))
    assert inv.login == inv.hosts[0] and inv.login.user == "me"
    inv = load_inventory(write_inv(tmp_path, base + "  login: {hostname: login.x, identity_file: ~/.ssh/k, "
                                               "jump_host: me@bastion}\n  remote_dir: /shared/ddp\n"))
    assert (inv.login.name, inv.login.hostname, inv.login.user, inv.login.port, inv.login.jump_host) == \
        ("login.x", "login.x", "me", 2200, "me@bastion")
    assert isinstance(get("slurm", inv), LoginBackend)
    # the login node's own inventory: this one, SLURM there (no login, no remote_dir)
    import yaml
    there = yaml.safe_load(_remote_inventory(inv))
    assert there["backend"] == "slurm" and "login" not in there["slurm"] and "remote_dir" not in there["slurm"]
    assert there["slurm"]["partition"] == "gpu" and there["hosts"] == [{"name": "login01"}]


def test_task_output_is_prefixed_and_a_last_partial_line_stays_its_own(tmp_path):
    """The whole task as srun starts it, minus submitit: SlurmTask with the prefixer on."""
    env = {**os.environ, "SLURMD_NODENAME": "gpu07", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "5"}
    payload = [sys.executable, "-c", "import sys; print('hello'); sys.stderr.write('partial'); sys.exit(4)"]
    code = ("from cluster.node import slurm_task as t; t.prefix_output(b'[gpu07 0] '); "
            f"t.SlurmTask({{'argv': {payload!r}, 'workdir': {str(tmp_path)!r}, 'run_dir': 'r'}})()")
    p = subprocess.run([sys.executable, "-u", "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    lines = p.stdout.splitlines()
    assert p.returncode == 4 and p.stderr == "", p.stderr
    assert all(l.startswith("[gpu07 0] ") for l in lines), lines
    assert "[gpu07 0] hello" in lines and "[gpu07 0] partial" in lines
    assert lines[-1] == "[gpu07 0] payload exited with code 4"


def test_status_names_each_nodes_first_task_pid_of_this_start(tmp_path, fake_slurm):
    from cluster.backends import backend_for
    fake_slurm.configure(state="RUNNING")
    run = _slurm_run(tmp_path)
    now = time.time()
    for rank, host, pid, t in [(1, "gpu01", 102, now), (0, "gpu01", 101, now), (3, "gpu02", 204, now),
                               (2, "gpu02", 999, now - 3600)]:       # rank 2's record: of an earlier start
        (run.dir / "state" / f"task{rank}.json").write_text(json.dumps(
            {"rank": rank, "host": host, "pid": pid, "started": t}))
    _, nodes = backend_for(run).status(run)
    assert {n.host: n.pid for n in nodes} == {"gpu01": 101, "gpu02": 204}


TASK_ENV = {"SLURMD_NODENAME": "gpu07", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "5",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SUBMITIT_EXECUTOR": "slurm"}


def test_task_starts_the_payload_from_its_spec_without_submitits_pickle(tmp_path):
    """The task as srun starts it (python -m cluster.node.slurm_task FOLDER): the payload starts from
    task.spec alone; submitit's pickle is not read (nor submitit imported) unless a requeue signal
    comes, so the folder here has none. Once finished, a requeued job's task starts nothing."""
    from cluster.node.slurm_task import write_spec
    marker, folder = tmp_path / "starts", tmp_path / "slurm"
    probe = f"open({str(marker)!r}, 'a').write('x'); print('ran')"
    folder.mkdir()
    write_spec(folder, {"argv": [sys.executable, "-c", probe], "workdir": str(tmp_path), "run_dir": "r", "requeue": True})

    def task():
        return subprocess.run([sys.executable, "-S", "-u", "-m", "cluster.node.slurm_task", str(folder)], cwd=REPO,
                              env={**os.environ, **TASK_ENV}, capture_output=True, text=True, timeout=60)
    p = task()
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines and all(l.startswith("[gpu07 0] ") for l in lines), lines
    assert marker.read_text() == "x" and p.stdout.count("[gpu07 0] ran") == 1
    assert p.stdout.count("] task 0/1 on gpu07") == 1 and lines[-1] == "[gpu07 0] payload finished (exit code 0)"
    assert json.loads((tmp_path / "r" / "state" / "task0.json").read_text())["host"] == "gpu07"
    p = task()
    assert p.returncode == 0 and marker.read_text() == "x" and p.stdout.count("not running it again") == 1, p.stdout


def test_task_starts_its_payload_before_site_and_the_records(tmp_path):
    """The task's way to its payload (every task takes it at once, on cores the payloads share):
    srun starts its interpreter without site (the golden script has its -S), and when the payload
    starts nothing beyond what starting it needs is loaded: not site-packages, not the agent, not
    the records (written after), not json, pathlib, subprocess, threading or signal's enums
    (about 25 ms of CPU per task together). A task other than 0 loads none of those at all."""
    from cluster.node.slurm_task import write_spec
    folder = tmp_path / "slurm"
    folder.mkdir()
    write_spec(folder, {"argv": [sys.executable, "-c", "print('ran')"], "workdir": str(tmp_path), "run_dir": "r"})
    # srun's command as the plan writes it; the payload's start notes what its task had loaded
    # then (the fork is in the task; only its child, the payload's side, prints), and the task's end
    probe = ("import os, runpy, sys\n"
             "fork = os.fork\n"
             "def noted():\n"
             "    loaded = ' '.join(sorted(sys.modules))\n"
             "    pid = fork()\n"
             "    if pid == 0:\n"
             "        print('loaded:', loaded, flush=True)\n"
             "    return pid\n"
             "os.fork = noted\n"
             "exit = os._exit\n"
             "def at_end(code):\n"       # fds 1 and 2 are /dev/null by then: srun's file is the task's _out
             "    out = sys.modules['cluster.node.slurm_task']._out\n"
             "    os.write(out, ('at the end: ' + ' '.join(sorted(sys.modules)) + '\\n').encode())\n"
             "    exit(code)\n"
             "os._exit = at_end\n"
             f"sys.argv = ['slurm_task', {str(folder)!r}]\n"
             "runpy.run_module('cluster.node.slurm_task', run_name='__main__', alter_sys=True)\n")
    heavy = ("site", "socket", "cluster.node.agent", "cluster.node.record", "json", "pathlib", "subprocess",
             "threading", "signal", "enum", "re")
    for rank in ("1", "0"):     # task 0 writes the done marker, after which no task starts a payload
        p = subprocess.run([sys.executable, "-S", "-u", "-c", probe], cwd=REPO,
                           env={**os.environ, **TASK_ENV, "SLURM_PROCID": rank}, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and f"[gpu07 {rank}] ran" in p.stdout, p.stdout + p.stderr
        loaded = next(l for l in p.stdout.splitlines() if "] loaded: " in l).split("] loaded: ")[1].split()
        assert not [m for m in loaded if m in heavy or m.startswith("submitit")], loaded
        at_end = next(l for l in p.stdout.splitlines() if "at the end: " in l).split("at the end: ")[1].split()
        if rank == "1":
            assert not [m for m in at_end if m in heavy or m.startswith("submitit")], at_end
        task = json.loads((tmp_path / "r" / "state" / f"task{rank}.json").read_text())
        assert task["pid"] > 0 and task["host"] == "gpu07" and task["job_id"] == "5"



def test_task_records_written_without_json_read_back_as_json(tmp_path):
    """The task writes its records without the json module (slurm_task._json): what json reads back
    is what was written, quotes, backslashes, control and non-ASCII characters included."""
    from cluster.node.slurm_task import _write_json
    rec = {"rank": 3, "host": 'gpu"07\\x\n\tnödé😀', "pid": 12, "job_id": None, "started": 1733500000.123456,
           "final": True}
    _write_json(str(tmp_path / "task3.json"), rec)
    assert json.loads((tmp_path / "task3.json").read_text(encoding="utf-8")) == rec

def test_a_data_source_on_a_host_is_refused_on_slurm(tmp_path):
    """SLURM's first step stages from a path every node reads; HOST:PATH is the ssh backend's."""
    from cluster.submit import resolve
    job = tmp_path / "d.yaml"
    job.write_text("name: d\nmodule: tests.fixtures.hello\ndata:\n  source: login01:/datasets/x\n  path: /tmp/x\n")
    with pytest.raises(UserError, match="is on a host: SLURM stages from a path every node reads") as e:
        resolve(str(job), [], write_inv(tmp_path), None, run_id="r")[3].render()
    assert e.value.key == "data.source"


def _task_until_signal(tmp_path, timeout_min, max_requeues, after_s=0.0):
    """A task as srun starts it, with submitit's real pickle (as its executor writes it), a payload
    that runs until stopped; USR2 once the payload is up (and ``after_s`` more). Returns the
    finished process, its output, the folder."""
    from submitit.core.job_environment import JobPaths
    from submitit.core.utils import DelayedSubmission
    from cluster.node.slurm_task import SlurmTask, write_spec
    folder = tmp_path / "slurm"
    folder.mkdir()
    payload = [sys.executable, "-c", "import os, time; print('up', os.getpid(), flush=True); time.sleep(60)"]
    spec = {"argv": payload, "workdir": str(tmp_path), "run_dir": "r", "requeue": True}
    write_spec(folder, spec)
    delayed = DelayedSubmission(SlurmTask(spec))
    delayed.set_timeout(timeout_min, max_requeues)
    delayed.dump(JobPaths(folder, job_id="5", task_id=0).submitted_pickle)
    p = subprocess.Popen([sys.executable, "-S", "-u", "-m", "cluster.node.slurm_task", str(folder)], cwd=REPO,
                         env={**os.environ, **TASK_ENV}, stdout=subprocess.PIPE, text=True)
    first = []
    for line in p.stdout:
        first.append(line)
        if "] up " in line:
            break
    time.sleep(after_s)
    p.send_signal(signal.SIGUSR2)
    out = "".join(first) + p.stdout.read()
    p.wait(timeout=60)
    payload_pid = int(next(l for l in first if "] up " in l).split()[-1])
    return p, out, folder, payload_pid


def test_requeue_signal_hands_over_to_submitit_which_checkpoints_and_requeues(tmp_path, fake_slurm):
    """USR2 (a preemption: far from the time limit): submitit, imported only now, calls the task's
    checkpoint(), pickles the next attempt and runs scontrol requeue; the payload does not outlive
    the task."""
    from submitit.core.utils import DelayedSubmission, JobPaths
    p, out, folder, payload_pid = _task_until_signal(tmp_path, timeout_min=60, max_requeues=3)
    assert p.returncode != 0, out
    assert "[gpu07 0] submitit WARNING" in out and "this job is preempted" in out, out
    assert "[gpu07 0] checkpoint: a requeued job runs this task again (attempt 1)" in out
    assert "submitit INFO" not in out               # submitit's own chatter is not the job's log
    assert ["scontrol", "requeue", "5"] in fake_slurm.calls()
    again = DelayedSubmission.load(JobPaths(folder, job_id="5", task_id=0).submitted_pickle)
    assert again.function.attempt == 1 and again._timeout_countdown == 3     # a preemption is not a time-out
    assert not Path(f"/proc/{payload_pid}").exists()


def test_time_out_is_counted_from_the_tasks_start(tmp_path, fake_slurm):
    """submitit calls a signal a time-out once the job ran past its guaranteed time (here: a
    10 min 1 s limit guarantees 1 s) since the task started, not since the signal: with no
    time-outs left it does not requeue, and the task says why and stops the payload."""
    p, out, folder, payload_pid = _task_until_signal(tmp_path, timeout_min=601 / 60, max_requeues=0, after_s=1.5)
    assert p.returncode == 1, out
    assert "this job is timed-out" in out
    assert "[gpu07 0] Job not requeued because: timed-out too many times. Stopping." in out
    assert not any(c[:2] == ["scontrol", "requeue"] for c in fake_slurm.calls())
    assert not Path(f"/proc/{payload_pid}").exists()


# ------------------------------------------------------------------- a silent node (restart.silent_s)
def test_a_node_is_silent_only_while_another_beats_and_once_it_has_beaten():
    """The follower's decision: by when each node's beat last changed (its own clock)."""
    from cluster.backends.slurm_follower import silent_hosts
    nodes = ["gpu01", "gpu02", "gpu03"]
    now = 1000.0
    # gpu02 quiet for 21 s while gpu01 beat 1 s ago: silent; gpu03 never beat in this start: not judged
    assert silent_hosts({"gpu01": now - 1, "gpu02": now - 21}, nodes, now, 20) == {"gpu02": 21}
    # every node that beat is quiet: the filesystem's or the follower's stall, not one node's
    assert silent_hosts({"gpu01": now - 25, "gpu02": now - 21}, nodes, now, 20) == {}
    # ... and as they go quiet one after the other, the last one's beat is not "recent" either
    assert silent_hosts({"gpu01": now - 18, "gpu02": now - 20}, nodes, now, 20) == {}
    assert silent_hosts({"gpu01": now - 1, "gpu02": now - 19}, nodes, now, 20) == {}    # not yet
    assert silent_hosts({"gpu01": now - 1, "gpu02": now - 21}, nodes, now, 0) == {}     # off
    assert silent_hosts({"gpu01": now - 1, "gpu09": now - 60}, nodes, now, 20) == {}    # not the job's node
    assert silent_hosts({"gpu02": now - 60}, nodes, now, 20) == {}                      # a one-node view


def test_beats_are_read_for_the_current_start_and_an_ended_task_is_not_silent(tmp_path):
    from cluster.backends.slurm_follower import BeatWatch, read_beats
    (tmp_path / "alive-77-gpu01").write_text("77 1 1733500000.000 5\n")
    (tmp_path / "alive-77-gpu02").write_text("77 0 1733400000.000 9\n")       # the start before the requeue
    (tmp_path / "alive-76-gpu03").write_text("76 1 1733500000.000 5\n")       # another job's
    (tmp_path / "alive-77-gpu$(x)").write_text("77 1 1 1\n")                  # no name SLURM gives
    (tmp_path / ".alive-77-gpu01.tmp9").write_text("77 1 1")                   # half written
    assert read_beats(tmp_path, "77", 1) == {"gpu01": "77 1 1733500000.000 5\n"}
    w = BeatWatch()
    w.look({"gpu01": "77 1 1 5\n", "gpu02": "77 1 1 3\n"}, 10.0)
    w.look({"gpu01": "77 1 1 6\n", "gpu02": "77 1 1 3\n"}, 13.0)
    assert w.changed() == {"gpu01": 13.0, "gpu02": 10.0}        # the follower's clock: when it saw a change
    w.look({"gpu01": "77 1 1 7 ended\n"}, 14.0)
    assert w.changed() == {"gpu02": 10.0}


def test_the_task_beats_for_its_node_and_says_when_it_ended(tmp_path, monkeypatch):
    from cluster.node import slurm_task
    monkeypatch.setattr(slurm_task, "ALIVE_S", 0.05)
    path = tmp_path / "alive-5-gpu07"
    count = lambda: int(path.read_text().split()[3]) if path.exists() else 0
    try:
        slurm_task._start_beat(str(tmp_path), "gpu07", "5", 1)
        deadline = time.time() + 10
        while count() < 3 and time.time() < deadline:
            time.sleep(0.02)
        job, restart, started, n = path.read_text().split()
        assert (job, restart) == ("5", "1") and int(n) >= 3 and abs(float(started) - time.time()) < 10
    finally:
        slurm_task._write_beat(ended=True)
    text = path.read_text()
    assert text.split()[-1] == "ended"
    time.sleep(0.2)
    assert path.read_text() == text and not slurm_task._write_beat()       # no beat after the last
    assert sorted(f.name for f in tmp_path.iterdir()) == ["alive-5-gpu07"]
    slurm_task._beat.clear()


def _running_job(tmp_path, fake_slurm, monkeypatch, *overrides):
    """A run submitted through the fake SLURM (job 4242 on gpu[01-02]), RUNNING."""
    import cluster.run.records
    import cluster.submit
    runs = tmp_path / "runs"
    monkeypatch.setattr(cluster.run.records, "RUNS_DIR", runs)
    monkeypatch.setattr(cluster.submit, "new_run_id", lambda job: "r1")
    run = cluster.submit.submit("resnet50", list(overrides), inventory=write_inv(tmp_path))
    run.set_state(State.RUNNING)
    fake_slurm.configure(state="RUNNING", nodes="gpu[01-02]", next_job=4243,
                         partition_nodes=["gpu01", "gpu02", "gpu03"])
    from cluster.backends.slurm import SlurmBackend, job_info
    return run, SlurmBackend(load_inventory(write_inv(tmp_path))), job_info("4242")


def test_a_silent_node_replaces_the_job_with_one_without_it(tmp_path, fake_slurm, monkeypatch):
    """The job is cancelled, a new one submitted for the same run through launch (the plan's script,
    the node excluded); status, logs and the record then follow the new job and keep the old one's."""
    from cluster.backends.slurm_follower import replace_job
    run, be, info = _running_job(tmp_path, fake_slurm, monkeypatch)
    first = (fake_slurm.dir / "submitted.sh").read_text()
    (run.dir / "slurm" / "4242_0_log.out").write_text("[gpu01 0] step 100\n")
    assert replace_job(be, run, "4242", info, {"gpu02": 21.4})
    calls = fake_slurm.calls()
    assert ["scancel", "--signal=KILL", "--full", "4242"] in calls
    submitted = (fake_slurm.dir / "submitted.sh").read_text()
    # the plan's script, with the silent node added to the user's exclude (none here)
    assert submitted == first.replace("#SBATCH --exclusive\n", "#SBATCH --exclude=gpu02\n#SBATCH --exclusive\n")
    d = json.loads((run.dir / "run.json").read_text())
    assert d["handle"]["job_id"] == "4243" and d["handle"]["job_ids"] == ["4242", "4243"]
    assert d["handle"]["follower_pid"] == os.getpid()              # the follower goes on, no second one
    assert d["state"] == "PENDING" and d["attempt"] == 2
    assert d["plan"]["sbatch"]["additional_parameters"]["exclude"] == "gpu02"
    [a] = d["attempts"]
    assert a["cause"] == ("node gpu02 silent for 21 s: no beat from its tasks; SLURM had not noticed "
                          "(job 4242 still RUNNING)") and a["restart"] and a["hosts"] == ["gpu01", "gpu02"]
    assert [(e["node"], e["excluded"], e["text"]) for e in d["excluded_nodes"]] == [
        ("gpu02", True, "excluded gpu02 after it fell silent (job 4242, attempt 1)")]
    events = [json.loads(l)["event"] for l in (run.dir / "events.jsonl").read_text().splitlines()]
    assert events[-5:] == ["recovery", "state", "exclude-node", "attempt", "state"]
    # logs: the old job's files, then the new one's, each under a name of its own
    from cluster.backends.slurm import job_logs
    names = [n for n, _, _ in job_logs(d["handle"])]
    assert names[:17] == [f"rank{t}" for t in range(16)] + ["slurm"]
    assert names[17:] == [f"rank{t}@4243" for t in range(16)] + ["slurm@4243"]
    (run.dir / "slurm" / "4243_0_log.out").write_text("[gpu03 0] resumed from ckpt_100.pt\n")
    p = cli("logs", "r1", runs=tmp_path / "runs", env=fake_slurm.env())
    assert p.stdout.splitlines()[:2] == ["[gpu01 0] step 100", "[gpu03 0] resumed from ckpt_100.pt"]
    p = cli("status", "r1", runs=tmp_path / "runs", env=fake_slurm.env())
    assert "attempt 1: node gpu02 silent for 21 s" in p.stdout and "job 4243" in p.stdout
    assert "  excluded gpu02 after it fell silent (job 4242, attempt 1)\n" in p.stdout


def test_a_silent_node_past_the_limit_or_a_failed_submit_ends_the_run_failed(tmp_path, fake_slurm, monkeypatch):
    from cluster.backends.slurm_follower import replace_job
    run, be, info = _running_job(tmp_path, fake_slurm, monkeypatch, "restart.max_requeues=0")
    assert replace_job(be, run, "4242", info, {"gpu02": 20.0})
    d = json.loads((run.dir / "run.json").read_text())
    assert d["state"] == "FAILED" and d["final"] and d["handle"]["job_id"] == "4242"
    assert d["failure"]["recovery"]["reason"] == "restart.max_requeues (0) reached: no new job"
    assert ["scancel", "--signal=KILL", "--full", "4242"] in fake_slurm.calls()
    assert len([c for c in fake_slurm.calls() if c[0] == "sbatch"]) == 2       # --test-only, the first job

    (tmp_path / "b").mkdir()
    run, be, info = _running_job(tmp_path / "b", fake_slurm, monkeypatch)
    fake_slurm.configure(**{**json.loads((fake_slurm.dir / "config.json").read_text()), "sbatch_rc": 1})
    assert replace_job(be, run, "4242", info, {"gpu02": 20.0})
    d = json.loads((run.dir / "run.json").read_text())
    assert d["state"] == "FAILED" and "the new job for attempt 2 could not be submitted: sbatch failed" in \
        d["failure"]["error"] and "Invalid account" in d["failure"]["error"]


def test_no_replacement_while_the_run_is_stopped_or_slurm_handles_the_job(tmp_path, fake_slurm, monkeypatch):
    from cluster.backends.slurm_follower import _replace_silent, replace_job
    run, be, info = _running_job(tmp_path, fake_slurm, monkeypatch)
    fake_slurm.configure(**{**json.loads((fake_slurm.dir / "config.json").read_text()), "state": "COMPLETING"})
    assert not _replace_silent("r1", "4242", 0, {"gpu02": 20.0})    # SLURM's own path
    fake_slurm.configure(**{**json.loads((fake_slurm.dir / "config.json").read_text()), "state": "RUNNING",
                            "restarts": 1})
    assert not _replace_silent("r1", "4242", 0, {"gpu02": 20.0})    # requeued since
    run.update(stop_requested=time.time())
    assert not replace_job(be, run, "4242", info, {"gpu02": 20.0})
    assert not [c for c in fake_slurm.calls() if c[0] == "scancel"]
    assert json.loads((run.dir / "run.json").read_text())["handle"]["job_id"] == "4242"
