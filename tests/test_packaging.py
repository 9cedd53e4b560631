"""What `pip install` gives: the orchestration without torch (a laptop, a login node), torch and
torchvision as the `train` extra, matplotlib as the `report` extra, the `ddp-cluster` command with
the verbs of `python -m cluster`, and requirements.txt (what `make setup` installs) in step."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import VERBS

REPO = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
HEAVY = ("torch", "torchvision", "matplotlib", "tensorboard")


def names(reqs) -> set[str]:
    return {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_torch_is_an_extra_and_requirements_txt_is_everything():
    assert not names(PROJECT["dependencies"]) & set(HEAVY)
    extras = PROJECT["optional-dependencies"]
    assert {"torch", "torchvision"} <= names(extras["train"]) and "matplotlib" in names(extras["report"])
    # make setup installs requirements.txt: the dependencies and every extra, with the same versions,
    # but gpu-decode (CUDA 13 GPU machines only: the hardware JPEG decoders' libraries, DALI)
    listed = [l.strip() for l in (REPO / "requirements.txt").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    wanted = set(PROJECT["dependencies"]) | {r for k, rs in extras.items() if k != "gpu-decode" for r in rs}
    assert set(listed) == wanted
    # submitit's private functions (cluster/backends/slurm.py): an upper bound, and the venv within it
    pin = next(r for r in PROJECT["dependencies"] if r.startswith("submitit"))
    assert "<" in pin
    from importlib.metadata import version
    major, minor = (int(x) for x in version("submitit").split(".")[:2])
    assert (major, minor) == (1, 5), f"submitit {version('submitit')} is outside the tested range ({pin})"


def test_the_orchestration_imports_without_torch_or_matplotlib():
    """Every module of cluster/ imports with torch, torchvision, matplotlib and tensorboard absent."""
    mods = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for p in (REPO / "cluster").rglob("*.py") if p.name != "__main__.py")
    code = ("import importlib, sys\n"
            f"for m in {HEAVY!r}: sys.modules[m] = None\n"
            f"for m in {mods!r}: importlib.import_module(m)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_bash_completion_knows_every_verb_and_its_options():
    script = subprocess.run([sys.executable, "-m", "cluster", "completion", "bash"], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=True).stdout

    def complete(*words):
        line = " ".join(f"'{w}'" for w in words)
        p = subprocess.run(["bash", "-c", f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; '
                                          '_ddp_cluster; printf "%s\\n" "${COMPREPLY[@]}"'],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return p.stdout.split()

    assert complete("ddp-cluster", "") == list(VERBS)
    assert complete("ddp-cluster", "st") == ["status", "stop"]
    assert complete("ddp-cluster", "plan", "--ru") == ["--run-id"]
    assert complete("ddp-cluster", "plan", "res") == []          # not an option: bash completes file names


@pytest.mark.slow
def test_pip_install_gives_ddp_cluster_without_torch(tmp_path):
    """The wheel into a fresh virtual environment (its dependencies from the package index), then
    `ddp-cluster plan` run from another directory; and `pip install -e` of a checkout, where jobs
    are found by name from anywhere (a login node: git clone, pip install -e .)."""
    src = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]

    def run(argv, cwd=tmp_path, ok=True):
        p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
        assert (p.returncode == 0) == ok, f"{argv}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)])
    wheel, = (tmp_path / "dist").glob("ddp_cluster-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py, cmd = str(venv / "bin" / "python"), str(venv / "bin" / "ddp-cluster")
    run(pip + ["--python", py, "install", str(wheel)])
    for heavy in HEAVY:
        assert "ModuleNotFoundError" in run([py, "-c", f"import {heavy}"], ok=False).stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    help_ = run([cmd, "--help"], cwd=elsewhere).stdout
    assert help_.startswith("usage: ddp-cluster") and all(v in help_ for v in VERBS)
    plan = run([cmd, "plan", str(src / "jobs" / "resnet50.yaml"), "-i", str(src / "inventory.yaml"),
                "--run-id", "r1"], cwd=elsewhere).stdout
    assert plan.startswith("# run r1: job resnet50, backend local") and "-m cluster.node.agent" in plan
    # bad input from the installed command: one message, exit 2
    bad = run([cmd, "plan", "no-such-job", "-i", str(src / "inventory.yaml")], cwd=elsewhere, ok=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no-such-job" in bad.stderr

    run(pip + ["--python", py, "install", "--no-deps", "-e", str(src)])
    plan = run([cmd, "plan", "resnet50", "--run-id", "r1"], cwd=elsewhere).stdout
    assert f"cd {src} && " in plan and "backend local" in plan
