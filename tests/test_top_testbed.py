"""`cluster top` on a 3-host run of the cluster in a box, in a real terminal (tmux), as a user sees it:
a row per rank, the rank slowed by train.debug_sleep_ms highlighted as the straggler, a rank's log
tail on Enter, a clean exit on `q`; after the run, from a new process, its final state."""
import re
import shlex
import subprocess
import sys
import time

import pytest

from tests.testbed_client import REPO, TRAIN

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

SLOW_RANK = 1        # on node2
JOB = TRAIN.format(steps=120, log_every=5).replace(
    "checkpoint:", f"  debug_sleep_ms: 300\n  debug_sleep_rank: {SLOW_RANK}\ncheckpoint:")
# rich's "black on yellow" as tmux renders it: a background colour 43 in the line's escapes
YELLOW_BG = re.compile(r"\x1b\[[0-9;]*\b43[;m]")


class Tmux:
    """A private tmux server (its own socket) with one 160x40 window running ``command``."""

    def __init__(self, tmp_path, env):
        self.argv = ["tmux", "-S", str(tmp_path / "tmux.sock")]
        self.env = env

    def start(self, command: str) -> None:
        subprocess.run(self.argv + ["new-session", "-d", "-s", "top", "-x", "160", "-y", "40", command],
                       check=True, env=self.env, cwd=REPO)

    def screen(self, escapes: bool = False) -> str:
        p = subprocess.run(self.argv + ["capture-pane", "-p", "-t", "top"] + (["-e"] if escapes else []),
                           capture_output=True, text=True)
        return p.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(self.argv + ["send-keys", "-t", "top", *keys], check=True)

    def alive(self) -> bool:
        return subprocess.run(self.argv + ["has-session", "-t", "top"], capture_output=True).returncode == 0

    def wait_for(self, what, timeout: float = 180, escapes: bool = False) -> str:
        deadline = time.time() + timeout
        while True:
            text = self.screen(escapes)
            if what(text):
                return text
            assert time.time() < deadline, f"the screen never showed what was expected:\n{text}"
            time.sleep(1)

    def kill(self) -> None:
        subprocess.run(self.argv + ["kill-server"], capture_output=True)


def rank_line(screen: str, host: str, rank: int) -> str:
    for line in screen.splitlines():
        if re.search(rf"\b{host}\b\s+(\x1b\[[0-9;]*m)*\s*{rank}\b", re.sub(r"\x1b\[[0-9;]*m", "", line)):
            return line
    return ""


def test_top_shows_ranks_and_the_straggler_live_and_the_final_state_after(client, tmp_path):
    rid, _ = client.submit(client.job(JOB))
    tmux = Tmux(tmp_path, client.testbed.env(CLUSTER_RUNS_DIR=str(client.runs)))
    done = tmp_path / "top.exit"
    tmux.start(f"{shlex.quote(sys.executable)} -m cluster top {rid} --interval-s 2; echo $? > {done}")
    try:
        plain = lambda s: re.sub(r"\x1b\[[0-9;]*m", "", s)
        screen = tmux.wait_for(lambda s: "STRAGGLER" in s and all(rank_line(s, f"node{r + 1}", r) for r in range(3)),
                               escapes=True)
        assert f"run {rid}" in plain(screen) and "RUNNING" in plain(screen)
        slow = rank_line(screen, "node2", SLOW_RANK)
        assert "STRAGGLER" in slow and YELLOW_BG.search(slow), slow
        for host, rank in (("node1", 0), ("node3", 2)):
            line = rank_line(screen, host, rank)
            assert "STRAGGLER" not in line and not YELLOW_BG.search(line), line
        # the straggler waits on its data (the sleep); its peers wait for it in the all-reduce
        cells = plain(slow).split()
        assert "img/s in all" in plain(screen) and "ETA" in plain(screen)
        assert cells[0] == "node2" and int(cells[1]) == SLOW_RANK, cells
        # a rank's log tail, and back
        tmux.keys("j", "Enter")
        tail = tmux.wait_for(lambda s: "log of rank 0 on node1" in s, timeout=30)
        assert "[node1 0]" in tail
        tmux.keys("Enter")
        tmux.wait_for(lambda s: "IMG/S" in s, timeout=30)
        tmux.keys("q")
        deadline = time.time() + 20
        while tmux.alive() and time.time() < deadline:
            time.sleep(0.2)
        assert not tmux.alive() and done.read_text().strip() == "0"
    finally:
        tmux.kill()
    st = client.wait(rid, timeout=300)
    assert st["state"] == "SUCCEEDED", st
    # the watcher's last pass brought every host's metrics and TensorBoard files here
    deadline = time.time() + 120
    while client.state(rid)["checkpoints"]["state"] == "syncing":
        assert time.time() < deadline, "the watcher's last pass did not come"
        time.sleep(2)
    metrics = client.runs / rid / "metrics"
    for r in range(3):
        assert (metrics / f"metrics-rank{r}.jsonl").stat().st_size > 0
        assert list((metrics / "tb" / f"rank{r}").glob("events.out.tfevents.*")), r
    # after the run, from a new process: the final state of every rank
    p = client.cli("top", rid, "--once")
    assert p.returncode == 0, p.stderr
    assert "SUCCEEDED" in p.stdout and "120/120" in p.stdout
    for r in range(3):
        line = rank_line(p.stdout, f"node{r + 1}", r)
        assert line and "DONE" in line and " 120 " in line, p.stdout


