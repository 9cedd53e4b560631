"""Build the training image (``make image``) with podman or docker; print its tag on the last line.

    python image/build.py                       # CUDA base from the registry, the repo's pins
    python image/build.py --base local          # no registry: a Debian rootfs (debootstrap) as base
    python image/build.py --small               # the tests' variant: local base, CPU torch, no extras

The tag says what is inside and where it came from: ``ddp-train:torch2.14.1-cu130-<commit>``
(asked of the built image itself, so it cannot lie). pip inside the build uses the same package
sources as pip here: local ones in the pip configuration (file:// indexes, find-links directories)
are mounted read-only into the build and passed on. The local base is built once and kept
(``localhost/ddp-base:bookworm``); podman/docker cache the build's layers, so a rebuild with the
same inputs takes seconds.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCAL_BASE = "localhost/ddp-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# what the Containerfile would otherwise apt-get: in the base already, so the build needs no apt
BASE_PACKAGES = "python3,python3-venv,openssh-client,rsync,ca-certificates"


def say(msg: str) -> None:
    print(f">> {msg}", file=sys.stderr, flush=True)


def pins() -> dict[str, str]:
    """torch and torchvision as requirements.txt pins them."""
    out = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(r"(torch|torchvision)\s*==\s*(\S+)", line.strip())
        if m:
            out[m.group(1)] = f"{m.group(1)}=={m.group(2)}"
    return out


def local_pip_sources(offline: bool = False) -> tuple[list[str], list[str]]:
    """(pip arguments, host paths to mount) for the local package sources pip is configured with,
    and its CA bundle (a TLS-intercepting proxy's). ``offline``: the local sources only, no PyPI."""
    p = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    args, paths = [], []
    for line in p.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name == "cert" and not offline and "--cert" not in args:
            cert = value.strip().strip("'\"")
            if os.path.isfile(cert):
                args += ["--cert", cert]
                paths.append(cert)
        if name not in ("index-url", "extra-index-url", "find-links"):
            continue
        for v in value.strip().strip("'\"").split():
            path = v[len("file://"):] if v.startswith("file://") else v if v.startswith("/") else None
            if path and os.path.exists(path):
                root = path.rstrip("/")
                root = str(Path(root).parent) if root.endswith("/simple") else root   # the index and its files/
                paths.append(root)
                arg = ["--find-links" if name == "find-links" else "--extra-index-url", v]
                if not any(args[i:i + 2] == arg for i in range(0, len(args), 2)):
                    args += arg
    if offline and "--extra-index-url" in args:         # the first local index replaces PyPI
        args[args.index("--extra-index-url")] = "--index-url"
    elif offline:
        args.append("--no-index")
    return args, sorted(set(paths))


def ensure_local_base(runtime: str) -> str:
    """A Debian rootfs (debootstrap, minbase + python3 and the nodes' tools) imported as an image."""
    if subprocess.run([runtime, "image", "inspect", LOCAL_BASE], capture_output=True).returncode == 0:
        say(f"base {LOCAL_BASE}: present (kept from an earlier build)")
        return LOCAL_BASE
    if not shutil.which("debootstrap"):
        sys.exit("error: debootstrap is not installed (apt-get install debootstrap), or give --base IMAGE")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ddp-base-") as tmp:
        root = Path(tmp) / "rootfs"
        say(f"debootstrap bookworm into {root} (minbase + {BASE_PACKAGES}) ...")
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(root),
                        DEBIAN_MIRROR], check=True, stdout=subprocess.DEVNULL)
        for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in glob.glob(str(root / d / "*.deb")) + glob.glob(str(root / d / "*_Packages")):
                os.remove(f)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([runtime, "import", "--change", "CMD=/bin/bash", "-", LOCAL_BASE], stdin=tar.stdout,
                       check=True, stdout=subprocess.DEVNULL)
        tar.wait()
    say(f"base {LOCAL_BASE} built in {time.monotonic() - t0:.0f} s")
    return LOCAL_BASE


