"""Structure-aware fuzzing of what a user writes: inventories, jobs and override lists, valid and
invalid (nested, unicode, huge numbers, YAML anchors, host ranges, hostile strings), through
`python -m cluster plan` in this process.

For every case: exit code 0 or 2, never a traceback or another exception; a message without
control characters; at most 30 s and 300 MB more memory (guard rails against a blow-up, not
speed goals). For exit code 0: the printed plan is the backend's rendering of the plan, every
shell line passes `sh -n` (the sbatch script `bash -n`), each node's argv and environment
round-trip exactly through the shell's quoting, and every #SBATCH line is one argument as sbatch
reads it.

    make fuzz                      # FUZZ_EXAMPLES=2000 (the normal test run: 40)

A failing case is written to tests/corpus/fuzz/<hash>/ (inventory.yaml, job.yaml,
overrides.json) and replayed by test_fuzz_corpus from then on: keep it in git.
"""
import contextlib
import hashlib
import io
import json
import os
import resource
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.backends import transport
from cluster.backends import slurm as slurm_backend
from cluster.cli import main
from cluster.submit import resolve

CORPUS = Path(__file__).parent / "corpus" / "fuzz"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
TIME_LIMIT_S = 30
MEMORY_LIMIT = 300 * 2**20         # growth of this process's high-water mark during one case

# ---------------------------------------------------------------- values
HOSTILE = ["", " ", "-L", "-oProxyCommand=touch /tmp/pwned", "a b", "a;b", "$(id)", "`id`", "a\nb", "a\rb",
           "\x1b[2J", "\u202e", "\u200b", "~", "~/x y", "~bob/x", "a\\'\"b #c", "#c", "é☃𝄞", "x" * 300, "*",
           "..", "../../etc", "/etc", "gpu1:2222", ":2222", "[", "]", "a[1-3", "%j", "'", '"', "\\", "null",
           "yes", "0x10", "1e26", ".inf", "NaN"]


def sometimes_bad(valid, bad=None):
    """``valid`` nine times in ten, else a hostile value (so that many whole cases stay valid)."""
    bad = bad if bad is not None else st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12), NUMBER)
    return st.integers(0, 9).flatmap(lambda i: bad if i == 9 else valid)   # 0 is what hypothesis tries first


NUMBER = st.one_of(st.integers(-3, 70000), st.integers(-(2**80), 2**80), st.sampled_from([0, 1, 65535, 65536, 2**63]),
                   st.floats(allow_nan=True, allow_infinity=True), st.booleans())
WORD = st.from_regex(r"[a-z][a-z0-9_.-]{0,8}", fullmatch=True)
PATH = st.one_of(st.sampled_from(["~/ddp", "~/my dir/ddp", "/tmp/w d", "/opt/ddp", "work", "~"]),
                 st.builds(lambda w: f"/srv/{w}", WORD))
TEXT = st.one_of(WORD, st.sampled_from(HOSTILE), st.text(max_size=16))
HOSTNAME = st.one_of(
    st.from_regex(r"[a-z]{1,4}[0-9]{0,2}", fullmatch=True), st.just("localhost"),
    st.builds(lambda p, a, b: f"{p}[{a:02d}-{b:02d}]", st.sampled_from(["gpu", "n"]), st.integers(0, 9), st.integers(0, 30)),
    st.builds(lambda p, a, b: f"{p}[1-{a}]-[1-{b}]", st.sampled_from(["r"]), st.integers(1, 3000), st.integers(1, 3000)),
    st.builds(lambda a: f"x[1-{a}]", st.sampled_from([5000, 10000, 10001, 10**9])))


