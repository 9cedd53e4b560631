"""Where the images of a dataset are: a folder (ImageFolder layout) or its packed form.

Both give the same thing, a `Split`: class names, one label per sample, and read(i) -> the
sample's file bytes, unchanged. Standard library only (the packer and the staging code use it).

Packed form (written by `python -m train.pack SRC DST`):

    DST/MANIFEST.json           format, splits (classes, sample count, index file), and every
                                file of the set with its size and sha256 (what staging verifies)
    DST/<split>/shard-NNNNN.tar plain tar (ustar): members are the source's <class>/<file>, byte-exact
    DST/<split>/index.json      per sample [shard, byte offset of the data, size, label, name]

The tar members make a shard readable by `tar x` and by tar-based loaders (WebDataset); the index
gives random access, so the sampler's order (and the resume contract) is the same as a folder's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

MANIFEST = "MANIFEST.json"
FORMAT = "ddp-cluster-pack"
# what torchvision's ImageFolder takes as an image, by name
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Split:
    """One split (train or val): labels[i] and read(i) for i in range(len)."""

    root: str
    classes: list[str]
    labels: list[int]
    names: list[str]                       # <class>/<file>, for messages
    # folder: absolute paths; packed: (shard, offset, size) per sample
    paths: Optional[list[str]] = None
    where: Optional[list[tuple[int, int, int]]] = None
    shards: list[str] = field(default_factory=list)
    _fds: dict = field(default_factory=dict, repr=False)
    _pid: int = -1

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> bytes:
        if self.paths is not None:
            with open(self.paths[i], "rb") as f:
                return f.read()
        if self._pid != os.getpid():   # a forked loader worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        shard, offset, size = self.where[i]
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.shards[shard]}: short read at {offset} (truncated shard?)")
        return data


def is_packed(root: str) -> bool:
    return os.path.isfile(os.path.join(root, MANIFEST))


def read_manifest(root: str) -> dict:
    with open(os.path.join(root, MANIFEST)) as f:
        m = json.load(f)
    if m.get("format") != FORMAT:
        raise ValueError(f"{root}/{MANIFEST}: not a {FORMAT} manifest")
    return m


def scan_folder(split_dir: str) -> tuple[list[str], list[tuple[str, int]]]:
    """ImageFolder's order: classes sorted, files sorted within each; (classes, [(relpath, label)])."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    items = []
    for label, c in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, c), followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMG_EXTENSIONS):
                    items.append((os.path.relpath(os.path.join(dirpath, name), split_dir), label))
    return classes, items


def open_split(root: str, split: str) -> Optional[Split]:
    """The split of a folder or packed set; None when the set has no such split."""
    if is_packed(root):
        m = read_manifest(root)
        info = m["splits"].get(split)
        if info is None:
            return None
        with open(os.path.join(root, info["index"])) as f:
            index = json.load(f)
        return Split(root=root, classes=info["classes"], labels=[r[3] for r in index],
                     names=[r[4] for r in index], where=[(r[0], r[1], r[2]) for r in index],
                     shards=[os.path.join(root, s) for s in info["shards"]])
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        return None
    classes, items = scan_folder(split_dir)
    return Split(root=root, classes=classes, labels=[lab for _, lab in items], names=[p for p, _ in items],
                 paths=[os.path.join(split_dir, p) for p, _ in items])
