"""Containers (cluster/container.py): golden command lines per runtime, hostile strings, and the
shell line run through a real bash + the real node agent with a stand-in runtime that dumps argv.

Real podman runs are in test_container_podman.py (local) and test_container_testbed.py (ssh).
"""
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from cluster import container
from cluster.node import containers as node_containers
from cluster.spec.config import REPO, ContainerSpec, load_inventory, load_job
from cluster.errors import UserError
from cluster.plan import make_plan

from .test_plan import check_golden

RACK = """
defaults:
  user: ml
  gpus: 8
  interface: ens1f0
  workdir: {workdir}
  python: /opt/venv/bin/python
  container_runtime: {runtime}
hosts:
  - name: gpu[01-02]
"""
# what STYLE.md item 8 asks for: quotes, command substitution, spaces, newlines
PWNED = "/tmp/pwned-by-container-test"
HOSTILE_JOB = {
    "name": "hostile",
    "module": "mypkg.train",
    "args": ["--data", "/data/x y"],
    "env": {"JOB_Q": f"a'; touch {PWNED}"},
    "container": {
        "image": "nvcr.io/nvidia/pytorch:24.05-py3",
        "mounts": [f"/data/a'; touch {PWNED}:/data/x y:ro", "/srv/$(id):/mnt/$(id)", '/scratch/`id` "q":/scratch'],
        "env": {"SUB": "$(id) `id` ${HOME}", "NL": "line1\nline2", "SP": "  spaced  ", "QQ": 'a"=0"'},
        "args": ["--security-opt", "label=disable"],
        "shm_gb": 32,
    },
}


def job_file(tmp_path, data=HOSTILE_JOB, **container_over):
    data = json.loads(json.dumps(data))
    data["container"].update(container_over)
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def rack(tmp_path, runtime, workdir="/srv/ddp runs"):
    path = tmp_path / "rack.yaml"
    path.write_text(RACK.format(runtime=runtime, workdir=json.dumps(workdir)))
    return load_inventory(path)


def rack_plan(tmp_path, runtime, workdir="/srv/ddp runs", gpus=8, **container_over):
    inv = rack(tmp_path, runtime, workdir)
    job = load_job(job_file(tmp_path, **container_over)).job
    return make_plan(inv, job, "hostile-golden", {h.name: gpus for h in inv.hosts}, port=29999)


# ---------------------------------------------------------------- golden command lines
@pytest.mark.parametrize("runtime,workdir", [
    ("docker", "/srv/ddp runs"),
    ("podman", "/srv/ddp runs"),
    ("podman", "~/ddp runs"),          # the ssh default: mounted through $PWD on the host
    ("apptainer", "/srv/ddp runs"),
])
def test_golden_ssh_plan_per_runtime(tmp_path, runtime, workdir):
    extra = {"args": ["--writable-tmpfs"]} if runtime == "apptainer" else {}
    plan = rack_plan(tmp_path, runtime, workdir, **extra)
    tag = "tilde" if workdir.startswith("~") else "abs"
    check_golden(f"container_{runtime}_{tag}.txt", plan.render())
    for node in plan.nodes:
        # the shell line splits back into exactly the argv we meant (one quoting hop)
        words = shlex.split(node.shell())
        start = words.index("setsid") + 1
        assert words[start:start + len(node.argv)] == list(node.argv)
        assert node.container.runtime == runtime
        assert node.container.name == ("" if runtime == "apptainer" else f"ddp-hostile-golden-{node.host}")


def test_golden_local_plan_cli_rootfs(tmp_path, capsys, monkeypatch):
    """``python -m cluster plan`` prints the exact container command (the testbed's podman form)."""
    from cluster.cli import main
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CLUSTER_RUNS_DIR", raising=False)
    job = job_file(tmp_path, {"name": "hello", "module": "tests.fixtures.hello", "env": {},
                              "container": {}}, image="rootfs:/", runtime="podman",
                   args=["--ulimit", "nofile=1000:1000", "--ulimit", "nproc=1000:1000"])
    assert main(["plan", job, "--run-id", "hello-golden"]) == 0
    out = capsys.readouterr().out
    check_golden("container_podman_local_rootfs.txt", out)
    # a rootfs image runs the host's own interpreter; the runtime's flags come before --rootfs
    assert f"--rootfs /:O {sys.executable} -m torch.distributed.run" in out


