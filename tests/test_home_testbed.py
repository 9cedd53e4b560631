"""`~` in an inventory's python and workdir is the remote user's home (the cluster in a box).

README's rack example says `python: ~/venv/bin/python`; it used to plan fine and then fail on
every host with "No such file or directory" ('~' quoted into the command line). Here the python
and the workdir are links in the login user's home on each host, named only through `~/`.
"""
import secrets
from pathlib import Path

import pytest

from tests.testbed_client import HELLO

pytestmark = pytest.mark.testbed


@pytest.fixture
def home_links(client):
    """~/<name>-venv -> the testbed's venv (python finds its venv by the path it was started as, as
    README's ~/venv/bin/python does) and ~/<name>-<host> -> the host's workdir, on each host."""
    name = f".ddp-home-{secrets.token_hex(3)}"
    made = []
    for h in client.testbed.host_names:
        venv = str(Path(client.testbed.python).parent.parent)
        for link, target in ((f"{name}-venv", venv), (f"{name}-{h}", str(client.workdir[h]))):
            p = client.testbed.run(h, ["sh", "-c", 'ln -sfn "$1" "$HOME/$2"', "sh", target, link], timeout=30)
            assert p.returncode == 0, p.stderr
            made.append((h, link))
    yield name
    for h, link in made:
        client.testbed.run(h, ["sh", "-c", 'rm -f "$HOME/$1"', "sh", link], timeout=30)


# warm: the agent is started by the probe, without a shell, and forks torchrun; cold: by the node's
# shell line
@pytest.mark.parametrize("warm", ["true", "false"])
def test_tilde_python_and_workdir_are_the_remote_home(client, home_links, warm):
    def edit(text):
        text = text.replace(f"python: {client.testbed.python}", f"python: ~/{home_links}-venv/bin/{Path(client.testbed.python).name}")
        for h in client.testbed.host_names:
            text = text.replace(f"workdir: {client.workdir[h]}", f"workdir: ~/{home_links}-{h}")
        return text.replace("\nssh:\n", f"\nssh:\n  warm_start: {warm}\n")
    inv = client.inventory(edit)
    assert f"warm_start: {warm}" in inv.read_text()
    assert f"~/{home_links}-venv/bin/" in inv.read_text() and f"~/{home_links}-node2" in inv.read_text()
    job = client.job(HELLO.format(sleep=0))
    p = client.cli("doctor", job, "-i", inv)
    assert p.returncode == 0, p.stdout + p.stderr
    # a warm start needs the code in place already: the first run syncs it, the second starts warm
    for attempt in range(2 if warm == "true" else 1):
        rid, _ = client.submit(job, inventory=inv)
        st = client.wait(rid)
        logs = client.cli("logs", rid).stdout
        assert st["state"] == "SUCCEEDED", logs[-3000:]
        for h in client.testbed.host_names:       # each host ran in its ~/ workdir (the link to its own)
            assert client.host_file(h, rid, f"logs/{h}.log").exists()
        assert not client.left_anywhere(rid)
    assert logs.count("torchrun from a warm interpreter") == (3 if warm == "true" else 0), logs[-3000:]
