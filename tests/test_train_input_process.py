"""The GPU decode's own process (train/input_process.py), run here on the CPU: the same batches,
in the same order, with the same crops and counts as the decode in the training process; an
early end of a pass leaves nothing stale for the next; its errors and its death reach the
training process; it does not outlive it."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.test_train_loop import clean_env
from tests.test_train_pipeline import imageset  # noqa: F401 - the fixture
from train.config import TrainConfig
from train.data import RealImages
from train.dist import DistEnv
from train.input_process import InputProcess
from train.pipeline import DeviceStage

ENV = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend=None)


def config(data) -> TrainConfig:
    return TrainConfig(data=str(data), image_size=32, batch_size=8, workers=1, seed=5, num_classes=4)


@pytest.fixture(scope="module")
def process(imageset):  # noqa: F811
    p = InputProcess(config(imageset[1]), ENV, "torchvision", True, RealImages)
    yield p
    p.close()
    assert not p.proc.is_alive()


def through_process(p: InputProcess, kind: str, epoch: int = 0, start: int = 0, take: int | None = None):
    stage, out = DeviceStage(ENV.device, 32, False), []
    for buf, slot, d in p.batches(kind, epoch, start):
        x, y = stage.from_decoded(buf, d)
        p.release(slot)
        out.append((d["keys"], x, y))
        if take is not None and len(out) == take:
            break
    return out, stage.counts


def in_process(packed, kind: str, epoch: int = 0, start: int = 0, decoder: str = "torchvision"):
    data = RealImages(config(packed), ENV, False, role="input", gpu=True)
    data.sampler.set_epoch(epoch, start)
    stage, out = DeviceStage(ENV.device, 32, False, decoder=decoder), []
    for b in data.loader if kind == "train" else data.val_loader:
        x, y = stage(b)
        out.append((b["keys"], x, y))
    return out, stage.counts


def test_same_batches_crops_and_counts_as_decoding_in_the_training_process(process, imageset):  # noqa: F811
    for kind, epoch, start in (("train", 2, 16), ("val", 0, 0)):
        got, counts = through_process(process, kind, epoch, start)
        want, want_counts = in_process(imageset[1], kind, epoch, start)
        assert [k for k, _, _ in got] == [k for k, _, _ in want] and len(got) == len(want) > 0
        for (_, x, y), (_, xr, yr) in zip(got, want):
            assert torch.equal(y, yr)
            assert torch.allclose(x, xr, atol=1e-4), (x - xr).abs().max()
        assert counts == want_counts
    assert sum(want_counts.values()) > 0 or kind == "val"   # the extras took the PIL path and were counted


def test_dali_in_the_input_process_crops_as_dali_in_the_training_process(imageset):  # noqa: F811
    """jpeg_decoder=dali: the input process hands over DALI's uint8 crops, the rank normalises
    them; the same batches and values as DALI's whole pipeline in the rank (its CPU operators here)."""
    p = InputProcess(config(imageset[1]), ENV, "dali", True, RealImages)
    try:
        for kind, epoch, start in (("train", 1, 8), ("val", 0, 0)):
            got, counts = through_process(p, kind, epoch, start)
            want, want_counts = in_process(imageset[1], kind, epoch, start, decoder="dali")
            assert [k for k, _, _ in got] == [k for k, _, _ in want] and len(got) == len(want) > 0
            for (_, x, y), (_, xr, yr) in zip(got, want):
                assert torch.equal(y, yr) and x.shape == xr.shape == (8, 3, 32, 32)
                assert torch.allclose(x, xr, atol=1e-5), (x - xr).abs().max()
            assert counts == want_counts
    finally:
        p.close()


