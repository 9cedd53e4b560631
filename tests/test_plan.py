"""The plan is a pure function; its printed form is byte-exact (golden files)."""
import os
import shlex
import sys
from pathlib import Path

import pytest

from cluster.spec.config import REPO, load_inventory, load_job
from cluster.plan import default_port, make_plan

GOLDEN = Path(__file__).parent / "golden"
RACK = """
defaults:
  user: ml
  gpus: 8
  interface: ens1f0
  workdir: ~/ddp runs
  python: /opt/venv/bin/python
hosts:
  - name: gpu[01-03]
"""


def check_golden(name: str, text: str):
    text = text.replace(str(REPO), "<repo>").replace(sys.executable, "<python>")
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"plan output changed; if intended, rerun with UPDATE_GOLDEN=1 ({path})"


def test_local_cpu_plan_golden(capsys, monkeypatch):
    from cluster.cli import main
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")   # this machine without GPUs, wherever the test runs
    assert main(["plan", "resnet50", "--run-id", "resnet50-golden"]) == 0
    check_golden("plan_resnet50_local_cpu.txt", capsys.readouterr().out)


def test_ssh_rack_plan_golden(tmp_path):
    inv_path = tmp_path / "rack.yaml"
    inv_path.write_text(RACK)
    inv = load_inventory(inv_path)
    job = load_job("resnet50", ["train.steps=100"]).job
    plan = make_plan(inv, job, "resnet50-golden", {h.name: 8 for h in inv.hosts})
    assert plan.world_size == 24
    assert plan.rdzv_endpoint == f"gpu01:{default_port('resnet50-golden')}"
    from cluster.backends import get
    check_golden("plan_resnet50_ssh_rack.txt", get("ssh", inv).render(plan))     # as `plan` prints it


def test_the_parked_line_is_the_agent_argv_a_warm_start_runs_and_only_with_warm_start(tmp_path):
    from cluster.backends import get
    from cluster.node.probe import parked_argv
    for warm in (True, False):
        inv_path = tmp_path / "rack.yaml"
        inv_path.write_text(RACK + f"ssh:\n  warm_start: {str(warm).lower()}\n")
        inv = load_inventory(inv_path)
        plan = make_plan(inv, load_job("resnet50").job, "r1", {h.name: 8 for h in inv.hosts})
        parked = [l[len("  # parked: "):] for l in get("ssh", inv).render(plan).splitlines()
                  if l.startswith("  # parked: ")]
        if not warm:        # the shell line is what runs: nothing else is printed
            assert parked == [] and get("ssh", inv).render(plan) == plan.render()
            continue
        # splits back into exactly the argv the probe starts (one quoting hop, as the line)
        assert [shlex.split(l) for l in parked] == [parked_argv(n.argv) for n in plan.nodes]
        assert all(a[3:5] == ["--park-fd", "200"] for a in map(shlex.split, parked))


def test_every_node_gets_the_same_endpoint_and_its_own_rank(tmp_path):
    inv_path = tmp_path / "rack.yaml"
    inv_path.write_text(RACK)
    inv = load_inventory(inv_path)
    plan = make_plan(inv, load_job("resnet50").job, "r1", {h.name: 8 for h in inv.hosts}, port=31000)
    for i, node in enumerate(plan.nodes):
        argv = node.payload()
        assert "--master-addr=gpu01" in argv and "--master-port=31000" in argv
        assert f"--node-rank={i}" in argv and "--nproc-per-node=8" in argv
        assert node.env["NCCL_SOCKET_IFNAME"] == "ens1f0" == node.env["GLOO_SOCKET_IFNAME"]
        # the shell line splits back into exactly the argv we meant (one quoting hop)
        words = shlex.split(node.shell())
        assert list(node.argv) == words[words.index("setsid") + 1: words.index("setsid") + 1 + len(node.argv)]


def test_gpu_count_mismatch_is_an_error(tmp_path):
    from cluster.errors import UserError
    inv_path = tmp_path / "rack.yaml"
    inv_path.write_text(RACK)
    inv = load_inventory(inv_path)
    with pytest.raises(UserError, match="different GPU counts"):
        make_plan(inv, load_job("resnet50").job, "r1", {"gpu01": 8, "gpu02": 8, "gpu03": 4})
    with pytest.raises(UserError, match="wants 16 GPUs per node"):
        make_plan(inv, load_job("resnet50", ["gpus_per_node=16"]).job, "r1", {h.name: 8 for h in inv.hosts})
