"""submit/plan: inventory + job + overrides -> plan -> (dry run | preflight, record, launch)."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Optional

from cluster import backends
from cluster.spec import hostlist
from cluster.spec.config import (check_profile_overrides, check_run_id, inventory_from_plain, load_inventory,
                                 load_job, node_range)
from cluster.errors import UserError
from cluster.run.records import Run, State, git_commit, new_run_id, submitter
from cluster.spec.schema import to_plain


def resolve(job_name: str, overrides: list[str], inventory: Optional[str], backend: Optional[str],
            run_id: Optional[str] = None, healthy: bool = False):
    """Everything up to the plan; pure apart from GPU detection on the hosts. ``healthy`` (submit):
    a job with a range of nodes runs on the hosts that pass the preflight probe."""
    inv = load_inventory(inventory)
    if backend:
        if backend not in backends.NAMES:
            raise UserError(f"unknown backend '{backend}'", where="BACKEND",
                            hint="use one of: " + ", ".join(backends.NAMES))
        if backend == "slurm" and inv.slurm is None:
            raise UserError("backend slurm needs a 'slurm:' section in the inventory", where=inv.path,
                            key="slurm", hint="add 'slurm:' with at least 'partition:'")
        inv = dataclasses.replace(inv, backend=backend)
    loaded = load_job(job_name, overrides)
    be = backends.get(inv.backend, inv)
    notes: list[str] = []
    hosts = _in_job(loaded, be.select_hosts, loaded.job)
    span = node_range(loaded.job.nodes)
    if span and healthy:
        hosts = _healthy_hosts(be, loaded, span, notes) or hosts
    gpus = be.detect_gpus(hosts)
    if span:
        notes.append(f"nodes {loaded.job.nodes}: {len(hosts)} node(s) now" + (
            f"; when a host fails the run and no spare is left, the next attempt goes on without it, down to "
            f"{span[0]} node(s)" + (" (train: the per-process batch is kept; the learning rate follows the "
                                    "global batch)" if loaded.job.train is not None else "")
            if len(hosts) > span[0] else ""))
    if all(g == 0 for g in gpus.values()) and "cpu" in loaded.job.profiles:
        loaded = load_job(job_name, overrides, profile="cpu")
        notes += [f"no GPU on {hostlist.fold([h.name for h in hosts])}: {n}" for n in loaded.notes]
    check_profile_overrides(overrides, loaded.profile)
    run_id = check_run_id(run_id, "--run-id") if run_id else new_run_id(loaded.job.name)
    plan = _in_job(loaded, be.make_plan, loaded.job, run_id, gpus, notes=tuple(notes), local_runs=_local_runs(),
                   **({"hosts": hosts} if span else {}))
    return inv, be, loaded, plan


def _in_job(loaded, fn, *args, **kw):
    """``fn(*args, **kw)``; an error that names the job (where="job") names the job file's line of
    its key instead (or the override): the plan knows the key, not the file."""
    try:
        return fn(*args, **kw)
    except UserError as e:
        if e.where != "job":
            raise
        raise UserError(e.message, where=loaded.where(e.key or ""), key=e.key, hint=e.hint) from None


def _healthy_hosts(be, loaded, span: tuple[int, int], notes: list[str]):
    """``nodes: MIN-MAX``: the inventory's job hosts that pass the preflight probe (the one a spare
    passes: reachable, python, torch, GPUs, disk, leftovers), the first MAX of them in inventory order;
    fewer than MIN: refused, naming what is wrong with the others. None where the backend does not
    probe hosts on its own."""
    lo, hi = span
    candidates = list(be.inv.job_hosts)
    found = be.check_spares([h.name for h in candidates])
    if found is None:
        return None
    bad = {n: p for n, p in found.items() if p}
    good = [h for h in candidates if h.name not in bad][:hi]
    if len(good) < lo:
        raise UserError(f"nodes: {loaded.job.nodes} needs at least {lo} healthy host(s); {len(good)} of "
                        f"{len(candidates)} passed the preflight probe:\n  " +
                        "\n  ".join(f"{n}: {p}" for n, p in bad.items()),
                        where=loaded.where("nodes"), key="nodes",
                        hint="fix those hosts, or lower the range's minimum")
    for n, p in bad.items():
        notes.append(f"{n} left out (nodes {loaded.job.nodes}): {p}")
    return tuple(good)


def _local_runs() -> str:
    import os
    from cluster.spec.config import REPO
    from cluster.run.records import RUNS_DIR
    rel = os.path.relpath(RUNS_DIR, REPO)
    return str(RUNS_DIR) if rel.startswith("..") else rel


def submit(job_name: str, overrides: list[str], inventory: Optional[str] = None,
           backend: Optional[str] = None, resume: Optional[str] = None) -> Run:
    from cluster.backends.base import progress
    inv = load_inventory(inventory)
    if inv.login is not None and (backend or inv.backend) == "slurm":
        # SLURM through the login node: the SLURM backend runs there (cluster/backends/login.py)
        from cluster.backends.login import submit as submit_through_login
        return submit_through_login(inv, job_name, overrides, resume=resume)
    inv, be, loaded, plan = resolve(job_name, overrides, inventory, backend, healthy=True)
    for n in plan.notes:
        progress(n)
    resume_run = None
    if resume:
        from cluster.run.records import resolve as resolve_run
        resume_run = resolve_run(resume)
    progress(f"preflight: {len(plan.nodes)} node(s) ...")
    be.preflight(plan)
    if loaded.job.preflight == "deep":      # opt-in: GPU health and the network's bandwidth (doctor --deep)
        from cluster.backends.deepcheck import deep_preflight
        deep_preflight(be, plan, loaded.job.min_busbw_gbps)
    run = Run(plan.run_id)
    run.create({
        "id": plan.run_id, "created": time.time(), "state": State.PENDING.value,
        "backend": inv.backend, "job": {"name": loaded.job.name, "file": loaded.path,
                                        "resolved": to_plain(loaded.job), "profile": loaded.profile},
        "overrides": list(overrides), "inventory": to_plain(inv), "plan": to_plain(plan),
        "git_commit": git_commit(), "resume_from": resume_run.id if resume_run else None,
        "submitter": submitter(),
    })
    run.event("submitted", job=loaded.job.name, nodes=len(plan.nodes), world_size=plan.world_size)
    if resume_run:
        seed_checkpoint(resume_run, run)
    be.prepare(plan, run)
    try:
        handle = be.launch(plan, run)
    except BaseException as e:
        # never leave half a run behind: stop whatever did start, then report
        run.event("launch-failed", error=str(e))
        run.update(handle=be.partial_handle or run.data.get("handle", {}))
        be.stop_nodes(run, grace_s=5.0)
        run.set_state(State.FAILED, final=True, failure={"error": str(e)})
        raise
    run.update(handle=handle)
    if inv.backend != "slurm":
        # a SLURM job stays PENDING (queued) once sbatch answered with its id: its task 0 records
        # RUNNING as it starts (cluster/node/slurm_task.py), maybe before this line, so no STARTING here
        run.set_state(State.STARTING)
    return run


def seed_checkpoint(src: Run, dst: Run) -> list[str]:
    """Copy the newest checkpoint of ``src`` (kept on this machine) into ``dst``'s run directory:
    train's latest ``ckpt_*.pt`` and ``latest``, or else all of its checkpoints/ (CLUSTER_CHECKPOINT_DIR),
    and the job's own ``checkpoint.path``. Returns what was copied, relative to the run directory
    (the ssh backend puts exactly that on the node(s) that need it)."""
    from cluster.run.checkpoints import checkpoint_path
    own = checkpoint_path(src.data)
    stored = src.data.get("checkpoint_dir")           # ssh: the storage copy
    ckpts = Path(stored or src.dir / "checkpoints")
    if src.data.get("backend") == "ssh" and (src.data.get("plan") or {}).get("nodes"):
        # the run may have ended a moment ago, before its watcher's last sync: fetch node 0's newest now
        from cluster.backends.base import progress
        from cluster.backends.rsync import pull_checkpoints
        inv = inventory_from_plain(src.data["inventory"])
        node0 = inv.host(src.data["plan"]["nodes"][0]["host"])
        r = pull_checkpoints(node0, inv.ssh, src.id, ckpts, own)
        progress(f"resume: {src.id}'s checkpoints from {node0.name}: " +
                 (r.describe() if r.ok else f"not reachable ({r.error}); using the copy here"))
    out = dst.dir / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    copied: list[str] = []
    latest = ckpts / "latest"
    if latest.exists():
        name = latest.read_text().strip()
        shutil.copy2(ckpts / name, out / name)
        shutil.copy2(latest, out / "latest")
        copied += [f"checkpoints/{name}", "checkpoints/latest"]
    elif ckpts.is_dir():
        skip = own.split("/")[0] if own and stored else None      # kept beside them in storage
        for item in sorted(ckpts.iterdir()):
            if not item.name.startswith(".") and item.name != skip:
                _copy(item, out / item.name)
                copied.append(f"checkpoints/{item.name}")
    if own and ((Path(stored) if stored else src.dir) / own).exists():
        _copy((Path(stored) if stored else src.dir) / own, dst.dir / own)
        copied.append(own)
    if not copied:
        raise UserError(f"run {src.id} has no checkpoint to resume from (nothing in {ckpts}" +
                        (f", no {own}" if own else "") + ")",
                        hint="resume a run that wrote a checkpoint (train: ckpt_every or the end of training; "
                             "a script: into $CLUSTER_CHECKPOINT_DIR or its checkpoint.path)")
    dst.update(resume_files=copied)
    dst.event("resume", from_run=src.id, checkpoint=copied[0].split("/", 1)[-1] if latest.exists() else None,
              files=copied)
    return copied


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)
