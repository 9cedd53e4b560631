"""User-facing errors: one clear message, exit code 2, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: bad file, unknown key, unreachable host.

    The CLI prints ``str(err)`` and exits 2. ``where`` names the file (and line), ``key`` the
    dotted key path, ``hint`` what to do.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, key: str | None = None,
                 hint: str | None = None):
        self.message, self.where, self.key, self.hint = message, where, key, hint
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: " if self.where else ""
        key = f"{self.key}: " if self.key else ""
        text = f"error: {head}{key}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class RemoteError(UserError):
    """A command failed on one or more hosts (exit code 2 for the CLI as well)."""
