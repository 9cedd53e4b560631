"""Real images: the packed form, the input pipeline's CPU path and its GPU path's arithmetic, and
the resume contract, with real torchrun processes on CPU (gloo).

The set: small generated JPEGs (bench/imageset.py) plus one PNG, one CMYK JPEG, one progressive
JPEG and one corrupt file in train/c0000.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from bench.imageset import make
from tests.conftest import REPO_ROOT
from tests.test_train_loop import clean_env, summary, train_records
from train.imagesets import MANIFEST, open_split
from train.pack import sha256_file
from train.pipeline import DeviceStage, Items, collate, gpu_kind

TINY = ["model=train.model:tiny_cnn", "image_size=32", "num_classes=4"]
EXTRAS = ("extra_cmyk.jpg", "extra_corrupt.jpg", "extra_png.png", "extra_progressive.jpg")


@pytest.fixture(scope="module")
def imageset(tmp_path_factory):
    """(folder, packed): 60 train JPEGs + the 4 extras (64 in all), 16 val, 4 classes."""
    root = tmp_path_factory.mktemp("images")
    make(str(root / "src"), 60, 16, 4, small=True, extras=True)
    subprocess.run([sys.executable, "-m", "train.pack", str(root / "src"), str(root / "packed"), "--shard-mb", "1"],
                   check=True, capture_output=True, env=clean_env())
    return root / "src", root / "packed"


def pack_cli(*args):
    return subprocess.run([sys.executable, "-m", "train.pack", *map(str, args)], capture_output=True, text=True,
                          env=clean_env())


def test_pack_reads_back_byte_exact_with_checksums(imageset, tmp_path):
    src, packed = imageset
    m = json.loads((packed / MANIFEST).read_text())
    for split in ("train", "val"):
        a, b = open_split(str(src), split), open_split(str(packed), split)
        assert len(a) == len(b) == {"train": 64, "val": 16}[split]
        assert (a.classes, a.labels, a.names) == (b.classes, b.labels, b.names)
        for i in range(len(a)):
            assert b.read(i) == a.read(i) == (src / split / a.names[i]).read_bytes()
    assert {n for n in open_split(str(packed), "train").names if "extra_" in n} == {f"c0000/{e}" for e in EXTRAS}
    # every file of the set is listed with its size and checksum; shards are plain tar
    listed = {f["path"]: f for f in m["files"]}
    on_disk = {str(p.relative_to(packed)) for p in packed.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(listed) == on_disk
    for path, f in listed.items():
        assert (f["bytes"], f["sha256"]) == (os.path.getsize(packed / path), sha256_file(str(packed / path)))
    with tarfile.open(packed / m["splits"]["val"]["shards"][0]) as tf:
        member = tf.getmembers()[0]
        assert tf.extractfile(member).read() == (src / "val" / member.name).read_bytes()
    # several shards when they are small; packing twice gives the same bytes
    again = pack_cli(src, tmp_path / "again", "--shard-mb", "1")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "again" / MANIFEST).read_text())["files"] == m["files"]


def test_pack_refuses_bad_input_with_one_message(imageset, tmp_path):
    src, packed = imageset
    r = pack_cli(tmp_path / "nothing", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no train/ folder" in r.stderr
    assert "Traceback" not in r.stderr
    r = pack_cli(src, packed)
    assert r.returncode == 2 and "already holds a packed set" in r.stderr


@pytest.mark.parametrize("decoder", ["torchvision", "dali"])
def test_gpu_path_sorting_and_arithmetic_match_the_cpu_path(imageset, decoder):
    """What nvJPEG cannot take goes to PIL (named), and the GPU path's crop/resize/flip (roi_align
    over the decoded batch, or DALI's pipeline; here on the CPU) matches PIL's within 3 levels of
    255 per image."""
    src, packed = imageset
    kinds = {e: gpu_kind((src / "train" / "c0000" / e).read_bytes())[0] for e in EXTRAS}
    assert kinds == {"extra_cmyk.jpg": "cmyk", "extra_corrupt.jpg": "not-jpeg", "extra_png.png": "not-jpeg",
                     "extra_progressive.jpg": "progressive"}
    split = open_split(str(packed), "train")
    stage = DeviceStage(torch.device("cpu"), 32, False, decoder=decoder)
    keys = [(3, i) for i in range(len(split))]
    gpu_batch = collate([Items(split, 0, 32, gpu=True)[k] for k in keys])
    assert len(gpu_batch["jpeg_sizes"]) == 60 and sorted(gpu_batch["reasons"]) == \
        ["cmyk", "corrupt", "not-jpeg", "progressive"]
    x_gpu, y = stage(gpu_batch)
    x_cpu, y_cpu = stage(collate([Items(split, 0, 32, gpu=False)[k] for k in keys]))
    assert torch.equal(y, y_cpu) and x_gpu.shape == (64, 3, 32, 32)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    per_image = ((x_gpu - x_cpu) * std).abs().mean(dim=(1, 2, 3))
    assert per_image.max() <= 3.0, per_image
    # the crops differ between epochs and images: a real augmentation, not a constant
    x_other, _ = stage(collate([Items(split, 0, 32, gpu=True)[(4, i)] for i in range(len(split))]))
    assert ((x_other - x_gpu) * std).abs().mean() > 5


FUSED_CHECK = """
import sys, torch
from train.imagesets import open_split
from train.pipeline import DeviceStage, Items, collate
split = open_split(sys.argv[1], "train")
batch = collate([Items(split, 0, 32, gpu=True)[(3, i)] for i in range(len(split))])
for channels_last in (False, True):
    ref, _ = DeviceStage(torch.device("cpu"), 32, channels_last, fused=False)(batch)
    out, _ = DeviceStage(torch.device("cpu"), 32, channels_last, fused=True)(batch)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    print(channels_last, float((out - ref).abs().max()))
