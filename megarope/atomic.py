"""Atomic file outputs: a reader, another rank or a requeued job sees the old file or the new one,
never a partial one. Every file megarope writes outside dist_checkpointing goes through here."""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``, renamed onto it (``os.replace``, atomic on POSIX)
    when the block succeeds: a reader or a requeued job sees the old file or the new one, never a
    partial one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # unique per process and call (ranks or threads may write the same file), created by the
    # writer itself so that it gets the usual umask permissions, unlike mkstemp's 0600
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data after a node crash