def test_golden_slurm_srun_args_and_apptainer(tmp_path):
    """What the slurm backend puts around each task: pyxis options, or apptainer exec."""
    spec = load_job(job_file(tmp_path)).job.container
    wd = "/shared/ddp runs"
    lines = ["# enroot/pyxis: srun options (one argv element per line)"]
    lines += container.srun_args(replace(spec, args=["--container-remap-root"]), workdir=wd,
                                 mounts=["/shared/runs:/shared/runs"], env_names=["CLUSTER_RUN_ID"])
    lines += ["# enroot/pyxis, named container, docker.io image", *container.srun_args(
        replace(spec, image="pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime", mounts=[], env={}, args=[]),
        workdir=wd, name="ddp-r1")]
    spec = replace(spec, args=["--writable-tmpfs"])
    lines += ["# apptainer exec around the task (shell-quoted)",
              shlex.join(container.apptainer_exec(spec, ["python3", "-m", "train", "steps=10"], workdir=wd,
                                                  env={"CLUSTER_RUN_ID": "r1"}, gpus=4))]
    lines += ["# apptainer, .sif on a shared filesystem, no GPU",
              shlex.join(container.apptainer_exec(replace(spec, image="/shared/images/torch.sif"), ["python3", "x.py"],
                                                  workdir=wd, env={}, gpus=0))]
    check_golden("container_slurm.txt", "\n".join(lines) + "\n")


def test_golden_quotas_and_user_per_runtime(tmp_path):
    """container.cpus/memory_gb/pids/user on every runtime, with the hostile job around them."""
    lines = []
    for user in ("self", "root"):
        over = dict(cpus=1.5, memory_gb=2, pids=512, user=user)
        for runtime in ("docker", "podman"):
            node = rack_plan(tmp_path, runtime, **over).nodes[0]
            lines += [f"# {runtime}, user {user}", node.shell()]
        node = rack_plan(tmp_path, "podman", "~/ddp runs", **over).nodes[0]
        lines += [f"# podman, ~ workdir, user {user}", node.shell()]
        spec = load_job(job_file(tmp_path, **over)).job.container
        lines += [f"# apptainer, user {user}", shlex.join(container.apptainer_exec(
            spec, ["python3", "-m", "train"], workdir="/shared/ddp runs", env={"CLUSTER_RUN_ID": "r1"}, gpus=4))]
        lines += [f"# pyxis, user {user}, 4 tasks per node", *container.srun_args(
            replace(spec, pids=None), workdir="/shared/ddp runs", env_names=["CLUSTER_RUN_ID"], tasks_per_node=4)]
    check_golden("container_quotas.txt", "\n".join(lines) + "\n")


def test_quota_defaults_and_refusals(tmp_path):
    """Defaults: no cpu/memory cap, 16384 pids on docker/podman; apptainer and pyxis add nothing
    unasked; pyxis cannot limit pids (SLURM has no such limit): a clear error."""
    s = list(rack_plan(tmp_path, "podman").nodes[0].payload())
    assert s[s.index("--pids-limit") + 1] == "16384"
    assert "--cpus" not in s and "--memory" not in s and "--user" not in s[3:]   # --user: the host's shell
    spec = load_job(job_file(tmp_path)).job.container
    a = container.apptainer_exec(spec, ["x"], workdir="/w", env={}, gpus=0)
    assert not {"--cpus", "--memory", "--pids-limit", "--fakeroot"} & set(a)
    # apptainer applies quotas through cgroups: preflight checks it can (root, or cgroups v2)
    ref = container.ContainerRef("apptainer", "", "/i.sif", False, "r", quotas=True)
    check = container.preflight_checks(ref)[1]
    assert check.argv == ("sh", "-c", container.APPTAINER_CGROUPS) and "cgroups v2" in check.problem
    assert container.preflight_checks(replace(ref, quotas=False))[1].argv == ("test", "-r", "/i.sif")
    with pytest.raises(UserError, match="no per-job process limit"):
        container.srun_args(replace(spec, pids=100), workdir="/w")
    # the OOM watcher sits around torchrun only when memory is limited
    m = list(rack_plan(tmp_path, "podman", memory_gb=1).nodes[0].payload())
    i = m.index("nvcr.io/nvidia/pytorch:24.05-py3")
    assert m[i + 1:i + 5] == ["sh", "-c", container.OOM_SCRIPT, "1"] and m[i + 5] == "python3"


