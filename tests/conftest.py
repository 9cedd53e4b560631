"""Shared pytest configuration. Add your fixtures in their own clearly marked section."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

# a suite started in the background (`make test &` in a script) has SIGINT ignored, and so would
# every process it starts: the tests that press Ctrl-C (jupyter, shell, logs -f) would wait forever.
# A handler of our own is reset to the default in the processes we start.
signal.signal(signal.SIGINT, signal.default_int_handler)

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# =============================================================================================
# Cluster in a box (tests/testbed): the `testbed` marker and the session-scoped `testbed` fixture
#
#   @pytest.mark.testbed
#   def test_x(testbed):
#       testbed.run("node1", ["hostname"])        # ssh -F .testbed/ssh_config node1 -- hostname
#       testbed.inventory                         # Path of .testbed/inventory.yaml
#
# The fixture brings 3 hosts up once per session (or reuses a healthy testbed that is already
# up, e.g. from `make testbed-up`, and then leaves it up) and tears its own down at the end,
# also on failure, Ctrl-C (KeyboardInterrupt), SIGTERM and interpreter exit. For the session it
# puts the testbed's bin dir (the `sacct` stand-in) first on os.environ["PATH"], so submitit
# and the slurm backend, run from this process or its children, get job states.
# Where the testbed cannot run (not root, not Linux, no `ip netns`, packages missing) it skips
# with the reason -- except in CI (CI=true), where that is a failure.
# =============================================================================================

TESTBED_NODES = 3


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "testbed: needs the cluster in a box (root, network namespaces, sshd, SLURM)")
    config.addinivalue_line(
        "markers", "testbed_last: run after every other test (it takes the testbed down and up)")


def pytest_collection_modifyitems(config, items):
    # Tests that cycle the shared testbed (down, check, up) go last so nothing else waits on them.
    last = [it for it in items if it.get_closest_marker("testbed_last")]
    if last:
        items[:] = [it for it in items if not it.get_closest_marker("testbed_last")] + last


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


class Testbed:
    """What the `testbed` fixture yields. Attributes follow .testbed/state.json (refresh() after
    the testbed was brought down and up again)."""

    def __init__(self, root: Path = REPO_ROOT):
        self.root = Path(root)
        self.refresh()

    def refresh(self) -> None:
        from tests.testbed import load_state

        st = load_state(self.root)
        if not st:
            raise RuntimeError("the testbed is not up (no .testbed/state.json)")
        self.state = st
        self.state_dir = Path(st["state_dir"])
        self.inventory = Path(st["inventory"])            # .testbed/inventory.yaml
        self.ssh_config = Path(st["ssh_config"])          # .testbed/ssh_config
        self.bin_dir = Path(st["bin_dir"])                # holds the sacct stand-in
        self.hosts = list(st["hosts"])                    # [{name, hostname, address, workdir}]
        self.host_names = [h["name"] for h in self.hosts]
        self.partition = st["partition"]
        self.python = st["python"]

    def env(self, **extra) -> dict:
        """os.environ with the sacct stand-in first on PATH (for subprocesses)."""
        env = dict(os.environ)
        parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != str(self.bin_dir)]
        env["PATH"] = os.pathsep.join([str(self.bin_dir)] + parts)
        env.update(extra)
        return env

    def ssh_argv(self, host: str, argv) -> list[str]:
        import shlex

        return ["ssh", "-F", str(self.ssh_config), host, "--", " ".join(shlex.quote(str(a)) for a in argv)]

    def run(self, host: str, argv, timeout: float = 60, check: bool = False, **kw):
        """Run argv on a host over plain ssh (one shell boundary, shlex-quoted)."""
        import subprocess

        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.ssh_argv(host, argv), timeout=timeout, check=check, **kw)

    def local(self, argv, timeout: float = 60, check: bool = False, **kw):
        """Run argv on the submitting machine (root namespace) with the testbed's PATH."""
        import subprocess

        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("env", self.env())
        return subprocess.run([str(a) for a in argv], timeout=timeout, check=check, **kw)


