"""The testbed's network: a bridge in the root namespace, one network namespace per host (veth
eth0 with the host's address, lo up, no default route), and the hosts' names in /etc/hosts."""

from __future__ import annotations

from pathlib import Path

from .common import (BRIDGE, BRIDGE_ADDR, CONTROLLER, MARKER, NETNS_DIR, NODE_RE, SUBNET_PREFIX,
                     VETH_PREFIX, node_addr, run)

HOSTS_FILE = Path("/etc/hosts")


def network_up(n: int) -> None:
    run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    run(["ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])
    for i in range(1, n + 1):
        ns, veth = f"node{i}", f"{VETH_PREFIX}{i}"
        run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
        # One batch inside the namespace: address, eth0 up, lo up. No default route, on purpose.
        run(["ip", "-n", ns, "-batch", "-"],
            input=f"addr add {node_addr(i)}/24 dev eth0\nlink set eth0 up\nlink set lo up\n")


def testbed_netns(recorded: list[str]) -> list[str]:
    """The namespaces to delete: those state.json recorded, and any node<N> holding a testbed
    address (after a crashed up, state.json may not name them)."""
    netns = set(recorded)
    for n in netns_list():
        if NODE_RE.match(n) and (n in netns or netns_is_ours(n)):
            netns.add(n)
    return sorted(n for n in netns if (NETNS_DIR / n).exists())


def network_down(netns: list[str]) -> None:
    for n in netns:
        run(["ip", "netns", "del", n], check=False)
    links = link_names()
    for link in links:
        if link.startswith(VETH_PREFIX):
            run(["ip", "link", "del", link], check=False)
    if BRIDGE in links:
        run(["ip", "link", "del", BRIDGE], check=False)


def netns_list() -> list[str]:
    p = run(["ip", "netns", "list"], check=False)
    return [ln.split()[0] for ln in p.stdout.splitlines() if ln.strip()]


def link_names() -> list[str]:
    p = run(["ip", "-o", "link", "show"], check=False)
    names = []
    for ln in p.stdout.splitlines():
        parts = ln.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def netns_is_ours(name: str) -> bool:
    p = run(["ip", "-n", name, "-o", "-4", "addr", "show"], check=False)
    return SUBNET_PREFIX in p.stdout


# /etc/hosts: one line per host and one for the controller, each tagged with MARKER


def _hosts_lines(n: int) -> list[str]:
    lines = [f"{BRIDGE_ADDR}\t{CONTROLLER}\t# {MARKER}"]
    lines += [f"{node_addr(i)}\tnode{i}\t# {MARKER}" for i in range(1, n + 1)]
    return lines


def _rewrite_in_place(path: Path, text: str) -> None:
    # /etc/hosts may be a bind mount: rename over it can fail, so rewrite in place.
    with open(path, "r+") as f:
        f.seek(0)
        f.write(text)
        f.truncate()


def hosts_add(n: int) -> None:
    text = HOSTS_FILE.read_text() if HOSTS_FILE.exists() else ""
    kept = [ln for ln in text.splitlines() if not ln.rstrip().endswith(f"# {MARKER}")]
    new = "\n".join(kept + _hosts_lines(n)) + "\n"
    if HOSTS_FILE.exists():
        _rewrite_in_place(HOSTS_FILE, new)
    else:
        HOSTS_FILE.write_text(new)


def hosts_marked_lines() -> list[str]:
    try:
        text = HOSTS_FILE.read_text()
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.rstrip().endswith(f"# {MARKER}")]


def hosts_remove() -> None:
    if not hosts_marked_lines():
        return
    text = HOSTS_FILE.read_text()
    kept = [ln for ln in text.splitlines() if not ln.rstrip().endswith(f"# {MARKER}")]
    _rewrite_in_place(HOSTS_FILE, "\n".join(kept) + ("\n" if kept else ""))
