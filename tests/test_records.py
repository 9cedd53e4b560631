"""Run records (cluster/run/records.py): how RUN names a run, damaged records, durable writes."""
import json

import pytest

from cluster.errors import UserError
from cluster.run.records import Run, all_runs, resolve


def make(root, rid, job, created):
    r = Run(rid, root)
    r.create({"id": rid, "job": {"name": job}, "created": created, "state": "SUCCEEDED"})
    return r


@pytest.fixture
def runs(tmp_path):
    make(tmp_path, "resnet50-20261128-100000-aaaa", "resnet50", 1)
    make(tmp_path, "resnet50-20261128-110000-bbbb", "resnet50", 2)
    make(tmp_path, "resnet50-tiny-20261128-120000-cccc", "resnet50-tiny", 3)
    make(tmp_path, "hello-20261128-130000-dddd", "hello", 4)
    return tmp_path


def test_run_is_an_id_a_job_name_meaning_its_latest_run_a_unique_prefix_or_the_latest(runs):
    assert resolve("resnet50", runs).id == "resnet50-20261128-110000-bbbb"     # README: "its latest run"
    assert resolve("resnet50-tiny", runs).id == "resnet50-tiny-20261128-120000-cccc"
    assert resolve("resnet50-20261128-10", runs).id == "resnet50-20261128-100000-aaaa"
    assert resolve(None, runs).id == resolve("latest", runs).id == "hello-20261128-130000-dddd"
    with pytest.raises(UserError, match="'resnet50-2026' matches 2 runs"):
        resolve("resnet50-2026", runs)
    with pytest.raises(UserError, match="no run 'nope'"):
        resolve("nope", runs)


def test_a_damaged_record_is_found_by_id_and_passed_over_as_the_latest(runs, capsys):
    bad = Run("hello-20261128-130000-dddd", runs)
    bad.path.write_text('{"id": "hello-2026')
    assert [r.id for r in all_runs(runs)][-1] == bad.id and all_runs(runs)[-1].damaged
    assert resolve(None, runs).id == "resnet50-tiny-20261128-120000-cccc"
    assert f"passing over {bad.id}" in capsys.readouterr().err
    r = resolve(bad.id, runs)
    e = r.damaged
    assert e is not None and bad.id in e.message and "damaged" in e.message
    with pytest.raises(UserError, match="is damaged"):
        r.data


def test_a_write_keeps_the_record_before_it(tmp_path):
    r = make(tmp_path, "j-1", "j", 1)
    r.update(state="RUNNING")
    assert json.loads(r.prev_path.read_text())["state"] == "SUCCEEDED"
    assert json.loads(r.path.read_text())["state"] == "RUNNING"
    assert sorted(p.name for p in r.dir.iterdir() if p.name.startswith(".")) == []     # no temp files left
