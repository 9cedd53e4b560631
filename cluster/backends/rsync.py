"""rsync between this machine and the hosts: the code, checkpoints and logs of a run.

* Code: the project's files (git's tracked files plus untracked ones that .gitignore does not
  exclude, so a file just written runs too) go to each host's workdir; a host whose copy already
  matches (same size and mtime for every file, checked inside the preflight probe) is skipped.
* Checkpoints: node 0's runs/<id>/checkpoints/ is pulled into the storage directory (default
  runs/<id>/checkpoints here) every ``checkpoint.sync_every_s`` by a detached watcher process
  (``python -m cluster.backends.rsync watch RUN``), and once more when the run ends. The host side runs at
  ``nice 19``; files arrive by rsync's temp file + rename (never ``--inplace``), and ``latest``
  is replaced only once the checkpoint it names is here. A job's own ``checkpoint.path`` (a file or
  directory of its run directory, e.g. a script's ``snapshot.pt``) is pulled into the storage too;
  ``submit --resume`` puts what it kept back into the new run's directory on node 0, or on every
  node (``checkpoint.every_node``), before the start (:func:`push_run_files`).
* Logs: ``cluster logs --collect`` pulls every host's runs/<id>/logs/ (also done by the watcher
  when the run ends).
* Metrics: every host's runs/<id>/metrics/ (the ranks' records, heartbeats and TensorBoard event
  files) comes with each checkpoint pass of the watcher and at the end, for ``report`` and
  ``tensorboard``.

rsync talks to the hosts through OpenSSH with the inventory's settings (user, port, key, jump
host, known_hosts, accept-new, timeouts, BatchMode: never a prompt): cluster/backends/openssh.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from cluster.spec.config import REPO, Host, SSHSettings
from cluster.backends.openssh import rsync_rsh, ssh_options as ssh_command  # noqa: F401 (stage.py and bench use this name)
from cluster.errors import UserError

RSYNC_TIMEOUT_S = 600
GIVE_UP_S = float(os.environ.get("CLUSTER_WATCH_GIVE_UP_S", "1800"))   # no host answering this long


@dataclass
class SyncResult:
    host: str
    ok: bool
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    skipped: bool = False

    def describe(self) -> str:
        if not self.ok:
            return f"{self.host}: {self.error}"
        if self.skipped:
            return f"{self.host}: up to date"
        return f"{self.host}: {self.files} file(s), {_size(self.bytes)} in {self.seconds:.1f} s"


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


# ---------------------------------------------------------------- what to send
def project_files(repo: Path = REPO) -> list[str]:
    """Tracked and untracked-but-not-ignored files that exist (relative paths)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        raise UserError(f"cannot list the project's files with git in {repo}",
                        hint="run from a git checkout, or declare 'shared_fs: true' when the hosts see this directory") from None
    files = sorted({f for f in out.decode(errors="surrogateescape").split("\0") if f})
    return [f for f in files if (repo / f).is_file() and not f.startswith("runs/")]


def manifest(files: Sequence[str], repo: Path = REPO) -> dict[str, list[int]]:
    """path -> [size, mtime in whole seconds]: what the hosts compare their copy with."""
    out = {}
    for f in files:
        try:
            st = (repo / f).stat()
        except OSError:
            continue
        out[f] = [st.st_size, int(st.st_mtime)]
    return out


def stale_files(workdir: str, expected: dict) -> int:
    """On a host (standard library only): how many files differ from ``expected``."""
    base = os.path.expanduser(workdir)
    stale = 0
    for rel, (size, mtime) in expected.items():
        try:
            st = os.stat(os.path.join(base, rel))
        except OSError:
            stale += 1
            continue
        if st.st_size != size or int(st.st_mtime) != mtime:
            stale += 1
    return stale


# ---------------------------------------------------------------- rsync over OpenSSH
def remote_path(workdir: str, *parts: str) -> str:
    """A path on the host as rsync (with --protect-args) takes it: '~/x' becomes 'x' (home-relative)."""
    wd = workdir
    if wd == "~":
        wd = "."
    elif wd.startswith("~/"):
        wd = wd[2:] or "."
    return "/".join([wd.rstrip("/") or "/"] + [p.strip("/") for p in parts if p])


def shell_path(path: str) -> str:
    """A path for a POSIX shell on the host, ~ expanded there and everything else quoted."""
    from cluster.backends.transport import shell_word
    return shell_word(path, home=True)


