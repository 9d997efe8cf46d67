"""The one way a benchmark script shows its table: printed, and with ``--append`` added to
benchmarks/RESULTS.md under its own heading (scripts run as ``python benchmarks/NAME.py`` import it
as ``results``)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def publish(heading: str, lines: list[str], note: str = "", append: bool = False) -> None:
    """Print ``lines`` (plus ``note`` after a blank line); with ``append`` also add them to RESULTS.md
    as a ``## heading`` section."""
    text = "\n".join(lines + (["", note] if note else []))
    print(text)
    if append:
        with open(RESULTS, "a") as f:
            f.write(f"\n## {heading}\n\n{text}\n")
