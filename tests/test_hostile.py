"""Hostile input: every case of tests/corpus is refused with one clear message, exit code 2,
no traceback, and nothing launched (no run directory, no injected command run).

Most cases run the real CLI in this process (plan, submit --dry-run, submit); a handful run it
as a subprocess to prove the exit code and the absence of a traceback end to end.
"""
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.run import records
from cluster.backends import local as local_backend
from cluster.cli import main

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).parent / "corpus"
CANARY_DIR = Path("/tmp")


def _header(path: Path) -> tuple[str, list[str]]:
    case, expect = "", []
    for line in path.read_bytes().split(b"\n"):
        if not line.startswith(b"# "):
            break
        text = line[2:].decode()
        if text.startswith("case: "):
            case = text[6:]
        elif text.startswith("expect: "):
            expect.append(text[8:])
    return case, expect


def _cases():
    out = []
    for kind in ("inventory", "jobs"):
        for p in sorted((CORPUS / kind).glob("*.yaml")):
            case, expect = _header(p)
            out.append(pytest.param(kind, p, None, expect, id=f"{kind}/{p.stem}"))
    for line in (CORPUS / "overrides.jsonl").read_text(encoding="utf-8").splitlines():
        c = json.loads(line)
        out.append(pytest.param("overrides", c.get("job", "resnet50"), c["args"], c["expect"],
                                id=f"overrides/{c['case']}"))
    return out


CASES = _cases()


def test_corpus_is_large_enough():
    assert len(CASES) >= 50
    for p in CASES:
        assert p.values[3], f"{p.id}: no '# expect:' lines"


@pytest.fixture
def canary():
    path = CANARY_DIR / f"pwned-{secrets.token_hex(4)}"
    yield path
    if path.exists():
        path.unlink()


def _target(kind, source, args, tmp_path, canary):
    """The CLI arguments after the verb, with @CANARY@ made real; and the file errors must name."""
    if kind == "overrides":
        return [source] + [a.replace("@CANARY@", str(canary)) for a in args], None
    f = tmp_path / source.name
    f.write_bytes(source.read_bytes().replace(b"@CANARY@", str(canary).encode()))
    return ([str(f)] if kind == "jobs" else ["resnet50", "-i", str(f)]), f


@pytest.fixture
def no_launch(tmp_path, monkeypatch):
    """Runs go to a fresh directory; a launch that slips through fails the test, not the machine."""
    runs = tmp_path / "runs"
    monkeypatch.setattr(records, "RUNS_DIR", runs)
    launched = []

    def launch(self, plan, run):
        launched.append(plan.run_id)
        raise AssertionError(f"launched {plan.run_id}")
    monkeypatch.setattr(local_backend.LocalBackend, "launch", launch)
    return runs, launched


def _check(err: str, expect, named_file, canary):
    assert err.startswith("error: "), err
    assert "Traceback" not in err, err
    assert err.count("error: ") == 1, err
    assert len(err) < 2000, err[:300]
    # no control character of the input reaches the terminal (escape sequences, bidi overrides)
    assert all(c.isprintable() or c == "\n" for c in err), repr(err)
    if named_file is not None:
        assert err.startswith(f"error: {named_file}"), err
    else:
        assert "command line" in err or "error: JOB" in err or "error: " in err
    for e in expect:
        assert e in err, (e, err)
    assert not canary.exists(), f"{canary} was created"


@pytest.mark.parametrize("kind,source,args,expect", CASES)
def test_hostile_input_refused(kind, source, args, expect, tmp_path, canary, no_launch, capsys):
    runs, launched = no_launch
    target, named = _target(kind, source, args, tmp_path, canary)
    for verb in (["plan"], ["submit", "--dry-run"], ["submit"]):
        code = main(verb + target)
        err = capsys.readouterr().err
        assert code == 2, (verb, err)
        _check(err, expect, named, canary)
    assert not launched and not (runs.exists() and any(runs.iterdir()))


# a few through a real process: the exit code, stderr and the file system as a user sees them
END_TO_END = ["inventory/alias-bomb", "inventory/python-tag", "inventory/hostname-option",
              "jobs/name-traversal", "jobs/env-reserved-run-id", "overrides/newline-value",
              "overrides/nodes-injection"]


@pytest.mark.parametrize("kind,source,args,expect", [p for p in CASES if p.id in END_TO_END])
def test_hostile_input_refused_end_to_end(kind, source, args, expect, tmp_path, canary):
    target, named = _target(kind, source, args, tmp_path, canary)
    runs = tmp_path / "runs"
    env = {**os.environ, "CLUSTER_RUNS_DIR": str(runs), "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "cluster", "submit", *target], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    _check(p.stderr, expect, named, canary)
    assert not runs.exists() or not any(runs.iterdir())


def test_end_to_end_cases_exist():
    assert {p.id for p in CASES} >= set(END_TO_END)
