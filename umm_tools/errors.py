"""User-facing failures.

Library code raises :class:`UmmError` when the *user* can fix the problem (a bad path, an unsupported
model, a malformed data file). The CLI prints its message and exits 1 without a traceback. Anything else
that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UmmError(Exception):
    """A failure the user can act on; the message says what went wrong and what to do."""


class OptionsError(Exception):
    """Invalid options or recipe values: one ``field: message`` line per problem (the CLI exits 2)."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines
