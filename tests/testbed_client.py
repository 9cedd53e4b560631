"""The `client` fixture's class (conftest.py) and helpers for tests that drive `python -m cluster`
against the cluster in a box, mostly its ssh backend: the CLI in a new process with its own runs/
dir, job files, waits, and what is left of a run on each host, checked over ssh (each host looking
at its own network namespace)."""
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TRAIN = """name: tbtrain
cpu_procs_per_node: 1
train:
  model: train.model:tiny_cnn
  image_size: 32
  num_classes: 10
  data: synthetic-learnable
  synthetic_size: 1600
  batch_size: 16
  lr: 0.2
  warmup_steps: 5
  steps: {steps}
  log_every: {log_every}
  ckpt_every: 10
checkpoint:
  sync_every_s: 5
restart:
  max_failures: 0   # the fault tests resume by hand; tests/test_recovery_testbed.py turns it on
"""
STEPS_LONG = 300     # long enough to outlast a 10 s outage on a busy 2-core machine
HELLO = """name: tbhello
module: tests.fixtures.hello
cpu_procs_per_node: 1
env:
  HELLO_SLEEP_S: '{sleep}'
"""
# every process of the run in this host's network namespace (argv[1]: run id)
PS_RUN = r"""
import os, sys
mine = os.readlink('/proc/self/ns/net')
for p in os.listdir('/proc'):
    if not p.isdigit() or int(p) == os.getpid():
        continue
    try:
        env = open(f'/proc/{p}/environ', 'rb').read().split(b'\0')
        stat = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()
        net = os.readlink(f'/proc/{p}/ns/net')
    except OSError:
        continue
    if stat[0] != 'Z' and net == mine and ('CLUSTER_RUN_ID=' + sys.argv[1]).encode() in env:
        print(p, open(f'/proc/{p}/cmdline', 'rb').read().replace(b'\0', b' ')[:100].decode())
"""


class Client:
    """A user at the submitting machine, aimed at the testbed: `python -m cluster` in a new
    process with a runs/ dir of the test's own, job and inventory files, waits, and what a run
    left on each host."""

    def __init__(self, testbed, tmp_path):
        self.testbed, self.tmp = testbed, tmp_path
        self.runs = tmp_path / "runs"
        self.workdir = {h["name"]: Path(h["workdir"]) for h in testbed.hosts}

    def cli(self, *args, timeout=240, env=None):
        return subprocess.run([sys.executable, "-m", "cluster", *map(str, args)], cwd=REPO, text=True,
                              capture_output=True, timeout=timeout,
                              env=self.testbed.env(CLUSTER_RUNS_DIR=str(self.runs), **(env or {})))

    def job(self, text, name="job.yaml"):
        p = self.tmp / name
        p.write_text(text)
        return p

    def inventory(self, edit=lambda t: t, name="inv.yaml"):
        p = self.tmp / name
        p.write_text(edit(self.testbed.inventory.read_text()))
        return p

    def submit(self, job, *extra, inventory=None):
        p = self.cli("submit", job, "-i", inventory or self.testbed.inventory, *extra)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout.split()[1], p

    def state(self, rid):
        return json.loads(self.cli("status", rid, "--json").stdout)

    def wait(self, rid, states=("SUCCEEDED", "FAILED", "CANCELLED"), timeout=240):
        deadline = time.time() + timeout
        while True:
            st = self.state(rid)
            if st["state"] in states:
                return st
            assert time.time() < deadline, f"{rid} still {st['state']} after {timeout}s"
            time.sleep(2)

    def run_pids(self, host, rid):
        p = self.testbed.run(host, [self.testbed.python, "-c", PS_RUN, rid], timeout=30)
        assert p.returncode == 0, p.stderr
        return p.stdout.splitlines()

    def left_anywhere(self, rid):
        return {h: self.run_pids(h, rid) for h in self.testbed.host_names if self.run_pids(h, rid)}

    def host_file(self, host, rid, rel):
        return self.workdir[host] / "runs" / rid / rel

    def record(self, rid):
        return json.loads((self.runs / rid / "run.json").read_text())

    def wait_lines(self, rid, needle, count, timeout=180):
        deadline = time.time() + timeout
        while True:
            text = "".join(self.host_file(h, rid, f"logs/{h}.log").read_text(errors="replace")
                           for h in self.testbed.host_names if self.host_file(h, rid, f"logs/{h}.log").exists())
            if text.count(needle) >= count:
                return
            assert time.time() < deadline, f"fewer than {count} '{needle}' lines after {timeout}s:\n{text[-3000:]}"
            time.sleep(0.5)


def stop_leftover_runs(client: Client) -> None:
    """Whatever a failed test left running: stop it; then remove what this test's runs left in
    the hosts' workdirs (logs, checkpoints: the hosts' files are this machine's), and the named
    semaphores in /dev/shm of a host whose processes a test killed all at once, its agent too."""
    import shutil
    from cluster.node.shm import remove_left_semaphores
    for d in (client.runs.iterdir() if client.runs.exists() else []):
        rec = d / "run.json"
        if rec.exists() and not json.loads(rec.read_text()).get("final"):
            client.cli("stop", d.name, "--grace-s", "2")
        for h in client.testbed.host_names:
            remove_left_semaphores(str(client.host_file(h, d.name, "state")))
            shutil.rmtree(client.host_file(h, d.name, ""), ignore_errors=True)


def host_lines(client, rid):
    return {h: client.host_file(h, rid, f"logs/{h}.log").read_text().splitlines() for h in client.testbed.host_names}


def assert_merged(merged: list[str], per_host: dict):
    """Every host's lines are in the merged stream, each once, in the host's order."""
    for h, lines in per_host.items():
        mine = [l for l in merged if l.startswith(f"[{h} ")]
        assert mine == lines, f"{h}: merged {len(mine)} lines, the host has {len(lines)}"
    assert len(merged) == sum(len(v) for v in per_host.values())




def pty_cli(args, send: bytes, env: dict, timeout: float = 60):
    """Run ``python -m cluster ARGS`` on a pseudo-terminal as a user would, type ``send``;
    return (exit code, everything the terminal showed)."""
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "cluster", *map(str, args)], cwd=REPO, stdin=slave, stdout=slave,
                         stderr=slave, start_new_session=True, env=env)
    os.close(slave)
    os.write(master, send)
    out, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                data = os.read(master, 4096)
            except OSError:       # EIO: the other side is closed
                break
            if not data:
                break
            out += data
        elif p.poll() is not None:
            break
    os.close(master)
    return p.wait(timeout=10), out.decode(errors="replace")
