"""cluster/backends/deepcheck.py: the pairwise schedule and who is blamed (the measurements
themselves run on the cluster in a box: tests/test_doctor_deep_testbed.py)."""
import itertools

import pytest

from cluster.backends.deepcheck import blame, gpu_type, rounds
from cluster.errors import UserError
from cluster.spec.config import load_job


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_rounds_cover_every_pair_once_each_host_once_per_round(n):
    pairs = [p for r in rounds(n) for p in r]
    assert sorted(pairs) == list(itertools.combinations(range(n), 2))
    for r in rounds(n):
        hosts = [h for p in r for h in p]
        assert len(hosts) == len(set(hosts))


def test_slow_host_is_the_one_in_every_slow_pair():
    bw = {("a", "b"): 1.5, ("a", "c"): 0.01, ("b", "c"): 0.02}
    assert blame(["a", "b", "c"], bw, 0.2) == (["c"], [])


def test_slow_link_between_two_fast_hosts():
    bw = {("a", "b"): 0.01, ("a", "c"): 1.0, ("b", "c"): 1.0, ("a", "d"): 1.0, ("b", "d"): 1.0, ("c", "d"): 1.0}
    assert blame(["a", "b", "c", "d"], bw, 0.2) == ([], [("a", "b")])


def test_two_hosts_only_the_link_can_be_named():
    assert blame(["a", "b"], {("a", "b"): 0.01}, 0.2) == ([], [("a", "b")])


def test_gpu_types():
    assert gpu_type("NVIDIA H100 80GB HBM3") == "H100" and gpu_type("NVIDIA H200") == "H200"
    assert gpu_type("NVIDIA A100-SXM4-80GB") == "A100" and gpu_type("Tesla T4") == "gpu"


def test_job_preflight_and_threshold_are_checked():
    assert load_job("resnet50", ["preflight=deep", "min_busbw_gbps=50"]).job.preflight == "deep"
    with pytest.raises(UserError):
        load_job("resnet50", ["preflight=deeper"])
    with pytest.raises(UserError) as e:
        load_job("resnet50", ["min_busbw_gbps=0"])
    assert "min_busbw_gbps" in (e.value.key or "") + e.value.message + (e.value.where or "")
