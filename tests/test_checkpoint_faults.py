"""A checkpoint write that fails (disk full) leaves no partial file and `latest` on the last good one."""
import errno

import pytest
import torch

from train import checkpoint


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
