"""train.checkpoint in-process: atomic writes, the `latest` marker, keep-K, corrupt files, inference,
and a write that fails (disk full)."""

import errno

import pytest
import torch

from train import checkpoint
from train.config import TrainConfig
from train.model import build_model


def payload(step, model=None):
    cfg = TrainConfig(model="train.model:tiny_cnn", num_classes=4, image_size=16)
    model = model or build_model(cfg.model, cfg.num_classes, cfg.image_size)
    return {"format": checkpoint.FORMAT, "model_name": cfg.model, "config": cfg.__dict__.copy(), "world_size": 2,
            "step": step, "epoch": 0, "samples_in_epoch": 8 * step, "model": model.state_dict(),
            "optimizer": {}, "scheduler": {}, "rng": [{"torch": torch.get_rng_state()}] * 2}


def test_save_writes_step_files_a_latest_marker_and_keeps_the_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, payload(step), keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_20.pt", "ckpt_30.pt", "ckpt_40.pt", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "ckpt_40.pt"
    assert checkpoint.load_latest(tmp_path)["step"] == 40


def test_corrupt_newest_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(tmp_path, payload(step), keep=3)
    newest = tmp_path / "ckpt_30.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn write
    said = []
    loaded = checkpoint.load_latest(tmp_path, log=said.append)
    assert loaded["step"] == 20 and loaded["path"].endswith("ckpt_20.pt")
    assert "ckpt_30.pt" in said[0] and "unreadable" in said[0]
    (tmp_path / "ckpt_20.pt").write_bytes(b"\0" * 1000)  # garbage
    assert checkpoint.load_latest(tmp_path, log=said.append)["step"] == 10
    (tmp_path / "ckpt_10.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 3 checkpoints"):
        checkpoint.load_latest(tmp_path, log=said.append)


def test_crash_while_writing_leaves_latest_on_the_previous_whole_file(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, payload(10), keep=3)

    def dies_halfway(obj, fh):
        fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # stands in for SIGTERM/SIGKILL mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, payload(20), keep=3)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "ckpt_10.pt"
    assert not (tmp_path / "ckpt_20.pt").exists()
    assert checkpoint.load_latest(tmp_path)["step"] == 10
    checkpoint.save(tmp_path, payload(20), keep=3)  # the next save clears the temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_10.pt", "ckpt_20.pt", "latest"]


def test_a_step_file_holding_another_step_is_refused(tmp_path):
    checkpoint.save(tmp_path, payload(10), keep=3)
    (tmp_path / "ckpt_10.pt").rename(tmp_path / "ckpt_99.pt")
    with pytest.raises(ValueError, match="holds step 10"):
        checkpoint.load(tmp_path / "ckpt_99.pt")


def test_loads_for_inference_without_the_job_file(tmp_path):
    model = build_model("train.model:tiny_cnn", 4, 16)
    checkpoint.save(tmp_path, payload(5, model), keep=3)
    x = torch.randn(3, 3, 16, 16)
    loaded, meta = checkpoint.load_for_inference(tmp_path)  # the directory: its latest
    assert meta["step"] == 5 and meta["config"]["num_classes"] == 4 and not loaded.training
    torch.testing.assert_close(loaded(x), model.eval()(x))
    loaded, _ = checkpoint.load_for_inference(tmp_path / "ckpt_5.pt")
    assert loaded(x).shape == (3, 4)


# A checkpoint write that fails (disk full) leaves no partial file and `latest` on the last good one.
def test_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    payload = {k: 0 for k in checkpoint.REQUIRED} | {"format": checkpoint.FORMAT, "step": 10}
    checkpoint.save(tmp_path, payload, keep=3)
    real_save = torch.save

    def full_disk(obj, fh, *a, **kw):
        fh.write(b"x" * 1000)          # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*ckpt_20\.pt \(No space left on device; \d+ kB free there\); "
                                      r"the latest good checkpoint is still ckpt_10\.pt"):
        checkpoint.save(tmp_path, {**payload, "step": 20}, keep=3)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_10.pt", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "ckpt_10.pt"


def test_rescale_lr_scales_the_schedule_from_where_it_is():
    """At another world size (the per-process batch kept) the LR follows the global batch: the
    schedule from the resumed step on is the old one times the factor, and the factor is kept in
    what the next checkpoint saves (a second change scales from there)."""
    from train.loop import rescale_lr, warmup_cosine

    def sched():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3, momentum=0.9)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(4, 20))

    opt, s = sched()
    for _ in range(7):
        opt.step()
        s.step()
    plain = [opt.param_groups[0]["lr"]]
    state = (opt.state_dict(), s.state_dict())
    for _ in range(5):
        opt.step()
        s.step()
        plain.append(opt.param_groups[0]["lr"])
    opt2, s2 = sched()      # resumed from step 7 at 2/3 of the world size
    opt2.load_state_dict(state[0])
    s2.load_state_dict(state[1])
    rescale_lr(opt2, s2, 2 / 3)
    scaled = [opt2.param_groups[0]["lr"]]
    assert s2.get_last_lr() == scaled
    for _ in range(5):
        opt2.step()
        s2.step()
        scaled.append(opt2.param_groups[0]["lr"])
    assert scaled == pytest.approx([x * 2 / 3 for x in plain], rel=1e-12)
    opt3, s3 = sched()      # the next checkpoint keeps the scaled schedule
    s3.load_state_dict(s2.state_dict())
    assert s3.base_lrs == pytest.approx([0.3 * 2 / 3])
