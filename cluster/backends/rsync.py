"""rsync between this machine and the hosts: the code, checkpoints and logs of a run.

* Code: the project's files (git's tracked files plus untracked ones that .gitignore does not
  exclude, so a file just written runs too) go to each host's workdir; a host whose copy already
  matches (same size and mtime for every file, checked inside the preflight probe) is skipped.
* Checkpoints: node 0's runs/<id>/checkpoints/ is pulled into the storage directory (default
  runs/<id>/checkpoints here) every ``checkpoint.sync_every_s`` by a detached watcher process
  (cluster/backends/watcher.py), and once more when the run ends. The host side runs at
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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from cluster.spec.config import REPO, Host, SSHSettings
from cluster.backends.openssh import rsync_rsh
from cluster.errors import UserError

RSYNC_TIMEOUT_S = 600


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
    from cluster.quoting import shell_word
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
def pull_metrics(hosts: Sequence[Host], ssh: SSHSettings, run_id: str, dest: Path) -> list[SyncResult]:
    """Every host's runs/<id>/metrics/ (each rank's records and heartbeat, TensorBoard event files
    under tb/rank<R>/: the names differ per rank, so the hosts' files land side by side) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)

    def one(h: Host) -> SyncResult:
        return rsync(h, ssh, remote_path(h.workdir, "runs", run_id, "metrics") + "/", str(dest) + "/", push=False,
                     nice=True, extra=["--exclude", ".*", "--ignore-missing-args"])
    return parallel(one, list(hosts), ssh.fanout)