def rsync(host: Host, ssh: SSHSettings, src: str, dst: str, *, push: bool, extra: Sequence[str] = (),
          files_from: Optional[Iterable[str]] = None, mkdir: Optional[str] = None,
          nice: bool = False, timeout_s: float = RSYNC_TIMEOUT_S) -> SyncResult:
    """One rsync between here and ``host``; ``src``/``dst`` are local or host paths per ``push``."""
    target = f"{host.hostname}:"
    argv = ["rsync", "--protect-args", "-rlt", "--stats", "--timeout", str(int(ssh.command_timeout_s)),
            "-e", rsync_rsh(host, ssh)]
    rpath = "rsync"
    if nice:
        rpath = "nice -n 19 rsync"     # checkpoint copies must not slow training down
    if mkdir:
        rpath = f"mkdir -p {shell_path(mkdir)} && {rpath}"
    if rpath != "rsync":
        argv += ["--rsync-path", rpath]
    argv += list(extra)
    data = None
    if files_from is not None:
        argv += ["--files-from=-", "--from0"]
        data = "\0".join(files_from).encode(errors="surrogateescape")
    argv += [src, target + dst] if push else [target + src, dst]
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, input=data, capture_output=True, timeout=timeout_s,
                           stdin=None if data is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return SyncResult(host.name, False, seconds=time.monotonic() - t0, error=f"rsync timed out after {timeout_s:g} s")
    except FileNotFoundError:
        return SyncResult(host.name, False, error="rsync is not installed on this machine")
    out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    secs = time.monotonic() - t0
    if p.returncode != 0:
        lines = [l for l in err.splitlines() if l.strip() and not l.startswith("rsync error: some files")]
        return SyncResult(host.name, False, seconds=secs,
                          error=f"rsync exit code {p.returncode}: " + " | ".join(lines[-3:]))
    files = _stat(out, r"Number of regular files transferred: ([\d,.]+)")
    size = _stat(out, r"Total transferred file size: ([\d,.]+)")
    return SyncResult(host.name, True, files, size, secs)


def _stat(text: str, rx: str) -> int:
    m = re.search(rx, text)
    return int(re.sub(r"[,.]", "", m.group(1))) if m else 0


def parallel(fn, items: Sequence, width: int) -> list:
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=max(1, min(width, len(items))), thread_name_prefix="rsync") as ex:
        return list(ex.map(fn, items))


# ---------------------------------------------------------------- the three syncs
def push_code(hosts: Sequence[Host], ssh: SSHSettings, files: Sequence[str], progress=None,
              repo: Path = REPO) -> list[SyncResult]:
    """The project's files to every host's workdir, in parallel (``ssh.fanout`` at a time)."""
    def one(h: Host) -> SyncResult:
        r = rsync(h, ssh, str(repo) + "/", remote_path(h.workdir) + "/", push=True, files_from=files,
                  mkdir=h.workdir)
        if progress:
            progress(f"sync: {r.describe()}")
        return r
    return parallel(one, list(hosts), ssh.fanout)


def pull_checkpoints(host: Host, ssh: SSHSettings, run_id: str, dest: Path,
                     path: Optional[str] = None) -> SyncResult:
    """Node 0's checkpoints into ``dest``: files first, then ``latest`` once what it names is here;
    then the job's own ``checkpoint.path`` (a file or directory of its run directory) into ``dest/path``."""
    dest.mkdir(parents=True, exist_ok=True)
    src = remote_path(host.workdir, "runs", run_id, "checkpoints")
    marker = dest / ".latest.incoming"
    first = rsync(host, ssh, src + "/latest", str(marker), push=False, nice=True,
                  extra=["--ignore-missing-args"])
    if not first.ok:
        return first
    r = rsync(host, ssh, src + "/", str(dest) + "/", push=False, nice=True,
              extra=["--exclude", ".*", "--exclude", "latest"] +
                    (["--exclude", "/" + path.strip("/").split("/")[0]] if path else []))
    if r.ok and marker.exists():
        name = marker.read_text().strip()
        if name and (dest / name).is_file():
            os.replace(marker, dest / "latest")
    if r.ok and path:
        into = (dest / path.strip("/")).parent
        into.mkdir(parents=True, exist_ok=True)
        own = rsync(host, ssh, remote_path(host.workdir, "runs", run_id, path.strip("/")), str(into) + "/",
                    push=False, nice=True, extra=["--ignore-missing-args"])
        if not own.ok:
            return own
        r.files, r.bytes, r.seconds = r.files + own.files, r.bytes + own.bytes, r.seconds + own.seconds
    return r


