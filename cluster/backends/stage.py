"""Dataset staging: a job's `data:` on every node before the launch.

    data:
      source: /datasets/imagenet-packed   # on the submitting machine (a packed set or a folder),
                                          # or HOST:PATH on an inventory host
      path: data/imagenet                 # where each node holds it (relative: under its workdir)
      fanout: 4                           # copies at once from one source (its disk and NIC)
      peers: true                         # hosts with a verified copy serve the others too

Each node's copy carries a stamp (`.ddp-data.json`: the source's digest and the size and mtime of
every file as verified). A node is current when its stamp names the source's digest and no file
changed since; a file that changed is checked against its sha256 (packed sets list one per
file, train/pack.py) and copied again when it differs. So a second submit checks in one round
trip and copies nothing, and a corrupted shard is found and replaced.

On submit, in parallel with the preflight: check every node, refuse at once when a node's disk
cannot hold what is missing, copy to the rest with rsync (resumable: --partial; progress per
host; at most `fanout` at once from the source), verify the checksums of what changed, write the
stamp. With `peers` (the default), a host whose copy is verified (current from the start, or
copied in this submit) is a source too: while the source is busy, a waiting host pulls from it
(rsync over ssh, run on the receiving host; at most `fanout` at once from each), so the source's
disk and NIC are not the bottleneck (Schedule: who copies from whom). A copy between hosts that
fails (the hosts cannot reach each other by ssh) is taken again from the source, and no further
copy between hosts is tried in that submit. A source on a host (`data.source: node1:/datasets/x`)
is described there, and the hosts pull their copies from there the same way (SLURM refuses it).
Any host that ends without a current copy stops the submit: nothing starts, one message names
the hosts.
`shared_fs: true`: no copy; the set must be present (every file, right size) at `path`.
`doctor` only checks and reports per host. SLURM: `python -m cluster.backends.stage SOURCE PATH` runs the
same check, copy and verify on each allocated node in the job's first step, before the tasks
(cluster/backends/slurm.py); PATH may name $TMPDIR or $SLURMD_NODENAME, expanded on the node.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

from cluster.spec import hostlist
from cluster.spec.config import Host, SSHSettings
from cluster.errors import UserError
from cluster.backends.openssh import rsync_rsh, ssh_argv
from cluster.backends.rsync import remote_path, shell_path
from cluster.quoting import quote_argv

STAMP = ".ddp-data.json"
MANIFEST = "MANIFEST.json"
MARGIN = 1.02            # free space asked for beyond what is missing (filesystem overhead)


@dataclass
class Source:
    path: str
    packed: bool
    digest: str
    files: list            # [relpath, bytes, sha256 or None]

    @property
    def total(self) -> int:
        return sum(f[1] for f in self.files)


def describe(path: str) -> Source:
    """The source set on this machine: a packed set (its manifest lists every file with a checksum) or a folder."""
    d = node_describe({"path": path, "stamp": STAMP, "manifest": MANIFEST})
    if "error" in d:
        raise UserError(f"data.source {path!r} is not a folder on this machine", key="data.source",
                        hint="a packed set (python -m train.pack SRC DST) or an ImageFolder root")
    return Source(d["path"], d["packed"], d["digest"], d["files"])


def split_source(text: str) -> tuple[Optional[str], str]:
    """`HOST:PATH` (a colon before any '/', as rsync reads it) -> (HOST, PATH); a path here -> (None, PATH)."""
    head, colon, rest = text.partition(":")
    if colon and head and "/" not in head and not head.startswith("~") and rest:
        return head, rest
    return None, text


def node_describe(a: dict) -> dict:
    """The set at a["path"] (here, or on the host that holds the source: python -c, JSON in and out;
    standard library only): packed (MANIFEST.json lists every file with its sha256) or a folder
    (every file's size; the digest covers names, sizes and mtimes)."""
    import hashlib
    import json
    import os

    root = os.path.abspath(os.path.expanduser(a["path"]))
    if not os.path.isdir(root):
        return {"error": f"{root} is not a folder", "path": root}
    man = os.path.join(root, a["manifest"])
    if os.path.isfile(man):
        with open(man, "rb") as f:
            raw = f.read()
        files = [[f["path"], f["bytes"], f["sha256"]] for f in json.loads(raw)["files"]]
        files.append([a["manifest"], len(raw), hashlib.sha256(raw).hexdigest()])
        return {"path": root, "packed": True, "digest": hashlib.sha256(raw).hexdigest()[:16], "files": files}
    files, h = [], hashlib.sha256()
    for dirpath, dirnames, names in os.walk(root):
        dirnames.sort()
        for n in sorted(names):
            if n in (a["stamp"], a["stamp"] + ".tmp"):
                continue
            full = os.path.join(dirpath, n)
            st = os.stat(full)
            rel = os.path.relpath(full, root)
            files.append([rel, st.st_size, None])
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(errors="surrogateescape"))
    return {"path": root, "packed": False, "digest": h.hexdigest()[:16], "files": files}


