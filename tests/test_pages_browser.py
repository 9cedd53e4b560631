"""The pages a user opens in a browser, opened in a real headless Chromium: TensorBoard serving two
finished local runs' event files (the second resumed from the first), and the report page of the
resumed run. Each test keeps a screenshot (PAGES_SCREENSHOTS=dir keeps them there too)."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import test_local as local   # its helpers (a module import: pytest would collect its tests again)

pytestmark = pytest.mark.slow

TINY = ["train.model=train.model:tiny_cnn", "train.image_size=32", "train.num_classes=10",
        "train.synthetic_size=1600", "train.batch_size=16", "train.log_every=5", "train.ckpt_every=15",
        "train.data=synthetic-learnable", "train.tensorboard=true"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail("chromium is not installed (make testbed-deps installs it as root)", pytrace=False)
    pytest.skip("chromium is not installed (as root: python -m tests.testbed install-deps)")


def browse(url: str, shot, wait_ms: int = 15000) -> str:
    """The page's DOM once its scripts have run, and a screenshot of it at ``shot``."""
    # no WebGL: TensorBoard then draws its charts as SVG, whose lines are in the DOM (and headless
    # Chromium's software WebGL sometimes leaves a chart empty)
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-3d-apis", "--hide-scrollbars",
            "--window-size=1400,1000", f"--virtual-time-budget={wait_ms}", f"--user-data-dir={shot.parent / 'chrome'}"]
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    p = subprocess.run(base + [f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and shot.stat().st_size > 10_000, p.stderr[-2000:]
    keep = os.environ.get("PAGES_SCREENSHOTS")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(shot, os.path.join(keep, shot.name))
    return dom.stdout


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A finished run of 30 steps and one resumed from it to 45 (both real 2-rank local runs)."""
    runs = tmp_path_factory.mktemp("pages") / "runs"
    first = local.submit(runs, "resnet50", *TINY, "train.steps=30")
    assert local.wait_state(runs, first, {"SUCCEEDED", "FAILED"}, timeout=300)["state"] == "SUCCEEDED"
    second = local.submit(runs, "resnet50", "--resume", first, *TINY, "train.steps=45")
    assert local.wait_state(runs, second, {"SUCCEEDED", "FAILED"}, timeout=300)["state"] == "SUCCEEDED"
    return runs, first, second


def test_tensorboard_serves_the_runs_and_its_page_shows_the_loss_chart(two_runs, tmp_path):
    runs, first, second = two_runs
    for rid in (first, second):
        assert sorted(p.name for p in (runs / rid / "metrics" / "tb").iterdir()) == ["rank0", "rank1"]
    env = {**os.environ, "CLUSTER_RUNS_DIR": str(runs)}
    tb = subprocess.Popen([sys.executable, "-m", "cluster", "tensorboard", first, second, "--port", "0"], cwd=local.REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = tb.stdout.readline()
        assert line.startswith("TensorBoard for ") and "http://127.0.0.1:" in line, line + tb.stderr.read()
        url = line.split()[-4]
        dom = browse(url + "#timeseries", tmp_path / "tensorboard.png")
        # the runs (each rank a line) and the charts train/ writes
        for rid in (first, second):
            assert f"{rid}/rank0" in dom and f"{rid}/rank1" in dom
        # TensorBoard groups the charts by their name's prefix: one group per metric family
        for group in ("loss", "lr", "throughput", "rank", "val"):
            assert f'class="group-title" title="{group}"' in dom, group
        # and the loss chart, the first card, is drawn: its lines are SVG paths through the points
        loss_card = dom[dom.index('title="loss"'):dom.index('title="lr"')]
        assert len(re.findall(r'<path d="M[\d.]+,[\d.]+(?:L[\d.]+,[\d.]+){3,}', loss_card)) >= 2
    finally:
        os.kill(tb.pid, signal.SIGTERM)
        assert tb.wait(30) == 143
    # the server went with it
    deadline = time.time() + 10
    while subprocess.run(["pgrep", "-s", str(tb.pid)], capture_output=True).returncode == 0:
        assert time.time() < deadline, "tensorboard is still running"
        time.sleep(0.2)


def test_report_page_shows_the_ranks_the_time_split_and_the_restart(two_runs, tmp_path):
    runs, first, second = two_runs
    p = local.cli(runs, "report", second)
    assert p.returncode == 0, p.stderr
    assert "resumed at step 30" in p.stdout
    page = runs / second / "report.html"
    assert f"page: {page}" in p.stdout and (runs / second / "report.png").stat().st_size > 10_000
    dom = browse(page.as_uri(), tmp_path / "report.png", wait_ms=2000)
    assert f"Run {second}" in dom and "SUCCEEDED" in dom
    assert "<td>0</td><td>45</td>" in dom and "<td>1</td><td>45</td>" in dom     # rank, steps
    assert "resumed at step 30" in dom and "data:image/png;base64," in dom


def test_top_of_a_finished_local_run_from_a_new_shell(two_runs):
    runs, first, second = two_runs
    p = local.cli(runs, "top", second)        # stdin is not a terminal: one frame
    assert p.returncode == 0, p.stderr
    assert f"run {second}  SUCCEEDED  local, 1 host(s), 2 rank(s)" in p.stdout and "step 45/45" in p.stdout
    rows = [l.split() for l in p.stdout.splitlines() if l.split()[:1] == ["localhost"]]
    assert [r[1] for r in rows] == ["0", "1"] and all(r[2] == "45" and r[-1] == "DONE" for r in rows)
    if not shutil.which("nvidia-smi"):
        assert all(r[7:10] == ["-", "-", "-"] for r in rows)      # no GPU here: GPU %, memory, power
