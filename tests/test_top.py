"""cluster top, report and train/metrics' charts, piece by piece (the live runs are in
test_top_testbed.py and test_pages_browser.py): who is the straggler, how a frame reads, what keys
do, what nvidia-smi's answer becomes, where restarts are, which charts each rank writes."""
import os

import pytest

from cluster.run import top
from cluster.node.probe import _gpu_query
from cluster.run.report import restarts, shares
from train.config import ConfigError
from train.metrics import MetricsWriter


def row(rank, **kw):
    base = dict(host=f"node{rank + 1}", rank=rank, step=50, steps_total=100, img_s=40.0, step_ms=400.0,
                data_share=0.02, comm_share=0.9)
    return top.Row(**{**base, **kw})


def test_the_rank_the_others_wait_for_is_the_straggler():
    rows = [row(0), row(1, data_share=0.7, comm_share=0.1), row(2)]
    assert top.waited_for(rows) == [1]
    # on GPU no communication share: the data wait tells
    rows = [row(0, comm_share=None), row(1, comm_share=None, data_share=0.6), row(2, comm_share=None)]
    assert top.waited_for(rows) == [1]
    # all alike: nobody; a done or hung rank is not compared
    assert top.waited_for([row(0), row(1), row(2)]) == []
    assert top.waited_for([row(0), row(1, comm_share=0.1, flag="done")]) == []


def frame(snap, **kw) -> str:
    from rich.console import Console
    c = Console(width=150, record=True, file=open(os.devnull, "w"))
    c.print(top.render(snap, **kw))
    return c.export_text()


def test_a_frame_has_totals_eta_rows_and_flags_and_dashes_without_gpus():
    gpu = {"index": 0, "util": 97.0, "mem_used": 20480.0, "mem_total": 81920.0, "power": 612.0}
    snap = top.Snapshot("r1", "RUNNING", "ssh", 3, [row(0, gpu=gpu), row(1, flag="straggler", img_s=38.0),
                                                    row(2, step=48, flag="hung")], fetch_s=0.12)
    text = frame(snap)
    lines = text.splitlines()
    # step of the slowest rank, the sum of img/s, ETA from the remaining steps at the slowest pace
    assert "step 48/100" in text and "118.0 img/s in all" in text and "ETA 0m20s" in text
    r0 = next(l for l in lines if l.split()[:2] == ["node1", "0"])
    assert r0.split()[7:10] == ["97", "20.0/80", "612"]
    r1 = next(l for l in lines if l.split()[:2] == ["node2", "1"])
    assert r1.split()[7:10] == ["-", "-", "-"] and r1.rstrip().endswith("STRAGGLER")
    assert next(l for l in lines if l.split()[:2] == ["node3", "2"]).rstrip().endswith("HUNG")
    # sorted by img/s: rank 1 (38) first
    by_rate = [l.split()[1] for l in frame(snap, sort="img_s").splitlines() if l.split()[:1] in (["node1"], ["node2"], ["node3"])]
    assert by_rate == ["1", "0", "2"]


def test_keys_typed_together_are_each_handled():
    r, w = os.pipe()
    try:
        os.write(w, b"j\r\x1b[Aq")
        assert top._keys(r, 1.0) == ["down", "enter", "up", "quit"]
        assert top._keys(r, 0.05) is None
    finally:
        os.close(r)
        os.close(w)
    snap = top.Snapshot("r1", "RUNNING", "local", 1, [row(0), row(1)])
    state = ("rank", False, None, None)
    for key in ("down", "down", "enter"):
        state = top._on_key(key, snap, *state)
    assert state == ("rank", False, 1, 1)          # rank 1's log is shown
    assert top._on_key("back", snap, *state)[3] is None
    assert top._on_key("sort", snap, *state[:3], None)[0] == "img_s"


def test_gpu_query_reads_nvidia_smi_and_says_none_without_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _gpu_query({}) is None
    smi = tmp_path / "nvidia-smi"
    # the first line as an idle H100's nvidia-smi printed it for this query; the second as a GPU without power readings
    smi.write_text("#!/bin/sh\necho '0, 0, 0, 81559, 73.94'\necho '1, 97, 20480, 81559, [N/A]'\n")
    smi.chmod(0o755)
    assert _gpu_query({}) == [{"index": 0, "util": 0, "mem_used": 0, "mem_total": 81559, "power": 73.94},
                              {"index": 1, "util": 97, "mem_used": 20480, "mem_total": 81559, "power": None}]


def test_report_marks_restarts_and_splits_the_step_time():
    rank0 = [{"kind": "start", "step": 0, "time": 100.0},
             {"kind": "train", "step": 10, "step_ms": 100.0, "data_ms": 10.0, "comm_ms": 30.0, "time": 101.0},
             {"kind": "train", "step": 20, "step_ms": 100.0, "data_ms": 20.0, "comm_ms": 40.0, "time": 102.0},
             {"kind": "start", "step": 20, "time": 200.0},       # a requeue resumed at step 20
             {"kind": "train", "step": 30, "step_ms": 100.0, "data_ms": 20.0, "comm_ms": 40.0, "time": 201.0}]
    assert restarts({0: rank0}) == [{"time": 200.0, "step": 20, "what": "restart at step 20"}]
    # a run submitted with --resume: its first start is marked too
    assert restarts({0: rank0[3:]})[0]["what"] == "resumed at step 20"
    s = shares([r for r in rank0 if r["kind"] == "train"])      # the first interval left out
    assert s == pytest.approx({"data": 0.2, "comm": 0.4, "compute": 0.4})
    # GPU records carry no comm_ms: not measured, not zero
    assert shares([{"step_ms": 50.0, "data_ms": 5.0}])["comm"] is None


def test_rank_0_charts_everything_the_others_their_own_throughput(tmp_path):
    rec = {"kind": "train", "step": 5, "loss": 2.0, "loss_mean": 2.1, "lr": 0.1, "img_s": 40.0,
           "img_s_total": 120.0, "step_ms": 400.0, "data_ms": 4.0}
    rank0, rank1 = MetricsWriter(str(tmp_path), 0, 10), MetricsWriter(str(tmp_path), 1, 10)
    assert set(rank0.scalars(rec)) == {
        "loss", "lr", "throughput/img_s_total", "rank/img_s", "rank/step_ms", "rank/data_wait_ms"}
    assert set(rank1.scalars(rec)) == {"rank/img_s", "rank/step_ms", "rank/data_wait_ms"}
    assert rank0.scalars({"kind": "start", "step": 0}) == {}
    rank0.close()
    rank1.close()


def test_wandb_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)      # not installed, whatever this machine has
    with pytest.raises(ConfigError) as e:
        MetricsWriter(str(tmp_path), 0, 10, wandb_project="resnet")
    assert e.value.key == "wandb_project" and "pip install wandb" in str(e.value)
