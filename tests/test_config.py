"""Loading and validation of inventories, jobs and overrides: good files load, bad ones say why."""
import textwrap
from pathlib import Path

import pytest

from cluster.spec import hostlist
from cluster.cli import main
from cluster.spec.config import load_inventory, load_job
from cluster.errors import UserError
from cluster.spec.yamlsrc import parse_scalar


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_default_inventory_is_this_machine():
    inv = load_inventory()
    assert inv.backend == "local"
    assert [h.name for h in inv.hosts] == ["localhost"]
    assert inv.hosts[0].gpus == "auto"


def test_ssh_inventory_with_ranges_and_defaults(tmp_path):
    p = write(tmp_path, "rack.yaml", """
        defaults:
          user: ml
          gpus: 8
          interface: ens1
          workdir: ~/ddp
        hosts:
          - name: gpu[01-03]
          - name: gpu10
            hostname: 10.0.0.10
            address: 192.168.0.10
            gpus: 4
        ssh:
          fanout: 16
        """)
    inv = load_inventory(p)
    assert inv.backend == "ssh"
    assert [h.name for h in inv.hosts] == ["gpu01", "gpu02", "gpu03", "gpu10"]
    assert inv.hosts[0].user == "ml" and inv.hosts[0].gpus == 8 and inv.hosts[0].interface == "ens1"
    assert inv.hosts[3].hostname == "10.0.0.10" and inv.hosts[3].address == "192.168.0.10"
    assert inv.hosts[3].gpus == 4 and inv.ssh.fanout == 16


