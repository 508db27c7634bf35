"""The one exception type the command line turns into a sentence and an exit code.

Every refusal a user can cause (bad input, a wrong PIN, a device that misbehaves) is raised
as a `StamplineError` whose message is one complete sentence; anything else is a bug and
is reported as such.
"""

from __future__ import annotations

#: The longest message an error keeps: a last line of defence against echoing input.
MAX_MESSAGE = 1000


def shown(text: str, limit: int = 60) -> str:
    """Untrusted text, made safe to put in a message: printable and bounded."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clean if len(text) <= limit else clean[:limit - 3] + "..."


class StamplineError(Exception):
    """A refusal with a one-sentence reason, safe to show to an operator."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        message = shown(str(message), MAX_MESSAGE)  # one printable line, whatever input it quotes
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(StamplineError):
    """A bad command line or configuration value."""

    exit_code = 2
