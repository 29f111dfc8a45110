"""User-facing errors.

Every problem a user can fix (a missing path, a bad option value, a text that is too short)
is raised as :class:`AchillesError` with a one-line message that names the fix. The CLI
prints that line to stderr and exits with status 2; nothing else is ever shown as a
traceback for bad input.
"""

from __future__ import annotations


class AchillesError(Exception):
    """A problem with the user's input, reported as one line naming the fix."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`AchillesError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise AchillesError(message)