@pytest.mark.parametrize("expr,names", [
    ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
    ("n[1-3,7]", ["n1", "n2", "n3", "n7"]),
    ("a[1-2]b[1-2]", ["a1b1", "a1b2", "a2b1", "a2b2"]),
    ("x,y[8-10]", ["x", "y8", "y9", "y10"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
])
def test_hostlist_expands_like_slurm(expr, names):
    assert hostlist.expand(expr) == names


def test_hostlist_fold_roundtrip():
    names = ["gpu01", "gpu02", "gpu03", "gpu05", "login"]
    assert hostlist.fold(names) == "gpu[01-03,05],login"
    assert hostlist.expand(hostlist.fold(names)) == names


def test_job_loads_with_overrides_and_cpu_profile():
    lj = load_job("resnet50", ["train.batch_size=4", "steps=7"], profile="cpu")
    assert lj.job.train["batch_size"] == 4          # the override wins over the profile
    assert lj.job.train["steps"] == 7               # a bare train key goes to train.
    assert lj.job.train["image_size"] == 64         # from the profile
    assert lj.profile == "cpu" and "applying profile cpu" in lj.notes[0]


# (file name, text, where the error must point, words the message must hold)
BAD_INVENTORIES = [
    ("unknown key", "hosts:\n  - name: a\n    gpu: 2\n", "bad.yaml:3", ["hosts[0].gpu", "unknown key 'gpu'", "valid keys", "gpus"]),
    ("unknown top key", "host:\n  - name: a\n", "bad.yaml:1", ["unknown key 'host'", "hosts"]),
    ("no hosts key", "defaults:\n  user: x\n", "bad.yaml:1", ["missing required key 'hosts'"]),
    ("empty hosts", "hosts: []\n", "bad.yaml:1", ["no hosts listed"]),
    ("duplicate host", "hosts:\n  - name: gpu[01-03]\n  - name: gpu02\n", "bad.yaml:3", ["duplicate host 'gpu02'"]),
    ("backwards range", "hosts:\n  - name: gpu[03-01]\n", "bad.yaml:2", ["goes backwards"]),
    ("unbalanced range", "hosts:\n  - name: gpu[01-03\n", "bad.yaml:2", ["unbalanced"]),
    ("non-numeric range", "hosts:\n  - name: gpu[a-c]\n", "bad.yaml:2", ["not numeric"]),
    ("gpus not a number", "hosts:\n  - name: a\n    gpus: two\n", "bad.yaml:3", ["hosts[0].gpus", "'two'"]),
    ("negative gpus", "hosts:\n  - name: a\n    gpus: -1\n", "bad.yaml:3", ["0 or more"]),
    ("port out of range", "hosts:\n  - name: a\n    port: 70000\n", "bad.yaml:3", ["out of range"]),
    ("port as string", "hosts:\n  - name: a\n    port: ssh\n", "bad.yaml:3", ["hosts[0].port", "integer"]),
    ("bad backend", "backend: k8s\nhosts:\n  - name: a\n", "bad.yaml:1", ["backend", "'local', 'ssh', 'slurm'"]),
    ("bad runtime", "hosts:\n  - name: a\n    container_runtime: lxc\n", "bad.yaml:3", ["container_runtime", "'docker'"]),
    ("duplicate yaml key", "hosts:\n  - name: a\nhosts:\n  - name: b\n", "bad.yaml:3", ["duplicate key 'hosts'"]),
    ("broken yaml", "hosts: [\n", "bad.yaml:2", ["invalid YAML"]),
    ("hosts not a list", "hosts: localhost\n", "bad.yaml:1", ["hosts", "expected a list"]),
    ("bad host name", "hosts:\n  - name: \"a b\"\n", "bad.yaml:2", ["not a valid host name"]),
    ("slurm without section", "backend: slurm\nhosts:\n  - name: login\n", "bad.yaml:1", ["needs a 'slurm:' section"]),
    ("local with remote host", "backend: local\nhosts:\n  - name: gpu01\n", "bad.yaml:1", ["this machine only"]),
    ("ssh setting typo", "hosts:\n  - name: a\nssh:\n  fan_out: 8\n", "bad.yaml:4", ["ssh.fan_out", "fanout"]),
    ("hostname on a range", "hosts:\n  - name: g[1-2]\n    hostname: x\n", "bad.yaml:3", ["cannot be set on a host range"]),
    ("hostname with a port", "hosts:\n  - name: a\n    hostname: gpu1:2222\n", "bad.yaml:3",
     ["hosts[0].hostname", "holds no port", "port:"]),
    ("hostname only a port", "hosts:\n  - name: a\n    hostname: ':2222'\n", "bad.yaml:3", ["holds no port"]),
    ("address with a port", "defaults:\n  address: 10.0.0.1:29500\nhosts:\n  - name: a\n", "bad.yaml:2",
     ["defaults.address", "holds no port"]),
    ("timeout infinite", "hosts:\n  - name: a\nssh:\n  connect_timeout_s: .inf\n", "bad.yaml:4",
     ["ssh.connect_timeout_s", "finite"]),
    ("timeout nan", "hosts:\n  - name: a\nssh:\n  command_timeout_s: .nan\n", "bad.yaml:4", ["finite"]),
    ("timeout a year", "hosts:\n  - name: a\nssh:\n  command_timeout_s: 31536000\n", "bad.yaml:4", ["at most 604800"]),
    ("port huge", "hosts:\n  - name: a\n    port: 99999999999999999999999\n", "bad.yaml:3", ["too large"]),
    ("time limit huge", "backend: slurm\nhosts:\n  - name: a\nslurm:\n  time_min: 100000000\n", "bad.yaml:5",
     ["slurm.time_min", "at most"]),
]


def test_host_count_is_capped_per_inventory_before_expanding(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"is larger than 10,000 hosts \(1,000,000,000\)"):
        hostlist.expand("n[1-1000]-[1-1000]x[1-1000]")     # counted, not expanded: no MemoryError
    assert len(hostlist.expand("n[1-100]-[1-100]")) == 10_000
    assert main(["exec", "--hosts", "x[1-100000]", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert "is larger than 10,000 hosts (100,000)" in err and len(err) < 300, err
    assert main(["exec", "--hosts", "x[1-5000]", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert "5000 host(s) not in the inventory: x[1-5000]" in err and len(err) < 500, err


def test_config_files_are_read_up_to_a_size(tmp_path, capsys):
    assert main(["plan", "resnet50", "-i", "/dev/zero"]) == 2
    assert capsys.readouterr().err.startswith("error: /dev/zero: larger than 1 MiB")
    big = tmp_path / "job.yaml"
    big.write_text("name: j\nmodule: a\n" + "#" * (2 << 20) + "\n")
    assert main(["plan", str(big)]) == 2
    assert f"error: {big}: larger than 1 MiB" in capsys.readouterr().err


def test_ipv6_hostnames_are_not_ports(tmp_path):
    p = tmp_path / "inv.yaml"
    p.write_text("hosts:\n  - name: a\n    hostname: 'fe80::1%eth0'\n  - name: b\n    hostname: '2001:db8::2'\n")
    assert [h.hostname for h in load_inventory(p).hosts] == ["fe80::1%eth0", "2001:db8::2"]


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "0", "1e300"])
def test_exec_timeout_must_be_finite_and_positive(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["exec", "--timeout-s", value, "--", "true"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--timeout-s" in err and "Traceback" not in err


@pytest.mark.parametrize("case", BAD_INVENTORIES, ids=[c[0] for c in BAD_INVENTORIES])
def test_bad_inventory_names_file_line_key(tmp_path, case, capsys):
    _, text, where, words = case
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as ei:
        load_inventory(p)
    msg = ei.value.render()
    assert msg.startswith(f"error: {tmp_path}/{where}"), msg
    for w in words:
        assert w in msg, (w, msg)
    # and through the CLI: exit 2, one message, no traceback
    assert main(["plan", "resnet50", "-i", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


BAD_JOBS = [
    ("unknown job key", "name: j\ntrain: {}\nnode: 2\n", "job.yaml:3", ["unknown key 'node'", "nodes"]),
    ("nothing to run", "name: j\n", "job.yaml", ["exactly one of 'train', 'module' or 'command'"]),
    ("two things to run", "name: j\nmodule: a.b\ncommand: [x]\n", "job.yaml", ["exactly one of", "module, command"]),
    ("nodes zero", "name: j\nmodule: a\nnodes: 0\n", "job.yaml:3", ["at least 1"]),
    ("nodes a word", "name: j\nmodule: a\nnodes: many\n", "job.yaml:3", ["nodes", "'many'"]),
    ("env not a mapping", "name: j\nmodule: a\nenv: [A]\n", "job.yaml:3", ["env", "expected a mapping"]),
    ("bad env name", "name: j\nmodule: a\nenv:\n  1BAD: x\n", "job.yaml:4", ["not a valid environment variable name"]),
    ("container without image", "name: j\nmodule: a\ncontainer:\n  runtime: docker\n", "job.yaml:3", ["missing required key 'image'"]),
    ("unknown train key", "name: j\ntrain:\n  batchsize: 8\n", "job.yaml:3", ["batchsize"]),
    ("bad train type", "name: j\ntrain:\n  batch_size: big\n", "job.yaml:3", ["batch_size"]),
    ("rdzv port low", "name: j\nmodule: a\nrdzv_port: 80\n", "job.yaml:3", ["1024-65535"]),
]


@pytest.mark.parametrize("case", BAD_JOBS, ids=[c[0] for c in BAD_JOBS])
def test_bad_job_names_file_line_key(tmp_path, case, capsys):
    _, text, where, words = case
    p = tmp_path / "job.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as ei:
        load_job(str(p))
    msg = ei.value.render()
    assert msg.startswith(f"error: {tmp_path}/{where}"), msg
    for w in words:
        assert w in msg, (w, msg)
    assert main(["plan", str(p)]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("overrides,words", [
    (["foo=1"], ["unknown key 'foo'", "valid keys"]),
    (["train.batch_size"], ["is not key=value"]),
    (["train.batch_size=abc"], ["command line (override train.batch_size)", "batch_size"]),
    (["nodes=0"], ["command line (override nodes)", "at least 1"]),
    (["train..x=1"], ["not a dotted name"]),
    (["nodes=5"], ["asks for 5 nodes", "lists 1"]),
])
def test_bad_overrides(overrides, words, capsys):
    assert main(["plan", "resnet50", *overrides]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)
    assert "Traceback" not in err


def test_unknown_job_lists_known_ones(capsys):
    assert main(["plan", "nosuchjob"]) == 2
    err = capsys.readouterr().err
    assert "no job named 'nosuchjob'" in err and "resnet50" in err


def test_container_section_through_load_job_accepts_what_container_implements(tmp_path):
    """One validator (cluster.spec.container.check_spec): a .sif path, shm_gb 0 (--ipc host) and a bare
    mount (the same path inside) load, and reach the plan's command line."""
    from cluster.plan import make_plan
    job = tmp_path / "c.yaml"
    job.write_text("name: c\nmodule: tests.fixtures.hello\ncontainer:\n  image: /images/torch.sif\n"
                   "  shm_gb: 0\n  mounts: [/data, '/models:/m:ro']\n")
    spec = load_job(str(job)).job.container
    assert (spec.image, spec.shm_gb, spec.mounts) == ("/images/torch.sif", 0, ("/data", "/models:/m:ro"))
    inv = tmp_path / "inv.yaml"
    inv.write_text("backend: ssh\ndefaults: {container_runtime: podman, gpus: 0}\nhosts:\n  - name: n1\n")
    argv = make_plan(load_inventory(inv), load_job(str(job)).job, "r", {"n1": 0}).nodes[0].argv
    text = " ".join(argv)
    assert "--ipc host" in text and "--shm-size" not in text
    assert "/data:/data" in text and "/models:/m:ro" in text and "/images/torch.sif" in text
    job.write_text(job.read_text().replace("shm_gb: 0", "shm_gb: -2"))
    with pytest.raises(UserError) as e:
        load_job(str(job))
    assert e.value.render().startswith(f"error: {job}:5: container.shm_gb: must be 0 or more")


@pytest.mark.parametrize("override,words", [
    ("train.steps=100000000000000000000000000", ["override train.steps", "must be at most"]),
    ("train.lr=.inf", ["train.lr", "finite"]),
    ("train.data=/data/a\nb", ["train.data", "control"]),
    ("train.ckpt_dir=/etc", ["train.ckpt_dir", "outside the run's workdir", "checkpoint.outside_workdir"]),
    ("train.ckpt_dir=runs/../../x", ["outside the run's workdir"]),
    ("profiles.gpu.train.steps=5", ["names no key of a profile", "profiles here: cpu"]),
])
def test_train_settings_are_checked(override, words, capsys):
    assert main(["plan", "resnet50", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: command line") and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_ckpt_dir_outside_the_workdir_with_opt_in(capsys):
    assert main(["plan", "resnet50", "train.ckpt_dir=/scratch/ck", "checkpoint.outside_workdir=true",
                 "--run-id", "r"]) == 0
    assert " ckpt_dir=/scratch/ck " in capsys.readouterr().out


def test_profile_overrides_apply_or_are_refused(tmp_path, capsys):
    """profiles.cpu.train.steps=7 changes the cpu profile (applied on this GPU-less machine), and
    is refused where the profile does not apply (hosts with GPUs): never silently ignored."""
    import shlex
    assert main(["plan", "resnet50", "profiles.cpu.train.steps=7", "--run-id", "r"]) == 0
    out = capsys.readouterr().out
    assert "steps=7" in shlex.split(out.splitlines()[-1])
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text("backend: ssh\nhosts:\n  - name: g1\n    gpus: 8\n")
    assert main(["plan", "resnet50", "profiles.cpu.train.steps=7", "-i", str(gpu)]) == 2
    assert "changes profile 'cpu', but no profile is applied on these hosts" in capsys.readouterr().err


@pytest.mark.parametrize("text,value", [("a #b", "a #b"), ("x: y", "x: y"), ("8", 8), ("'8'", "8"),
                                        ("[a, b]", ["a", "b"]), ("a\nb", "a\nb"), ("2024-01-01", "2024-01-01")])
def test_override_values_arrive_as_written(text, value):
    """YAML would drop '#b', fold the newline or read a date: an override's text is kept unless it
    is a plain scalar (number, bool, null), quoted, or a flow list/mapping."""
    assert parse_scalar(text) == value
    if isinstance(value, str):
        assert load_job("resnet50", [f"env.X={text}"]).job.env["X"] == value


# ---------------------------------------------------------------- the examples users copy
REPO = Path(__file__).resolve().parent.parent


def _readme_yaml_blocks():
    """Every indented block of README.md that is a YAML mapping (commands and output are not)."""
    import yaml
    blocks, cur = [], []
    for line in (REPO / "README.md").read_text().splitlines() + [""]:
        if line.startswith("    ") or (cur and not line.strip()):
            cur.append(line[4:])
            continue
        if cur:
            try:
                data = yaml.safe_load("\n".join(cur))
            except yaml.YAMLError:
                data = None
            if isinstance(data, dict):
                blocks.append("\n".join(cur))
            cur = []
    return blocks


def _inventory_examples():
    """inventory.yaml itself, and each commented '# --- Example' section of it, uncommented."""
    text = (REPO / "inventory.yaml").read_text()
    out = [("inventory.yaml", text)]
    for part in text.split("# --- Example")[1:]:
        title = part.splitlines()[0].strip(" :-")
        body = "\n".join(l[2:] for l in part.splitlines()[1:] if l.startswith("# ") or l == "#")
        out.append((title, body))
    return out


@pytest.mark.parametrize("title,text", _inventory_examples(), ids=[t for t, _ in _inventory_examples()])
def test_inventory_examples_load_and_plan(title, text, tmp_path):
    """The examples README points to (inventory.yaml's commented rack and SLURM cluster) load and
    plan; their ~/ paths are the remote home in the plan's command line, not quoted into a name."""
    from cluster.submit import resolve
    p = tmp_path / "inv.yaml"
    p.write_text(text)
    inv = load_inventory(p)
    plan = resolve(str(REPO / "tests" / "corpus" / "job.yaml"), [], str(p), None, run_id="r")[3]
    text = plan.render()
    if inv.backend == "ssh":
        assert inv.hosts[0].python == "~/venv/bin/python"
        assert "setsid ~/venv/bin/python -m cluster.node.agent" in text and "cd ~/ddp && " in text


def test_readme_examples_load(tmp_path):
    """Every YAML example shown in README.md loads: inventories as inventories, job sections
    (container: ...) inside a minimal job; and every job in jobs/."""
    import yaml
    blocks = _readme_yaml_blocks()
    assert blocks, "README.md shows no YAML example"
    from cluster.spec.config import Job
    job_keys = set(Job.__dataclass_fields__) | {"profiles"}
    for i, text in enumerate(blocks):
        data = yaml.safe_load(text)
        p = tmp_path / f"example{i}.yaml"
        if "hosts" in data:
            p.write_text(text)
            load_inventory(p)
        else:
            assert set(data) <= job_keys, f"README example is neither an inventory nor a job: {text}"
            p.write_text("name: example\nmodule: tests.fixtures.hello\n" + text)
            load_job(str(p))
    for job in sorted((REPO / "jobs").glob("*.yaml")):
        load_job(str(job))


@pytest.mark.parametrize("argv,where", [
    (["plan", "resnet50", "--run-id", "x\n#SBATCH --wrap=id"], "--run-id"),
    (["plan", "resnet50", "--run-id", "../x"], "--run-id"),
    (["status", "../../etc"], "RUN"),
    (["logs", "a\x1b[2Jb"], "RUN"),
    (["stop", "-x"], None),
    (["submit", "resnet50", "--resume", "a b"], "--resume"),
])
def test_run_ids_are_checked_where_they_enter(argv, where, capsys):
    try:
        code = main(argv)
    except SystemExit as e:          # argparse: '-x' is an option, not a run
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    if where:
        assert err.startswith(f"error: {where}: ") and "is not a run id" in err, err
        assert "\x1b" not in err and "\n#SBATCH" not in err


def test_the_profile_notice_shows_the_values_that_run():
    """steps=60 on a machine without GPU: the cpu profile says 30, the override wins, the notice says so."""
    loaded = load_job("resnet50", ["steps=60"], profile="cpu")
    assert loaded.job.train["steps"] == 60
    assert "steps=60 (override; the profile's: 30)" in loaded.notes[0] and "batch_size=8" in loaded.notes[0]


def test_plan_errors_name_the_job_files_line(tmp_path, capsys):
    """Errors found while planning (GPUs per node, a runtime for the backend) name the job file's
    line of the key, or the override that set it."""
    inv = tmp_path / "gpu.yaml"
    inv.write_text("backend: ssh\nhosts:\n  - name: g1\n    gpus: 8\n")
    job = tmp_path / "j.yaml"
    job.write_text("name: j\nmodule: a\ngpus_per_node: 16\n")
    assert main(["plan", str(job), "-i", str(inv)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {job}:3: gpus_per_node: job wants 16 GPUs per node but g1 has 8")
    assert main(["plan", "resnet50", "gpus_per_node=12", "-i", str(inv)]) == 2
    assert capsys.readouterr().err.startswith("error: command line (override gpus_per_node): gpus_per_node: job wants 12")


@pytest.mark.parametrize("value,words", [
    ("5", ["restart.silent_s", "must be 0 (off) or at least 10 (seconds); got 5", "each node beats every 2 s"]),
    ("-1", ["restart.silent_s", "must be"]),
    ("100000", ["restart.silent_s", "must be at most 3600"]),
    ("soon", ["restart.silent_s", "expected a number"]),
])
def test_restart_silent_s_is_checked(value, words, capsys):
    assert main(["plan", "resnet50", f"restart.silent_s={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: command line") and "Traceback" not in err and err.count("error:") == 1
    for w in words:
        assert w in err, (w, err)


def test_restart_silent_s_defaults_to_20_and_0_turns_it_off():
    from cluster.spec.config import RestartSpec, job_from_plain
    from cluster.spec.schema import to_plain
    job = load_job("resnet50").job
    assert job.restart.silent_s == RestartSpec().silent_s == 20
    assert load_job("resnet50", ["restart.silent_s=0"]).job.restart.silent_s == 0
    assert job_from_plain(to_plain(job)).restart.silent_s == 20      # what the follower reads back from run.json
