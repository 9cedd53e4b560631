"""Pack an ImageFolder (train/, val/) into tar shards with an index and a checksum per shard.

    python -m train.pack SRC DST [--shard-mb 256]

SRC holds train/ (and val/) in ImageFolder layout; DST gets the packed form described in
train/imagesets.py. Every image file is stored unchanged (its bytes, under <class>/<file>), so
training reads exactly what it would read from SRC. MANIFEST.json is written last: a
DST without it is an unfinished pack, which train/ and staging do not take for a packed set.
Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import time

from .imagesets import FORMAT, MANIFEST, scan_folder

SPLITS = ("train", "val")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _info(name: str, size: int) -> tarfile.TarInfo:
    # fixed owner and time: packing the same folder twice gives the same bytes (and checksums)
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


def pack_split(src_split: str, dst: str, split: str, shard_bytes: int, log=print) -> tuple[dict, list[dict]]:
    classes, items = scan_folder(src_split)
    os.makedirs(os.path.join(dst, split), exist_ok=True)
    index, shards, files = [], [], []
    tf = None
    done_bytes, t0 = 0, time.time()

    def close_shard():
        tf.close()
        path = shards[-1]
        files.append({"path": path, "bytes": os.path.getsize(os.path.join(dst, path)),
                      "sha256": sha256_file(os.path.join(dst, path))})
        log(f"pack: {split} shard {len(shards)}: {len(index)}/{len(items)} images, "
            f"{done_bytes / 1e6:.0f} MB, {done_bytes / 1e6 / max(1e-6, time.time() - t0):.0f} MB/s")

    for rel, label in items:
        with open(os.path.join(src_split, rel), "rb") as f:
            data = f.read()
        if tf is None or tf.offset + len(data) > shard_bytes and tf.offset > 0:
            if tf is not None:
                close_shard()
            shards.append(f"{split}/shard-{len(shards):05d}.tar")
            tf = tarfile.open(os.path.join(dst, shards[-1]), "w", format=tarfile.PAX_FORMAT)
        info = _info(rel, len(data))
        header = len(info.tobuf(tf.format, tf.encoding, tf.errors))
        index.append([len(shards) - 1, tf.offset + header, len(data), label, rel])
        tf.addfile(info, _Bytes(data))
        done_bytes += len(data)
    if tf is not None:
        close_shard()
    index_path = f"{split}/index.json"
    with open(os.path.join(dst, index_path), "w") as f:
        json.dump(index, f, separators=(",", ":"))
    files.append({"path": index_path, "bytes": os.path.getsize(os.path.join(dst, index_path)),
                  "sha256": sha256_file(os.path.join(dst, index_path))})
    return {"classes": classes, "count": len(index), "index": index_path, "shards": shards}, files


class _Bytes:
    """A file object over bytes, for tarfile.addfile."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return out


def pack(src: str, dst: str, shard_mb: int = 256, log=print) -> dict:
    splits = [s for s in SPLITS if os.path.isdir(os.path.join(src, s))]
    if "train" not in splits:
        raise ValueError(f"{src}: no train/ folder (ImageFolder layout: SRC/train/<class>/<image>)")
    if os.path.exists(os.path.join(dst, MANIFEST)):
        raise ValueError(f"{dst}: already holds a packed set ({MANIFEST}); remove it or choose another DST")
    os.makedirs(dst, exist_ok=True)
    manifest = {"format": FORMAT, "version": 1, "source": os.path.abspath(src), "splits": {}, "files": []}
    for split in splits:
        info, files = pack_split(os.path.join(src, split), dst, split, shard_mb << 20, log)
        manifest["splits"][split] = info
        manifest["files"] += files
    tmp = os.path.join(dst, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(dst, MANIFEST))
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="ImageFolder root holding train/ (and val/)")
    p.add_argument("dst", help="output folder (created)")
    p.add_argument("--shard-mb", type=int, default=256, help="target shard size in MiB (default 256)")
    a = p.parse_args(argv)
    if a.shard_mb < 1:
        print("error: --shard-mb must be at least 1", file=sys.stderr)
        return 2
    try:
        m = pack(a.src, a.dst, a.shard_mb)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(f["bytes"] for f in m["files"])
    counts = ", ".join(f"{s} {v['count']} images in {len(v['shards'])} shards" for s, v in m["splits"].items())
    print(f"packed {a.src} into {a.dst}: {counts}, {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
