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


class MegaropeErrors(MegaropeError):
    """Several bad inputs found in one validation pass, reported together (``errors``, in the order
    found; ``field`` and ``message`` are the first's, the message counting the others)."""

    def __init__(self, errors: list[MegaropeError]):
        self.errors = [e for err in errors for e in getattr(err, "errors", [err])]
        first = self.errors[0]
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        super().__init__(first.field, first.message + more)


def raise_all(errors: list[MegaropeError]) -> None:
    """Raise ``errors``: nothing when empty, the error itself when one, :class:`MegaropeErrors` else."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise MegaropeErrors(errors)