def host_path(host: Host, path: str) -> str:
    """`path` on the host: relative ones are under its workdir."""
    return path if path.startswith(("/", "~")) else remote_path(host.workdir, path)


# ---------------------------------------------------------------- on the host (standard library only)
def node_check(a: dict) -> dict:
    """Runs on a node (python -c, JSON in and out; stage_here() calls it on SLURM nodes).
    mode "check": is the copy current (stamp + stat, checksums of files that changed)?
    "verify": after a copy: checksum every file not matching the stamp, then write the stamp.
    "presence": every file there with its size (shared filesystems)."""
    import hashlib
    import json
    import os
    import shutil

    path, mode, digest = os.path.expanduser(a["path"]), a["mode"], a["digest"]
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    out = {"state": "current", "missing": 0, "bad": [], "present_bytes": 0,
           "free": shutil.disk_usage(probe).free, "path": path}
    try:
        with open(os.path.join(path, a["stamp"])) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        stamp = {}
    same = stamp.get("digest") == digest
    seen = stamp.get("stat", {}) if same else {}
    stats, unverified = {}, 0

    def sha(p):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    for rel, size, checksum in a["files"]:
        p = os.path.join(path, rel)
        try:
            st = os.stat(p)
        except OSError:
            out["missing"] += 1
            continue
        if st.st_size != size:
            out["bad"].append(rel)
            continue
        out["present_bytes"] += size
        key = [st.st_size, st.st_mtime_ns]
        if mode == "presence" or seen.get(rel) == key:
            stats[rel] = key
            continue
        if checksum is None:          # a folder's file: no checksum; rsync's copy is trusted
            if mode == "verify":
                stats[rel] = key
            else:
                unverified += 1
            continue
        if mode == "check" and not same:
            unverified += 1           # copied by something else: rsync and verify decide
            continue
        if sha(p) == checksum:
            stats[rel] = key
        else:
            out["bad"].append(rel)
    if out["missing"] or out["bad"] or unverified:
        out["state"] = "missing" if out["present_bytes"] == 0 else "stale"
    elif mode != "presence" and (mode == "verify" or stats != seen):
        tmp = os.path.join(path, a["stamp"] + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"digest": digest, "stat": stats}, f)
        os.replace(tmp, os.path.join(path, a["stamp"]))
    return out


def node_command(python: str, fn: Callable = node_check) -> str:
    src = "import json, sys\n" + inspect.getsource(fn) + \
        f"print(json.dumps({fn.__name__}(json.loads(sys.stdin.readline()))))\n"
    return " ".join(shlex.quote(a) for a in (python, "-c", src))


# ---------------------------------------------------------------- who copies from whom
SOURCE = ""          # the giver that is the source itself