def test_top_of_a_slurm_run_shows_its_nodes_ranks_and_straggler(testbed, tmp_path):
    from tests.test_slurm_testbed import Slurm
    s = Slurm(testbed, tmp_path)
    rid, _ = s.submit(s.job("top", JOB), "nodes=2")
    try:
        deadline, out = time.time() + 240, ""
        while not ("STRAGGLER" in out and rank_line(out, "node1", 0) and rank_line(out, "node2", 1)):
            assert time.time() < deadline, out
            time.sleep(3)
            p = s.cli("top", rid, "--once")
            assert p.returncode == 0, p.stderr
            out = p.stdout
        assert "RUNNING  slurm, 2 host(s), 2 rank(s)" in out
        assert "STRAGGLER" in rank_line(out, "node2", SLOW_RANK) and "STRAGGLER" not in rank_line(out, "node1", 0)
    finally:
        s.cli("stop", rid, "--grace-s", "2")


def test_top_marks_hung_ranks_red(client):
    # rank 2 is stopped (SIGSTOP); the others block in the all-reduce; 10 s later the run is HUNG
    # (startup_timeout_s too: a rank seen at one step only may still be starting up)
    job = TRAIN.format(steps=2000, log_every=5) + "hang_timeout_s: 10\nstartup_timeout_s: 10\n"
    rid, _ = client.submit(client.job(job))
    client.wait_lines(rid, "step 10/2000", 1)
    pid = next(l.split()[0] for l in client.run_pids("node3", rid) if " -m train " in l)
    assert client.testbed.run("node3", ["kill", "-STOP", pid]).returncode == 0
    try:
        deadline, out = time.time() + 120, ""
        while "HUNG" not in out.split("\n", 1)[0]:
            assert time.time() < deadline, out
            time.sleep(3)
            p = client.cli("top", rid, "--once", env={"FORCE_COLOR": "1"})
            assert p.returncode == 0, p.stderr
            out = p.stdout
        plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
        assert "\nhung: " in plain and "rank 2 (node3)" in plain and "stopped" in plain, plain
        # the others wait for rank 2 in the all-reduce: no heartbeat moves, every rank is hung
        for host, rank in (("node1", 0), ("node2", 1), ("node3", 2)):
            line = rank_line(out, host, rank)
            assert "HUNG" in line and re.search(r"\x1b\[[0-9;]*\b41[;m]", line), line     # white on red
    finally:
        client.testbed.run("node3", ["kill", "-CONT", pid])
        client.cli("stop", rid, "--grace-s", "2")
