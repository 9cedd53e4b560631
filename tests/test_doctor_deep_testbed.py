"""`doctor --deep` on the cluster in a box: a real gloo all-reduce across the 3 hosts (CPU: no GPU
to check); one host's link slowed (tc netem, or tbf where the kernel has no netem) on its veth in the root namespace is named within
60 s, and a healthy testbed passes."""
import subprocess
import time

import pytest

from tests.testbed.common import VETH_PREFIX

pytestmark = [pytest.mark.testbed]

JOB = "jobs/ddp-module.yaml"


def doctor(client):
    t0 = time.time()
    p = client.cli("doctor", JOB, "-i", client.testbed.inventory, "--deep", timeout=120)
    return p, time.time() - t0


def test_healthy_testbed_passes(client):
    p, _ = doctor(client)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout + p.stderr
    assert "ok  all-reduce  gloo, node[1-3]:" in out and "Gbit/s bus bandwidth" in out, out
    assert "ok  gpu health  no GPU (node[1-3])" in out, out


def test_slowed_link_names_its_host(client):
    veth = f"{VETH_PREFIX}3"        # node3's veth, root namespace side (tests/testbed/network.py)
    add = ["tc", "qdisc", "add", "dev", veth, "root"]
    if subprocess.run(add + ["netem", "delay", "50ms", "rate", "10mbit"], capture_output=True).returncode != 0:
        # a kernel without sch_netem ("Specified qdisc kind is unknown"): a token bucket, same rate
        subprocess.run(add + ["tbf", "rate", "10mbit", "burst", "32kbit", "latency", "400ms"], check=True,
                       capture_output=True)
    try:
        p, took = doctor(client)
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", veth, "root"], capture_output=True)
    out = p.stdout + p.stderr
    print(out)      # README's example (pytest -s)
    assert p.returncode == 2, out
    assert "!!  all-reduce" in out and "!!  pairs" in out, out
    assert "node3: all-reduce bus bandwidth under" in out and "(the slow host)" in out, out
    assert "nothing was started" in out and "Traceback" not in out, out
    assert took < 60, f"took {took:.0f} s"
    assert "ok (node[1-2])" in out and "slow: " in out and "(node3)" in out, out   # folded, as clush -b


def test_job_with_deep_preflight_checks_before_it_starts(client):
    from tests.testbed_client import HELLO
    job = client.job(HELLO.format(sleep=0) + "preflight: deep\n")
    rid, p = client.submit(job)
    assert "ok  all-reduce  gloo, node[1-3]:" in p.stderr and "deep preflight: 3 host(s)" in p.stderr, p.stderr
    assert client.wait(rid, timeout=120)["state"] == "SUCCEEDED"
