"""`~` in an inventory's python and workdir is the remote user's home (the cluster in a box).

README's rack example says `python: ~/venv/bin/python`; it used to plan fine and then fail on
every host with "No such file or directory" ('~' quoted into the command line). Here the python
and the workdir are links in the login user's home on each host, named only through `~/`.
"""
import secrets
from pathlib import Path

import pytest

from tests.sshbed import HELLO

pytestmark = pytest.mark.testbed


@pytest.fixture
def home_links(bed):
    """~/<name>-venv -> the testbed's venv (python finds its venv by the path it was started as, as
    README's ~/venv/bin/python does) and ~/<name>-<host> -> the host's workdir, on each host."""
    name = f".ddp-home-{secrets.token_hex(3)}"
    made = []
    for h in bed.tb.host_names:
        venv = str(Path(bed.tb.python).parent.parent)
        for link, target in ((f"{name}-venv", venv), (f"{name}-{h}", str(bed.workdir[h]))):
            p = bed.tb.run(h, ["sh", "-c", 'ln -sfn "$1" "$HOME/$2"', "sh", target, link], timeout=30)
            assert p.returncode == 0, p.stderr
            made.append((h, link))
    yield name
    for h, link in made:
        bed.tb.run(h, ["sh", "-c", 'rm -f "$HOME/$1"', "sh", link], timeout=30)


def test_tilde_python_and_workdir_are_the_remote_home(bed, home_links):
    def edit(text):
        text = text.replace(f"python: {bed.tb.python}", f"python: ~/{home_links}-venv/bin/{Path(bed.tb.python).name}")
        for h in bed.tb.host_names:
            text = text.replace(f"workdir: {bed.workdir[h]}", f"workdir: ~/{home_links}-{h}")
        return text
    inv = bed.inventory(edit)
    assert f"~/{home_links}-venv/bin/" in inv.read_text() and f"~/{home_links}-node2" in inv.read_text()
    job = bed.job(HELLO.format(sleep=0))
    p = bed.cli("doctor", job, "-i", inv)
    assert p.returncode == 0, p.stdout + p.stderr
    rid, _ = bed.submit(job, inventory=inv)
    st = bed.wait(rid)
    logs = bed.cli("logs", rid).stdout
    assert st["state"] == "SUCCEEDED", logs[-3000:]
    for h in bed.tb.host_names:       # each host ran in its ~/ workdir (the link to its own)
        assert bed.host_file(h, rid, f"logs/{h}.log").exists()
    assert not bed.left_anywhere(rid)
