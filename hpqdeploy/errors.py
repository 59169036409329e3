"""User-facing errors.

Anything a user can cause (a missing file, an unknown name, a ratio out of range) raises `UserError` with a
one-line message naming the problem and the fix; the CLI prints it and exits non-zero, never with a traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line."""

    exit_code = 2


class MissingExtra(UserError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"{package} is not installed: pip install 'hpqdeploy[{extra}]'")