def test_a_batch_dali_refuses_still_reaches_the_rank_as_crops(imageset, capfd):  # noqa: F811
    """A JPEG whose header passes but whose data DALI's decoder rejects: that batch is decoded by
    torchvision and cropped by the crop kernel in the input process (PIL, then a blank, for the bad
    image), counted, and said once; the crops match the rank's own fallback to within rounding."""
    from train.imagesets import open_split
    from train.pipeline import Items, collate

    split = open_split(str(imageset[1]), "train")
    items = [Items(split, 0, 32, True)[(0, i)] for i in range(8)]
    jpeg = next(k for k, it in enumerate(items) if it[2] is not None)
    items[jpeg] = (items[jpeg][0], items[jpeg][1][:len(items[jpeg][1]) // 3], *items[jpeg][2:])
    b = collate(items)
    want = DeviceStage(ENV.device, 32, False, decoder="dali")(b)[0]
    buf, d = DeviceStage(ENV.device, 32, False, decoder="dali").decode_into(b, None)
    got = DeviceStage(ENV.device, 32, False).from_decoded(buf, d)[0]
    assert d["counts"]["dali-refused-batches"] == 1
    assert d["counts"]["corrupt"] == b["reasons"].count("corrupt") + 1   # the workers' blanks, and this one
    assert (got - want).abs().max() <= 0.5 / (255 * 0.224) + 1e-4   # half a level of 255, normalised
    assert capfd.readouterr().err.count("DALI refused a batch") == 2   # once per stage


def test_it_says_where_its_time_per_batch_went(imageset, capfd):  # noqa: F811
    """Each pass ends with one line: how many batches, and per batch the time spent waiting for the
    workers, for a slot, and decoding (which of the three limits the input)."""
    p = InputProcess(config(imageset[1]), ENV, "torchvision", True, RealImages)
    try:
        got, _ = through_process(p, "train", 0, 0)
        val, _ = through_process(p, "val")
    finally:
        p.close()
    lines = re.findall(r"^data: input process, (\w+) pass: (\d+) batches; per batch ([\d.]+) ms waiting for the "
                       r"workers, ([\d.]+) ms for the training process to hand a slot back, ([\d.]+) ms decoding$",
                       capfd.readouterr().out, re.M)
    assert [(k, int(n)) for k, n, *_ in lines] == [("train", len(got)), ("val", len(val))]
    assert all(float(d) > 0 for *_, d in lines)


def test_a_pass_left_early_leaves_nothing_for_the_next(process, imageset):  # noqa: F811
    first, _ = through_process(process, "train", 1, 0, take=2)
    assert len(first) == 2
    again, _ = through_process(process, "train", 3, 8)
    want, _ = in_process(imageset[1], "train", 3, 8)
    assert [k for k, _, _ in again] == [k for k, _, _ in want]


def test_its_error_and_its_death_reach_the_training_process(imageset, tmp_path):  # noqa: F811
    broken = InputProcess(config(tmp_path / "missing"), ENV, "torchvision", True, RealImages)
    with pytest.raises(RuntimeError, match="(?s)input process .* failed.*missing"):
        next(broken.batches("train"))
    broken.close()
    p = InputProcess(config(imageset[1]), ENV, "torchvision", True, RealImages)
    try:
        next(p.batches("train"))
        os.kill(p.proc.pid, signal.SIGKILL)
        p.proc.join(10)
        with pytest.raises(RuntimeError, match="ended with exit code -9"):
            for _ in p.batches("train", 1, 0):
                pass
    finally:
        p.close()


ORPHAN = """
import os, sys, torch
from train.config import TrainConfig
from train.dist import DistEnv
from train.input_process import InputProcess
from train.data import RealImages
env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend=None)
p = InputProcess(TrainConfig(data=sys.argv[1], image_size=32, batch_size=8, workers=1), env, "torchvision", True,
                 RealImages)
next(p.batches("train"))
print(p.proc.pid, flush=True)
os._exit(0)
"""


def test_it_does_not_outlive_the_training_process(imageset):  # noqa: F811
    """A training process killed or gone without cleaning up: its input process (and that
    process's DataLoader worker) end by themselves within seconds."""
    r = subprocess.run([sys.executable, "-c", ORPHAN, str(imageset[1])], capture_output=True, text=True,
                       cwd=REPO_ROOT, env=clean_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    pid = int(re.search(r"^(\d+)$", r.stdout, re.M).group(1))
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the input process outlived its training process by 10 s")


def test_under_mps_the_training_process_lets_the_decode_go_first(imageset, tmp_path):  # noqa: F811
    """`python -m train` on real images with input_process true, or auto where CUDA's MPS runs: the
    training process's CUDA work is below normal priority under MPS (CUDA_MPS_CLIENT_PRIORITY=1,
    set before its CUDA context); a value the user set for it stands. Without the input process
    (false, auto without MPS, synthetic data, decode=cpu) nothing is set."""
    code = ("import os, sys, train.__main__ as m, train.loop as loop; "
            "loop.train = lambda cfg, env: print('priority', os.environ.get('CUDA_MPS_CLIENT_PRIORITY')); "
            "sys.exit(m.main(sys.argv[1:]))")

    def priority(*args, **env):
        r = subprocess.run([sys.executable, "-c", code, f"data={imageset[1]}", "steps=1", *args], cwd=REPO_ROOT,
                           env={**clean_env(), **env}, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return re.search(r"^priority (\S+)$", r.stdout, re.M).group(1)
    (tmp_path / "control").touch()      # the MPS control daemon's pipe, as mps_running looks for it
    mps = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    assert priority("input_process=true") == "1"
    assert priority(**mps) == "1"                                    # auto, under MPS
    assert priority("input_process=true", CUDA_MPS_CLIENT_PRIORITY="0") == "0"
    assert priority(CUDA_MPS_PIPE_DIRECTORY=str(tmp_path / "none")) == "None"   # auto, no MPS
    assert priority("input_process=false", **mps) == "None"
    assert priority("decode=cpu", **mps) == "None"
    assert priority("data=synthetic", **mps) == "None"


def test_the_mps_check_looks_for_the_control_daemons_pipe(tmp_path, monkeypatch):
    """input_process pays only under CUDA's MPS: the rank warns when its control daemon's pipe is absent."""
    from train.input_process import mps_running
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert not mps_running()
    os.mkfifo(tmp_path / "control")
    assert mps_running()