def host_fields(name_required: bool):
    fields = {
        "hostname": sometimes_bad(st.sampled_from(["10.0.0.1", "fe80::1%eth0", "gpu-a.example.com", "alias1"])),
        "address": sometimes_bad(st.sampled_from(["10.0.0.2", "192.168.1.7"])),
        "user": sometimes_bad(st.sampled_from(["ml", "root", "a.b-c"])),
        "port": sometimes_bad(st.integers(1, 65535)),
        "identity_file": sometimes_bad(st.sampled_from(["~/.ssh/id_ed25519", "/keys/k y"])),
        "jump_host": sometimes_bad(st.sampled_from(["ml@bastion:22", "b1,b2"])),
        "interface": sometimes_bad(st.sampled_from(["ens1f0", "^docker,lo", "eth0"])),
        "workdir": sometimes_bad(PATH),
        "python": sometimes_bad(st.sampled_from(["python3", "~/venv/bin/python", "/opt/py thon/bin/python"])),
        "gpus": sometimes_bad(st.one_of(st.integers(0, 8), st.just("auto"))),
        "container_runtime": sometimes_bad(st.sampled_from(["docker", "podman", "apptainer", "enroot"])),
    }
    required = {"name": sometimes_bad(HOSTNAME, st.one_of(TEXT, HOSTNAME))} if name_required else {}
    return st.fixed_dictionaries(required, optional=fields)


SBATCH = st.dictionaries(
    sometimes_bad(st.sampled_from(["comment", "exclusive", "mail_type", "mail-user", "hold", "nice", "gres"]),
                  st.sampled_from(["wrap", "chdir", "output", "bad key", "time"])),
    sometimes_bad(st.one_of(st.text(max_size=30), st.booleans(), st.integers(-5, 100))), max_size=3)
SLURM = st.fixed_dictionaries({"time_min": sometimes_bad(st.integers(1, 600))}, optional={
    "partition": sometimes_bad(WORD), "account": sometimes_bad(WORD), "gpus_per_node": sometimes_bad(st.integers(0, 8)),
    "nodes": sometimes_bad(st.integers(1, 4)), "mem_gb": sometimes_bad(st.integers(0, 512)),
    "signal_delay_s": sometimes_bad(st.integers(0, 120)), "sbatch": SBATCH})
INVENTORY = st.fixed_dictionaries(
    {"hosts": sometimes_bad(st.lists(host_fields(True), min_size=1, max_size=3), st.sampled_from([[], "gpu01", None]))},
    optional={
        "backend": sometimes_bad(st.sampled_from(["ssh", "slurm", "local"])),
        "defaults": host_fields(False),
        "ssh": st.fixed_dictionaries({}, optional={
            "connect_timeout_s": sometimes_bad(st.floats(0.5, 60)), "command_timeout_s": sometimes_bad(st.integers(1, 600)),
            "fanout": sometimes_bad(st.integers(1, 64)), "warm_start": sometimes_bad(st.booleans()),
            "accept_new_host_keys": sometimes_bad(st.booleans())}),
        "slurm": SLURM,
        "shared_fs": sometimes_bad(st.booleans()),
        "storage": sometimes_bad(PATH),
    })
# a login host and a slurm: section, so that SLURM plans are common
SLURM_INVENTORY = st.fixed_dictionaries({"backend": st.just("slurm"), "hosts": st.just([{"name": "login01"}]),
                                         "slurm": SLURM})
TRAIN = st.fixed_dictionaries({}, optional={
    "steps": sometimes_bad(st.integers(0, 1000)), "batch_size": sometimes_bad(st.integers(1, 64)),
    "lr": sometimes_bad(st.floats(1e-5, 1.0)), "data": sometimes_bad(st.sampled_from(["synthetic", "/data/in et", "~/d"])),
    "ckpt_dir": sometimes_bad(st.sampled_from(["ck", "runs/x/ck"])), "model": sometimes_bad(st.sampled_from(["resnet18", "pkg.m:f"])),
    "compile": sometimes_bad(st.sampled_from([True, False, "auto"]))})
PAYLOAD = st.one_of(
    st.fixed_dictionaries({"train": TRAIN}),
    st.fixed_dictionaries({"module": sometimes_bad(st.sampled_from(["tests.fixtures.hello", "pkg.mod"]))}),
    st.fixed_dictionaries({"command": sometimes_bad(st.lists(TEXT, min_size=1, max_size=4))}))
