"""YAML loading that remembers where every key came from, so errors can name file and line."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster.errors import UserError

MAX_BYTES = 1024 * 1024         # a config file; anything larger is a mistake (or /dev/zero)


@dataclass
class Source:
    """A loaded YAML document plus the line of every key path in it."""

    name: str
    data: object
    lines: dict[tuple, int] = field(default_factory=dict)

    def where(self, path: tuple = ()) -> str:
        """``file:line`` for the closest known ancestor of ``path``."""
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        line = self.lines.get(p)
        return f"{self.name}:{line}" if line else self.name


def load(path: Path | str, text: str | None = None) -> Source:
    name = str(path)
    if text is None:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BYTES + 1)     # never more: /dev/zero or a huge file is refused at once
            if len(data) > MAX_BYTES:
                raise UserError(f"larger than {MAX_BYTES // 2**20} MiB", where=name,
                                hint="an inventory or job file is a few kilobytes; is this the right file?")
            text = data.decode("utf-8")
        except FileNotFoundError:
            raise UserError("file not found", where=name,
                            hint="check the path (INVENTORY=... / JOB=...)") from None
        except IsADirectoryError:
            raise UserError("is a directory, not a file", where=name) from None
        except UnicodeDecodeError as e:
            raise UserError(f"not UTF-8 text ({e.reason})", where=name) from None
        except OSError as e:
            raise UserError(f"cannot read: {e.strerror}", where=name) from None
    try:
        # the C parser where PyYAML has it (the pure-Python one takes seconds for a 1 MiB file)
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        src = Source(name, None)
        src.data = _convert(node, (), src, set(), yaml.constructor.SafeConstructor()) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = ", ".join(escape(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) \
            or escape(str(e))
        if "nesting depth" in problem:       # libyaml's own limit (the pure-Python parser recurses instead)
            raise UserError("invalid YAML: nested too deeply", where=where,
                            hint="a config file needs a few levels of nesting, not hundreds") from None
        raise UserError(f"invalid YAML: {problem}", where=where,
                        hint="fix the syntax (indentation, quotes, colons)") from None
    except RecursionError:
        raise UserError("invalid YAML: nested too deeply", where=name,
                        hint="a config file needs a few levels of nesting, not hundreds") from None
    return src


# tags a config file may carry (most implicitly); others (!!python/..., !!binary, !custom) are refused
_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map", "timestamp")}


def _convert(node, path: tuple, src: Source, seen: set, scalars):
    line = node.start_mark.line + 1
    if id(node) in seen:
        # an alias (*name) of a node already converted: refused, since repeated aliases expand
        # exponentially ("billion laughs") and a recursive one never ends
        raise UserError("YAML aliases (*name) are not supported", where=f"{src.name}:{line}",
                        hint="write the value out, or use 'defaults:' for settings shared by hosts")
    seen.add(id(node))
    if node.tag not in _TAGS:
        raise UserError(f"YAML tag {show(node.tag.replace('tag:yaml.org,2002:', '!!'))} is not supported",
                        where=f"{src.name}:{line}", hint="write plain values (strings, numbers, lists, mappings)")
    src.lines.setdefault(path, line)
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                raise UserError("YAML merge keys (<<) are not supported", where=f"{src.name}:{knode.start_mark.line + 1}")
            if not isinstance(knode, yaml.ScalarNode):
                raise UserError("keys must be plain strings", where=f"{src.name}:{knode.start_mark.line + 1}")
            key = knode.value
            kpath = path + (key,)
            if key in out:
                raise UserError(f"duplicate key {show(key)} (first on line {src.lines.get(kpath)})",
                                where=f"{src.name}:{knode.start_mark.line + 1}",
                                key=".".join(map(str, kpath)), hint="keep one of them")
            src.lines[kpath] = knode.start_mark.line + 1
            out[key] = _convert(vnode, kpath, src, seen, scalars)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(v, path + (i,), src, seen, scalars) for i, v in enumerate(node.value)]
    return scalars.construct_object(node, deep=True) if node.tag != "tag:yaml.org,2002:str" else node.value


def escape(text: str) -> str:
    """``text`` with every non-printable character written as its escape (\\n, \\x1b, \\u202e)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def show(value, limit: int = 80) -> str:
    """A value for an error message: quoted, control and invisible characters escaped (a file
    must not be able to move the cursor or reorder the text of our messages), long ones cut."""
    text = value if isinstance(value, str) else repr(value)
    out = escape(text)
    if len(out) > limit:
        out = out[:limit] + f"... ({len(text)} characters)"
    return f"'{out}'"


def parse_scalar(text: str):
    """Parse a command-line override value the way YAML reads a scalar (``8`` -> 8, ``true`` ->
    True, ``'8'`` -> '8', ``[a, b]`` -> a list). Any other text is taken as it is: YAML would drop a
    ``#comment``, fold a newline into a space or make ``a: b`` a mapping, and an override's value
    must arrive as the user wrote it."""
    if not text.isprintable():
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None:
        return None if text.strip() in ("null", "~", "") else text
    if isinstance(value, (bool, int, float)):
        return value
    stripped = text.strip()
    if isinstance(value, str) and len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        return value                 # quoted on purpose: '8' is the string 8
    if isinstance(value, (list, dict)) and stripped[:1] in "[{":
        return value
    return text
