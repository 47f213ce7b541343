"""Errors a user can hit, with one-line messages naming the file or key and the fix."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input or configuration, not by a bug.

    The message is one line that names the offending file or config key and says how to fix it.
    Command-line entry points print it without a traceback and exit with status 2.
    """


class ScanRejected(UserError):
    """A scan that cannot be used (unreadable, malformed, or failing QC).

    Raised inside preprocessing; the workflow turns it into an ``excluded`` row with ``reason``
    instead of failing the run.
    """

    def __init__(self, reason: str, path: str | None = None):
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)