def cpu_torch(find_links: list[str]) -> tuple[str, str]:
    """(torch spec, extra index) for the small variant: the newest local CPU wheel, else PyTorch's CPU index."""
    wheels = sorted(w for d in find_links for w in glob.glob(os.path.join(d, "torch-*+cpu-*.whl")))
    if wheels:
        return "torch==" + os.path.basename(wheels[-1]).split("-")[1], ""
    return "torch", "https://download.pytorch.org/whl/cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", choices=["podman", "docker"], help="default: podman if installed, else docker")
    ap.add_argument("--base", help="base image, or 'local' (default: the Containerfile's CUDA runtime image)")
    ap.add_argument("--small", action="store_true", help="local base, CPU torch, no torchvision/requirements/jupyter")
    ap.add_argument("--no-jupyter", action="store_true")
    ap.add_argument("--torch-index", metavar="URL",
                    help="extra index for torch (default: the Containerfile's PyTorch CUDA index; '' for none, "
                         "e.g. where only a PyPI mirror is reachable)")
    ap.add_argument("--name", default=None, help="image name (default: ddp-train, ddp-train-small)")
    ap.add_argument("--build-opt", action="append", default=[], metavar="OPT",
                    help="passed to '<runtime> build' as is (e.g. --build-opt=--ulimit=nofile=1000:1000)")
    a = ap.parse_args(argv)
    runtime = a.runtime or next((r for r in ("podman", "docker") if shutil.which(r)), None)
    if runtime is None:
        sys.exit("error: neither podman nor docker is installed")
    pip_args, mounts = local_pip_sources(offline=a.small)
    p = pins()
    build_args = {"TORCH": p.get("torch", "torch"), "TORCHVISION": p.get("torchvision", ""), "JUPYTER": "1"}
    reqs = (REPO / "requirements.txt").read_text()
    base = a.base
    if a.small:
        base = base or "local"
        torch, index = cpu_torch([pip_args[i + 1] for i, x in enumerate(pip_args) if x == "--find-links"])
        build_args.update(TORCH=torch, TORCHVISION="", JUPYTER="0", TORCH_INDEX=index)
        reqs = "numpy\n"               # the agent runs outside the image; train needs torch (+ numpy for gloo objects)
    if a.no_jupyter:
        build_args["JUPYTER"] = "0"
    if a.torch_index is not None:
        build_args["TORCH_INDEX"] = a.torch_index
    if base == "local":
        base = ensure_local_base(runtime)
    if base:
        build_args["BASE"] = base
    build_args["PIP_ARGS"] = " ".join(pip_args)
    name = a.name or ("ddp-train-small" if a.small else "ddp-train")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "nogit"
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ddp-image-") as ctx:
        shutil.copy(REPO / "image" / "Containerfile", Path(ctx) / "Containerfile")
        (Path(ctx) / "requirements.txt").write_text(reqs)
        argv = [runtime, "build", "-f", str(Path(ctx) / "Containerfile"), "-t", f"{name}:building", "--network", "host"]
        for k, v in build_args.items():
            argv += ["--build-arg", f"{k}={v}"]
        if runtime == "podman":        # docker build has no volumes: local sources need podman
            for m in mounts:
                argv += ["-v", f"{m}:{m}:ro"]
        argv += a.build_opt + [ctx]
        say(" ".join(argv))
        subprocess.run(argv, check=True, stdout=sys.stderr)
    out = subprocess.run([runtime, "run", "--rm", "--network", "host", *[o for o in a.build_opt if o.startswith("--ulimit")], f"{name}:building", "python3", "-c",
                          "import torch; print(torch.__version__.split('+')[0], "
                          "'cu' + torch.version.cuda.replace('.', '') if torch.version.cuda else 'cpu')"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: the built image cannot import torch: {out.stderr.strip()[-500:]}")
    version, cuda = out.stdout.split()
    tag = f"{name}:torch{version}-{cuda}-{commit}"
    subprocess.run([runtime, "tag", f"{name}:building", tag], check=True)
    subprocess.run([runtime, "rmi", f"{name}:building"], capture_output=True)   # the tag stays
    say(f"built {tag} in {time.monotonic() - t0:.0f} s")
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