JOB = st.tuples(PAYLOAD, st.fixed_dictionaries({}, optional={
    "name": sometimes_bad(WORD),
    "nodes": sometimes_bad(st.one_of(st.integers(1, 3), st.just("all"))),
    "gpus_per_node": sometimes_bad(st.one_of(st.integers(0, 8), st.just("auto"))),
    "cpu_procs_per_node": sometimes_bad(st.integers(1, 4)),
    "args": sometimes_bad(st.lists(TEXT, max_size=4)),
    "env": sometimes_bad(st.dictionaries(sometimes_bad(st.from_regex(r"[A-Z][A-Z0-9_]{0,6}", fullmatch=True)),
                                         TEXT.filter(lambda t: "\x00" not in t), max_size=3)),
    "container": st.fixed_dictionaries({"image": sometimes_bad(st.sampled_from(["pytorch", "/x.sif", "nvcr.io/nvidia/pytorch:24.05-py3"]))},
                                       optional={"shm_gb": sometimes_bad(st.integers(0, 64)),
                                                 "mounts": sometimes_bad(st.lists(st.sampled_from(["/data", "/a:/b:ro", "/m:/n"]), max_size=2))}),
    "checkpoint": st.fixed_dictionaries({}, optional={"keep": sometimes_bad(st.integers(1, 5)), "every_steps": sometimes_bad(st.integers(0, 100))}),
    "time_limit_min": sometimes_bad(st.integers(1, 600)),
    "rdzv_port": sometimes_bad(st.integers(1024, 65535)),
    "profiles": st.fixed_dictionaries({}, optional={"cpu": st.fixed_dictionaries({"train": TRAIN})}),
})).map(lambda t: {**t[1], **t[0]})
OVERRIDE_KEYS = ["nodes", "train.steps", "steps", "train.lr", "env.FOO", "args", "name", "gpus_per_node",
                 "profiles.cpu.train.steps", "checkpoint.keep", "container.image", "train.stepz", "x..y", "env.A B"]
OVERRIDES = st.lists(st.builds(lambda k, v: f"{k}={v}", sometimes_bad(st.sampled_from(OVERRIDE_KEYS), TEXT),
                               st.one_of(TEXT, NUMBER.map(str))), max_size=3)


@st.composite
def cases(draw):
    """(inventory text, job text, overrides): YAML from the structures, sometimes with an anchor
    (the same object twice), sometimes with a character spliced into the text."""
    inv, job = draw(st.one_of(INVENTORY, SLURM_INVENTORY)), draw(JOB)
    if draw(st.integers(0, 19)) == 19 and isinstance(inv.get("hosts"), list) and inv["hosts"]:
        inv["defaults"] = inv["hosts"][0]                  # safe_dump writes &id001 / *id001
    texts = [yaml.safe_dump(d, allow_unicode=True, sort_keys=False) for d in (inv, job)]
    if draw(st.integers(0, 9)) == 9:
        i, ch = draw(st.integers(0, 1)), draw(st.sampled_from(["\t", ":", "\n  - ", "&a ", "*a", "!!python/name:os.system ", "\x00", "\ufeff"]))
        pos = draw(st.integers(0, len(texts[i])))
        texts[i] = texts[i][:pos] + ch + texts[i][pos:]
    return texts[0], texts[1], draw(OVERRIDES)


# ---------------------------------------------------------------- checks
@pytest.fixture
def offline(monkeypatch):
    """No network and no real SLURM: `gpus: auto` over ssh answers 1, sinfo knows no GPUs."""
    def run(self, commands, hosts=None, **kw):
        names = list(commands) if isinstance(commands, dict) else list(hosts or self.hosts)
        return transport.GroupResult({n: transport.Result(n, "probe", 0, "1\n") for n in names})
    monkeypatch.setattr(transport.Pool, "run", run)
    monkeypatch.setattr(slurm_backend, "_run",
                        lambda argv, **kw: subprocess.CompletedProcess(argv, 0 if argv[0] == "sinfo" else 1, "", ""))


def slurm_args(line: str) -> list[str]:
    """The arguments sbatch's #SBATCH parser reads from one line (SLURM's _get_argument loop: quotes
    group, a backslash escapes the next character even inside quotes, an unquoted '#' ends the line).
    test_sbatch_quoting_testbed.py holds the real sbatch to the same reading."""
    out, i, rest = [], 0, line[len("#SBATCH"):]
    while True:
        while i < len(rest) and rest[i].isspace():
            i += 1
        if i >= len(rest):
            return out
        arg, quote, escaped = "", None, False
        while i < len(rest) and (quote or not rest[i].isspace()):
            c = rest[i]
            i += 1
            if escaped:
                arg, escaped = arg + c, False
            elif c == "\\":
                escaped = True
            elif quote:
                if c == quote:
                    quote = None
                else:
                    arg += c
            elif c in "'\"":
                quote = c
            elif c == "#":
                return out + ([arg] if arg else [])
            else:
                arg += c
        assert quote is None, f"unmatched quote in {line!r}"
        out.append(arg)


