"""Code that runs on the hosts: the ssh backend's probe, status and stop (standard library only).

Each function takes one dict and returns one; cluster/backends/ship.py renders ``python -c <source>``
for it (the function, the helpers it uses, and a line that reads its argument as JSON from the
first line of stdin and prints the result as JSON). The same functions run here in the unit tests.
One pid namespace may hold several hosts' processes (as in the cluster in a box), so process scans
keep to the host's own network namespace.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from cluster.node.shm import remove_left_semaphores


def stale_files(workdir: str, expected: dict) -> int:
    """How many files differ from ``expected``."""
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


def _gpu_count(a: dict) -> int:
    import os
    import subprocess
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([d for d in vis.split(",") if d.strip() and d.strip() != "-1"])
    try:     # the driver's list: instant, where nvidia-smi takes a while to start NVML
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.TimeoutExpired):
        pass
    return 0


def _gpu_query(a: dict):
    """Each GPU's use now (``cluster top``): [{index, util, mem_used, mem_total, power}] (MiB, %,
    W; None where nvidia-smi says N/A), or None when this host has no nvidia-smi."""
    import shutil
    import subprocess
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=index,utilization.gpu,memory.used,memory.total,power.draw",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None

    def num(x):
        try:
            return float(x)
        except ValueError:
            return None
    keys = ("index", "util", "mem_used", "mem_total", "power")
    return [dict(zip(keys, map(num, (f.strip() for f in line.split(","))))) for line in out.splitlines()
            if line.count(",") == 4]


def _run_processes(wd: str, run_id=None, anywhere: bool = False) -> dict:
    """run id -> pids of processes in this host's network namespace that carry CLUSTER_RUN_ID and
    run in ``wd`` (one pid namespace may hold several hosts' processes, as in the cluster in a box);
    ``anywhere``: in any namespace and directory (one machine's own runs, found by id alone)."""
    import os

    def netns(pid):
        try:
            return os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            return None

    mine, me = netns("self"), os.getpid()
    found: dict = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            cwd = os.readlink(f"/proc/{name}/cwd")
        except (OSError, IndexError):
            continue
        rid = next((e[15:].decode(errors="replace") for e in env if e.startswith(b"CLUSTER_RUN_ID=")), None)
        if rid is None or (run_id is not None and rid != run_id):
            continue
        if not anywhere and mine is not None and netns(name) != mine:
            continue
        if not anywhere and not (cwd == wd or cwd.startswith(wd.rstrip("/") + "/")):
            continue
        found.setdefault(rid, []).append(int(name))
    return found


def _group_alive(pgid) -> bool:
    """Whether a non-zombie process is in group ``pgid`` (kill(-pgid, 0) also counts zombies)."""
    import os
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                return True
    return False


def _activity(log_path: str, pids, pgid) -> dict:
    """What a run does on this node without heartbeats: when its log last grew (every line a rank
    prints lands there) and the CPU seconds its own processes have used. The agent (``pgid``),
    torchrun and a fork server only poll: they are left out."""
    import os
    try:
        output_t = os.stat(log_path).st_mtime
    except OSError:
        output_t = None
    ticks, tck = 0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        if pid == pgid:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if b"torch.distributed.run" in cmd or b"cluster.node.agent" in cmd or b"forkserver" in cmd:
            continue
        ticks += int(fields[11]) + int(fields[12])      # utime + stime
    return {"output_t": output_t, "cpu_s": round(ticks / tck, 2)}


def _job_python(argv0: str) -> dict:
    """The interpreter a ``command:`` job names itself (not the inventory's): its version, and
    whether it has torch, as the job will find it (same PATH, no import of torch)."""
    import subprocess
    code = "import sys, importlib.util as u; print(sys.version.split()[0], u.find_spec('torch') is not None)"
    try:
        out = subprocess.run([argv0, "-c", code], capture_output=True, text=True, timeout=60)
        version, torch = out.stdout.split()
        return {"argv0": argv0, "python": version, "torch": torch == "True"}
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return {"argv0": argv0, "error": getattr(e, "strerror", None) or str(e) or type(e).__name__}


def _other_runs(wd: str, host: str) -> tuple:
    """(leftovers, live runs) among the processes of runs in ``wd`` on this host. A run whose agent
    is alive and has not recorded an exit is live: "running" once its pid file is there, "starting"
    before (another submit's preflight parked it, or it is writing the pid file now). Processes of
    a run with no such agent (it was killed, or ended and left them) are leftovers: run id -> pids."""
    import os
    left, live = {}, {}
    for rid, pids in _run_processes(wd).items():
        state = os.path.join(wd, "runs", rid, "state")
        agent = False
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"cluster.node.agent" in argv and argv[argv.index(b"cluster.node.agent") - 1] == b"-m":
                agent = True
                break
        if agent and not os.path.exists(os.path.join(state, host + ".exit")):
            live[rid] = "running" if os.path.exists(os.path.join(state, host + ".pid")) else "starting"
        else:
            left[rid] = sorted(pids)
    return left, live


def _probe(a: dict) -> dict:
    import json
    import os
    import select
    import socket
    import sys
    import time
    r = {"hostname": socket.gethostname(), "python": sys.version.split()[0], "torch": None,
         "cuda": None, "nccl": None}
    # torch's version.py, not the import: milliseconds instead of seconds
    try:
        import importlib.util
        spec = importlib.util.find_spec("torch")
        if spec is not None and spec.submodule_search_locations:
            vals = {}
            with open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")) as f:
                for line in f:
                    key, sep, val = line.partition("=")
                    key = key.split(":")[0].strip()
                    if sep and key in ("__version__", "cuda", "hip"):
                        vals[key] = val.strip().strip("'\"")
            r["torch"] = vals.get("__version__", "?")
            r["cuda"] = None if vals.get("cuda") in (None, "None") else vals["cuda"]
            # NCCL: the nvidia-nccl-cuXX wheel beside torch (the one torch loads), by its dist-info name
            site = os.path.dirname(list(spec.submodule_search_locations)[0])
            for name in sorted(os.listdir(site), reverse=True):
                if name.startswith("nvidia_nccl_cu") and name.endswith(".dist-info"):
                    r["nccl"] = name[:-len(".dist-info")].split("-", 1)[1]
                    break
    except (ImportError, OSError, ValueError, IndexError):
        pass
    r["gpus"] = _gpu_count(a)
    if a.get("job_python"):
        r["job_python"] = _job_python(a["job_python"])
    wd = os.path.expanduser(a["workdir"])
    p = wd
    while not os.path.exists(p):
        p = os.path.dirname(p) or "/"
    st = os.statvfs(p)
    r["free_gb"] = round(st.f_bavail * st.f_frsize / 1e9, 1)
    r["writable"] = os.access(p, os.W_OK)
    if a.get("manifest") is not None:
        r["stale"] = stale_files(a["workdir"], a["manifest"])
    wd_real = os.path.realpath(wd)
    r["leftovers"], r["busy"] = _other_runs(wd_real, a["host"])
    # ports: node 0 binds them and waits for every other node to connect to each
    ports = a.get("ports") or []
    if a.get("role") == "server":
        r["ports"], socks = {}, []
        for port in ports:
            s = socket.socket(socket.AF_INET6 if ":" in a["address"] else socket.AF_INET)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
                s.listen(128)
                socks.append(s)
                r["ports"][str(port)] = "free"
            except OSError as e:
                r["ports"][str(port)] = f"in use ({e.strerror})"
                s.close()
        want = a.get("peers", 0) * len(socks)
        got, deadline = 0, time.time() + a["wait_s"]
        while socks and got < want and time.time() < deadline:
            ready, _, _ = select.select(socks, [], [], 0.1)
            for s in ready:
                c, _ = s.accept()
                c.close()
                got += 1
        for s in socks:
            s.close()
    elif a.get("role") == "client":
        r["reach"] = {}
        for port in ports:
            deadline = time.time() + a["wait_s"]
            while True:
                try:
                    socket.create_connection((a["address"], port), timeout=2).close()
                    r["reach"][str(port)] = "ok"
                    break
                except OSError as e:
                    if time.time() > deadline:
                        r["reach"][str(port)] = f"cannot connect to {a['address']}:{port} ({e.strerror or e})"
                        break
                    time.sleep(0.02)
    return r


def parked_argv(argv: list) -> list:
    """What a parked agent runs as (warm start): the node's agent argv with ``--park-fd 200``, the
    descriptor on which GO reaches it. A fixed number, so that the plan prints this argv exactly
    (cluster/plan.py, Plan.render); cluster/node/agent.py reads the flag."""
    return list(argv[:3]) + ["--park-fd", "200"] + list(argv[3:])


def _park(a: dict, stale: int):
    """Warm start: the node's agent, started now in its own session with the node's environment,
    as :func:`parked_argv` (argv), waiting on a pipe for GO (cluster/node/agent.py, ``--park-fd``)
    while torchrun and a fork server for its workers import torch.
    Only where the code is already in place (``stale`` files: what is synced later must not run now),
    and where the descriptor is free here (else the node starts cold, by its shell line)."""
    spec = a.get("park")
    if not spec or spec["argv"][1:3] != ["-m", "cluster.node.agent"] or stale:
        return None
    argv = parked_argv(spec["argv"])
    fd = int(argv[argv.index("--park-fd") + 1])
    if argv[0].startswith("~/"):
        argv[0] = os.path.expanduser(argv[0])       # as the shell line's ~/ is
    r, w = os.pipe()
    try:
        if r != fd:
            try:
                os.fstat(fd)
            except OSError:         # free, as it should be
                os.dup2(r, fd, inheritable=False)       # pass_fds makes it the child's
                os.close(r)
                r = fd
            else:
                raise OSError(f"descriptor {fd} is in use")     # the probe's own: the node starts cold
        proc = subprocess.Popen(argv, cwd=os.path.expanduser(a["workdir"]),
                                env={**os.environ, **spec["env"]}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, pass_fds=(r,))
    except OSError:
        os.close(w)
        return None
    finally:
        os.close(r)
    return proc, w


def _probe_then_launch(a: dict) -> dict:
    """The probe's answer as the first line; then, on 'GO <json>' from the submitter, start the
    node (its NodeLaunch.shell() line, or the parked agent) and answer with the agent's pid file.
    EOF: start nothing (a parked agent is killed before it has written anything)."""
    answer = _probe(a)      # its scan for leftovers comes before the parked agent exists
    parked = _park(a, answer.get("stale", 0))
    answer["parked"] = parked is not None
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line.startswith("GO "):
        if parked:
            os.close(parked[1])                 # EOF: the agent ends what it forked and its temp dir
            try:
                parked[0].wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(parked[0].pid, 9)     # its own session: the agent and what it forked
            except ProcessLookupError:
                pass
            parked[0].wait()
        return {"launched": False}
    go = json.loads(line[3:])
    base = os.path.expanduser(a["workdir"])
    warm = False
    if parked:
        proc, w = parked
        try:
            if proc.poll() is None:
                os.write(w, b"GO " + json.dumps({"out": go["out"]}).encode() + b"\n")
                warm = True
        except OSError:
            pass
        os.close(w)
    if not warm:
        # a subshell with /dev/null for stdio: nothing the line backgrounds keeps this session open
        subprocess.run(["/bin/sh", "-c", "( " + go["shell"] + " ) </dev/null >/dev/null 2>&1"])
    pid, out = os.path.join(base, go["pid"]), os.path.join(base, go["out"])
    deadline = time.time() + go["wait_s"]
    while time.time() < deadline:
        try:
            with open(pid) as f:
                return {"launched": True, "agent": json.load(f), "warm": warm}
        except (OSError, ValueError):
            pass
        try:
            if (warm and proc.poll() is not None) or os.path.getsize(out) > 0:
                break
        except OSError:
            pass
        time.sleep(0.01)
    try:
        with open(out, errors="replace") as f:
            tail = f.read()[-2000:]
    except OSError:
        tail = "(no output)"
    sys.stderr.write("the agent did not start:\n" + tail)
    sys.exit(3)


def _rank_states(beats: dict, run_id: str) -> None:
    """Each live rank's process state from /proc ("R", "S", "D", "T" stopped, "t" traced, "Z"), as
    ``proc`` in its heartbeat, where its pid is a process of this run here (a container's ranks
    have pids of their own namespace: no state, rather than a wrong one)."""
    needle = ("CLUSTER_RUN_ID=" + run_id).encode()
    for hb in beats.values():
        pid = hb.get("pid")
        if hb.get("done") or not isinstance(pid, int):
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                hb["proc"] = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue


def _status(a: dict) -> dict:
    import json
    import os
    base = os.path.join(os.path.expanduser(a["workdir"]), a["run_dir"])

    def load(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    pid = load(os.path.join(base, "state", a["host"] + ".pid"))
    pgid = (pid or {}).get("pgid") or a.get("pgid")
    alive = bool(pgid) and _group_alive(pgid)
    beats = {}
    mdir = os.path.join(base, "metrics")
    try:
        names = os.listdir(mdir)
    except OSError:
        names = []
    for n in names:
        if n.startswith("heartbeat-rank") and n.endswith(".json"):
            hb = load(os.path.join(mdir, n))
            if hb:
                beats[str(hb.get("rank", n[14:-5]))] = hb
    _rank_states(beats, os.path.basename(os.path.normpath(base)))
    out = {"pid": pid, "exit": load(os.path.join(base, "state", a["host"] + ".exit")), "alive": alive,
           "heartbeats": beats}
    if alive and a.get("run_id"):
        wd = os.path.realpath(os.path.expanduser(a["workdir"]))
        pids = _run_processes(wd, a["run_id"]).get(a["run_id"], [])
        out["activity"] = _activity(os.path.join(base, "logs", a["host"] + ".log"), pids, pgid)
    if a.get("gpus"):       # cluster top: the GPUs' use in the same round trip
        out["gpus"] = _gpu_query(a)
    return out


def _stop(a: dict) -> dict:
    import os
    import signal
    import time
    wd = os.path.realpath(os.path.expanduser(a["workdir"]))

    def live():
        pids = set(_run_processes(wd, a["run_id"], a.get("anywhere", False)).get(a["run_id"], []))
        if a.get("pgid") and _group_alive(a["pgid"]):
            pids.add(-a["pgid"])
        return pids

    def signal_all(sig):
        if a.get("pgid"):
            try:
                os.killpg(a["pgid"], sig)
            except OSError:
                pass
        for pid in live():
            try:
                os.kill(pid, sig) if pid > 0 else None
            except OSError:
                pass

    signal_all(signal.SIGTERM)
    deadline = time.time() + a["grace_s"]
    while live() and time.time() < deadline:
        time.sleep(0.2)
    if live():
        signal_all(signal.SIGKILL)
        deadline = time.time() + 5
        while live() and time.time() < deadline:
            time.sleep(0.1)
    # what the KILL left in /dev/shm
    remove_left_semaphores(a.get("state_dir") or os.path.join(wd, "runs", a["run_id"], "state"))
    left = []
    for pid in sorted(p for p in live() if p > 0):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                left.append([pid, f.read().replace(b"\0", b" ").decode(errors="replace")[:120]])
        except OSError:
            pass
    return {"left": left}


def _serve(a: dict) -> dict:
    """A server (Jupyter, or one the user names) on this host's loopback, tied to the caller.

    Picks a free loopback port, starts ``a["argv"]`` ({port} and {token} filled in) in its own
    session in ``a["workdir"]`` with the run's environment, prints ``{"port", "pid", "log"}`` and
    then ``{"ready": true}`` once the port accepts connections. It stops the server's whole process
    group (TERM, then KILL) when its stdin closes (Ctrl-C on the user's side, or the ssh connection
    gone), when the run ends on this node (``a["end_file"]`` appears, or the agent's process group
    ``a["pgid"]`` is gone), or it reports the server's own exit with the tail of its log.
    """
    import json
    import os
    import select
    import signal
    import socket
    import subprocess
    import sys
    import time

    def say(**kw):
        print(json.dumps(kw), flush=True)

    wd = os.path.expanduser(a["workdir"])
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    argv = [x.replace("{port}", str(port)).replace("{token}", a["token"]) for x in a["argv"]]
    env = dict(os.environ)
    env.update(a.get("env") or {})
    env["JUPYTER_TOKEN"] = a["token"]
    log = os.path.join(wd, a["log"])
    os.makedirs(os.path.dirname(log), exist_ok=True)
    try:
        with open(log, "ab") as logf:
            p = subprocess.Popen(argv, cwd=os.path.expanduser(a.get("cwd") or a["workdir"]), env=env,
                                 stdin=subprocess.DEVNULL, stdout=logf,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return {"error": f"cannot start {argv[0]}: {e.strerror}"}
    say(port=port, pid=p.pid, log=log)

    def tail():
        try:
            with open(log, "rb") as f:
                return f.read()[-4000:].decode(errors="replace").splitlines()[-15:]
        except OSError:
            return []

    def stop(why):
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)
            except OSError:
                pass
            deadline = time.time() + wait_s
            while time.time() < deadline:
                p.poll()
                if not _group_alive(p.pid):
                    return {"stopped": why, "left": False}
                time.sleep(0.1)
        return {"stopped": why, "left": _group_alive(p.pid)}

    def run_over():
        if a.get("end_file") and os.path.exists(os.path.join(wd, a["end_file"])):
            return True
        return bool(a.get("pgid")) and not _group_alive(a["pgid"])

    ready, t0 = False, time.time()
    while True:
        if p.poll() is not None:
            deadline = time.time() + (5 if p.returncode < 0 else 0)
            while True:          # killed by a signal: by the run's stop? (its agent ends too)
                if run_over():
                    return stop("the run ended")
                if time.time() >= deadline:
                    break
                time.sleep(0.2)
            out = {"exited": p.returncode, "tail": tail()}
            out.update(stop("the server exited"))
            return out
        if not ready:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                ready = True
                say(ready=True)
            except OSError:
                if time.time() - t0 > a.get("ready_timeout_s", 120):
                    out = stop(f"not listening on port {port} after {a.get('ready_timeout_s', 120):g} s")
                    out["tail"] = tail()
                    return out
        r, _, _ = select.select([sys.stdin], [], [], 0.3)
        if r and not os.read(sys.stdin.fileno(), 4096):
            return stop("asked to stop")
        if run_over():
            return stop("the run ended")
