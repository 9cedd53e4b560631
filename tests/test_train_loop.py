"""Real training processes on CPU (gloo): torchrun with 2 ranks, SLURM-style variables, plain python.

Small models (the two-conv `train.model:tiny_cnn`) keep the whole file at about 1.5 minutes on
2 cores; nearly all of it is starting Python and torch.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from train.metrics import read_heartbeats, read_metrics

pytestmark = pytest.mark.slow

TINY = ["model=train.model:tiny_cnn", "image_size=32"]
LEARNABLE = [*TINY, "num_classes=10", "data=synthetic-learnable", "synthetic_size=1600", "batch_size=16",
             "lr=0.2", "warmup_steps=10"]


def clean_env(**extra) -> dict:
    """This environment minus any launcher variables the test runner itself may sit under."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra)
    return env


def dirs(tmp_path: Path, name: str) -> list[str]:
    return [f"out_dir={tmp_path / name / 'metrics'}", f"ckpt_dir={tmp_path / name / 'ckpt'}"]


def run(cmd: list[str], tmp_path: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=tmp_path, env=env or clean_env(), capture_output=True, text=True, timeout=180)
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def torchrun(nproc: int, args: list[str], tmp_path: Path, kill_at: int = 0, **kw) -> subprocess.CompletedProcess:
    """kill_at=N: every rank dies by SIGKILL after step N's checkpoint (tests/fixtures/train_killed.py)."""
    entry = ["tests.fixtures.train_killed", str(kill_at)] if kill_at else ["train"]
    # --log-dir: torchrun's per-rank files stay in the test's directory (else /tmp/torchelastic_*)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           f"--log-dir={tmp_path / 'torchrun'}", "-m", *entry, *args]
    return run(cmd, tmp_path, **kw)


def python_train(args: list[str], tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "train", *args], tmp_path, **kw)


def train_records(metrics_dir: Path, rank: int) -> dict[int, dict]:
    """{step: record} of one rank; later records (after a resume) win."""
    return {r["step"]: r for r in read_metrics(metrics_dir)[rank] if r["kind"] == "train"}


def summary(stdout: str) -> dict[str, str]:
    line = [ln for ln in stdout.splitlines() if ln.startswith("summary: ")][-1]
    return dict(kv.split("=") for kv in line.split()[1:])


def test_loss_decreases_on_learnable_data_over_two_ranks(tmp_path):
    out = torchrun(2, [*LEARNABLE, "steps=60", "log_every=5", *dirs(tmp_path, "run")], tmp_path)
    metrics_dir = tmp_path / "run" / "metrics"
    per_rank = read_metrics(metrics_dir)
    assert sorted(per_rank) == [0, 1]
    losses = [r["loss_mean"] for r in per_rank[0] if r["kind"] == "train"]
    assert len(losses) == 12
    assert losses[0] > 1.9  # about ln(10) at the start: chance
    assert losses[-1] < 0.5 * losses[0], losses
    # each rank trains on its own shard: same steps, different local losses, one mean
    r0, r1 = train_records(metrics_dir, 0), train_records(metrics_dir, 1)
    assert r0.keys() == r1.keys() and r0[5]["loss"] != r1[5]["loss"] and r0[5]["loss_mean"] == r1[5]["loss_mean"]
    s = summary(out.stdout)
    assert s["steps"] == "60" and float(s["final_loss"]) == pytest.approx(losses[-1], abs=1e-4)
    assert float(s["top1"]) > 80  # validation, reduced over both ranks; chance is 10
    assert "step 60/60 loss " in out.stdout and " img/s " in out.stdout
    beats = read_heartbeats(metrics_dir)
    assert {r: (b["step"], b["done"], b["steps_total"]) for r, b in beats.items()} == {0: (60, True, 60), 1: (60, True, 60)}
    assert (tmp_path / "run" / "ckpt" / "latest").read_text().strip() == "ckpt_60.pt"