class Schedule:
    """Who copies from whom. A waiting host takes the source when it has a free slot; else, with
    ``peers``, the least busy host that holds a verified copy (current from the start, or copied and
    verified in this submit) and has a free slot; every giver serves at most ``fanout`` at once.
    So the source is never busier than without peers, and no peer is used when the source alone can
    take every waiting host; with fanout 1 it is a doubling tree (the source -> 1 host; the source
    and that host -> 2 more; ...)."""

    def __init__(self, waiting: Sequence[str], holders: Sequence[str], fanout: int, peers: bool):
        self.waiting, self.holders = list(waiting), list(holders)
        self.fanout, self.peers = fanout, peers
        self.busy: dict[str, int] = {SOURCE: 0}

    def assign(self) -> list[tuple[str, str]]:
        """(host, giver) pairs to start now; a giver is SOURCE or a host's name."""
        out = []
        while self.waiting:
            givers = [SOURCE] if self.busy[SOURCE] < self.fanout else \
                sorted((g for g in self.holders if self.busy.get(g, 0) < self.fanout),
                       key=lambda g: self.busy.get(g, 0)) if self.peers else []
            if not givers:
                break
            self.busy[givers[0]] = self.busy.get(givers[0], 0) + 1
            out.append((self.waiting.pop(0), givers[0]))
        return out

    def done(self, host: str, giver: str, ok: bool) -> None:
        self.busy[giver] -= 1
        if ok:
            self.holders.append(host)        # verified: it serves the next waiting hosts

    def retry_from_source(self, host: str, giver: str) -> None:
        """A copy between hosts failed: this host waits for the source, first; no more peer copies."""
        self.busy[giver] -= 1
        self.peers = False
        self.waiting.insert(0, host)


def peer_command(giver: Host, dst: str, path: str, ssh: SSHSettings, opts: Sequence[str], local: bool = False) -> str:
    """The shell command a receiving host runs to pull the copy from host ``giver``: rsync over ssh
    to the giver's ``address`` (the network the hosts share), with the inventory's ssh settings
    (user, port, identity_file, known_hosts: their paths as the receiving host reads them), no
    jump host (hosts on one network reach each other directly)."""
    here = shell_path(dst)
    if local:                # the source is on the receiving host itself
        return f"mkdir -p {here} && " + quote_argv(["rsync", *opts]) + f" {shell_path(host_path(giver, path))}/ {here}/"
    hop = replace(giver, hostname=giver.address, jump_host=None)
    there = host_path(giver, path)
    there = "." if there == "~" else there[2:] if there.startswith("~/") else there   # --protect-args: home-relative
    addr = f"[{hop.hostname}]" if ":" in hop.hostname else hop.hostname
    return (f"mkdir -p {here} && " + quote_argv(["rsync", "--protect-args", *opts, "-e", rsync_rsh(hop, ssh),
                                                  f"{addr}:{there}/"]) + f" {here}/")