def check_plan(job: Path, inv: Path, overrides: list[str], printed: str) -> None:
    _, be, _, plan = resolve(str(job), overrides, str(inv), None, run_id="fuzz")
    assert be.render(plan) == printed
    if plan.backend == "slurm":
        script = plan.render()
        p = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr + script
        for line in script.splitlines():
            if line.startswith("#SBATCH"):
                assert len(slurm_args(line)) == 1, line
            if line.startswith("export "):
                k, _, v = shlex.split(line)[1].partition("=")
                assert plan.nodes[0].env.get(k, v) == v or k in ("MASTER_ADDR", "MASTER_PORT"), line
        return
    lines = [n.shell() for n in plan.nodes]
    p = subprocess.run(["sh", "-n"], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr + "\n".join(lines)
    for node, line in zip(plan.nodes, lines):
        # the words the shell reads (before ~ expansion) are exactly the plan's directory, env and argv
        cd = (["--"] if node.workdir.startswith("-") else []) + [node.workdir]
        env = [f"{k}={v}" for k, v in sorted(node.env.items())]
        assert shlex.split(line) == ["cd", *cd, "&&", "mkdir", "-p", node.state_dir, "&&", "env", *env, "setsid",
                                     *node.argv, "</dev/null", ">" + node.agent_log_path, "2>&1", "&"], line


def run_case(inv_text: str, job_text: str, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        inv, job = Path(d, "inventory.yaml"), Path(d, "job.yaml")
        inv.write_text(inv_text, encoding="utf-8")
        job.write_text(job_text, encoding="utf-8")
        out, err = io.StringIO(), io.StringIO()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(["plan", str(job), *overrides, "-i", str(inv), "--run-id", "fuzz"])
            except SystemExit as e:          # argparse's own errors
                code = e.code
        took = time.monotonic() - t0
        text = err.getvalue()
        assert code in (0, 2), (code, text)
        assert "Traceback" not in text
        # guard rails against a blow-up (a plan of 10,000 hosts takes about a second)
        assert took < TIME_LIMIT_S, took
        assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024 < MEMORY_LIMIT
        assert all(c.isprintable() or c == "\n" for c in text), repr(text)
        if code == 2:
            assert text.startswith(("error: ", "usage: ")) and len(text) < 5000, text[:500]
        else:
            check_plan(job, inv, overrides, out.getvalue())


_failed: list = []


@pytest.fixture
def keep_failure():
    """The last failing case of a run is hypothesis' shrunk one: it goes to the corpus."""
    _failed.clear()
    yield
    if _failed:
        inv_text, job_text, overrides = _failed[-1]
        key = hashlib.sha1(json.dumps(_failed[-1]).encode()).hexdigest()[:12]
        d = CORPUS / key
        d.mkdir(parents=True, exist_ok=True)
        (d / "inventory.yaml").write_text(inv_text, encoding="utf-8")
        (d / "job.yaml").write_text(job_text, encoding="utf-8")
        (d / "overrides.json").write_text(json.dumps(overrides) + "\n", encoding="utf-8")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("FUZZ_EXAMPLES"),
          suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_fuzz_plan(case, offline, keep_failure):
    try:
        run_case(*case)
    except BaseException:
        _failed.append(case)
        raise


def test_fuzz_corpus(offline):
    """Every case the fuzzer ever found, replayed."""
    for d in sorted(p for p in CORPUS.iterdir() if p.is_dir()) if CORPUS.exists() else []:
        overrides = json.loads((d / "overrides.json").read_text(encoding="utf-8"))
        try:
            run_case((d / "inventory.yaml").read_text(encoding="utf-8"), (d / "job.yaml").read_text(encoding="utf-8"),
                     overrides)
        except AssertionError as e:
            raise AssertionError(f"corpus case {d.name}: {e}") from None