@pytest.fixture(scope="session")
def testbed():
    import atexit
    import signal

    from tests.testbed import TestbedUnavailable, down, health, leftovers, load_state, unavailable_reason, up

    reason = unavailable_reason()
    if reason:
        if _in_ci():
            pytest.fail(f"cluster in a box unavailable in CI: {reason}", pytrace=False)
        pytest.skip(f"cluster in a box unavailable: {reason}")

    healthy, _ = health(REPO_ROOT)
    st = load_state(REPO_ROOT) if healthy else None
    owned = not (st and st.get("nodes", 0) >= TESTBED_NODES)
    done = {"down": False}

    def teardown():
        if owned and not done["down"]:
            done["down"] = True
            down(REPO_ROOT, quiet=True)

    old_term = None
    if owned:
        # Ctrl-C arrives as KeyboardInterrupt (pytest then runs this fixture's finally);
        # SIGTERM is turned into one too; atexit covers an interpreter exit without teardown.
        atexit.register(teardown)
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            def _on_term(signum, frame):
                raise KeyboardInterrupt("SIGTERM")
            old_term = signal.signal(signal.SIGTERM, _on_term)
        try:
            up(TESTBED_NODES, root=REPO_ROOT, quiet=True)
        except KeyboardInterrupt:
            teardown()
            raise
        except BaseException as e:
            teardown()
            if isinstance(e, TestbedUnavailable) and not _in_ci():
                pytest.skip(f"cluster in a box unavailable: {e}")
            pytest.fail(f"cluster in a box did not come up: {e}", pytrace=False)

    running = Testbed(REPO_ROOT)
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = running.env()["PATH"]
    try:
        yield running
    finally:
        os.environ["PATH"] = old_path
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if owned:
            teardown()
            left = leftovers(REPO_ROOT)
            if left:
                pytest.fail("testbed down left things behind:\n  " + "\n  ".join(left), pytrace=False)


# =============================================================================================
# `client` (tests/testbed_client.py): a user at the submitting machine, aimed at the testbed --
# `python -m cluster` with a runs/ dir of the test's own, helpers to submit, wait and look at
# what is left on the hosts; runs a test left running are stopped afterwards.
# =============================================================================================
@pytest.fixture
def client(testbed, tmp_path):
    from tests.testbed_client import Client, stop_leftover_runs

    c = Client(testbed, tmp_path)
    yield c
    stop_leftover_runs(c)


@pytest.fixture(scope="session")
def small_image():
    """tests/test_image_build.py's small training image, built once per session (podman's layer
    cache makes a rebuild of unchanged inputs take seconds): ``ddp-train-small:torch<v>-cpu-<commit>``."""
    import subprocess
    import time

    from tests.test_container_podman import _podman_problem, podman_args
    problem = _podman_problem() or (None if os.path.exists("/usr/sbin/debootstrap") or
                                    subprocess.run(["podman", "image", "exists", "localhost/ddp-base:bookworm"]
                                                   ).returncode == 0 else "debootstrap is not installed")
    if problem:
        pytest.fail(problem) if _in_ci() else pytest.skip(problem)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "image/build.py", "--small",
                        *[f"--build-opt={a}={b}" for a, b in zip(podman_args()[::2], podman_args()[1::2])]],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    tag = p.stdout.strip().splitlines()[-1]
    print(f"small image {tag} built in {time.monotonic() - t0:.0f} s")
    # one tag per commit would pile up: keep this one (and the base), the cache for the next run
    old = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", "localhost/ddp-train-small"],
                         capture_output=True, text=True).stdout.split()
    for t in old:
        if t != tag and t != f"localhost/{tag}":
            subprocess.run(["podman", "rmi", t], capture_output=True)
    return tag, p.stderr
