"""The one error type for bad input: every validator raises a subclass naming the offending field.

The CLI prints ``error: <field>: <message>`` and exits 2 for these only; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations


class MegaropeError(ValueError):
    """Bad user input. ``field`` is the key as the user wrote it (``stages[3].method.factor``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
