"""Regenerate the real log excerpts under tests/logs by running the failures for real.

    python tests/logs/generate.py cpu      # gloo/torchrun/ssh-free cases, any machine
    python tests/logs/generate.py gpu      # CUDA/NCCL cases, a host with 2 GPUs
    python tests/logs/generate.py NAME     # one case

disk_full needs FULL_DIR set to a directory on a tiny filesystem
(mount -t tmpfs -o size=1M tmpfs DIR).

Each case runs the node agent (python -m cluster.node.agent) with torchrun under it, exactly as a
run does, so the file holds the node log as `cluster logs` shows it ("[host rank] ..." lines).
Paths and the machine's name are normalized so the files do not depend on where they were made.
"""
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PY = sys.executable


def _has_prefix_template() -> bool:
    """torch before 2.12 has no --log-line-prefix-template (torch_too_old.txt shows what happens)."""
    out = subprocess.run([PY, "-m", "torch.distributed.run", "--help"], capture_output=True, text=True)
    return "--log-line-prefix-template" in out.stdout


PREFIX_TEMPLATE = _has_prefix_template()


def torchrun(host, *args, nproc=2, nnodes=1, node_rank=0, port=29650, extra=(), scenario="ok"):
    prefix = [f"--log-line-prefix-template=[{host} ${{rank}}] "] if PREFIX_TEMPLATE else []
    return [PY, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}", *extra,
            "--tee=3", *prefix, str(HERE / "scenarios.py"), scenario]


def hold_port(port, argv):
    """Run argv while something else already listens on ``port`` (a stale run, another job)."""
    code = ("import socket,subprocess,sys; s=socket.socket(); s.bind(('0.0.0.0',%d)); s.listen(); "
            "sys.exit(subprocess.call(sys.argv[1:]))" % port)
    return [PY, "-c", code, *argv]


CPU = {
    "ddp_unused_parameters": ("gpu01", torchrun("gpu01", scenario="unused_parameters", port=29651)),
    "gloo_collective_timeout": ("gpu01", torchrun("gpu01", scenario="gloo_timeout", port=29652)),
    "address_in_use": ("gpu01", hold_port(29653, torchrun("gpu01", nnodes=2, port=29653))),
    "rendezvous_client_timeout": ("gpu02", torchrun("gpu02", nnodes=2, node_rank=1, port=29654,
                                                    extra=["--rdzv-conf=timeout=10,read_timeout=10"])),
    "rendezvous_server_timeout": ("gpu01", torchrun("gpu01", nnodes=2, node_rank=0, port=29655,
                                                    extra=["--rdzv-conf=timeout=10,read_timeout=10"])),
    "rendezvous_c10d_timeout": ("gpu01", [PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
                                          "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29656",
                                          "--rdzv-id=resnet50-20261128-101500-8c1e",
                                          "--rdzv-conf=join_timeout=10", "--tee=3",
                                          "--log-line-prefix-template=[gpu01 ${rank}] ",
                                          str(HERE / "scenarios.py"), "ok"]),
    "host_oom_killed": ("gpu02", torchrun("gpu02", scenario="killed", port=29657)),
    "dataloader_workers": ("gpu01", torchrun("gpu01", scenario="dataloader_workers", port=29658)),
    "missing_module": ("gpu04", torchrun("gpu04", scenario="missing_module", port=29659)),
    "clean_run": ("gpu01", torchrun("gpu01", scenario="ok", port=29649)),
    "disk_full": ("gpu01", torchrun("gpu01", scenario="disk_full", port=29660)),
}
GPU = {
    "cuda_oom": ("gpu03", torchrun("gpu03", scenario="cuda_oom", port=29661)),
    "nccl_watchdog_timeout": ("gpu03", torchrun("gpu03", scenario="nccl_timeout", port=29662)),
    "nccl_duplicate_gpu": ("gpu03", torchrun("gpu03", scenario="nccl_duplicate_gpu", port=29663)),
    "nccl_version_info": ("gpu03", torchrun("gpu03", scenario="ok", port=29664)),
    "cuda_device_assert": ("gpu03", torchrun("gpu03", scenario="device_assert", port=29665)),
}
ENV = {"nccl_version_info": {"NCCL_DEBUG": "INFO", "BACKEND": "nccl"}}


def normalize(text: str, run_dir: str) -> str:
    if not PREFIX_TEMPLATE:
        # older torchrun tags worker lines "[default<local rank>]:"; write them as the agent does
        # with the template ("[host rank] "); single-node cases: local rank == rank
        text = re.sub(r"^\[(\S+) agent\] \[default(\d+)\]:", r"[\1 \2] ", text, flags=re.M)
    text = text.replace(run_dir, "runs/resnet50-20261128-101500-8c1e")
    text = text.replace(sys.prefix, "/home/ml/ddp/.venv").replace(str(REPO), "/home/ml/ddp")
    return text.replace(socket.gethostname(), "gpu-node")


def main(which: str, out: Path = HERE) -> None:
    cases = {"cpu": CPU, "gpu": GPU}.get(which) or {k: v for k, v in {**CPU, **GPU}.items() if k == which}
    for name, (host, argv) in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, **ENV.get(name, {}), "PYTHONPATH": str(REPO)}
            p = subprocess.run([PY, "-m", "cluster.node.agent", "--run-dir", tmp, "--host", host, "--", *argv],
                               cwd=REPO, env=env, timeout=300)
            log = Path(tmp, "logs", f"{host}.log").read_text(errors="replace")
            (out / f"{name}.txt").write_text(normalize(log, tmp))
            print(f"{name}: exit {p.returncode}, {log.count(chr(10))} lines", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) > 2 else HERE)
