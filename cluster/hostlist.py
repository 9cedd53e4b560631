"""SLURM-style host ranges: ``gpu[01-03,07]`` -> gpu01 gpu02 gpu03 gpu07, and back."""
from __future__ import annotations

import re

_BRACKET = re.compile(r"\[([^\[\]]*)\]")
MAX_HOSTS = 100_000


def expand(pattern: str) -> list[str]:
    """Expand one hostlist expression (may hold several bracket groups and commas outside them)."""
    names: list[str] = []
    for part in _split_top(pattern):
        names.extend(_expand_one(part))
    return names


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"unbalanced '[' in {text!r}")
    parts.append(cur)
    for p in parts:
        if not p.strip():
            raise ValueError(f"empty host name in {text!r}")
    return [p.strip() for p in parts]


def _expand_one(text: str) -> list[str]:
    m = _BRACKET.search(text)
    if not m:
        if "[" in text or "]" in text:
            raise ValueError(f"unbalanced brackets in {text!r}")
        return [text]
    head, tail = text[: m.start()], text[m.end():]
    out: list[str] = []
    for item in m.group(1).split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty range item in {text!r}")
        if "-" in item:
            lo, _, hi = item.partition("-")
            if not (lo.isdigit() and hi.isdigit()):
                raise ValueError(f"range {item!r} in {text!r} is not numeric (write e.g. 01-16)")
            if int(hi) < int(lo):
                raise ValueError(f"range {item!r} in {text!r} goes backwards")
            width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
            if int(hi) - int(lo) + 1 > MAX_HOSTS:
                raise ValueError(f"range {item!r} in {text!r} is larger than {MAX_HOSTS} hosts")
            nums = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            if not item.isdigit():
                raise ValueError(f"range item {item!r} in {text!r} is not a number")
            nums = [item]
        for n in nums:
            out.extend(head + n + rest for rest in _expand_one(tail))
    return out


def fold(names: list[str]) -> str:
    """Compress host names into one hostlist expression: node1,node2,node3 -> node[1-3]."""
    groups: dict[tuple[str, str, int], list[int]] = {}
    order: list[tuple] = []
    singles: list[str] = []
    for name in names:
        m = re.fullmatch(r"(.*?)(\d+)(\D*)", name)
        if not m:
            key = (name, "", -1)
            if key not in groups:
                groups[key] = []
                order.append(key)
            continue
        head, num, tail = m.groups()
        width = len(num) if num.startswith("0") else 0
        key = (head, tail, width)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(int(num))
    parts: list[str] = []
    for key in order:
        head, tail, width = key
        nums = sorted(set(groups[key]))
        if width == -1:
            parts.append(head)
            continue
        if len(nums) == 1:
            parts.append(f"{head}{str(nums[0]).zfill(width)}{tail}")
            continue
        ranges, start, prev = [], nums[0], nums[0]
        for n in nums[1:] + [None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            a, b = str(start).zfill(width), str(prev).zfill(width)
            ranges.append(a if start == prev else f"{a}-{b}")
            if n is not None:
                start = prev = n
        parts.append(f"{head}[{','.join(ranges)}]{tail}")
    return ",".join(parts + singles)
