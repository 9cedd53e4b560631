"""SSH backend: one detached agent + torchrun per host, started by a Fabric/paramiko fan-out.

    make submit JOB=resnet50 INVENTORY=rack.yaml        # preflight, sync, launch; then follow
    python -m cluster doctor resnet50 -i rack.yaml       # the preflight alone (changes nothing)

* preflight: one probe per host, all at once (cluster/backends/transport.py): reachable, python, torch /
  CUDA / NCCL versions (read from torch's files: no import), GPU count against the inventory, free
  disk in the workdir, leftover processes of earlier runs, whether the code is already there, and
  the rendezvous and gang ports (node 0 binds them, every other node connects to them). Answers
  are folded (``clush -b``); any failure, and nothing starts anywhere.
* prepare: rsync of the project's files to hosts whose copy differs (not with ``shared_fs``),
  and on ``--resume`` the seeded checkpoint to node 0 (cluster/backends/rsync.py).
* launch: each probe, having answered, waits on its session; launch sends every host 'GO' with
  its ``NodeLaunch.shell()`` line (a closed session starts nothing), and each answers with its
  agent's pid file (pid == process group). Warm start (``ssh.warm_start``, on by default): where
  the code is already in place, the probe starts the node's agent once it has answered, parked:
  it writes nothing, and torchrun and a fork server for its workers import torch while the
  preflight goes on (cluster/node/agent.py, cluster/node/warmworker.py); on GO it starts, its workers forked
  from that server; on EOF the probe kills its group. Same directory and environment as the line, and
  its argv with ``--park-fd 200`` (cluster/node/probe.py parked_argv), which ``plan`` prints as the
  node's ``# parked:`` line (render). A detached watcher (``python -m cluster.backends.watcher watch``) then syncs node 0's checkpoints
  to storage periodically and at the end. Gang semantics live in
  the agents (cluster/node/agent.py): no controller is needed to stop a run when one node fails.
* status / stop: one fan-out each (pid, exit and heartbeat files; TERM the group, wait, KILL,
  then verify by the run's CLUSTER_RUN_ID that nothing is left). An unreachable host is UNKNOWN,
  never FAILED: a stopped sshd does not stop training.
* logs: SFTP reads from byte offsets over the kept connection; a dropped host raises OSError and
  reconnects in the background, and the merger resumes where it was.

The code that runs on the hosts (standard library only) is in cluster/node/probe.py.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Optional

from cluster.spec import hostlist
from cluster.spec.config import Host
from cluster.errors import UserError
from cluster.plan import Plan, default_port, make_plan
from cluster.backends.transport import GroupError, Pool, Staged, fold, hint_for
from cluster.quoting import quote_argv
from cluster.node.probe import _gpu_count, _probe, _probe_then_launch, _status, _stop
from cluster.backends.ship import host_command
from cluster.run.diagnose import PEER_SYMPTOMS
from cluster.run.records import Run, State
from cluster.backends.rsync import manifest, project_files, pull_logs, pull_metrics, push_code, push_run_files, remote_path, shell_path
from cluster.backends.base import (Backend, LogSource, LogTails, NodeStatus, failed_by_itself,
                                   node_status_of, progress, start_detached)

MIN_FREE_GB = float(os.environ.get("CLUSTER_MIN_FREE_GB", "1"))
PORT_WAIT_S = 10.0           # how long node 0 listens / the others retry in the port check
START_WAIT_S = 60.0          # how long launch waits for each agent's pid file
LOG_READ_MAX = 4 << 20       # bytes per log read (the merger asks again at once)


def gang_port(port: int) -> int:
    """The agents' gang port of a run: 1000 above the rendezvous port (below, near the top)."""
    return port + 1000 if port + 1000 < 65536 else port - 1000


def _json_of(res) -> Optional[dict]:
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