# ---------------------------------------------------------------- mapping details
def test_docker_and_podman_flags(tmp_path):
    d = rack_plan(tmp_path, "docker").nodes[0].payload()
    p = rack_plan(tmp_path, "podman").nodes[0].payload()
    for argv, gpu in ((d, ["--gpus", "all"]), (p, ["--device", "nvidia.com/gpu=all"])):
        s = list(argv)
        # the host's shell runs "<runtime> run" with --user "$(id -u):$(id -g)" (the default: user self)
        assert s[:3] == ["sh", "-c", container.host_script("self", False)]
        assert s[3:5] in (["docker", "run"], ["podman", "run"])
        for flag in (["--rm"], ["--init"], ["--network", "host"], gpu, ["--shm-size", "32g"],
                     ["--ulimit", "memlock=-1:-1"], ["--ulimit", "stack=67108864:67108864"],
                     ["--pull", "never"], ["-v", "/srv/ddp runs:/srv/ddp runs"], ["-w", "/srv/ddp runs/runs/hostile-golden"],
                     ["--label", "cluster.run_id=hostile-golden"], ["--label", "cluster.host=gpu01"],
                     ["-e", "CLUSTER_RUN_ID=hostile-golden"],
                     ["-e", "NCCL_SOCKET_IFNAME=ens1f0"], ["-e", "NL=line1\nline2"],
                     ["-e", "CLUSTER_RUN_DIR"], ["-e", "PYTHONPATH"]):   # the agent's, passed by name
            assert any(s[i:i + len(flag)] == flag for i in range(len(s))), flag
        image = s.index("nvcr.io/nvidia/pytorch:24.05-py3")
        # the image's python3 runs torchrun; the job's args stay after the module
        assert s[image + 1:image + 4] == ["python3", "-m", "torch.distributed.run"]
        assert s[-3:] == ["mypkg.train", "--data", "/data/x y"]
        assert "--ipc" not in s


def test_no_gpus_and_ulimit_override(tmp_path):
    argv = list(rack_plan(tmp_path, "podman", gpus=0, args=["--ulimit", "memlock=8388608:8388608"]).nodes[0].payload())
    assert "--device" not in argv and "--gpus" not in argv
    ulimits = [argv[i + 1] for i, a in enumerate(argv) if a == "--ulimit"]
    # the job's memlock replaces ours (podman refuses a memlock it may not raise), stack stays
    assert ulimits == ["stack=67108864:67108864", "memlock=8388608:8388608"]


def test_shm_zero_means_host_ipc():
    spec = ContainerSpec(image="img:1", shm_gb=0)
    argv = container.wrap(spec, "docker", name="n", workdir="/w", run_dir="runs/r", env={}, payload_argv=["p"], gpus=0)
    assert "--shm-size" not in argv and argv[argv.index("--ipc") + 1] == "host"


