"""The ssh backend without the cluster in a box: folding, quoting, errors, the host-side code run
here for real, the agents' gang on this machine, and the log merger across a dropped link."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.spec.config import Host, SSHSettings, load_inventory, load_job
from cluster.backends.transport import GroupError, GroupResult, Pool, Result, fold, render_folded
from cluster.quoting import quote_argv
from cluster.backends.openssh import ssh_options as ssh_command
from cluster.backends.rsync import remote_path, shell_path
from cluster.node.probe import stale_files

REPO = Path(__file__).resolve().parent.parent
HOSTILE = ["a 0", 'a"=0"', "a'; echo foo", "a\n0", "$(touch /tmp/x)", "`id`", "~user", "*", ""]


def host(name="n1", **kw) -> Host:
    d = dict(name=name, hostname=name, address=name, user=None, port=None, identity_file=None,
             jump_host=None, interface=None, workdir="~/ddp", python="python3", gpus=0, container_runtime=None)
    d.update(kw)
    return Host(**d)


# ---------------------------------------------------------------- folding and errors
def test_fold_groups_identical_output_biggest_first():
    out = {"gpu01": "2.4\n", "gpu02": "2.4\n", "gpu03": "2.3\n", "gpu04": "2.4\n"}
    assert fold(out) == [(["gpu01", "gpu02", "gpu04"], "2.4\n"), (["gpu03"], "2.3\n")]
    text = render_folded(out)
    assert "gpu[01-02,04] (3)\n" in text and "gpu03 (1)\n" in text
    assert text.index("gpu[01-02,04]") < text.index("gpu03")


def test_group_error_names_every_failed_host_with_exit_code_stderr_and_hint():
    res = GroupResult()
    res["n1"] = Result("n1", "true", 0)
    res["n2"] = Result("n2", "ls /nope", 2, stderr="ls: cannot access '/nope'\n")
    res["n3"] = Result("n3", "ls /nope", error="cannot connect to n3: Connection refused")
    with pytest.raises(GroupError) as e:
        res.check("listing")
    text = e.value.render()
    assert "listing failed on 2 of 3 host(s): n[2-3]" in text
    assert "n2: exit code 2: ls /nope" in text and "| ls: cannot access '/nope'" in text
    assert "n3: cannot connect to n3: Connection refused" in text
    assert "hint:" in text and e.value.exit_code == 2
    assert res.succeeded.keys() == {"n1"} and res.unreachable.keys() == {"n3"}


def test_unreachable_host_is_a_result_not_an_exception():
    with socket.socket() as s:      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = Pool([host("dead", hostname="127.0.0.1", port=port)], SSHSettings(connect_timeout_s=2))
    t0 = time.time()
    res = pool.run("true")
    assert time.time() - t0 < 5
    assert not res["dead"].ok and "cannot connect" in res["dead"].error and "refused" in res["dead"].error


def test_a_host_that_did_not_answer_last_time_is_not_waited_for_again():
    """A host cut off the network (here: a port that accepts and never says a word, so each try
    waits out the connect timeout) is waited for in full by a plain call; asked as optional (it
    did not answer the last time, the status probe's case) the call ends with the other hosts,
    and it is not tried again while its last try is still connecting."""
    with socket.socket() as silent, socket.socket() as closed:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        closed.bind(("127.0.0.1", 0))
        pool = Pool([host("cut", hostname="127.0.0.1", port=silent.getsockname()[1]),
                     host("dead", hostname="127.0.0.1", port=closed.getsockname()[1])],
                    SSHSettings(connect_timeout_s=4, config_file=None))
        t0 = time.time()
        res = pool.run("true")
        assert time.time() - t0 >= 3.5 and not res["cut"].ok and "dead" in res     # waited out
        t0 = time.time()
        for _ in range(3):
            res = pool.run("true", optional={"cut"})
            assert "not waited for" in res["cut"].error and "refused" in res["dead"].error, res
        assert time.time() - t0 < 3 * 1.0 + 2.5
        assert sum(t.name == "ssh-optional-cut" for t in threading.enumerate()) == 1


def test_a_host_that_did_not_answer_the_status_probe_is_not_asked_again_in_the_same_pass(tmp_path):
    """Cut off (a port that never says a word): its log comes from the local copy at once, and a
    relaunch's stop that leaves it out names it as not checked; asked, it costs the connect timeout."""
    from cluster.backends.ssh import SSHBackend
    from cluster.run.records import Run
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        (tmp_path / "inv.yaml").write_text(
            f"backend: ssh\nssh: {{connect_timeout_s: 4}}\nhosts:\n  - name: cut\n    hostname: 127.0.0.1\n"
            f"    port: {silent.getsockname()[1]}\n    workdir: {tmp_path / 'wd'}\n")
        be = SSHBackend(load_inventory(tmp_path / "inv.yaml"))
        run = Run("r1", tmp_path / "runs")
        run.create({"plan": {"nodes": [{"host": "cut"}]}})
        (run.dir / "logs").mkdir(parents=True, exist_ok=True)
        (run.dir / "logs" / "cut.log").write_text("[cut 0] collected by the watcher\n")
        be.unanswered = {"cut"}
        t0 = time.time()
        assert be.log_tail(run, "cut", 10) == ["[cut 0] collected by the watcher"]
        assert be.stop_nodes(run, 1.0, skip=frozenset({"cut"})) == [
            "cut: could not check (not asked: it did not answer the last status probe)"]
        assert time.time() - t0 < 2
        be.unanswered = set()
        t0 = time.time()
        assert be.log_tail(run, "cut", 10) == ["[cut 0] collected by the watcher"]    # after trying
        assert time.time() - t0 >= 3.5
        be.close()


def test_a_connection_that_cannot_be_built_is_that_hosts_result(tmp_path):
    """Fabric raises while building a connection for some values (here a port in the host name
    next to a port); that is the host's error, beside the other hosts' results, never a traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = Pool([host("bad", hostname="127.0.0.1:2222", port=22), host("dead", hostname="127.0.0.1", port=port)],
                SSHSettings(connect_timeout_s=2, config_file=None))
    pool.warm(["bad"])            # the background warm-up must not raise in its thread either
    res = pool.run("true")
    assert set(res) == {"bad", "dead"} and not res.succeeded
    assert res["bad"].error.startswith("cannot connect to 127.0.0.1:2222:22: ValueError"), res["bad"].error
    assert "refused" in res["dead"].error


# ---------------------------------------------------------------- one shell hop
@pytest.mark.parametrize("word", HOSTILE)
def test_quote_argv_survives_a_real_shell(word, tmp_path):
    out = subprocess.run(["sh", "-c", quote_argv([sys.executable, "-c", "import sys; print(repr(sys.argv[1]))", word])],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == repr(word)
    assert not Path("/tmp/x").exists() or Path("/tmp/x").stat().st_mtime < time.time() - 60


@pytest.mark.parametrize("wd", ["~/ddp runs", "/srv/a'b", "~", "/opt/x;touch y"])
def test_workdir_paths_for_the_host_shell_and_rsync(wd, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    out = subprocess.run(["sh", "-c", f"printf %s {shell_path(wd)}"], capture_output=True, text=True,
                         env={**os.environ, "HOME": str(home)})
    assert out.stdout == wd.replace("~", str(home), 1)
    rp = remote_path(wd, "runs", "r1")
    assert not rp.startswith("~") and rp.endswith("runs/r1")


def test_rsync_uses_the_inventory_ssh_settings_and_never_prompts():
    h = host(user="ml", port=2222, identity_file="~/.ssh/id_rack", jump_host="bastion:22")
    argv = ssh_command(h, SSHSettings(known_hosts="/etc/kh", connect_timeout_s=7))
    line = " ".join(argv)
    assert "BatchMode=yes" in line and "StrictHostKeyChecking=yes" in line
    assert "UserKnownHostsFile=/etc/kh" in line and "ConnectTimeout=7" in line
    assert ["-p", "2222"] == argv[argv.index("-p"):argv.index("-p") + 2]
    assert ["-l", "ml"] == argv[argv.index("-l"):argv.index("-l") + 2]
    proxy = next(a for a in argv if a.startswith("ProxyCommand="))
    # the jump host with the same key and known_hosts; its user is its own (none given: ssh's), as in Fabric
    assert proxy.endswith(" -i " + os.path.expanduser("~/.ssh/id_rack") + " -o IdentitiesOnly=yes -W '[%h]:%p' -- bastion")
    assert "-p 22 " in proxy and "UserKnownHostsFile=/etc/kh" in proxy and " -l " not in proxy
    chain = " ".join(ssh_command(host(jump_host="a,b"), SSHSettings()))
    assert "-J" not in chain and chain.endswith("-- a' -W '[%h]:%p' -- b")   # a, then b through a
    assert os.path.expanduser("~/.ssh/id_rack") in argv and "IdentitiesOnly=yes" in line
    new = ssh_command(h, SSHSettings(accept_new_host_keys=True))
    assert "StrictHostKeyChecking=accept-new" in " ".join(new)


# ---------------------------------------------------------------- the plan
RACK = """
backend: ssh
defaults: {user: ml, gpus: 8, workdir: /srv/ddp, python: /opt/venv/bin/python}
hosts:
  - name: gpu[01-03]
"""


def test_ssh_plan_carries_the_gang_and_the_local_one_does_not(tmp_path):
    from cluster.backends.ssh import SSHBackend, gang_port
    from cluster.plan import default_port, make_plan
    (tmp_path / "rack.yaml").write_text(RACK)
    inv = load_inventory(tmp_path / "rack.yaml")
    job = load_job("resnet50").job
    plan = SSHBackend(inv).make_plan(job, "r1", {h.name: 8 for h in inv.hosts}, local_runs="/x/runs")
    port = default_port("r1")
    for node in plan.nodes:
        argv = list(node.argv)
        assert argv[argv.index("--gang") + 1] == f"gpu01:{gang_port(port)}"
        assert argv[argv.index("--gang-nodes") + 1] == "3"
        assert node.argv[node.argv.index("--run-dir") + 1] == "runs/r1"     # under the host's workdir
    assert "--gang" not in make_plan(inv, job, "r1", {h.name: 8 for h in inv.hosts}).nodes[0].argv


# ---------------------------------------------------------------- host-side code, run here
def run_host_fn(fn, arg: dict, site=True) -> dict:
    """The exact command line the backend sends, through a real shell, JSON on stdin."""
    from cluster.backends.ship import host_command
    p = subprocess.run(["sh", "-c", host_command(sys.executable, fn, site=site)], input=json.dumps(arg),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_probe_reports_versions_disk_ports_and_stale_files(tmp_path):
    from cluster.node.probe import _probe
    wd = tmp_path / "wd"
    (wd / "a").mkdir(parents=True)
    (wd / "a" / "f.txt").write_text("x")
    st = (wd / "a" / "f.txt").stat()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        r = run_host_fn(_probe, {"workdir": str(wd), "host": "h", "role": "server", "address": "127.0.0.1",
                                 "ports": [busy], "peers": 0, "wait_s": 1,
                                 "manifest": {"a/f.txt": [st.st_size, int(st.st_mtime)], "b.txt": [1, 1]}})
    import torch
    assert r["torch"] == torch.__version__ and r["python"] == sys.version.split()[0]
    assert r["stale"] == 1 and r["free_gb"] > 0 and r["writable"]
    assert r["ports"][str(busy)].startswith("in use") and r["leftovers"] == {}


def test_leftovers_are_processes_of_ended_runs_in_the_workdir(tmp_path):
    from cluster.node.probe import _probe, _stop
    wd = tmp_path / "wd"
    (wd / "runs" / "old-1" / "state").mkdir(parents=True)
    (wd / "runs" / "old-1" / "state" / "h.exit").write_text('{"code": 1}')
    p = subprocess.Popen(["sleep", "60"], cwd=wd, env={**os.environ, "CLUSTER_RUN_ID": "old-1"},
                         start_new_session=True)
    try:
        r = run_host_fn(_probe, {"workdir": str(wd), "host": "h"})
        assert r["leftovers"] == {"old-1": [p.pid]}
        out = run_host_fn(_stop, {"workdir": str(wd), "run_id": "old-1", "pgid": p.pid, "grace_s": 2}, site=False)
        assert out["left"] == []
        assert p.wait(5) == -signal.SIGTERM
    finally:
        p.kill()


def test_stop_kills_what_ignores_term_and_verifies(tmp_path):
    from cluster.node.probe import _stop
    p = subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"],
                         cwd=tmp_path, env={**os.environ, "CLUSTER_RUN_ID": "r9"}, start_new_session=True)
    try:
        time.sleep(0.5)
        t0 = time.time()
        out = run_host_fn(_stop, {"workdir": str(tmp_path), "run_id": "r9", "pgid": p.pid, "grace_s": 1}, site=False)
        assert out["left"] == [] and p.wait(5) == -signal.SIGKILL and time.time() - t0 < 10
    finally:
        p.kill()


def test_status_reads_pid_exit_and_heartbeats(tmp_path):
    from cluster.node.probe import _status
    run = tmp_path / "runs" / "r1"
    (run / "state").mkdir(parents=True)
    (run / "metrics").mkdir()
    (run / "state" / "h.pid").write_text(json.dumps({"pid": os.getpid(), "pgid": os.getpgrp()}))
    (run / "metrics" / "heartbeat-rank3.json").write_text('{"step": 7, "rank": 3, "time": 1}')
    r = run_host_fn(_status, {"workdir": str(tmp_path), "run_dir": "runs/r1", "host": "h"}, site=False)
    assert r["alive"] and r["exit"] is None and r["heartbeats"]["3"]["step"] == 7
    (run / "state" / "h.exit").write_text('{"code": 0, "time": 5}')
    assert run_host_fn(_status, {"workdir": str(tmp_path), "run_dir": "runs/r1", "host": "h"}, site=False)["exit"]["code"] == 0


def test_stale_files_compares_size_and_mtime(tmp_path):
    (tmp_path / "f").write_text("abc")
    st = (tmp_path / "f").stat()
    assert stale_files(str(tmp_path), {"f": [3, int(st.st_mtime)]}) == 0
    assert stale_files(str(tmp_path), {"f": [4, int(st.st_mtime)], "g": [1, 1]}) == 2


# ---------------------------------------------------------------- preflight report (fake answers)
def probe_answer(**kw):
    d = {"hostname": "x", "python": "3.11.7", "torch": "2.4.0", "cuda": "12.4", "nccl": "2.20.5", "gpus": 8,
         "free_gb": 100.0, "writable": True, "stale": 0, "leftovers": {}, "busy": {}}
    d.update(kw)
    return d


def report_for(answers: dict, gpus=8):
    from cluster.backends.ssh import preflight_report
    hosts = [host(n, gpus=gpus) for n in answers]
    res = GroupResult()
    for n, a in answers.items():
        res[n] = a if isinstance(a, Result) else Result(n, "probe", 0, json.dumps(a))
    return preflight_report(None, hosts, res, [29500, 30500])


def test_preflight_all_good_is_folded_into_one_line_per_check():
    lines, problems = report_for({
        "gpu01": probe_answer(ports={"29500": "free", "30500": "free"}),
        "gpu02": probe_answer(reach={"29500": "ok", "30500": "ok"}),
        "gpu03": probe_answer(reach={"29500": "ok", "30500": "ok"})})
    assert problems == []
    text = "\n".join(lines)
    assert "ok  torch       2.4.0 (gpu[01-03])" in text
    assert "reachable from gpu[02-03]" in text and "!!" not in text


def test_preflight_differences_and_failures_are_named():
    lines, problems = report_for({
        "gpu01": probe_answer(ports={"29500": "in use (Address already in use)", "30500": "free"}),
        "gpu02": probe_answer(torch="2.3.1", gpus=4, reach={"29500": "cannot connect to gpu01:29500 (refused)"}),
        "gpu03": Result("gpu03", "probe", error="cannot connect to gpu03: timed out"),
        "gpu04": probe_answer(leftovers={"old-run": [123]}, free_gb=0.2)})
    text = "\n".join(problems)
    assert "gpu03: cannot connect to gpu03: timed out" in text
    assert "torch versions differ: 2.4.0 (gpu[01,04]) | 2.3.1 (gpu02)" in text
    assert "gpu02: 4 GPU(s) found, the inventory says 8" in text
    assert "gpu01: port 29500" in text and "gpu02: cannot connect to gpu01:29500" in text
    assert "earlier run old-run" in text and "gpu04: workdir 0.2 GB free" in text
    assert any(l.startswith("  !!  torch") and "<- differs" in l for l in lines)


def test_another_live_run_on_a_host_shares_its_cpus_but_not_its_gpus():
    ok = {"ports": {"29500": "free", "30500": "free"}}
    lines, problems = report_for({"cpu01": probe_answer(gpus=0, busy={"other-1": "starting"}, **ok)}, gpus=0)
    assert problems == [] and any(l.startswith("  ok  other runs") and "other-1 (starting)" in l for l in lines)
    lines, problems = report_for({"gpu01": probe_answer(busy={"other-1": "running"}, **ok)})
    assert problems == ["gpu01: its 8 GPU(s) are in use by run other-1 (running); a GPU is not shared between "
                        "runs: wait for it to end, or 'python -m cluster stop other-1'"]
    assert not any("leftover" in p or "earlier run" in p for p in problems)


# ---------------------------------------------------------------- the gang, on this machine
def start_agents(tmp_path, payloads, port, *grace):
    procs = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for i, payload in enumerate(payloads):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cluster.node.agent", "--run-dir", str(tmp_path / "run"), "--host", f"h{i}",
             "--node-rank", str(i), "--gang", f"127.0.0.1:{port}", "--gang-nodes", str(len(payloads)),
             *(grace or ("--kill-grace-s", "3")), "--", *payload],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
    return procs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exits(tmp_path, n):
    return [json.loads((tmp_path / "run" / "state" / f"h{i}.exit").read_text()) for i in range(n)]


def test_gang_one_failed_node_stops_all(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = start_agents(tmp_path, [sleeper, ["sh", "-c", "sleep 2; exit 3"], sleeper], free_port())
    t0 = time.time()
    try:
        for p in procs:
            p.wait(30)
        assert time.time() - t0 < 20
        e = exits(tmp_path, 3)
        assert e[1]["code"] == 3 and "gang_abort" not in e[1]
        for i in (0, 2):
            assert e[i]["gang_abort"] == {"origin": "h1", "reason": "h1 failed (exit code 3)"}
            assert e[i]["time"] > e[1]["time"]
        log = (tmp_path / "run" / "logs" / "h0.log").read_text()
        assert "gang: h1 failed (exit code 3); stopping every node" in log
    finally:
        for p in procs:
            p.kill()


def test_gang_survives_a_clean_run_and_a_lost_agent_stops_the_rest(tmp_path):
    procs = start_agents(tmp_path, [["sleep", "1"], ["sleep", "2"]], free_port())
    assert [p.wait(30) for p in procs] == [0, 0]
    assert [e["code"] for e in exits(tmp_path, 2)] == [0, 0]
    run2 = tmp_path / "second"
    run2.mkdir()
    procs = start_agents(run2, [["sleep", "60"], ["sleep", "60"], ["sleep", "60"]], free_port())
    try:
        pid_file = run2 / "run" / "state" / "h2.pid"
        deadline = time.time() + 20
        while not pid_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        os.killpg(procs[2].pid, signal.SIGKILL)     # the whole node: agent and payload
        for p in procs[:2]:
            p.wait(30)
        e = exits(run2, 2)
        assert all(x["gang_abort"]["origin"] == "h2" for x in e)
    finally:
        for p in procs:
            p.kill()


# a rank stuck in a collective: TERM does nothing (here: ignored), only KILL ends it
STUCK = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('stuck', flush=True); time.sleep(60)"]


def wait_started(run_dir, hosts):
    """Each host's payload has printed its first line (the agents are up, the gang formed or forming)."""
    deadline = time.time() + 30
    while not all(f"[{h} agent] stuck\n" in _read(run_dir / "logs" / f"{h}.log") for h in hosts):
        assert time.time() < deadline, [_read(run_dir / "logs" / f"{h}.log") for h in hosts]
        time.sleep(0.1)


def _read(path):
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("how", ["failed", "lost", "stop"])
def test_the_grace_before_kill_depends_on_why_the_node_stops(tmp_path, how):
    """Ranks stuck in a collective (TERM ignored) on h0 and h1. h2's payload fails: the gang's
    abort gives them --kill-grace-s (a node failed: ranks usually end by themselves, printing what
    the diagnosis reads). h2 gone, agent and all (a host lost): the short --lost-grace-s (nothing
    to save: the run restarts from its checkpoint). A stop's TERM to every node: the agents only
    forward it, never KILL on their own; the stop's own grace decides (cluster/node/probe.py)."""
    run = tmp_path / "run"
    h2 = ["sh", "-c", "echo stuck; sleep 2; exit 3"] if how == "failed" else STUCK
    procs = start_agents(tmp_path, [STUCK, STUCK, h2], free_port(), "--kill-grace-s", "4", "--lost-grace-s", "0.5")
    try:
        wait_started(run, ["h0", "h1", "h2"])
        if how == "lost":
            time.sleep(0.5)     # h2 has said HELLO: the gang loses it, rather than never seeing it
            os.killpg(procs[2].pid, signal.SIGKILL)
        elif how == "stop":
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
            time.sleep(3)       # well past the lost grace
            assert [p.poll() for p in procs] == [None] * 3
            assert not any("KILL" in _read(run / "logs" / f"h{i}.log") for i in range(3))
            return
        for p in procs[:2]:
            p.wait(30)
        grace = "4" if how == "failed" else "0.5"
        for i, e in enumerate(exits(tmp_path, 2)):
            assert e["code"] == -9 and e["gang_abort"]["origin"] == "h2", e
            assert f"[h{i} agent] still running {grace} s after TERM; KILL" in _read(run / "logs" / f"h{i}.log")
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


def _gang_run(tmp_path):
    from cluster.run.records import Run
    r = Run("cut-1", tmp_path)
    r.create({"plan": {"nodes": [{"host": "node1"}, {"host": "node2"}, {"host": "node3"}]}})
    return r


def _cut_nodes(reasons: dict):
    """Node statuses as status reads them after a cut: a reason per aborted host, None = unreachable."""
    from cluster.backends.base import NodeStatus
    from cluster.run.records import State
    nodes, aborts = [], {}
    for h, why in reasons.items():
        if why is None:
            nodes.append(NodeStatus(h, State.UNKNOWN, detail="unreachable: timed out"))
        else:
            aborts[h] = {"origin": "?", "reason": why}
            nodes.append(NodeStatus(h, State.CANCELLED, exit_code=-15, detail=f"stopped by the gang: {why}"))
    return nodes, aborts


@pytest.mark.parametrize("reasons, lost", [
    # node 0 cut off, still unreachable: both others lost "node 0"
    ({"node1": None, "node2": "lost node 0 (silent for 15 s)", "node3": "lost node 0 (silent for 15 s)"}, "node1"),
    # node 0 cut off, back by the time status looks: it lost a peer, the peers lost it
    ({"node1": "lost node node2 (silent for 15 s)", "node2": "lost node 0 (silent for 15 s)",
      "node3": "lost node 0 (its agent's connection closed)"}, "node1"),
    # node3 cut off, back: node 0 (and node2, told by node 0) lost node3; node3 lost node 0
    ({"node1": "lost node node3 (silent for 15 s)", "node2": "lost node node3 (silent for 15 s)",
      "node3": "lost node 0 (silent for 15 s)"}, "node3"),
])
def test_the_host_cut_off_is_the_failed_node_node_0_included(tmp_path, reasons, lost):
    from cluster.backends.base import aggregate
    from cluster.backends.ssh import _blame_lost
    from cluster.run.records import State
    run = _gang_run(tmp_path)
    nodes, aborts = _cut_nodes(reasons)
    nodes = _blame_lost(nodes, aborts, run)
    assert [n.host for n in nodes if n.state == State.FAILED] == [lost]
    assert "cut off the network" in next(n.detail for n in nodes if n.host == lost)
    assert aggregate(nodes, run) == State.FAILED


# ---------------------------------------------------------------- logs across a dropped link
class FlakySource:
    """A host's log that is unreachable for a while (as over SSH); bytes come from offsets."""

    def __init__(self, name, data: bytes):
        self.name, self.data, self.down = name, data, False

    def read(self, offset):
        if self.down:
            raise OSError("connection lost")
        return self.data[offset:]


def test_merger_resumes_from_offsets_and_loses_no_line():
    from cluster.run.logs import Merger
    a = FlakySource("n1", b"[n1 0] a1\n[n1 0] a2\n[n1 0] a")
    b = FlakySource("n2", b"[n2 1] b1\n")
    m = Merger([a, b])
    got = m.poll()
    a.data += b"3\n[n1 0] a4\n"
    a.down = True
    got += m.poll()
    b.data += b"[n2 1] b2\n"
    got += m.poll()
    a.down = False
    got += m.poll()
    assert got == ["[n1 0] a1", "[n1 0] a2", "[n2 1] b1", "[n2 1] b2", "[n1 0] a3", "[n1 0] a4"]