# ---------------------------------------------------------------- log source
class SSHLogSource(LogSource):
    """A host's log over SFTP from a byte offset; OSError while the host is unreachable."""

    def __init__(self, pool: Pool, host: Host, path: str):
        self.name, self.pool, self.path = host.name, pool, path
        self._sftp = self._file = None
        self._down: Optional[str] = None
        self._reconnecting: Optional[threading.Thread] = None
        self._last_try = 0.0

    def _open(self):
        if self._sftp is None:
            self._sftp = self.pool.connection(self.name).client.open_sftp()
            # short: a stalled host must not hold up the merger (and the other hosts' lines) for long
            self._sftp.get_channel().settimeout(min(10.0, self.pool.ssh.command_timeout_s))
        if self._file is None:
            self._file = self._sftp.open(self.path, "rb")
        return self._file

    def _reset(self) -> None:
        for obj in (self._file, self._sftp):
            try:
                obj and obj.close()
            except Exception:   # noqa: BLE001
                pass
        self._sftp = self._file = None
        self.pool.reset(self.name)

    def _reconnect(self) -> None:
        try:
            self._open()
            self._down = None
        except FileNotFoundError:
            self._down = None
        except Exception as e:   # noqa: BLE001 -- anything here means: still down
            self._down = _short(e)
            self._reset()

    def read(self, offset: int) -> bytes:
        if self._down is not None:
            if self._reconnecting is None or not self._reconnecting.is_alive():
                if time.time() - self._last_try > 1.0:
                    self._last_try = time.time()
                    self._reconnecting = threading.Thread(target=self._reconnect, daemon=True)
                    self._reconnecting.start()
            raise OSError(self._down)
        try:
            f = self._open()
            f.seek(offset)
            return f.read(LOG_READ_MAX)
        except FileNotFoundError:
            self._file = None
            return b""
        except Exception as e:   # noqa: BLE001 -- paramiko, socket and EOF errors: the link is down
            self._down = _short(e)
            self._last_try = time.time()
            self._reset()
            raise OSError(self._down) from None


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]


