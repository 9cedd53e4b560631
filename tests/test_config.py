"""Loading and validation of inventories, jobs and overrides: good files load, bad ones say why."""
import textwrap

import pytest

from cluster import hostlist
from cluster.cli import main
from cluster.config import load_inventory, load_job
from cluster.errors import UserError


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
]


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


def test_the_profile_notice_shows_the_values_that_run():
    """steps=60 on a machine without GPU: the cpu profile says 30, the override wins, the notice says so."""
    loaded = load_job("resnet50", ["steps=60"], profile="cpu")
    assert loaded.job.train["steps"] == 60
    assert "steps=60 (override; the profile's: 30)" in loaded.notes[0] and "batch_size=8" in loaded.notes[0]