def test_runtime_per_host_and_job_override(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text("defaults: {gpus: 0, workdir: /w, container_runtime: docker}\n"
                    "hosts:\n  - name: a\n  - name: b\n    container_runtime: podman\n  - name: c\n"
                    "    container_runtime: null\n")
    inv = load_inventory(path)
    job = load_job(job_file(tmp_path)).job
    plan = make_plan(inv, job, "r", {h.name: 0 for h in inv.hosts})
    assert [n.payload()[3] for n in plan.nodes] == ["docker", "podman", "docker"]   # after sh -c SCRIPT (--user)
    job = load_job(job_file(tmp_path, runtime="apptainer")).job
    assert {n.container.runtime for n in make_plan(inv, job, "r", {h.name: 0 for h in inv.hosts}).nodes} == {"apptainer"}
    path.write_text("defaults: {gpus: 0, workdir: /w}\nhosts:\n  - name: a\n")
    with pytest.raises(UserError, match="no runtime is known for host a"):
        make_plan(load_inventory(path), load_job(job_file(tmp_path)).job, "r", {"a": 0})


def test_image_mapping_per_runtime():
    assert container.enroot_image("nvcr.io/nvidia/pytorch:24.05-py3") == "nvcr.io#nvidia/pytorch:24.05-py3"
    assert container.enroot_image("localhost:5000/t:1") == "localhost:5000#t:1"
    assert container.enroot_image("pytorch/pytorch:2.4.0") == "pytorch/pytorch:2.4.0"
    assert container.enroot_image("docker://ubuntu:22.04") == "ubuntu:22.04"
    assert container.enroot_image("/shared/torch.sqsh") == "/shared/torch.sqsh"
    assert container.apptainer_image("pytorch/pytorch:2.4.0") == "docker://pytorch/pytorch:2.4.0"
    assert container.apptainer_image("/img/t.sif") == "/img/t.sif"
    assert container.apptainer_image("oras://ghcr.io/x/t:1") == "oras://ghcr.io/x/t:1"
    assert container.docker_image("docker://ubuntu:22.04") == "ubuntu:22.04"
    assert container.container_name("job 'x'-20260101-000000-abcd", "gpu01") == "ddp-job__x_-20260101-000000-abcd-gpu01"


@pytest.mark.parametrize("field,value,match", [
    ("image", "--privileged", "not"),                 # would be taken as an option
    ("image", "a b", "not"),
    ("image", "rootfs:relative", "absolute host directory"),
    ("mounts", ["data:/data"], "absolute paths"),
    ("mounts", ["/a:/b:/c"], "absolute paths"),
    ("mounts", ["/a,b:/c"], "absolute paths"),        # apptainer and pyxis join mounts with ','
    ("mounts", ["/a:/b:rx"], "absolute paths"),
    ("mounts", ["/a\nb:/c"], "control"),
    ("env", {"1X": "v"}, "not a valid environment variable name"),
    ("env", {"CLUSTER_RUN_ID": "v"}, "CLUSTER_RUN_ID"),
    ("shm_gb", -1, "at least|0 or more"),
    ("cpus", 0, "above 0"),
    ("memory_gb", -1, "above 0"),
    ("pids", 0, "above 0"),
    ("pids", "many", "integer"),
    ("cpus", float("inf"), "finite"),                 # numbers finite (schema) and in range (check_spec)
    ("memory_gb", float("nan"), "finite"),
    ("cpus", 5000, "at most 4096"),
    ("pids", 10**9, "at most"),
    ("pids", 1.5, "whole number|integer"),
    ("user", "bob; id", "one of|not a container user"),
])
def test_bad_container_sections_are_user_errors(tmp_path, field, value, match):
    """Caught when the job is loaded (config) or at the latest when the plan is made (container)."""
    inv = rack(tmp_path, "podman")
    with pytest.raises(UserError, match=match):
        job = load_job(job_file(tmp_path, **{field: value})).job
        make_plan(inv, job, "r", {h.name: 0 for h in inv.hosts})


def test_rootfs_is_podman_only_and_enroot_is_slurm_only(tmp_path):
    inv = rack(tmp_path, "docker")
    with pytest.raises(UserError, match="podman only"):
        make_plan(inv, load_job(job_file(tmp_path, image="rootfs:/")).job, "r", {h.name: 0 for h in inv.hosts})
    inv = rack(tmp_path, "enroot")
    with pytest.raises(UserError, match="SLURM only"):
        make_plan(inv, load_job(job_file(tmp_path)).job, "r", {h.name: 0 for h in inv.hosts})


def test_preflight_commands():
    P = container.preflight_argv
    # the last check prints the image's digest: preflight compares it across the run's hosts
    assert P("podman", "img:1") == [["podman", "version", "--format", "{{.Client.Version}}"],
                                    ["podman", "image", "exists", "img:1"],
                                    ["podman", "image", "inspect", "--format", "{{.Id}}", "img:1"]]
    assert P("docker", "img:1", pull=True) == [["docker", "version", "--format", "{{.Server.Version}}"],
                                               ["docker", "pull", "-q", "img:1"],
                                               ["docker", "image", "inspect", "--format", "{{.Id}}", "img:1"]]
    assert len(P("docker", "img:1")) == 2 and len(P("podman", "rootfs:/")) == 2   # inspect is the digest
    assert P("docker", "img:1")[1] == ["docker", "image", "inspect", "--format", "{{.Id}}", "img:1"]
    assert P("podman", "rootfs:/")[1] == ["test", "-d", "/"]
    assert P("apptainer", "/img/t.sif")[1:] == [["test", "-r", "/img/t.sif"], ["sha256sum", "/img/t.sif"]]
    assert P("apptainer", "docker://t:1")[1] == ["apptainer", "exec", "docker://t:1", "true"]
    assert node_containers.remove_argv("podman", "n") == ["podman", "rm", "--force", "--ignore", "--time", "0", "n"]
    assert node_containers.remove_argv("docker", "n") == ["docker", "rm", "--force", "n"]
    assert node_containers.remove_argv("apptainer", "") is None
    assert container.list_argv("docker", "r1") == ["docker", "ps", "--all", "--filter", "label=cluster.run_id=r1",
                                                    "--format", "{{.Names}}"]
    assert container.list_argv("podman", "r1", "gpu01")[3:7] == ["--filter", "label=cluster.run_id=r1",
                                                                 "--filter", "label=cluster.host=gpu01"]


def test_agent_can_find_its_container_from_the_payload(tmp_path):
    for runtime, workdir in (("docker", "/w"), ("podman", "~/ddp")):
        node = rack_plan(tmp_path, runtime, workdir).nodes[1]
        assert node_containers.remove_argv_of_payload(node.payload()) == node_containers.remove_argv(runtime, node.container.name)
    assert node_containers.remove_argv_of_payload(rack_plan(tmp_path, "apptainer").nodes[0].payload()) is None
    assert node_containers.remove_argv_of_payload(["python", "-m", "torch.distributed.run", "--name", "x"]) is None


class FakeRun:
    """Fakes the subprocess edge of preflight: answers known argv, refuses anything else."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def __call__(self, argv, **kw):
        self.calls.append(argv)
        for prefix, (code, err) in self.answers.items():
            if tuple(argv[:len(prefix)]) == prefix:
                return subprocess.CompletedProcess(argv, code, "", err)
        raise AssertionError(f"unexpected command {argv}")


def test_preflight_local_names_host_problem_and_fix(tmp_path):
    nodes = rack_plan(tmp_path, "podman").nodes
    ok = FakeRun({("podman", "version"): (0, ""), ("podman", "image", "exists"): (0, "")})
    container.preflight_local(nodes, run=ok)
    assert len(ok.calls) == 2        # same runtime and image on both nodes: checked once here
    missing = FakeRun({("podman", "version"): (0, ""), ("podman", "image", "exists"): (1, "")})
    with pytest.raises(UserError) as e:
        container.preflight_local(nodes, run=missing)
    text = str(e.value)
    assert "gpu01: container: image nvcr.io/nvidia/pytorch:24.05-py3 is not present" in text
    assert "podman pull nvcr.io/nvidia/pytorch:24.05-py3" in text and "container.pull: true" in text

    def absent(argv, **kw):
        raise FileNotFoundError(argv[0])
    with pytest.raises(UserError, match="podman is not installed or not working.*exited 127"):
        container.preflight_local(nodes, run=absent)
    pulled = FakeRun({("podman", "version"): (0, ""), ("podman", "pull"): (125, "Error: unauthorized")})
    with pytest.raises(UserError, match="(?s)cannot pull image .*unauthorized.*podman login"):
        container.preflight_local(rack_plan(tmp_path, "podman", pull=True).nodes, run=pulled)


def test_remove_local_removes_by_name_and_reports_leftovers(tmp_path):
    from cluster.spec.schema import to_plain
    data = {"plan": to_plain(rack_plan(tmp_path, "docker"))}
    gone = FakeRun({("docker", "rm"): (0, ""), ("docker", "ps"): (0, "")})
    assert container.remove_local(data, run=gone) == []
    assert ["docker", "rm", "--force", "ddp-hostile-golden-gpu01"] in gone.calls

    def stuck(argv, **kw):
        out = "ddp-hostile-golden-gpu01\n" if argv[1] == "ps" else ""
        return subprocess.CompletedProcess(argv, 0, out, "")
    assert "gpu01: docker container ddp-hostile-golden-gpu01 still there" in container.remove_local(data, run=stuck)
    assert container.remove_local({"plan": {"nodes": [{"host": "x", "container": None}]}}) == []


# ---------------------------------------------------------------- byte-exact through bash + agent
FAKE_RUNTIME = """#!{python}
import json, os, sys
with open(os.environ["FAKE_ARGV_OUT"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(),
               "env": {{k: v for k, v in os.environ.items() if k.startswith("APPTAINERENV_")}}}}, f)
