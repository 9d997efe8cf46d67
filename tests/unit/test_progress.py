"""megarope.progress: plain lines off a terminal, a tqdm bar on one, rank 0 only, ETA from the recent pace."""

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import sys
import termios

import pytest

from megarope import progress
from megarope.progress import Progress
from megarope.run.stages.eval import summary_line


class _Clock:
    """Stands in for time.monotonic; the test advances it."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


@pytest.fixture
def terminal(monkeypatch):
    """A real pseudo-terminal; yields (put sys.stdout on it with a width, read what was written).
    sys.stdout is replaced inside the test: pytest's capture resets it between setup and call."""
    master, slave = pty.openpty()
    stream = open(slave, "w", buffering=1, closefd=True)

    def set_columns(columns):
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        monkeypatch.setattr("sys.stdout", stream)

    def read():
        stream.flush()
        chunks = []
        while select.select([master], [], [], 0.2)[0]:
            chunks.append(os.read(master, 65536))
        return b"".join(chunks).decode()

    yield set_columns, read
    stream.close()
    os.close(master)


def _run(clock, total, durations, **kwargs):
    with Progress("train", total, **kwargs) as bar:
        for seconds in durations:
            clock.advance(seconds)
            bar.update(tokens=1000, loss=2.5)
    return bar


def test_plain_lines_every_n_and_at_the_end(clock, caplog, monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())  # not a terminal
    with caplog.at_level(logging.INFO, logger="megarope.progress"):
        _run(clock, 7, [0.5] * 7, every=3, enabled=True)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" | ")[0] for line in lines] == ["train 3/7 steps", "train 6/7 steps", "train 7/7 steps"]
    # 1000 tokens every 0.5 s; 1 step left at 0.5 s a step after step 6
    assert lines[1] == "train 6/7 steps | loss 2.5000 | 2000 tok/s | eta 0:00:00"
    assert re.fullmatch(r"train 3/7 steps \| loss 2\.5000 \| 2000 tok/s \| eta 0:00:02", lines[0])


def test_eta_follows_the_recent_pace_not_the_average(clock, monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    with Progress("search", 40, enabled=False) as bar:
        for _ in range(10):  # slow start: 10 s a unit
            clock.advance(10.0)
            bar.update()
        for _ in range(20):  # then 1 s a unit
            clock.advance(1.0)
            bar.update()
    # the whole-history average (120 s / 30 units = 4 s) would say 40 s for the last 10 units
    assert bar.eta_s == pytest.approx(10 * (1 + 9 * 0.8 ** 20), rel=1e-9)
    assert bar.eta_s < 12


def test_terminal_gets_a_bar_and_logs_print_above_it(clock, terminal):
    set_columns, read = terminal
    set_columns(100)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stdout)
    root.addHandler(handler)
    try:
        with Progress("train", 4, enabled=True) as bar:
            for _ in range(4):
                clock.advance(0.25)
                bar.update(tokens=100, loss=1.0)
                logging.getLogger("megarope.test").warning("a log line")
    finally:
        root.removeHandler(handler)
    out = read()
    assert "train: 100%" in out and "4/4" in out and "tok/s=400" in out and "loss=1.0000" in out
    assert out.count("a log line") == 4
    assert "train 4/4 steps |" not in out  # no plain lines on a terminal


def test_a_terminal_without_a_size_gets_plain_lines(clock, terminal, caplog):
    set_columns, read = terminal
    set_columns(0)  # e.g. a pty opened by a tool that sets no window size: a bar would draw nothing
    with caplog.at_level(logging.INFO, logger="megarope.progress"):
        _run(clock, 2, [1.0] * 2, enabled=True)
    assert [r.getMessage().split(" | ")[0] for r in caplog.records] == ["train 1/2 steps", "train 2/2 steps"]
    assert "%|" not in read()


def test_only_rank_zero_shows_progress(clock, caplog, monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    monkeypatch.setattr(progress.dist, "is_rank0", lambda: False)  # rank 1 (the rule itself: test_dist)
    with caplog.at_level(logging.INFO, logger="megarope.progress"):
        bar = _run(clock, 3, [1.0] * 3)
    assert not bar.enabled and caplog.records == []
    assert bar.tokens_per_s == pytest.approx(1000)  # still measured: the metrics rows carry it
    monkeypatch.setattr(progress.dist, "is_rank0", lambda: True)
    with caplog.at_level(logging.INFO, logger="megarope.progress"):
        _run(clock, 3, [1.0] * 3)
    assert len(caplog.records) == 3


def test_resumed_progress_counts_from_the_resume_point(clock, caplog, monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    with caplog.at_level(logging.INFO, logger="megarope.progress"):
        _run(clock, 10, [1.0] * 2, initial=8, enabled=True)
    assert [r.getMessage().split(" | ")[0] for r in caplog.records] == ["train 9/10 steps", "train 10/10 steps"]


def test_eval_summary_line():
    assert summary_line("eval_yarn", {128: 5.0, 1024: 7.25}, {"1024@0.5": 0.75}) == \
        "eval_yarn: ppl 128:5.000 1024:7.250 | passkey 1024@0.5:0.75"
    assert summary_line("eval_pi", {128: 5.0}, {}) == "eval_pi: ppl 128:5.000"


def test_rate_is_recent_tokens_over_recent_seconds(clock, monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    bar = _run(clock, 10, [0.1, 10.0], enabled=False)
    # 1000 tokens a step; seconds a step smoothed: 0.2 * 10 + 0.8 * 0.1 = 2.08
    assert bar.tokens_per_s == pytest.approx(1000 / 2.08)
