"""One image on every host: reading and comparing its digest per host (pure; ``image push`` is in
cluster/backends/image_push.py).

docker/podman: the image is saved here once (``RUNTIME save``, a tar in a temp dir) and streamed to
each host that lacks that digest (``ssh HOST RUNTIME load``), at most ``--fanout`` hosts at a time,
with a progress line per host every 10 %; a host that has the digest already is skipped. The digest
is the image ID (the sha256 of its config): it survives save/load and names the content, not the
tag. apptainer: a .sif file is copied to the same path (``cat > PATH.part && mv``), its sha256 is
the digest. A registry reference needs none of this: each host pulls it (container.pull: true).

The container preflight (cluster/container.py: checks marked ``digest``) reads the same digest on
every host of a run; ``compare`` turns a disagreement into one error naming the hosts.
"""
from __future__ import annotations

from typing import Mapping, Optional

from cluster.errors import UserError
from cluster.spec import hostlist


def digest_argv(runtime: str, image: str) -> list[str]:
    """Prints the image's digest on a host (exit 0), or fails when the image is not there."""
    if runtime in ("docker", "podman"):
        return [runtime, "image", "inspect", "--format", "{{.Id}}", image]
    if runtime == "apptainer":
        return ["sha256sum", image]
    raise UserError(f"runtime '{runtime}' has no local images to compare", key="container.runtime",
                    hint="use docker, podman or apptainer (a .sif path)")


def digest_of(output: str) -> str:
    """The digest in a digest command's output ('sha256:...' or sha256sum's first word)."""
    word = (output.split() or [""])[0]
    return word if ":" in word or not word else f"sha256:{word}"


def compare(image: str, digests: Mapping[str, Optional[str]]) -> None:
    """Raise one UserError naming the hosts when ``digests`` (host -> digest, None: missing) differ."""
    groups: dict[Optional[str], list[str]] = {}
    for host, d in digests.items():
        groups.setdefault(d, []).append(host)
    if len(groups) <= 1 and None not in groups:
        return
    parts = [f"{hostlist.fold(hosts)}: {d[:19] + '...' if d else 'missing'}"
             for d, hosts in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0] is None, kv[0] or ""))]
    raise UserError(f"image {image} is not the same on every host ({'; '.join(parts)})", key="container.image",
                    hint=f"copy one image to every host: python -m cluster image push {image} "
                         "(or pull the same digest everywhere)")
