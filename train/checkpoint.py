"""Self-describing, atomically written checkpoints: ckpt_dir/ckpt_<step>.pt plus a `latest` marker.

A checkpoint holds everything needed to continue or to use the model without the job file:
model name and full config, world size, step, epoch and position in the epoch, model,
optimizer and scheduler state, and every rank's RNG state.

    payload = load_latest("runs/<id>/checkpoints")          # resume
    model, payload = load_for_inference("runs/<id>/checkpoints")  # predict
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .metrics import atomic_write_text

FORMAT = "train-ckpt-v1"
REQUIRED = ("format", "model_name", "config", "world_size", "step", "epoch", "samples_in_epoch",
            "model", "optimizer", "scheduler", "rng")
_NAME = re.compile(r"ckpt_(\d+)\.pt")


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(step, path)] of complete-looking checkpoint files, newest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found, reverse=True)


def save(ckpt_dir: str | os.PathLike, payload: dict[str, Any], keep: int) -> Path:
    """Write ckpt_<step>.pt via temp file + fsync + rename, then point `latest` at it, then
    delete all but the newest `keep`. A crash at any point leaves `latest` naming a whole file."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(".ckpt_*.tmp*"):  # left by a writer that was killed mid-write
        stale.unlink(missing_ok=True)
    final = d / f"ckpt_{payload['step']}.pt"
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)   # a disk that filled up gets its space back; `latest` is untouched
        if not isinstance(e, Exception):
            raise
        kept = (d / "latest").read_text().strip() if (d / "latest").exists() else "none"
        try:
            st = os.statvfs(d)
            free = f"; {st.f_bavail * st.f_frsize // 1024} kB free there"
        except OSError:
            free = ""
        why = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200])
        msg = f"checkpoint: cannot write {final} ({why}{free}); the latest good checkpoint is still {kept}"
        raise (OSError(e.errno, msg) if isinstance(e, OSError) else RuntimeError(msg)) from e
    _fsync_dir(d)  # the rename itself must reach the disk before `latest` names the file
    atomic_write_text(d / "latest", final.name + "\n")
    _fsync_dir(d)
    for _, old in list_checkpoints(d)[keep:]:
        old.unlink(missing_ok=True)
    return final


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read one checkpoint onto the CPU; raise ValueError if it is unreadable or incomplete."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or overwritten file fails in many ways
        first_line = (str(e).splitlines() or [""])[0][:120]
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {first_line})") from None
    missing = [k for k in REQUIRED if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint (missing {', '.join(missing)})")
    m = _NAME.fullmatch(Path(path).name)
    if m and int(m.group(1)) != payload["step"]:
        raise ValueError(f"{path}: holds step {payload['step']}, not {m.group(1)}")
    return payload


def load_latest(ckpt_dir: str | os.PathLike, log=print) -> dict[str, Any] | None:
    """The newest readable checkpoint: the one `latest` names, else the newest other one that
    loads (a corrupt file is reported and skipped). None if there is no checkpoint file;
    ValueError if there are some but none is readable (starting over would overwrite them)."""
    d = Path(ckpt_dir)
    candidates = [p for _, p in list_checkpoints(d)]
    marker = d / "latest"
    if marker.is_file():
        named = d / marker.read_text(encoding="utf-8").strip()
        if named in candidates:  # the marker decides; the rest are fallbacks, newest first
            candidates = [named] + [p for p in candidates if p != named]
    for path in candidates:
        try:
            payload = load(path)
        except ValueError as e:
            log(f"checkpoint: skipping {e}")
            continue
        payload["path"] = str(path)
        return payload
    if candidates:
        raise ValueError(f"none of the {len(candidates)} checkpoints in {d} is readable")
    return None


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode, payload) from a checkpoint file or a ckpt_dir (its latest)."""
    from .model import build_model

    payload = load_latest(path) if Path(path).is_dir() else load(path)
    if payload is None:
        raise FileNotFoundError(f"no readable checkpoint in {path}")
    cfg = payload["config"]
    model = build_model(payload["model_name"], cfg["num_classes"], cfg["image_size"])
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), payload
