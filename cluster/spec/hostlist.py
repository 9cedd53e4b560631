"""SLURM-style host ranges: ``gpu[01-03,07]`` -> gpu01 gpu02 gpu03 gpu07, and back."""
from __future__ import annotations

import re

_BRACKET = re.compile(r"\[([^\[\]]*)\]")
# hosts in one inventory (or one --hosts expression): an SSH fan-out or a plan of more is a typo
# (past a rack SLURM schedules; its inventory lists login hosts). Counted before expanding, so a
# product of ranges (n[1-1000]-[1-1000]) is refused at once instead of filling memory.
MAX_HOSTS = 10_000


def expand(pattern: str, limit: int | None = MAX_HOSTS) -> list[str]:
    """Expand one hostlist expression (may hold several bracket groups and commas outside them);
    ValueError if it is malformed or names more than ``limit`` hosts."""
    parts = _split_top(pattern)
    if limit is not None:
        total = sum(count(p) for p in parts)
        if total > limit:
            raise ValueError(f"{_cut(pattern)} is larger than {limit:,} hosts ({total:,})")
    names: list[str] = []
    for part in parts:
        names.extend(_expand_one(part))
    return names


def count(part: str) -> int:
    """How many names one comma-free part expands to (the product of its bracket groups)."""
    n = 1
    for group in _BRACKET.findall(part):
        size = 0
        for item in group.split(","):
            lo, dash, hi = item.strip().partition("-")
            if dash and lo.isdigit() and hi.isdigit():
                size += max(0, int(hi) - int(lo) + 1)
            else:
                size += 1        # a malformed item: _expand_one names the mistake
        n *= max(size, 1)
    return n


def _cut(text: str, limit: int = 60) -> str:
    """``text`` for a message: repr'd, at most ``limit`` characters of it."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in {_cut(text)}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"unbalanced '[' in {_cut(text)}")
    parts.append(cur)
    for p in parts:
        if not p.strip():
            raise ValueError(f"empty host name in {_cut(text)}")
    return [p.strip() for p in parts]


def _expand_one(text: str) -> list[str]:
    m = _BRACKET.search(text)
    if not m:
        if "[" in text or "]" in text:
            raise ValueError(f"unbalanced brackets in {_cut(text)}")
        return [text]
    head, tail = text[: m.start()], text[m.end():]
    out: list[str] = []
    for item in m.group(1).split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty range item in {_cut(text)}")
        if "-" in item:
            lo, _, hi = item.partition("-")
            if not (lo.isdigit() and hi.isdigit()):
                raise ValueError(f"range {_cut(item, 20)} in {_cut(text)} is not numeric (write e.g. 01-16)")
            if int(hi) < int(lo):
                raise ValueError(f"range {_cut(item, 20)} in {_cut(text)} goes backwards")
            width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
            nums = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            if not item.isdigit():
                raise ValueError(f"range item {_cut(item, 20)} in {_cut(text)} is not a number")
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
