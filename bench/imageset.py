"""Generate an ImageNet-like JPEG set in ImageFolder layout (for tests and the data bench).

    python -m bench.imageset ROOT --train 25600 --val 2560 --classes 100 [--extras]

Images of varied sizes around 500x375 (some portrait), JPEG quality 90, baseline: a smooth
class-coloured field with texture and noise, so they compress like photos (about 100 kB at
500x375) and a model can learn the classes. --extras adds, to train/, the files the GPU path
cannot take: one PNG, one CMYK JPEG, one progressive JPEG, and one corrupt .jpg.
No image is kept in the repository: the set is made where it is used.
"""

from __future__ import annotations

import argparse
import io
import os
import random
from multiprocessing import Pool


def _image(seed: int, label: int, classes: int, small: bool):
    from PIL import Image, ImageFilter

    rng = random.Random(seed)
    if small:
        w, h = rng.randint(40, 72), rng.randint(32, 56)
    else:
        w, h = rng.randint(400, 600), rng.randint(300, 450)
        if rng.random() < 0.2:
            w, h = h, w
    hue = label / max(1, classes)
    base = tuple(int(255 * ((hue * k) % 1.0)) for k in (1, 3, 7))
    # low-frequency field: a few random pixels blown up smoothly, tinted by the class
    field = Image.effect_noise((max(2, w // 48), max(2, h // 48)), 64).convert("RGB")
    field = Image.blend(field, Image.new("RGB", field.size, base), 0.6).resize((w, h), Image.BICUBIC)
    texture = Image.effect_noise((w, h), 40 + rng.random() * 30).convert("RGB")
    img = Image.blend(field, texture, 0.25)
    return img.filter(ImageFilter.SMOOTH) if rng.random() < 0.5 else img


def _write(job):
    path, seed, label, classes, small, quality = job
    _image(seed, label, classes, small).save(path, "JPEG", quality=quality)
    return os.path.getsize(path)


def make(root: str, n_train: int, n_val: int, classes: int, small: bool = False, quality: int = 90,
         extras: bool = False, workers: int = 0) -> int:
    """Write the set; returns the bytes written. Deterministic in its arguments."""
    jobs = []
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c:04d}"), exist_ok=True)
        for i in range(n):
            c = i % classes
            jobs.append((os.path.join(root, split, f"c{c:04d}", f"{split}_{i:07d}.JPEG"),
                         i * 2 + (split == "val"), c, classes,
                         small, quality))
    if workers > 1:
        with Pool(workers) as p:
            total = sum(p.imap_unordered(_write, jobs, chunksize=64))
    else:
        total = sum(map(_write, jobs))
    if extras:
        total += add_extras(os.path.join(root, "train"), classes, small)
    return total


def add_extras(train_dir: str, classes: int, small: bool) -> int:
    """One PNG, one CMYK JPEG, one progressive JPEG, one corrupt .jpg, in the first class."""
    d = os.path.join(train_dir, "c0000")
    img = _image(999_999, 0, classes, small)
    img.save(os.path.join(d, "extra_png.png"))
    img.convert("CMYK").save(os.path.join(d, "extra_cmyk.jpg"), "JPEG", quality=90)
    img.save(os.path.join(d, "extra_progressive.jpg"), "JPEG", quality=90, progressive=True)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    with open(os.path.join(d, "extra_corrupt.jpg"), "wb") as f:
        f.write(b"this is not an image " * 20)
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.startswith("extra_"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--train", type=int, default=25600)
    p.add_argument("--val", type=int, default=2560)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--small", action="store_true", help="tiny images (tests)")
    p.add_argument("--extras", action="store_true")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    total = make(a.root, a.train, a.val, a.classes, a.small, a.quality, a.extras, a.workers)
    print(f"{a.root}: {a.train} train + {a.val} val images, {a.classes} classes, {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
