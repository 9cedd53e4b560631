"""Strict conversion of plain YAML data into frozen dataclasses.

Unknown keys are errors that list the valid ones (as submitit does); wrong types name the key
path and the file:line it came from.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from cluster.errors import UserError
from cluster.spec.yamlsrc import Source, escape, show

MAX_INT = 2**53          # larger numbers in a config file are typos (and overflow C code down the line)


def build(cls, data: Any, src: Source, path: tuple = ()):
    """Build dataclass ``cls`` from ``data`` (a mapping), validating every key and type."""
    dotted_ = dotted(path) or None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"expected a mapping, got {_kind(data)}", where=src.where(path), key=dotted_)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise UserError(f"unknown key {show(k)}", where=src.where(path + (k,)),
                        key=dotted(path + (k,)),
                        hint=did_you_mean(k, fields) + "valid keys here are: " + ", ".join(sorted(fields)))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name], src, path + (name,))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"missing required key '{name}'", where=src.where(path),
                            key=dotted(path + (name,)),
                            hint=f"add '{name}:' to this section")
    return cls(**kwargs)


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    """get_type_hints, once per class (it re-evaluates every annotation on each call)."""
    return get_type_hints(cls)


def did_you_mean(word, choices) -> str:
    """'did you mean 'steps'? ' for a near miss among ``choices`` (difflib), else ''."""
    import difflib
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{near[0]}'? " if near else ""


def convert(tp, value: Any, src: Source, path: tuple):
    dotted_ = dotted(path)
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, src, path)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        shaped = [a for a in real if dataclasses.is_dataclass(a) or get_origin(a) in (dict, list, tuple)]
        if len(real) == 1 or (len(shaped) == 1 and isinstance(value, (dict, list))):
            # one shape fits: its own, more precise error is the one to show
            return convert(shaped[0] if len(real) > 1 else real[0], value, src, path)
        errors = []
        for a in real:
            try:
                return convert(a, value, src, path)
            except UserError as e:
                errors.append(e)
        raise UserError(f"expected {_describe(tp)}, got {_kind(value)} {shown(value)}",
                        where=src.where(path), key=dotted_)
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise UserError(f"must be one of {', '.join(map(repr, get_args(tp)))}; got {shown(value)}",
                        where=src.where(path), key=dotted_)
    if origin in (list, tuple):
        (item,) = get_args(tp)[:1]
        if not isinstance(value, list):
            raise UserError(f"expected a list, got {_kind(value)}", where=src.where(path), key=dotted_)
        return tuple(convert(item, v, src, path + (i,)) for i, v in enumerate(value))
    if origin is dict:
        kt, vt = get_args(tp)
        if not isinstance(value, dict):
            raise UserError(f"expected a mapping, got {_kind(value)}", where=src.where(path), key=dotted_)
        return types.MappingProxyType({k: convert(vt, v, src, path + (k,)) for k, v in value.items()})
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                raise UserError(f"{shown(value)} is too large", where=src.where(path), key=dotted_,
                                hint="give a realistic value (each setting has its own range)")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value) or abs(value) > MAX_INT:
                raise UserError(f"must be a finite number; got {shown(value)}", where=src.where(path), key=dotted_)
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            if "\x00" in value:
                raise UserError("contains a NUL byte", where=src.where(path), key=dotted_)
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - schema mistake
        raise TypeError(f"unsupported schema type {tp}")
    raise UserError(f"expected {_describe(tp)}, got {_kind(value)} {shown(value)}",
                    where=src.where(path), key=dotted_)


def shown(value) -> str:
    """A value of any type for an error message (strings escaped and cut, see yamlsrc.show)."""
    if isinstance(value, str):
        return show(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def dotted(path: tuple) -> str:
    """('hosts', 0, 'gpus') -> 'hosts[0].gpus'."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{escape(str(p))}" if out else escape(str(p)))
    return out


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _describe(tp) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def to_plain(obj):
    """Dataclasses/mappingproxies/tuples -> JSON-able plain data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (dict, types.MappingProxyType)):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


typing  # keep import for get_type_hints on postponed annotations
