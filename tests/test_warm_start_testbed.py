"""The plan is exact with warm start on (the default), on the cluster in a box: what `plan` prints
for each node is what runs there. The agent a preflight probe parks runs as the node's '# parked:'
line, byte for byte, in the line's directory and with its environment; its torchrun runs as the
payload after '--' (with the log directory the agent gives it, cold or warm). Read from
/proc/<pid>/cmdline on each host, over ssh, during a short CPU run."""
import json
import shlex
from pathlib import Path

import pytest

from tests.testbed_client import HELLO

pytestmark = pytest.mark.testbed

# argv, working directory and environment of every process of the run in this host's network
# namespace (argv[1]: run id), as JSON
PROCS = r"""
import json, os, sys
mine = os.readlink('/proc/self/ns/net')
out = {}
for p in os.listdir('/proc'):
    if not p.isdigit() or int(p) == os.getpid():
        continue
    try:
        env = open(f'/proc/{p}/environ', 'rb').read().split(b'\0')
        if os.readlink(f'/proc/{p}/ns/net') != mine or ('CLUSTER_RUN_ID=' + sys.argv[1]).encode() not in env:
            continue
        argv = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\0')
        out[p] = {"argv": [a.decode() for a in argv], "cwd": os.readlink(f'/proc/{p}/cwd'),
                  "env": [e.decode(errors='replace') for e in env if e]}
    except OSError:
        continue
print(json.dumps(out))
"""


def host_procs(client, host, rid):
    p = client.testbed.run(host, [client.testbed.python, "-c", PROCS, rid], timeout=30)
    assert p.returncode == 0, p.stderr
    procs = json.loads(p.stdout)
    for info in procs.values():
        # a retitled process (torchrun, forked warm) has its area cleared with NULs after its argv
        while info["argv"] and info["argv"][-1] == "":
            info["argv"].pop()
    return procs


def planned(text: str) -> dict:
    """host -> (the shell line's words, the '# parked:' argv) from `plan`'s output."""
    out, host = {}, None
    for line in text.splitlines():
        if line.startswith("["):
            host = line[1:line.index("]")]
        elif host and line.startswith("  # parked: "):
            out[host] = (out[host][0], shlex.split(line[len("  # parked: "):]))
        elif host and line.startswith("  "):
            out[host] = (shlex.split(line.rstrip(" &")), None)
    return out


def test_plan_prints_the_argv_of_the_parked_agent_and_of_its_torchrun(client):
    job = client.job(HELLO.format(sleep=15))
    for _ in range(2):      # warm start needs the code in place: a first submit syncs it where it differs
        rid, p = client.submit(job)
        if "warm start: the agents on node[1-3]" in p.stderr:
            break
        client.wait(rid)
    else:
        pytest.fail("no warm start on the second submit either:\n" + p.stderr)
    shown = client.cli("plan", job, "-i", client.testbed.inventory, "--run-id", rid)
    assert shown.returncode == 0, shown.stderr
    plan = planned(shown.stdout)
    assert set(plan) == set(client.testbed.host_names) and all(parked for _, parked in plan.values()), shown.stdout
    # the plan printed now is the one the run recorded (a pure function of job, inventory and run id)
    assert [n["argv"] for n in client.record(rid)["plan"]["nodes"]] == \
        [parked[:3] + parked[5:] for _, parked in plan.values()]
    client.wait_lines(rid, "hello from rank", 3)         # torchrun runs on every host (after 'go')
    for host, (line, parked) in plan.items():
        procs = host_procs(client, host, rid)
        agents = [i for i in procs.values() if i["argv"][1:3] == ["-m", "cluster.node.agent"]]
        assert [i["argv"] for i in agents] == [parked], (host, procs)          # byte for byte
        # started in the line's directory (cd WORKDIR && ...): the run directory it names from there
        # is where the agent and torchrun work
        workdir = Path(line[1])
        assert agents[0]["cwd"] == str(workdir.resolve() / "runs" / rid)
        env = line[line.index("env") + 1:line.index("setsid")]                  # env K=V ... setsid
        assert set(env) <= set(agents[0]["env"]), (env, agents[0]["env"])
        payload = parked[parked.index("--") + 1:]
        torchruns = [i for i in procs.values() if i["argv"][1:3] == ["-m", "torch.distributed.run"]]
        assert [i["argv"] for i in torchruns] == [payload], (host, torchruns)     # its --log-dir included
        assert torchruns[0]["cwd"] == agents[0]["cwd"] and set(env) <= set(torchruns[0]["env"])
    assert client.wait(rid)["state"] == "SUCCEEDED"
    assert "torchrun from a warm interpreter" in client.cli("logs", rid).stdout
    assert not client.left_anywhere(rid)
