"""slurm.sbatch values reach the real sbatch exactly as written (the cluster in a box's SLURM).

sbatch's own #SBATCH line parser reads quotes as a shell does, except that a backslash escapes
the next character even inside quotes: a value with \\' and " used to end its quoted option early,
and the rest became options of their own (a second --chdir that won over the backend's). Each case
renders the plan's script, submits it held (--hold), reads the job back with `scontrol show job`
and cancels it: the comment is the value, and the options the backend sets are its own.
"""
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cluster.spec.config import REPO
from cluster.submit import resolve
from tests.test_fuzz import slurm_args

pytestmark = [pytest.mark.testbed]
JOB = str(Path(__file__).parent / "corpus" / "job.yaml")
HOSTILE = ["a\\'\"b #c --chdir=/tmp/elsewhere", "x' --chdir=/tmp \\", "\\", "\\\\n", "it's \"q\" # h",
           "--wrap=id", "a b\\ c", "$HOME `id` $(id) ;x", "é ü ☃ 𝄞", "#SBATCH --output=/tmp/x", "'", '"']


def _job_fields(job_id: str) -> dict:
    """``scontrol show job`` (one field per line where it matters: Comment, WorkDir, StdOut)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    fields = {}
    for line in out.splitlines():
        for key in ("Comment", "WorkDir", "StdOut", "StdErr"):
            if line.startswith(f"   {key}="):
                fields[key] = line[len(key) + 4:].removesuffix(" ")   # scontrol ends the line with a space
        if line.startswith("JobId="):
            fields["JobName"] = line.split("JobName=", 1)[1]
    return fields


@pytest.fixture(scope="module")
def inventory(testbed, tmp_path_factory):
    inv = yaml.safe_load(Path(testbed.inventory).read_text())
    inv["backend"] = "slurm"
    return inv, tmp_path_factory.mktemp("sbatch")


def _submit_held(inventory, value: str) -> dict:
    inv, tmp = inventory
    inv["slurm"]["sbatch"] = {"comment": value, "hold": True}
    path = tmp / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv, allow_unicode=True), encoding="utf-8")
    plan = resolve(JOB, [], str(path), None, run_id="sbatch-quoting")[3]
    script = tmp / "job.sh"
    script.write_text(plan.render(), encoding="utf-8")
    # the fuzz test's model of sbatch's #SBATCH parser reads the line as the real sbatch does below
    (line,) = [l for l in plan.render().splitlines() if l.startswith("#SBATCH --comment=")]
    assert slurm_args(line) == [f"--comment={value}"]
    p = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    job_id = p.stdout.strip().split(";")[0]
    try:
        return {"folder": plan.folder, **_job_fields(job_id), "id": job_id}
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=120)
       .filter(lambda v: v.isprintable() and v == v.strip()))
@example("a\\'\"b #c --chdir=/tmp/elsewhere")
def test_sbatch_reads_back_hostile_values_exactly(inventory, value):
    job = _submit_held(inventory, value)
    assert job["Comment"] == value
    # the backend's own options were not overridden by anything in the value
    assert job["WorkDir"] == str(REPO)
    assert job["StdOut"] == job["StdErr"] == f"{job['folder']}/{job['id']}_batch.log"
    assert job["JobName"] == "sbatch-quoting"


@pytest.mark.parametrize("value", HOSTILE)
def test_sbatch_reads_back_known_escapes(inventory, value):
    job = _submit_held(inventory, value)
    assert job["Comment"] == value and job["WorkDir"] == str(REPO)