def make_image_folder(root: Path) -> None:
    """4 classes of colored 40x40 noise images: 96 train (12 steps of 2x4), 24 val."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    colors = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]])
    for split, n in (("train", 24), ("val", 6)):
        for c, color in enumerate(colors):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                px = (color + torch.randint(-60, 61, (40, 40, 3), generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(px.numpy()).save(root / split / f"c{c}" / f"{i}.png")


def test_resume_after_a_kill_matches_a_straight_run(tmp_path):
    """2N steps straight against N steps, SIGKILL, resume, N more. N=9 stops mid-epoch (12
    steps/epoch) and the second half crosses into epoch 1; one DataLoader worker per rank.

    Tolerance: every random choice (sample order, augmentation, init) is a function of
    (seed, epoch, index), and the checkpoint restores weights, momentum, LR schedule and RNG
    states, at the same world size, on CPU. So the arithmetic is the same and losses agree to
    the bit; rel=1e-6 leaves room only for a reduction-order change, never for a wrong batch
    (a different batch changes the loss in the first or second digit)."""
    make_image_folder(tmp_path / "data")
    common = [*TINY, "num_classes=4", "batch_size=4", "data=data", "steps=18", "log_every=1", "ckpt_every=3",
              "keep_ckpts=2", "workers=1", "lr=0.1", "warmup_steps=2"]
    straight = torchrun(2, [*common, *dirs(tmp_path, "straight")], tmp_path)

    killed = torchrun(2, [*common, *dirs(tmp_path, "resumed")], tmp_path, kill_at=9, check=False)
    ckpt = tmp_path / "resumed" / "ckpt"
    assert killed.returncode != 0 and "summary:" not in killed.stdout
    assert (ckpt / "latest").read_text().strip() == "ckpt_9.pt"
    assert sorted(p.name for p in ckpt.glob("ckpt_*.pt")) == ["ckpt_6.pt", "ckpt_9.pt"]  # keep_ckpts=2

    resumed = torchrun(2, [*common, *dirs(tmp_path, "resumed")], tmp_path)
    assert "resumed from " in resumed.stdout and "ckpt_9.pt: step 9, epoch 0, sample 72" in resumed.stdout

    assert summary(straight.stdout)["steps"] == summary(resumed.stdout)["steps"] == "18"
    a = torch.load(tmp_path / "straight" / "ckpt" / "ckpt_18.pt", weights_only=True)
    b = torch.load(ckpt / "ckpt_18.pt", weights_only=True)
    position = lambda c: (c["step"], c["epoch"], c["samples_in_epoch"])  # noqa: E731
    assert position(a) == position(b) == (18, 1, 48)  # same sampler position: 6 steps into epoch 1
    for rank in (0, 1):
        la, lb = train_records(tmp_path / "straight" / "metrics", rank), train_records(tmp_path / "resumed" / "metrics", rank)
        assert sorted(lb) == list(range(1, 19))
        for step in range(10, 19):
            assert lb[step]["loss"] == pytest.approx(la[step]["loss"], rel=1e-6), (rank, step)
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-6, atol=1e-7)


def test_checkpoint_from_two_ranks_resumes_on_one(tmp_path):
    torchrun(2, [*LEARNABLE, "steps=40", "log_every=5", *dirs(tmp_path, "run")], tmp_path)
    first = train_records(tmp_path / "run" / "metrics", 0)
    out = python_train([*LEARNABLE, "steps=50", "log_every=5", *dirs(tmp_path, "run")], tmp_path)
    assert "ckpt_40.pt: step 40, epoch 0, sample 1280, saved at world size 2" in out.stdout
    # the per-process batch is kept, so the global batch halves: so does the LR (lr_scaling: linear)
    assert "lr scaled by 1/2 with the global batch (world size 2 -> 1): peak lr 0.1," in out.stdout, out.stdout
    assert "world_size=1" in out.stdout and summary(out.stdout)["steps"] == "50"
    after = train_records(tmp_path / "run" / "metrics", 0)
    # it went on from the trained weights: far below the loss a fresh start has (about ln 10)
    assert after[45]["loss_mean"] < 0.6 * first[5]["loss_mean"]
    assert read_heartbeats(tmp_path / "run" / "metrics")[0]["step"] == 50
    assert torch.load(tmp_path / "run" / "ckpt" / "ckpt_50.pt", weights_only=True)["world_size"] == 1


def test_restart_skips_a_corrupt_newest_checkpoint(tmp_path):
    args = [*LEARNABLE, "log_every=5", "ckpt_every=10", *dirs(tmp_path, "run")]
    python_train([*args, "steps=20"], tmp_path)  # plain process, no launcher: world size 1
    newest = tmp_path / "run" / "ckpt" / "ckpt_20.pt"
    newest.write_bytes(newest.read_bytes()[:4096])
    out = python_train([*args, "steps=30"], tmp_path)
    assert "checkpoint: skipping " in out.stdout and "ckpt_20.pt: unreadable" in out.stdout
    assert "ckpt_10.pt: step 10," in out.stdout
    assert summary(out.stdout)["steps"] == "30"
    assert (tmp_path / "run" / "ckpt" / "latest").read_text().strip() == "ckpt_30.pt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_variables_give_rank_and_world_size(tmp_path):
    """Two tasks started the way srun starts them: SLURM_* identity, MASTER_* from the launcher."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = clean_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_NODEID="0",
                        SLURM_STEP_TASKS_PER_NODE="2", SLURM_JOB_ID="42", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "train", *TINY, "data=synthetic", "steps=4",
                                       "log_every=1", "batch_size=4", *dirs(tmp_path, "run")],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "world_size=2" in outs[0] and "backend=gloo" in outs[0] and "summary: steps=4" in outs[0]
    assert "step " not in outs[1]  # only rank 0 prints progress
    beats = read_heartbeats(tmp_path / "run" / "metrics")
    assert {r: (b["rank"], b["done"]) for r, b in beats.items()} == {0: (0, True), 1: (1, True)}
    starts = [r for r in read_metrics(tmp_path / "run" / "metrics")[1] if r["kind"] == "start"]
    assert starts[0]["world_size"] == 2