"""


def weird_dir(tmp_path) -> Path:
    # submitit's weird_tmp_path strings, less ':' and ',' (no runtime can mount those) and the
    # newline (the inventory refuses control characters in paths; env values carry one instead)
    d = tmp_path / "a 0" / "a\"=0\"" / "a'; touch pwned $(id) `id`"
    d.mkdir(parents=True)
    return d


@pytest.mark.parametrize("runtime,tilde", [("docker", False), ("podman", False), ("podman", True),
                                           ("apptainer", False)])
def test_shell_line_delivers_argv_byte_exact(tmp_path, runtime, tilde):
    """NodeLaunch.shell() through a real bash and the real agent: the runtime gets exactly our argv."""
    wd = weird_dir(tmp_path)
    home = wd.parent
    workdir = "~/" + wd.name if tilde else str(wd)
    inv = rack(tmp_path, runtime, workdir)
    inv = replace(inv, hosts=tuple(replace(h, python=sys.executable) for h in inv.hosts))
    plan = make_plan(inv, load_job(job_file(tmp_path)).job, "hostile-golden", {h.name: 8 for h in inv.hosts})
    node = plan.nodes[1]
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / runtime).write_text(FAKE_RUNTIME.format(python=sys.executable))
    (fakebin / runtime).chmod(0o755)
    out = tmp_path / "argv.json"
    env = {**os.environ, "PATH": f"{fakebin}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "FAKE_ARGV_OUT": str(out), "HOME": str(home)}
    subprocess.run(["bash", "-c", node.shell()], env=env, check=True, timeout=30)
    exit_file = wd / node.state_dir / f"{node.host}.exit"
    deadline = time.time() + 30
    while not exit_file.exists():
        assert time.time() < deadline, (wd / node.agent_log_path).read_text()
        time.sleep(0.1)
    assert json.loads(exit_file.read_text())["code"] == 0, (wd / node.log_path).read_text()
    got = json.loads(out.read_text())
    want = list(node.payload())
    if runtime == "apptainer":       # env APPTAINERENV_K=V ... apptainer ARGS
        start = want.index("apptainer")
        assert got["env"] == dict(a.split("=", 1) for a in want[1:start])
        assert got["env"]["APPTAINERENV_NL"] == "line1\nline2"
        want = want[start + 1:]
    else:                            # sh -c 'r=$1; shift; exec "$0" "$r" --user ... "$@"' podman run ...
        # the host's shell adds the submitting user's uid:gid after "run", and for a ~ workdir the
        # code's directory (CLUSTER_CODE_DIR) mounted and the run directory ($PWD) as the working one
        assert want[:5] == ["sh", "-c", container.host_script("self", tilde), runtime, "run"]
        user = ["--user", f"{os.getuid()}:{os.getgid()}"]
        here = ["-v", f"{wd}:{wd}", "-w", str(wd / "runs" / "hostile-golden")] if tilde else []
        want = ["run"] + user + here + want[5:]
    assert got["argv"] == want
    assert got["cwd"] == str(wd / "runs" / "hostile-golden")      # the run directory, not the code
    assert not Path(PWNED).exists() and not (wd / "pwned").exists()


# ---------------------------------------------------------------- one image everywhere (cluster/image.py)
def test_digest_mismatch_names_the_hosts():
    from cluster import image
    image.compare("img:1", {"gpu01": "sha256:aa", "gpu02": "sha256:aa"})          # the same: nothing
    with pytest.raises(UserError) as e:
        image.compare("img:1", {"gpu01": "sha256:" + "a" * 64, "gpu02": "sha256:" + "a" * 64,
                                "gpu03": "sha256:" + "b" * 64, "gpu04": None})
    msg = e.value.render()
    assert "image img:1 is not the same on every host (gpu[01-02]: sha256:aaaaaaaaaaaa...; gpu03: sha256:bbb" in msg
    assert "gpu04: missing" in msg and "python -m cluster image push img:1" in msg
    assert image.digest_of("0123abcd  /shared/t.sif\n") == "sha256:0123abcd"
    assert image.digest_of("sha256:feed\n") == "sha256:feed"


def test_image_push_refuses_what_it_cannot_do(tmp_path):
    from cluster.cli import main
    local = tmp_path / "local.yaml"
    local.write_text("hosts:\n  - name: localhost\n")
    assert main(["image", "push", "img:1", "-i", str(local)]) == 2
    inv = rack(tmp_path, "podman")
    assert main(["image", "push", "img:1", "-i", str(inv.path), "--hosts", "gpu09"]) == 2