def push_run_files(hosts: Sequence[Host], ssh: SSHSettings, run_id: str, src_dir: Path, files: Sequence[str],
                   progress=None) -> list[SyncResult]:
    """Files of this run's directory here (``files``, relative to ``src_dir``; a directory goes
    whole) into the run's directory on ``hosts``, before it starts: a resumed run's checkpoint."""
    def one(h: Host) -> SyncResult:
        wd = h.workdir.rstrip("/")
        r = rsync(h, ssh, str(src_dir) + "/", remote_path(h.workdir, "runs", run_id) + "/", push=True,
                  files_from=sorted(files), mkdir=f"{wd}/runs/{run_id}")
        if progress:
            progress(f"resume: {r.describe()}")
        return r
    return parallel(one, list(hosts), ssh.fanout)


def pull_logs(hosts: Sequence[Host], ssh: SSHSettings, run_id: str, dest: Path, progress=None) -> list[SyncResult]:
    """Every host's runs/<id>/logs/ into ``dest`` (in parallel)."""
    dest.mkdir(parents=True, exist_ok=True)

    def one(h: Host) -> SyncResult:
        r = rsync(h, ssh, remote_path(h.workdir, "runs", run_id, "logs") + "/", str(dest) + "/", push=False,
                  nice=True)
        if progress:
            progress(f"logs: {r.describe()}")
        return r
    return parallel(one, list(hosts), ssh.fanout)


# ---------------------------------------------------------------- the watcher
QUIET_START_S = 15.0


def watch(run_id: str, poll_s: float = 5.0) -> int:
    """Detached, one per ssh run: keep node 0's checkpoints synced until the run ends, then once more.

    It also polls the run's status, which stops every node if one failed (the agents' gang does the
    same without it), and collects the logs at the end.
    """
    try:
        os.nice(10)         # a helper: the run's own processes (here too, on a one-box cluster) come first
    except OSError:
        pass
    # the first seconds belong to the run starting (every host imports torch): poll once it is up
    time.sleep(QUIET_START_S)
    from cluster.run.records import Run, State
    from cluster.submit import backend_for
    first = Run(run_id)
    be = backend_for(first)
    every_s = (first.data.get("job", {}).get("resolved", {}).get("checkpoint", {}) or {}).get("sync_every_s", 60)
    node0 = be.inv.host(first.data["plan"]["nodes"][0]["host"])
    dest = Path(first.data.get("checkpoint_dir") or first.dir / "checkpoints")
    own = checkpoint_path(first.data)
    last_sync = last_seen = time.time()
    while True:
        time.sleep(poll_s)
        run = Run(run_id, first.dir.parent)
        try:
            state, nodes = be.status(run)
            if any(n.state != State.UNKNOWN for n in nodes) or state.is_terminal():
                last_seen = time.time()
        except Exception as e:   # noqa: BLE001 -- a flaky host must not end the watcher
            print(f"status: {e}", flush=True)
            if run.damaged:     # nothing to follow without a record; 'stop RUN' still stops the run
                be.close()
                return 1
            state = run.state
        if state.is_terminal():
            break
        if time.time() - last_seen > GIVE_UP_S:
            print(f"no host of the run answered for {GIVE_UP_S:g} s; giving up "
                  f"('python -m cluster logs {run_id} --collect' and 'status' still work later)", flush=True)
            run.event("checkpoints-synced", ok=False, files=0, latest=_latest(dest, own),
                      error=f"no host of the run answered for {GIVE_UP_S:g} s; the watcher gave up")
            be.close()
            return 1
        if time.time() - last_sync >= every_s:
            last_sync = time.time()
            r = pull_checkpoints(node0, be.inv.ssh, run_id, dest, own)
            print(f"checkpoints: {r.describe()}", flush=True)
            _pull_metrics(be, first)
    r = pull_checkpoints(node0, be.inv.ssh, run_id, dest, own)
    print(f"checkpoints (final): {r.describe()}", flush=True)
    run = Run(run_id, first.dir.parent)
    run.event("checkpoints-synced", ok=r.ok, files=r.files, error=r.error or None, latest=_latest(dest, own))
    _pull_metrics(be, run)
    hosts = [be.inv.host(n["host"]) for n in run.data["plan"]["nodes"]]
    for r in pull_logs(hosts, be.inv.ssh, run_id, run.dir / "logs"):
        print(f"logs: {r.describe()}", flush=True)
    be.close()
    return 0


def _pull_metrics(be, run) -> None:
    """The metrics and TensorBoard files of every host, with the checkpoints (report, tensorboard)."""
    hosts = [be.inv.host(n["host"]) for n in run.data["plan"]["nodes"]]
    for r in pull_metrics(hosts, be.inv.ssh, run.id, run.dir / "metrics"):
        if not r.ok:
            print(f"metrics: {r.describe()}", flush=True)