# ---------------------------------------------------------------- the backend
class SSHBackend(Backend):
    name = "ssh"

    def __init__(self, inventory):
        super().__init__(inventory)
        self._pool: Optional[Pool] = None
        self._stale: dict[str, int] = {}
        self._staged_: Optional[Staged] = None
        # hosts that did not answer this backend's last status probe (down, cut off the network):
        # each try costs connect_timeout_s for the same answer, so the same pass reads their log
        # from the local copy (log_tail), the next probe (the watcher's, every few seconds) does not
        # wait for them beyond the others (Pool.run's optional), and the watcher does not sync from
        # them until they answer
        self.unanswered: set[str] = set()

    @property
    def _staged(self) -> Staged:
        if self._staged_ is None:
            self._staged_ = Staged(self.pool)
        return self._staged_

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            self._pool = Pool(self.inv.hosts, self.inv.ssh)
            atexit.register(self._pool.close)
        return self._pool

    def close(self) -> None:
        if self._staged_ is not None:
            self._staged_.close()
        if self._pool is not None:
            self._pool.close()

    def _hosts(self, run: Run) -> list[Host]:
        return [self.inv.host(n["host"]) for n in run.data["plan"]["nodes"]]

    def _run_dir(self, run: Run) -> str:
        return f"runs/{run.id}"

    # ---- plan
    def make_plan(self, job, run_id: str, gpus, **kw) -> Plan:
        port = kw.get("port") or job.rdzv_port or default_port(run_id)
        kw.pop("local_runs", None)       # hosts keep runs/ under their workdir
        return make_plan(self.inv, job, run_id, gpus, gang_port=gang_port(port), **kw)

    def detect_gpus(self, hosts) -> dict[str, int]:
        out = {h.name: int(h.gpus) for h in hosts if h.gpus != "auto"}
        auto = [h for h in hosts if h.gpus == "auto"]
        if auto:
            res = self.pool.run({h.name: host_command(h.python, _gpu_count, site=False) for h in auto},
                                stdin=b"{}", timeout_s=60, label="GPU count probe (python -c ...)")
            res.check("GPU detection (gpus: auto)")
            for h in auto:
                out[h.name] = int(res[h.name].stdout.strip().splitlines()[-1])
        return out

    def render(self, plan: Plan) -> str:
        """The plan, with the argv each node's agent runs as where the warm start parks it."""
        return plan.render(warm_start=self.inv.ssh.warm_start)

    # ---- preflight
    def preflight(self, plan: Plan) -> None:
        """The checks below and, at the same time, the job's data onto every node (cluster/backends/stage.py)."""
        staging = None
        if plan.data is not None:
            from cluster.backends.stage import Background, Stager
            staging = Background(Stager(plan.data, [self.inv.host(n.host) for n in plan.nodes], self.pool,
                                        self.inv.ssh, self.inv.shared_fs, progress, copy=not self.check_only,
                                        inventory_hosts=self.inv.hosts))
        try:
            self._preflight(plan)
        except BaseException:
            if staging is not None:
                staging.cancel()
            raise
        if staging is not None:
            try:
                staging.result()
            except BaseException:
                self._staged.close()    # parked agents end: nothing starts
                raise

    def _preflight(self, plan: Plan) -> None:
        hosts = [self.inv.host(n.host) for n in plan.nodes]
        master, port = plan.rdzv_endpoint.rsplit(":", 1)
        ports = [int(port), gang_port(int(port))] if len(hosts) > 1 else [int(port)]
        self.pool.warm([h.name for h in hosts])     # handshakes go on while the manifest is built
        man = None if self.inv.shared_fs else manifest(project_files())
        batches = -(-len(hosts) // max(1, self.inv.ssh.fanout))
        wait_s = PORT_WAIT_S * batches
        stdin, cmds = {}, {}
        for i, (h, node) in enumerate(zip(hosts, plan.nodes)):
            a = {"workdir": h.workdir, "host": h.name, "manifest": man, "ports": ports, "address": master,
                 "role": "server" if i == 0 else "client", "peers": len(hosts) - 1, "wait_s": wait_s}
            if self.inv.ssh.warm_start:
                a["park"] = {"argv": list(node.argv), "env": dict(node.env)}
            if node.job_python(h.python):
                a["job_python"] = node.job_python(h.python)
            stdin[h.name] = json.dumps(a).encode() + b"\n"
            cmds[h.name] = host_command(h.python, _probe_then_launch)
        t0 = time.monotonic()
        # each probe answers, then waits: launch() tells every host to start at once, over the same
        # session (one round trip less); if anything fails here, closing the sessions starts nothing
        self._staged.close()
        res = self._staged.start(cmds, stdin, timeout_s=wait_s + self.inv.ssh.command_timeout_s,
                                 label="preflight probe (python -c ...)")
        report, problems = preflight_report(plan, hosts, res, ports)
        progress(f"preflight: {len(hosts)} host(s) {hostlist.fold([h.name for h in hosts])} "
                 f"in {time.monotonic() - t0:.1f} s")
        for line in report:
            progress(line)
        if problems:
            self._staged.close()
            hint = hint_for(r for r in res.values() if r.error) or \
                "fix the hosts or the inventory, then rerun 'python -m cluster doctor' (it changes nothing)"
            raise UserError("preflight failed, nothing was started:\n  " + "\n  ".join(problems),
                            where=self.inv.path, hint=hint)
        self._stale = {h: (_json_of(r) or {}).get("stale", 1) for h, r in res.items()}
        parked = [h for h, r in res.items() if (_json_of(r) or {}).get("parked")]
        if parked:
            progress(f"warm start: the agents on {hostlist.fold(parked)} import torch now and start on 'go'")
        try:
            self._container_preflight(plan)
        except UserError:
            self._staged.close()
            raise

    def check_spares(self, names: list[str], peer: Optional[str] = None) -> dict[str, Optional[str]]:
        """Recovery (cluster/backends/relaunch.py): the preflight probe on each spare in ``names``
        and on ``peer`` (a host of the run), all at once; per spare, what the preflight report
        finds wrong with it (unreachable, no torch, versions unlike the peer's, GPUs, disk,
        leftovers), or None. Also the choice of a ``nodes: MIN-MAX`` job's hosts (cluster/submit.py)."""
        hosts = [self.inv.host(n) for n in dict.fromkeys([*names, *([peer] if peer else [])])]
        progress(f"preflight probe of {hostlist.fold([h.name for h in hosts])} ...")
        stdin = {h.name: json.dumps({"workdir": h.workdir, "host": h.name}).encode() + b"\n" for h in hosts}
        res = self.pool.run({h.name: host_command(h.python, _probe) for h in hosts}, stdin=stdin,
                            timeout_s=self.inv.ssh.command_timeout_s, label="spare preflight probe (python -c ...)")
        ref = [self.inv.host(peer)] if peer else []
        _, own = preflight_report(None, ref, res, [])
        out = {}
        for n in names:
            _, problems = preflight_report(None, ref + [self.inv.host(n)], res, [])
            problems = [p for p in problems if p not in own]
            out[n] = "; ".join(problems) or None
        return out

    def _container_preflight(self, plan: Plan) -> None:
        """Jobs in a container: the runtime works and the image is there, on every host (cluster/container.py)."""
        from cluster.container import check_digests, check_failed, preflight_checks
        checks = {n.host: preflight_checks(n.container) for n in plan.nodes if n.container is not None}
        images = {n.host: n.container.image for n in plan.nodes if n.container is not None}
        digests: dict[str, dict[str, str]] = {}     # image -> host -> digest check's output
        for i in range(max((len(c) for c in checks.values()), default=0)):
            todo = {h: c[i] for h, c in checks.items() if i < len(c)}
            res = self.pool.run({h: quote_argv(c.argv) for h, c in todo.items()}, timeout_s=1800,
                                label="container check")
            bad = [check_failed(h, todo[h], r.exit_code if r.exit_code is not None else -1,
                                (r.error or "") + r.stderr + r.stdout) for h, r in sorted(res.failed.items())]
            if bad:
                raise UserError("container preflight failed, nothing was started:\n  " +
                                "\n  ".join(b.render().replace("error: ", "", 1) for b in bad), hint=bad[0].hint)
            for h, c in todo.items():
                if c.digest:
                    digests.setdefault(images[h], {})[h] = res[h].stdout
            for h in [h for h in checks if h in res.failed]:
                checks.pop(h)
        for image, outputs in digests.items():      # one image everywhere: all or nothing
            try:
                check_digests(image, outputs)
            except UserError as e:
                raise UserError("container preflight failed, nothing was started: " + e.message,
                                key="container.image", hint=e.hint) from None

    # ---- prepare: code and checkpoints
    def prepare(self, plan: Plan, run: Run) -> None:
        hosts = [self.inv.host(n.host) for n in plan.nodes]
        storage = Path(os.path.expanduser(self.inv.storage)).resolve() / run.id if self.inv.storage \
            else run.dir / "checkpoints"
        run.update(checkpoint_dir=str(storage))
        if not self.inv.shared_fs:
            todo = [h for h in hosts if self._stale.get(h.name, 1)]
            if todo:
                files = project_files()
                progress(f"sync: {len(files)} project file(s) to {hostlist.fold([h.name for h in todo])}"
                         + (f" ({hostlist.fold([h.name for h in hosts if h not in todo])} up to date)"
                            if len(todo) < len(hosts) else ""))
                results = push_code(todo, self.inv.ssh, files, progress)
                bad = [r for r in results if not r.ok]
                if bad:
                    raise UserError("code sync failed, nothing was started:\n  " +
                                    "\n  ".join(r.describe() for r in bad),
                                    hint="check free disk and permissions of the workdir on those hosts")
            else:
                progress(f"sync: code up to date on {hostlist.fold([h.name for h in hosts])}")
            run.event("code-synced", hosts=[h.name for h in todo])
        if run.data.get("resume_files") and not run.data.get("attempts"):
            # node 0 (rank 0 loads and broadcasts), or every node where each rank loads it itself;
            # only before the first attempt: a later one resumes from what the run itself saved
            # since (cluster/backends/relaunch.py), which these older files would overwrite
            every = ((run.data["job"].get("resolved") or {}).get("checkpoint") or {}).get("every_node")
            to = hosts if every else hosts[:1]
            results = push_run_files(to, self.inv.ssh, run.id, run.dir, run.data["resume_files"])
            bad = [r for r in results if not r.ok]
            if bad:
                raise UserError("cannot copy the checkpoint to " + ", ".join(r.describe() for r in bad),
                                hint="check the workdir of those hosts (disk, permissions)")
            progress(f"resume: checkpoint copied to {hostlist.fold([h.name for h in to])} "
                     f"({', '.join(run.data['resume_files'])})")

    # ---- launch
    def launch(self, plan: Plan, run: Run) -> dict:
        if all(n.host in self._staged.channels for n in plan.nodes):
            words = {n.host: b"GO " + json.dumps({
                "shell": n.shell(), "pid": f"{n.state_dir}/{n.host}.pid", "out": n.agent_log_path,
                "wait_s": START_WAIT_S}).encode() + b"\n" for n in plan.nodes}
            res = self._staged.finish(words, timeout_s=START_WAIT_S + self.inv.ssh.command_timeout_s,
                                      label="start the agent (setsid python -m cluster.node.agent ...)")
            pgids = {h: info["agent"]["pgid"] for h, r in res.items()
                     if r.ok and (info := _json_of(r)) and info.get("launched")}
        else:
            res, pgids = self._launch_exec(plan)
        self.partial_handle = {"pgids": pgids}
        if len(pgids) < len(plan.nodes):
            raise GroupError("launch", res, hint="see the agent's output above; nothing of the run is left running")
        progress(f"started {len(pgids)} node(s): " + ", ".join(f"{h} (pgid {g})" for h, g in pgids.items()))
        return {"pgids": pgids, "watcher_pid": self._start_watcher(run)}

    def _launch_exec(self, plan: Plan):
        """Launch without a staged preflight: one exec per host that starts the line and waits for the pid file."""
        cmds = {}
        for node in plan.nodes:
            wd = self.inv.host(node.host).workdir.rstrip("/") or "/"
            pid = shell_path(f"{wd}/{node.state_dir}/{node.host}.pid")
            out = shell_path(f"{wd}/{node.agent_log_path}")
            steps = int(START_WAIT_S / 0.02)
            # a subshell with /dev/null for stdio: nothing backgrounded by the line may keep the ssh
            # channel open ('{ ...; }' would not do: the shell keeps saved copies of the channel)
            cmds[node.host] = (
                f"( {node.shell()} ) </dev/null >/dev/null 2>&1\n"
                f"w=0; while [ ! -s {pid} ] && [ ! -s {out} ] && [ $w -lt {steps} ]; do sleep 0.02; w=$((w+1)); done\n"
                f"if [ -s {pid} ]; then cat {pid}; else echo 'the agent did not start:'; tail -n 20 {out}; exit 3; fi")
        res = self.pool.run(cmds, timeout_s=START_WAIT_S + self.inv.ssh.command_timeout_s,
                            label="start the agent (setsid python -m cluster.node.agent ...)")
        pgids = {h: info["pgid"] for h, r in res.items() if r.ok and (info := _json_of(r))}
        return res, pgids

    def _start_watcher(self, run: Run) -> Optional[int]:
        """The detached checkpoint syncer (python -m cluster.backends.watcher watch RUN); it ends with the run."""
        if getattr(self, "watcher_pid", None):      # a relaunch by the watcher itself (backends/relaunch.py)
            return self.watcher_pid
        return start_detached(run, "cluster.backends.watcher", "watch", "watcher.log")

    # ---- status
    def node_status(self, run: Run) -> list[NodeStatus]:
        hosts = self._hosts(run)
        pgids = run.data.get("handle", {}).get("pgids", {})
        stdin = {h.name: json.dumps({"workdir": h.workdir, "run_dir": self._run_dir(run), "host": h.name,
                                     "pgid": pgids.get(h.name), "run_id": run.id,
                                     "gpus": self.with_gpus}).encode() for h in hosts}
        res = self.pool.run({h.name: host_command(h.python, _status, site=False) for h in hosts}, stdin=stdin,
                            timeout_s=min(30.0, self.inv.ssh.command_timeout_s), label="status probe (python -c ...)",
                            optional=self.unanswered)
        out, aborts = [], {}
        self.unanswered = {name for name, r in res.items() if r.error is not None}
        for h in hosts:
            r, pgid = res[h.name], pgids.get(h.name)
            info = _json_of(r) if r.ok else None
            if info is None:
                why = r.error or f"status probe failed: {r.describe()}"
                out.append(NodeStatus(h.name, State.UNKNOWN, pgid, detail=f"unreachable: {why}"))
                continue
            out.append(node_status_of(h.name, pgid, info))
            if (info["exit"] or {}).get("gang_abort") and info["exit"].get("code") != 0:
                aborts[h.name] = info["exit"]["gang_abort"]
        return _blame_lost(out, aborts, run)

    def first_failure(self, run: Run, nodes: list[NodeStatus], tails: Optional[LogTails] = None) -> dict:
        """The node that failed by itself, not one the gang stopped because of it."""
        own = [n for n in nodes if n.state == State.FAILED]
        stopped = [n for n in nodes if n.state == State.CANCELLED and n.exit_code not in (None, 0)
                   and "gang" in n.detail]
        tails = LogTails(self, run) if tails is None else tails
        own += [n for n in stopped[:8] if failed_by_itself(n, tails[n.host])]
        failure = super().first_failure(run, own or nodes, tails, everyone=nodes)
        if failure.get("host") and failure.get("rank") is None:
            # torchrun itself died (killed): no rank named in the log; name the host's first rank
            plan = run.data["plan"]
            idx = next((i for i, n in enumerate(plan["nodes"]) if n["host"] == failure["host"]), None)
            if idx is not None:
                nproc = plan["nodes"][idx]["nprocs"]
                failure["rank"] = idx * nproc
                failure["error"] = (f"torchrun on {failure['host']} ended with exit code {failure.get('exit_code')} "
                                    f"(ranks {idx * nproc}-{idx * nproc + nproc - 1})")
        findings = failure.get("findings") or []
        if failure.get("host") and {f["pattern_id"] for f in findings} <= PEER_SYMPTOMS:
            # only a peer's death shows; if that peer did not fail by itself, the ranks were out of step
            from cluster.run.diagnose import diagnose, out_of_step_finding
            address = {n["host"]: self.inv.host(n["host"]).address for n in run.data["plan"]["nodes"]}
            step = out_of_step_finding(failure.get("log_tail") or tails[failure["host"]], failure["host"],
                                       failure.get("rank"), nodes, address,
                                       lambda h: diagnose(tails[h]))    # a victim too: not out of step
            if step is not None:
                failure["findings"] = [step.to_dict()] + findings
                failure["error"] = f"ranks out of step: {step.line}"
        lost = next((n for n in nodes if n.host == failure.get("host") and n.detail.startswith("lost by the gang")), None)
        if lost is not None:
            failure["error"] = f"{lost.host}: {lost.detail}"
        stopped = sorted(n.host for n in nodes if "gang" in n.detail and n.state == State.CANCELLED)
        if stopped:
            failure["gang_stopped"] = stopped
        return failure

    # ---- stop
    def stop_nodes(self, run: Run, grace_s: float, skip: frozenset = frozenset()) -> list[str]:
        """``skip``: hosts not asked (cluster/backends/relaunch.py: a lost host that the next
        attempt runs without), each left as one that could not be checked."""
        plan_nodes = run.data.get("plan", {}).get("nodes", [])
        left = [f"{n['host']}: could not check (not asked: it did not answer the last status probe)"
                for n in plan_nodes if n["host"] in skip]
        hosts = [self.inv.host(n["host"]) for n in plan_nodes if n["host"] not in skip]
        pgids = (run.data.get("handle") or {}).get("pgids", {}) or self.partial_handle.get("pgids", {})
        stdin = {h.name: json.dumps({"workdir": h.workdir, "run_id": run.id, "pgid": pgids.get(h.name),
                                     "grace_s": grace_s}).encode() for h in hosts}
        res = self.pool.run({h.name: host_command(h.python, _stop, site=False) for h in hosts}, stdin=stdin,
                            timeout_s=grace_s + 30 + self.inv.ssh.command_timeout_s, label="stop (python -c ...)")
        for h in hosts:
            r = res[h.name]
            info = _json_of(r) if r.ok else None
            if info is None:
                left.append(f"{h.name}: could not check ({r.error or r.describe()})")
                continue
            left += [f"{h.name}: pid {pid} still alive: {cmd}" for pid, cmd in info["left"]]
        return left + self._remove_containers(run)

    def _remove_containers(self, run: Run) -> list[str]:
        """docker/podman containers belong to their daemon, not to the group: remove by name, verify by label."""
        from cluster.container import list_argv, refs_of_run
        from cluster.node.containers import remove_argv
        cmds = {}
        for host, ref in refs_of_run(run.data):
            rm, ls = remove_argv(ref.runtime, ref.name), list_argv(ref.runtime, ref.run_id, host)
            if rm is not None:
                cmds[host] = f"{quote_argv(rm)} >/dev/null 2>&1; {quote_argv(ls)}"
        res = self.pool.run(cmds, timeout_s=180, label="remove the run's containers")
        left = []
        for host, r in res.items():
            if not r.ok:
                left.append(f"{host}: could not check the run's containers ({r.describe()})")
            left += [f"{host}: container {name} still there" for name in r.stdout.split()]
        return left

    # ---- logs
    def log_sources(self, run: Run) -> list[LogSource]:
        # and the hosts that earlier attempts ran on (replaced by a spare since): their lines are the run's too
        hosts = self._hosts(run)
        hosts += [self.inv.host(n) for n in dict.fromkeys(h for a in run.data.get("attempts") or []
                                                          for h in a.get("hosts") or [])
                  if n not in {h.name for h in hosts}]
        # connect to every host at once, so that the merger's first poll does not wait host by host
        threads = [threading.Thread(target=self._try_connect, args=(h.name,), daemon=True) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.inv.ssh.connect_timeout_s + 5)
        return [SSHLogSource(self.pool, h, remote_path(h.workdir, "runs", run.id, "logs", f"{h.name}.log"))
                for h in hosts]

    def _try_connect(self, name: str) -> None:
        try:
            self.pool.connection(name)
        except Exception:   # noqa: BLE001 -- the log source reports it
            pass

    def log_tail(self, run: Run, host: str, lines: int) -> list[str]:
        h = self.inv.host(host)
        path = shell_path(f"{h.workdir.rstrip('/')}/runs/{run.id}/logs/{host}.log")
        r = self.pool.exec(host, f"tail -n {int(lines)} {path}", timeout_s=30) if host not in self.unanswered else None
        if r is not None and r.ok:
            return r.stdout.splitlines()
        local = run.dir / "logs" / f"{host}.log"      # collected earlier (logs --collect, the watcher)
        if local.exists():
            return local.read_text(errors="replace").splitlines()[-lines:]
        return []

    def collect_metrics(self, run: Run) -> None:
        """Every host's runs/<id>/metrics (records, heartbeats, TensorBoard files) into runs/<id>/metrics."""
        for r in pull_metrics(self._hosts(run), self.inv.ssh, run.id, run.dir / "metrics"):
            if not r.ok:
                progress(f"metrics: {r.describe()} (what is here already is used)")

    def collect_logs(self, run: Run) -> None:
        results = pull_logs(self._hosts(run), self.inv.ssh, run.id, run.dir / "logs", progress)
        bad = [r for r in results if not r.ok]
        if bad:
            raise UserError("could not collect the logs of " + ", ".join(r.host for r in bad) + ":\n  " +
                            "\n  ".join(r.describe() for r in bad),
                            hint="rerun 'cluster logs RUN --collect' when the hosts are reachable")


def _blame_lost(nodes: list[NodeStatus], aborts: dict, run: Run) -> list[NodeStatus]:
    """A host the gang lost (it went silent: down, or cut off the network) failed the run, though
    every agent, its own included, ended by the gang's abort: it becomes the FAILED node.

    Each aborted agent claims whom it lost; a peer names node 0 only as "node 0". A host cut off
    loses everyone, so it claims too: only claims by hosts that no other host lost count (node 0
    cut off: the others both lost node 0, and it lost one of them). An unreachable host counts as
    lost by nobody's claim but its own silence. With no such claimer (two nodes, each lost the
    other), node 0's own claim decides, as node 0 is the one that saw every peer."""
    if run.data.get("stop_requested") or any(n.state == State.FAILED for n in nodes):
        return nodes
    node0 = (run.data.get("plan", {}).get("nodes") or [{}])[0].get("host")
    claims: dict[str, tuple[str, str]] = {}       # claimer -> (lost host, why)
    for claimer, ab in aborts.items():
        m = re.match(r"lost node (\S+) \((.*)\)", ab.get("reason") or "")
        if m:
            claims[claimer] = (node0 if m.group(1) == "0" else m.group(1), m.group(2))
    lost_by_some = {host for host, _ in claims.values()}
    trusted = {c: v for c, v in claims.items() if c not in lost_by_some}
    if not trusted and node0 in claims:
        trusted = {node0: claims[node0]}
    lost = {host: why for host, why in trusted.values()}
    for n in nodes:
        if n.host in lost:
            n.state = State.FAILED
            n.detail = f"lost by the gang ({lost[n.host]}): the host went down or was cut off the network"
    return nodes


def preflight_report(plan: Plan, hosts: list[Host], res, ports: list[int]) -> tuple[list[str], list[str]]:
    """Folded lines (identical answers grouped, differences marked) and the problems found."""
    names = [h.name for h in hosts]
    info: dict[str, dict] = {}
    problems: list[str] = []
    lines: list[str] = []
    bad_reach = {}
    for h in hosts:
        r = res[h.name]
        data = _json_of(r) if r.ok else None
        if data is None:
            if r.error:
                bad_reach[h.name] = r.error
            elif r.exit_code == 127:
                bad_reach[h.name] = f"python {h.python!r} not found (inventory 'python')"
            else:
                bad_reach[h.name] = r.describe().split(": ", 1)[1]
        else:
            info[h.name] = data

    def line(ok: bool, check: str, text: str) -> None:
        lines.append(f"  {'ok' if ok else '!!'}  {check:<11} {text}")

    def folded(values: dict) -> str:
        return " | ".join(f"{v} ({hostlist.fold(hs)})" for hs, v in fold(values))

    reach_ok = [n for n in names if n in info]
    if reach_ok:
        line(not bad_reach, "reachable", hostlist.fold(reach_ok))
    for n, why in sorted(bad_reach.items()):
        line(False, "reachable", f"{n}: {why}")
        problems.append(f"{n}: {why}")
    if not info:
        return lines, problems
    for key, label in (("python", "python"), ("torch", "torch"), ("cuda", "CUDA"), ("nccl", "NCCL")):
        values = {n: str(d.get(key) or "none") for n, d in info.items()}
        same = len(set(values.values())) == 1
        missing = key == "torch" and "none" in values.values()
        line(same and not missing, label, folded(values) + ("" if same else "   <- differs"))
        if missing:
            problems.append("torch is not installed for the inventory's python on " +
                            hostlist.fold([n for n, v in values.items() if v == "none"]))
        elif not same:
            problems.append(f"{label} versions differ: {folded(values)}")
    jp = {n: d["job_python"] for n, d in info.items() if d.get("job_python")}
    if jp:      # a command: that names its own interpreter: the one the job really runs
        line(all(v.get("torch") for v in jp.values()), "job python", folded({
            n: f"{v['argv0']}: " + (f"python {v['python']}, torch {'found' if v['torch'] else 'missing'}"
                                   if "python" in v else v["error"]) for n, v in jp.items()}))
        bad = sorted(n for n, v in jp.items() if not v.get("torch"))
        if bad:
            argv0 = jp[bad[0]]["argv0"]
            problems.append(f"the job's command runs {argv0!r}, which has no torch (or does not run) on "
                            f"{hostlist.fold(bad)}; write \"{{python}}\" in 'command:' for the inventory's "
                            f"python ({hosts[0].python})")
    gpus_ok = True
    gvals = {}
    for h in hosts:
        if h.name not in info:
            continue
        found, want = info[h.name]["gpus"], h.gpus
        gvals[h.name] = f"{found}" + (f" (inventory: {want})" if want != "auto" and found != want else "")
        if want != "auto" and found != int(want):
            gpus_ok = False
            problems.append(f"{h.name}: {found} GPU(s) found, the inventory says {want}")
    line(gpus_ok, "gpus", folded(gvals))
    dvals = {n: f"{d['free_gb']:g} GB free" + ("" if d["writable"] else ", not writable") for n, d in info.items()}
    low = [n for n, d in info.items() if d["free_gb"] < MIN_FREE_GB or not d["writable"]]
    line(not low, "disk", folded(dvals))
    for n in low:
        problems.append(f"{n}: workdir {dvals[n]} (at least {MIN_FREE_GB:g} GB and write access needed)")
    # ports
    node0 = hosts[0].name
    if len(hosts) >= 1 and node0 in info:
        state = info[node0].get("ports") or {}
        busy = {p: s for p, s in state.items() if s != "free"}
        text = f"{', '.join(map(str, ports))} on {node0}: " + ("free" if not busy else
                                                                 ", ".join(f"{p} {s}" for p, s in busy.items()))
        unreach = {}
        for n, d in info.items():
            for p, s in (d.get("reach") or {}).items():
                if s != "ok":
                    unreach.setdefault(n, []).append(s)
        if len(hosts) > 1:
            ok_from = [n for n in info if n != node0 and n not in unreach]
            text += f"; reachable from {hostlist.fold(ok_from) if ok_from else 'no other node'}"
        line(not busy and not unreach, "ports", text)
        for p, s in busy.items():
            problems.append(f"{node0}: port {p} (rendezvous/gang) {s}; pass rdzv_port=<free port> or stop what holds it")
        for n, errs in unreach.items():
            problems.append(f"{n}: {errs[0]} (firewall, or the wrong 'address' for {node0})")
    # leftovers of earlier runs
    left = {n: d["leftovers"] for n, d in info.items() if d.get("leftovers")}
    line(not left, "leftovers", "none" if not left else
         "; ".join(f"{n}: " + ", ".join(f"run {rid} pids {' '.join(map(str, p[:5]))}" for rid, p in l.items())
                   for n, l in left.items()))
    for n, l in left.items():
        for rid in l:
            problems.append(f"{n}: processes of earlier run {rid} are still running; "
                            f"'python -m cluster stop {rid}' ends them")
    # other live runs on a host: they share its CPUs and memory, never its GPUs (every run's ranks
    # use cuda:0..N-1); their ports are checked above
    busy = {n: d["busy"] for n, d in info.items() if d.get("busy")}
    gpu_clash = {n: b for n, b in busy.items() if info[n].get("gpus")}
    if busy:
        line(not gpu_clash, "other runs", "; ".join(
            f"{n}: " + ", ".join(f"{rid} ({what})" for rid, what in b.items()) for n, b in busy.items()))
    for n, b in gpu_clash.items():
        for rid, what in b.items():
            problems.append(f"{n}: its {info[n]['gpus']} GPU(s) are in use by run {rid} ({what}); a GPU is not "
                            f"shared between runs: wait for it to end, or 'python -m cluster stop {rid}'")
    stale = {n: d.get("stale") for n, d in info.items() if d.get("stale") is not None}
    if stale:
        line(True, "code", folded({n: "up to date" if s == 0 else f"{s} file(s) to sync" for n, s in stale.items()}))
    return lines, problems


BACKEND = SSHBackend
