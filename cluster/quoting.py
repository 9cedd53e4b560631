"""Shell words: every command line we render for a host's shell goes through here (one shell hop,
one ``shlex.quote`` per word), so nothing a user wrote is read differently by that shell."""
from __future__ import annotations

import shlex
from typing import Iterable, Sequence


def quote_argv(argv: Sequence[str], home: Iterable[str] = ()) -> str:
    """One shell word per argument: the command line for exactly one shell hop. Words listed in
    ``home`` (the inventory's python) keep a leading ``~/`` for the host's shell to expand."""
    home = set(home)
    return " ".join(shell_word(str(a), home=a in home) for a in argv)


def shell_word(word: str, home: bool = False) -> str:
    """``word`` quoted for a POSIX shell; with ``home``, ``~`` or a leading ``~/`` is left outside
    the quotes, so it is the home of the user the command runs as on the host."""
    if home and word == "~":
        return "~"
    if home and word.startswith("~/"):
        return "~/" + shlex.quote(word[2:]) if word[2:] else "~/"
    return shlex.quote(word)