def test_sigterm_stops_both_ranks_and_marks_the_heartbeat(tmp_path):
    """What `cluster stop` does: TERM the launcher; every rank leaves (process group destroyed),
    no one hangs, and the heartbeats say the run did not finish."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           f"--log-dir={tmp_path / 'torchrun'}", "-m", "train",
           *LEARNABLE, "steps=100000", "log_every=10", *dirs(tmp_path, "run")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    metrics_dir = tmp_path / "run" / "metrics"
    deadline = time.time() + 90
    while time.time() < deadline:
        beats = read_heartbeats(metrics_dir)
        if len(beats) == 2 and min(b["step"] for b in beats.values()) >= 10:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no progress within 90 s:\n" + proc.communicate()[0][-3000:])
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0
    beats = read_heartbeats(metrics_dir)
    assert all(not b["done"] and "error" in b for b in beats.values()), (beats, out[-2000:])
    assert "summary:" not in out
    assert json.loads((metrics_dir / "heartbeat-rank0.json").read_text())["steps_total"] == 100000


def test_ddp_knobs_for_the_scaling_bench_train_like_the_default(tmp_path):
    # bench/bench_scaling.py measures DDP's own cost (ddp_always at world size 1) and the bf16
    # gradient hook (grad_compress): both must still train, to the same first-step loss.
    base = [*LEARNABLE, "steps=20", "log_every=5"]
    plain = torchrun(1, [*base, *dirs(tmp_path, "plain")], tmp_path)
    ddp1 = torchrun(1, [*base, "ddp_always=true", *dirs(tmp_path, "ddp1")], tmp_path)
    bf16 = torchrun(2, [*base, "grad_compress=bf16", *dirs(tmp_path, "bf16")], tmp_path)
    first = {name: train_records(tmp_path / name / "metrics", 0)[5]["loss"] for name in ("plain", "ddp1")}
    assert first["plain"] == pytest.approx(first["ddp1"], rel=1e-4)   # DDP at world size 1 changes nothing
    losses = [r["loss_mean"] for r in read_metrics(tmp_path / "bf16" / "metrics")[0] if r["kind"] == "train"]
    assert losses[-1] < losses[0], losses
    assert summary(plain.stdout)["steps"] == summary(ddp1.stdout)["steps"] == summary(bf16.stdout)["steps"] == "20"