def checkpoint_path(run_data: dict) -> Optional[str]:
    """The job's ``checkpoint.path`` (relative to the run directory), from run.json; None where it
    lies in checkpoints/ (CLUSTER_CHECKPOINT_DIR), which is synced whole anyway."""
    path = (((run_data.get("job") or {}).get("resolved") or {}).get("checkpoint") or {}).get("path")
    path = path.strip("/") if path else None
    return None if not path or path.split("/")[0] == "checkpoints" else path


def _latest(dest: Path, own: Optional[str] = None) -> Optional[str]:
    """The newest checkpoint kept in ``dest``: what ``latest`` names, else the job's own file."""
    try:
        return (dest / "latest").read_text().strip() or None
    except OSError:
        return own if own and (dest / own).exists() else None


def _alive(pid: Optional[int], run_id: str) -> bool:
    """Is ``pid`` still this run's watcher (not a reused pid, not a zombie)?"""
    import psutil
    try:
        argv = psutil.Process(int(pid)).cmdline()     # a zombie's: ZombieProcess
    except (psutil.Error, TypeError, ValueError):
        return False
    return "cluster.backends.rsync" in argv and run_id in argv


def pull_metrics(hosts: Sequence[Host], ssh: SSHSettings, run_id: str, dest: Path) -> list[SyncResult]:
    """Every host's runs/<id>/metrics/ (each rank's records and heartbeat, TensorBoard event files
    under tb/rank<R>/: the names differ per rank, so the hosts' files land side by side) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)

    def one(h: Host) -> SyncResult:
        return rsync(h, ssh, remote_path(h.workdir, "runs", run_id, "metrics") + "/", str(dest) + "/", push=False,
                     nice=True, extra=["--exclude", ".*", "--ignore-missing-args"])
    return parallel(one, list(hosts), ssh.fanout)


def checkpoint_sync(run) -> Optional[dict]:
    """Where the run's checkpoint copy stands, for runs that have a watcher (ssh): ``state`` is
    ``syncing`` (the watcher is still at work; after the run ends it makes one last pass), ``synced``,
    ``failed`` (with ``error``) or ``stopped`` (the watcher is gone without a last pass)."""
    handle = run.data.get("handle") or {}
    if "watcher_pid" not in handle:
        return None
    dest = Path(run.data.get("checkpoint_dir") or run.dir / "checkpoints")
    done = [e for e in run.events() if e.get("event") == "checkpoints-synced"]
    if done:
        e = done[-1]
        return {"state": "synced" if e.get("ok") else "failed", "dir": str(dest),
                "latest": e["latest"] if "latest" in e else _latest(dest, checkpoint_path(run.data)),
                "error": e.get("error")}
    cs = {"state": "syncing", "dir": str(dest), "latest": _latest(dest, checkpoint_path(run.data))}
    if not _alive(handle.get("watcher_pid"), run.id):
        cs.update(state="stopped", error="the checkpoint watcher ended before its last pass "
                                         f"(see {run.dir / 'state' / 'watcher.log'})")
    return cs


def describe_checkpoint_sync(cs: dict) -> str:
    where = cs["dir"]
    try:
        where = str(Path(where).relative_to(Path.cwd()))
    except ValueError:
        pass
    latest = f"latest {cs['latest']} in {where}" if cs.get("latest") else f"none yet in {where}"
    if cs["state"] == "syncing":
        return f"checkpoints: syncing from node 0 ({latest})"
    if cs["state"] == "synced":
        return f"checkpoints: synced ({latest})"
    return f"checkpoints: {cs['state']}: {cs.get('error')} ({latest})"


def wait_checkpoint_sync(run, timeout_s: float = 300.0, progress=None) -> Optional[dict]:
    """After the run has ended: wait (bounded) for the watcher's last pass; the final state."""
    cs = checkpoint_sync(run)
    if cs is None or cs["state"] != "syncing":
        return cs
    if progress:
        progress("-- waiting for the last checkpoint sync from node 0")
    deadline = time.time() + timeout_s
    while cs["state"] == "syncing" and time.time() < deadline:
        time.sleep(0.5)
        cs = checkpoint_sync(run)
    return cs


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m cluster.backends.rsync")
    sub = ap.add_subparsers(dest="verb", required=True)
    w = sub.add_parser("watch", help="sync a run's checkpoints until it ends")
    w.add_argument("run_id")
    w.add_argument("--poll-s", type=float, default=5.0)
    args = ap.parse_args(argv)
    return watch(args.run_id, args.poll_s)


if __name__ == "__main__":
    sys.exit(main())