# ---------------------------------------------------------------- from here
def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class Stager:
    """Check, copy, verify: `run()` returns per-host lines, or raises UserError naming the hosts."""

    def __init__(self, spec, hosts: Sequence[Host], pool, ssh: SSHSettings, shared_fs: bool,
                 progress: Callable[[str], None], copy: bool = True, inventory_hosts: Sequence[Host] = ()):
        """``inventory_hosts``: where a source on a host (`data.source: HOST:PATH`) is looked up;
        ``pool`` must reach that host too."""
        self.spec, self.hosts, self.pool, self.ssh = spec, list(hosts), pool, ssh
        self.shared_fs, self.progress, self.copy = shared_fs, progress, copy
        self.procs: dict[str, subprocess.Popen] = {}
        self.hosts_by_name = {h.name: h for h in [*inventory_hosts, *self.hosts]}
        self.cancelled = threading.Event()
        name, self.source_path = split_source(spec.source)
        self.source_host = None
        if name is not None:
            if name not in self.hosts_by_name:
                raise UserError(f"data.source {spec.source!r}: {name!r} is not a host of the inventory",
                                key="data.source", hint="HOST:PATH with an inventory host's name, or a path "
                                                        "on this machine")
            self.source_host = self.hosts_by_name[name]

    def describe(self) -> Source:
        """The source set, here or on its host (one round trip)."""
        if self.source_host is None:
            return describe(self.source_path)
        h = self.source_host
        path = host_path(h, self.source_path)
        res = self.pool.run({h.name: node_command(h.python, node_describe)},
                            stdin={h.name: json.dumps({"path": path, "stamp": STAMP, "manifest": MANIFEST}).encode()
                                   + b"\n"}, timeout_s=max(600.0, self.ssh.command_timeout_s),
                            label="data source (python -c ...)")[h.name]
        try:
            d = json.loads(res.stdout.strip().splitlines()[-1]) if res.ok else {"error": res.describe()}
        except (ValueError, IndexError):
            d = {"error": res.describe()}
        if "error" in d:
            raise UserError(f"data.source {self.spec.source!r}: cannot read the set on {h.name}: {d['error']}",
                            key="data.source", hint="a packed set (python -m train.pack SRC DST) or an "
                                                    f"ImageFolder root on {h.name} (relative paths: under its workdir)")
        return Source(d["path"], d["packed"], d["digest"], d["files"])

    def check(self, src: Source, hosts: Sequence[Host], mode: str) -> dict:
        stdin = {h.name: json.dumps({"path": host_path(h, self.spec.path), "mode": mode, "digest": src.digest,
                                     "files": src.files, "stamp": STAMP}).encode() + b"\n" for h in hosts}
        res = self.pool.run({h.name: node_command(h.python) for h in hosts}, stdin=stdin,
                            timeout_s=max(600.0, self.ssh.command_timeout_s), label=f"data {mode} (python -c ...)")
        out = {}
        for name, r in res.items():
            try:
                out[name] = json.loads(r.stdout.strip().splitlines()[-1]) if r.ok else {"error": r.describe()}
            except (ValueError, IndexError):
                out[name] = {"error": r.describe()}
        return out

    def run(self) -> list[str]:
        src = self.describe()
        mode = "presence" if self.shared_fs else "check"
        t0 = time.monotonic()
        state = self.check(src, self.hosts, mode)
        problems, said = [], {}          # said: line text -> hosts (identical answers folded)
        what = f"{'packed' if src.packed else 'folder'} {_size(src.total)}, {len(src.files)} files"
        todo = []
        for h in self.hosts:
            s = state[h.name]
            if "error" in s:
                problems.append(f"{h.name}: cannot check the data: {s['error']}")
            elif s["state"] == "current":
                said.setdefault(f"current ({what}) at {self.spec.path}", []).append(h.name)
            else:
                why = ", ".join(filter(None, [
                    f"{s['missing']} of {len(src.files)} files missing" if s["missing"] else "",
                    f"{len(s['bad'])} differ ({', '.join(s['bad'][:3])})" if s["bad"] else ""])) \
                    or "not verified against this source"
                need = (src.total - s["present_bytes"]) * MARGIN
                if self.shared_fs:
                    problems.append(f"{h.name}: {s['state']} at {s['path']} ({why}; shared_fs: nothing is copied)")
                elif need > s["free"]:
                    problems.append(f"{h.name}: not enough disk at {s['path']}: {_size(need)} to copy, "
                                    f"{_size(s['free'])} free")
                else:
                    todo.append((h, s, f"{s['state']} ({why})", _size(need)))
        for h, s, text, need in todo:
            # nothing is copied unless every host can take it
            text += f"; submit copies it ({need})" if not self.copy else "" if problems else f": copying {need}"
            said.setdefault(text, []).append(h.name)
        lines = [f"data: {hostlist.fold(hosts)}: {text}" for text, hosts in said.items()]
        for line in lines:
            self.progress(line)
        if problems or not todo or not self.copy:
            return self._done(problems, lines)
        problems += self._copy_all(src, todo, [h.name for h in self.hosts if state[h.name].get("state") == "current"])
        if not problems:
            done = [t[0].name for t in todo]
            lines.append(f"data: copied to {hostlist.fold(done)} and verified in {time.monotonic() - t0:.1f} s")
            self.progress(lines[-1])
        return self._done(problems, lines)

    def _copy_all(self, src: Source, todo: list, current: list[str]) -> list[str]:
        """Copy and verify every host of ``todo``, each from the giver the Schedule names; problems."""
        byname = {h.name: (h, s) for h, s, _, _ in todo}
        sched = Schedule([h.name for h, *_ in todo], current, max(1, self.spec.fanout), self.spec.peers)
        problems: list[str] = []
        with ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="data") as ex:
            flight = {}
            while True:
                for name, giver in sched.assign():
                    h, s = byname[name]
                    flight[ex.submit(self._fetch, src, h, s, giver)] = (name, giver)
                if not flight:
                    return problems
                finished, _ = wait(flight, return_when=FIRST_COMPLETED)
                for f in finished:
                    name, giver = flight.pop(f)
                    err = f.result()
                    if err and giver != SOURCE and not self.cancelled.is_set():
                        # hosts may not reach each other by ssh (keys, known_hosts, firewalls): the
                        # source takes this host and every later one; said once (others may be in flight)
                        if sched.peers:
                            self.progress(f"data: {name}: cannot copy from {giver} ({err.split(': ', 1)[-1]}); "
                                          f"copying from the source, no more copies between hosts in this submit")
                        sched.retry_from_source(name, giver)
                    else:
                        sched.done(name, giver, err is None)
                        if err:
                            problems.append(err)

    def _fetch(self, src: Source, h: Host, s: dict, giver: str) -> Optional[str]:
        """One host's copy (from the source or from ``giver``, a host with a verified copy), then
        its verification, so that it can serve the next hosts; None when both worked."""
        err = self._copy(src, h, s, giver)
        if err:
            return err
        after = self.check(src, [h], "verify")[h.name]
        if after.get("state") != "current":
            return f"{h.name}: copy does not verify: " + \
                (after.get("error") or f"{after['missing']} missing, differ: {', '.join(after['bad'][:3])}")
        return None

    def _done(self, problems: list[str], lines: list[str]) -> list[str]:
        if problems:
            hosts = hostlist.fold(sorted({p.split(":", 1)[0] for p in problems}))
            raise UserError(f"data not ready on {hosts}, nothing was started:\n  " + "\n  ".join(problems),
                            hint="free disk there, fix the source or the path, or set shared_fs "
                                             "correctly; a rerun copies only what is missing")
        return lines

    def _copy(self, src: Source, h: Host, s: dict, giver: str = "") -> Optional[str]:
        """rsync the source (or the copy on host ``giver``) to one host; progress every few seconds;
        None when it worked."""
        if self.cancelled.is_set():
            return f"{h.name}: cancelled"
        dst = host_path(h, self.spec.path)
        opts = ["-rlt", "--partial", "--info=progress2", "--no-inc-recursive", "--exclude", f"/{STAMP}",
                "--exclude", f"/{STAMP}.tmp", "--timeout", str(int(self.ssh.command_timeout_s))]
        if s["bad"]:
            opts.append("--ignore-times")   # a file with the right size and a changed content: copy it again
        if giver or self.source_host is not None:
            # run on the receiving host: it pulls from the giver (or the host that holds the source)
            there, path = (self.hosts_by_name[giver], self.spec.path) if giver else (self.source_host, self.source_path)
            argv = ssh_argv(h, self.ssh, tty=False) + [peer_command(there, dst, path, self.ssh, opts,
                                                                    local=there.name == h.name)]
        else:
            argv = ["rsync", "--protect-args", *opts, "-e", rsync_rsh(h, self.ssh),
                    "--rsync-path", f"mkdir -p {shlex.quote(dst) if not dst.startswith('~') else dst} && rsync",
                    src.path + "/", f"{h.hostname}:{dst}/"]
        t0 = last = time.monotonic()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.procs[h.name] = p
        buf = b""
        while chunk := p.stdout.read1(4096) if hasattr(p.stdout, "read1") else p.stdout.read(4096):
            buf = (buf + chunk)[-512:]
            now = time.monotonic()
            if now - last >= 2.0:
                m = re.findall(rb"([\d,]+)\s+(\d+)%\s+(\S+/s)", buf)
                if m:
                    done, pct, rate = m[-1]
                    self.progress(f"data: {h.name}: {pct.decode()}% {_size(int(done.replace(b',', b'')))} "
                                  f"{rate.decode()}")
                    last = now
        err = p.stderr.read().decode(errors="replace")
        rc = p.wait()
        self.procs.pop(h.name, None)
        if rc != 0:
            lines = [ln for ln in err.splitlines() if ln.strip()]
            if any("No space left" in ln for ln in lines):
                return f"{h.name}: no space left at {dst} while copying"
            return f"{h.name}: rsync exit code {rc}: " + " | ".join(lines[-2:])
        self.progress(f"data: {h.name}: copied in {time.monotonic() - t0:.1f} s from {giver or self._source_name()}")
        return None

    def _source_name(self) -> str:
        return "the source" if self.source_host is None else f"the source on {self.source_host.name}"

    def cancel(self) -> None:
        """Stop the copies in flight (rsync keeps the partial files: the next submit resumes). A
        copy between hosts is an ssh to the receiving host: its rsync ends at its next progress
        write once that session is gone."""
        self.cancelled.set()
        for p in list(self.procs.values()):
            if p.poll() is None:
                p.terminate()


