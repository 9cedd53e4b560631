"""Quoting, property-based: any text used as an env value, a path or an argument reaches the
remote process byte-exact through every shell hop.

Hypothesis makes the text; it goes into a real job and inventory file (YAML, as a user would
write it), through the real loading and plan (make_plan -> NodeLaunch.shell(), the line the
backends run), and through real shells: `bash -c LINE` (one hop) and
`bash -c "sh -c QUOTED_LINE"` (two hops: ssh hands its command string to the remote user's
shell). The host's `python` is a stand-in that records its argv, environment and working
directory, so no torchrun starts.
"""
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.spec.config import load_inventory, load_job
from cluster.plan import make_plan

RUN_ID = "q-20260101-000000-abcd"
# argv and environment hold no NUL; lone surrogates are not text a file can hold
ANY_TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)
# a directory name: printable (a workdir with control characters is refused by the inventory check)
DIR_NAME = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs", "Cc", "Cf", "Zl", "Zp")),
                   min_size=1, max_size=30).filter(
    lambda s: s not in (".", "..") and s.isprintable() and len(s.encode()) < 200)

RECORDER = """#!{python} -S
import json, os, sys
with open(os.environ["QUOTING_OUT"], "w", encoding="utf-8", errors="surrogateescape") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}, f)
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # the fixed parts are hostile too: a space, quotes and a dollar sign in every path
    root = tmp_path_factory.mktemp("quoting") / "base dir 'q' \"$HOME\""
    (root / "bin ;x").mkdir(parents=True)
    python = root / "bin ;x" / "py'thon"
    python.write_text(RECORDER.format(python=sys.executable))
    python.chmod(0o755)
    return root, python


def _plan_line(root: Path, python: Path, workdir: Path, env_value: str, path_arg: str, positional: str):
    # written with escapes (allow_unicode off): PyYAML's emitter writes a raw NEL (U+0085) into
    # single quotes otherwise, which YAML then reads back as a line break, i.e. a space
    inv = root / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"hosts": [{"name": "localhost", "python": str(python),
                                               "workdir": str(workdir), "gpus": 0}]}),
                   encoding="utf-8")
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "q", "command": ["prog"], "args": [path_arg, positional],
                                   "env": {"QUOTED": env_value}, "cpu_procs_per_node": 1}), encoding="utf-8")
    loaded = load_job(str(job))
    assert loaded.job.env["QUOTED"] == env_value and list(loaded.job.args) == [path_arg, positional]
    plan = make_plan(load_inventory(inv), loaded.job, RUN_ID, {"localhost": 0})
    (node,) = plan.nodes
    assert plan.render().count(node.shell()) == 1       # --dry-run prints exactly this line
    return node


def _run(shell_argv, out: Path):
    if out.exists():
        out.unlink()
    env = {**os.environ, "QUOTING_OUT": str(out)}
    p = subprocess.run(shell_argv, env=env, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    deadline = time.time() + 20           # the line starts the node in the background (&)
    while time.time() < deadline:
        if out.exists() and out.stat().st_size:
            try:
                return json.loads(out.read_text(encoding="utf-8", errors="surrogateescape"))
            except ValueError:
                pass                       # still being written
        time.sleep(0.01)
    raise AssertionError(f"the node never started: {p.stderr!r}")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(env_value=ANY_TEXT, path_arg=ANY_TEXT.map(lambda s: "/data/" + s), positional=ANY_TEXT, dirname=DIR_NAME)
def test_values_reach_the_node_byte_exact(base, env_value, path_arg, positional, dirname):
    root, python = base
    workdir = root / "work" / dirname
    workdir.mkdir(parents=True, exist_ok=True)
    node = _plan_line(root, python, workdir, env_value, path_arg, positional)
    line = node.shell()
    out = root / "out.json"
    hops = {
        "one hop (bash -c)": ["bash", "-c", line],
        "two hops (bash -c 'sh -c ...', as ssh)": ["bash", "-c", "sh -c " + shlex.quote(line)],
    }
    for name, argv in hops.items():
        got = _run(argv, out)
        assert got["argv"] == list(node.argv[1:]), name          # the agent's argv, payload included
        assert got["argv"][-3:] == ["prog", path_arg, positional], name
        assert got["env"]["QUOTED"] == env_value, name
        assert all(got["env"].get(k) == v for k, v in node.env.items()), name
        assert got["cwd"] == str(workdir), name
        assert (workdir / node.agent_log_path).exists(), name    # the redirection went where planned


def test_hostile_fixed_examples(base):
    """The strings submitit's weird_tmp_path uses, and a canary that must never run."""
    root, python = base
    canary = root / "pwned"
    for s in ["a 0", 'a"=0"', "a'; echo foo", "a\n0", f"a'; touch {canary}", "$(touch {c})".format(c=canary),
              "`touch x`", "\\", "'", "-e", "--", "~", "*", "ä\u202e\u200b", "\r\n\t\x1b[2J"]:
        # the workdir too, less what the inventory refuses there (control characters)
        workdir = root / "work" / "".join(c if c.isprintable() else "_" for c in s)
        workdir.mkdir(parents=True, exist_ok=True)
        node = _plan_line(root, python, workdir, s, s, s)
        for argv in (["bash", "-c", node.shell()], ["bash", "-c", "sh -c " + shlex.quote(node.shell())]):
            got = _run(argv, root / "out.json")
            assert got["argv"][-3:] == ["prog", s, s] and got["env"]["QUOTED"] == s
    assert not canary.exists() and not (Path.cwd() / "x").exists()
