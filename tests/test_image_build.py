"""The training image (image/): its small variant builds here with no registry and trains 2 ranks.

The small variant (``python image/build.py --small``) is the Containerfile on a local Debian base
(debootstrap, imported into podman, kept between runs) with the CPU torch of the configured local
package index, no extras. Durations on this 2-core machine: the base about 2.5 min once, the
build about 4 min cold; with podman's layer cache (same Containerfile and inputs) a few seconds.
The full build (CUDA base, the pinned torch) is bench/bench_image.py. The image is built once
per session (the ``small_image`` fixture in conftest.py; tests/test_container_docker.py uses it too).
"""
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from .test_container_podman import podman_args
from .test_local import cli, submit, wait_state

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_small_image_builds_with_its_versions_in_the_tag(small_image):
    tag, log = small_image
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    m = re.fullmatch(r"ddp-train-small:torch(\d+\.\d+\.\d+)-cpu-" + re.escape(commit), tag)
    assert m, tag
    inside = subprocess.run(["podman", "run", "--rm", *podman_args(), tag, "sh", "-c",
                             "command -v python3; command -v ssh; command -v rsync; python3 -c 'import torch; print(torch.__version__)'"],
                            capture_output=True, text=True, timeout=120)
    assert inside.returncode == 0, inside.stderr
    lines = inside.stdout.split()
    assert lines[0] == "/opt/venv/bin/python3" and lines[1].endswith("/ssh") and lines[2].endswith("/rsync")
    assert lines[3].split("+")[0] == m.group(1)


def test_small_image_trains_two_ranks(small_image, tmp_path):
    tag, _ = small_image
    runs = tmp_path / "runs"
    job = tmp_path / "imgtrain.yaml"
    job.write_text(yaml.safe_dump({
        "name": "imgtrain", "cpu_procs_per_node": 2,
        "train": {"model": "train.model:tiny_cnn", "data": "synthetic-learnable", "image_size": 32,
                  "num_classes": 10, "synthetic_size": 256, "batch_size": 16, "steps": 6, "ckpt_every": 6,
                  "log_every": 3},
        "container": {"image": tag, "runtime": "podman", "args": podman_args()}}))
    rid = submit(runs, str(job))
    st = wait_state(runs, rid, {"SUCCEEDED", "FAILED"}, timeout=300)
    logs = cli(runs, "logs", rid).stdout
    assert st["state"] == "SUCCEEDED", logs[-3000:]
    assert "[localhost 0] " in logs and "[localhost 1] " in logs
    ckpt = runs / rid / "checkpoints" / "ckpt_6.pt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    # trained by the image's torch (the CPU build), not the host's
    assert saved["world_size"] == 2 and saved["torch_version"].endswith("+cpu"), saved["torch_version"]