class Background:
    """A Stager in a thread, so staging runs while the preflight does."""

    def __init__(self, stager: Stager):
        self.stager, self.error, self.lines = stager, None, []
        self.thread = threading.Thread(target=self._run, name="data-staging", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.lines = self.stager.run()
        except BaseException as e:  # noqa: BLE001 - handed to the caller in result()
            self.error = e

    def result(self) -> list[str]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.lines

    def cancel(self) -> None:
        self.stager.cancel()
        self.thread.join()


# ---------------------------------------------------------------- SLURM: on each allocated node
def stage_here(source: str, path: str) -> int:
    """`python -m cluster.backends.stage SOURCE PATH`, one task per node in the SLURM job's first step:
    the same check, copy (local rsync from the shared filesystem) and verify as over SSH.
    Environment variables in PATH ($TMPDIR, $SLURMD_NODENAME) are expanded here, on the node."""
    import socket

    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    path = os.path.expandvars(path)
    src = describe(source)
    args = {"path": path, "digest": src.digest, "files": src.files, "stamp": STAMP}
    s = node_check({**args, "mode": "check"})
    if s["state"] == "current":
        print(f"data: {host}: current at {path}", flush=True)
        return 0
    need = (src.total - s["present_bytes"]) * MARGIN
    if need > s["free"]:
        print(f"data: {host}: not enough disk at {path}: {_size(need)} to copy, {_size(s['free'])} free",
              file=sys.stderr, flush=True)
        return 1
    t0 = time.monotonic()
    os.makedirs(path, exist_ok=True)
    argv = ["rsync", "-rlt", "--partial", "--exclude", f"/{STAMP}", "--exclude", f"/{STAMP}.tmp"]
    if s["bad"]:
        argv.append("--ignore-times")
    p = subprocess.run(argv + [src.path + "/", path + "/"], capture_output=True, text=True)
    if p.returncode != 0:
        print(f"data: {host}: rsync exit code {p.returncode}: {p.stderr.strip()[-300:]}", file=sys.stderr, flush=True)
        return 1
    s = node_check({**args, "mode": "verify"})
    if s["state"] != "current":
        print(f"data: {host}: copy does not verify: {s['missing']} missing, differ: {', '.join(s['bad'][:3])}",
              file=sys.stderr, flush=True)
        return 1
    print(f"data: {host}: copied {_size(need / MARGIN)} to {path} and verified in {time.monotonic() - t0:.1f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m cluster.backends.stage SOURCE PATH", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(stage_here(sys.argv[1], sys.argv[2]))
    except UserError as e:
        print(f"data: {e}", file=sys.stderr)
        sys.exit(1)