"""


def test_fused_gpu_kernel_matches_roi_align(imageset):
    """The GPU path's Triton kernel (crop, resize, flip, normalise in one pass; run here by
    Triton's CPU interpreter) gives roi_align's numbers, for decoded JPEGs and the images the
    workers decoded with PIL alike, in either memory format."""
    pytest.importorskip("triton")
    p = subprocess.run([sys.executable, "-c", FUSED_CHECK, str(imageset[1])], capture_output=True, text=True,
                       env=clean_env(TRITON_INTERPRET="1"), cwd=REPO_ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    diffs = [float(line.split()[1]) for line in p.stdout.splitlines()]
    assert len(diffs) == 2 and max(diffs) < 1e-3, p.stdout   # normalised units: 1e-3 is 0.06 levels of 255


def torchrun(nproc: int, args: list[str], cwd: Path, trace: Path, kill_at: int = 0, check=True):
    """kill_at=N: every rank dies by SIGKILL after step N's checkpoint (tests/fixtures/train_killed.py)."""
    env = clean_env(TRAIN_TEST_SAMPLE_TRACE=str(trace))
    entry = ["tests.fixtures.train_killed", str(kill_at)] if kill_at else ["train"]
    trace.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", *entry, *args] if nproc > 1 else [sys.executable, "-m", *entry, *args]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def trace(d: Path, rank: int) -> list[tuple[int, int]]:
    f = d / f"samples-rank{rank}.jsonl"
    return [tuple(k) for line in f.read_text().splitlines() for k in json.loads(line)]


def common(tmp_path: Path, name: str, data: Path) -> list[str]:
    return [*TINY, f"data={data}", "batch_size=4", "log_every=1", "ckpt_every=3", "workers=1", "lr=0.05",
            "decode=cpu", f"out_dir={tmp_path / name / 'metrics'}", f"ckpt_dir={tmp_path / name / 'ckpt'}"]


@pytest.mark.slow
def test_cpu_pipeline_trains_two_ranks_and_counts_bad_files(imageset, tmp_path):
    src, packed = imageset
    p = torchrun(2, [*common(tmp_path, "run", src), "steps=24", "lr=0.1"], tmp_path, tmp_path / "t")
    s = summary(p.stdout)
    assert s["steps"] == "24" and s["decode"] == "cpu" and "top1" in s
    # the corrupt file was read 3 times (3 epochs of 8 steps), named, and replaced each time
    assert s["blank"] == "3" and "c0000/extra_corrupt.jpg: cannot read or decode" in p.stderr
    losses = [train_records(tmp_path / "run" / "metrics", 0)[k]["loss_mean"] for k in range(1, 25)]
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses
    # the folder and the packed form are the same data: same samples, same losses
    q = torchrun(2, [*common(tmp_path, "packed", packed), "steps=24", "lr=0.1"], tmp_path, tmp_path / "tp")
    assert trace(tmp_path / "tp", 0) == trace(tmp_path / "t", 0)
    assert summary(q.stdout)["final_loss"] == s["final_loss"]


@pytest.mark.slow
def test_resume_on_real_data_sees_the_same_samples(imageset, tmp_path):
    """Kill at step 9 (epoch 1, sample 8) and resume: each rank trains on exactly the samples, in
    the same order, a straight run does. Then from a world-size-2 checkpoint at step 6 onto one
    rank: that rank sees the straight run's global order from sample 48 on, across the epoch end."""
    _, packed = imageset
    args = lambda name: [*common(tmp_path, name, packed), "steps=18"]  # noqa: E731
    torchrun(2, args("straight"), tmp_path, tmp_path / "t-straight")
    killed = torchrun(2, args("resumed"), tmp_path, tmp_path / "t-resumed", kill_at=9, check=False)
    assert killed.returncode != 0
    resumed = torchrun(2, args("resumed"), tmp_path, tmp_path / "t-resumed")
    assert "ckpt_9.pt: step 9, epoch 1, sample 8" in resumed.stdout
    for rank in (0, 1):
        straight = trace(tmp_path / "t-straight", rank)
        assert len(straight) == 18 * 4
        assert trace(tmp_path / "t-resumed", rank) == straight
    # world size 2 -> 1
    torchrun(2, args("shrunk"), tmp_path, tmp_path / "t-shrunk", kill_at=6, check=False)
    one = torchrun(1, args("shrunk"), tmp_path, tmp_path / "t-one")
    assert "saved at world size 2" in one.stdout and summary(one.stdout)["steps"] == "18"
    r0, r1 = trace(tmp_path / "t-straight", 0), trace(tmp_path / "t-straight", 1)
    global_order = [k for pair in zip(r0, r1) for k in pair]   # position 2j: rank 0's j-th, 2j+1: rank 1's
    after = trace(tmp_path / "t-one", 0)
    assert len(after) == 12 * 4 and after == global_order[48:96]
    assert after[16] == (1, after[16][1]) and after[15][0] == 0   # crossed into epoch 1 at sample 64
