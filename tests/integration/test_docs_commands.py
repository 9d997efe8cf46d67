"""Every shell command block in README.md and docs/ runs as written, so the docs cannot drift.

Which blocks: every fenced block tagged ``bash``, ``sh`` or ``shell`` in README.md and
docs/**/*.md (a new page is picked up by itself). Blocks tagged otherwise (``python``, ``yaml``,
``text``) are not commands; an untagged fence fails ``test_every_fence_is_tagged``, so that
nothing escapes by omission.

How a block runs: as one ``bash -e -o pipefail`` script, from a scratch copy of the checkout (its
top-level entries symlinked, so ``runs/`` and other outputs land in a temporary folder), with
this interpreter's ``python`` and ``torchrun`` first on PATH. The test is the block's id,
``<file>:<line of the fence>``.

A block changes how it is tested only through an HTML comment on the nearest non-blank line
above its fence (invisible on the rendered page), one of:

    <!-- doc-test: skip slurm -->          needs a SLURM cluster (sbatch, squeue, root for the test one)
    <!-- doc-test: skip gpu -->            needs GPUs
    <!-- doc-test: covered-by PATH ... --> long; PATH (must exist: a test file, .ci/run) runs the same
                                           commands, e.g. README's install and test commands
    <!-- doc-test: overrides K=V ... -->   run, with K=V added after the overrides of every
                                           ``-m megarope`` command of the block (Hydra: the last
                                           value wins) to keep it cheap

There is no other way to skip a block; skipped ones name their reason in the summary (``-rs``).
Whatever their marker, ``-m megarope`` commands asking for a parallel layout
(``parallel.tp*pp*cp > 1``) must be started by ``torchrun --nproc-per-node N``, N a multiple of
it: ``python -m megarope`` is one process and stops at once.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHELL_TAGS = {"bash", "sh", "shell"}
SKIP_KINDS = {"slurm": "needs a SLURM cluster", "gpu": "needs GPUs"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*(\S*)")
MARKER = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
MEGAROPE = re.compile(r"(?:^|\s)-m\s+megarope(?=\s|$)")


@dataclass
class Block:
    page: str  # relative to the checkout
    line: int  # of the opening fence, 1-based
    tag: str
    marker: str | None  # the doc-test comment's text
    body: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def doc_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]


def fenced_blocks(page: Path) -> tuple[list[Block], list[int]]:
    """The page's fenced blocks and the line numbers of doc-test markers attached to none."""
    lines = page.read_text().splitlines()
    blocks, stray, i = [], [], 0
    pending: tuple[int, str] | None = None  # (line, text) of a marker waiting for its fence
    while i < len(lines):
        line = lines[i]
        if m := MARKER.match(line.strip()):
            if pending:
                stray.append(pending[0])
            pending = (i + 1, m.group(1))
        elif m := FENCE.match(line):
            close = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(m.group(1))
                         and not lines[j].strip().strip(m.group(1)[0]))
            blocks.append(Block(str(page.relative_to(REPO)), i + 1, m.group(2),
                                pending[1] if pending else None, "\n".join(lines[i + 1:close]) + "\n"))
            pending, i = None, close
        elif line.strip() and pending:
            stray.append(pending[0])
            pending = None
        i += 1
    return blocks, stray + ([pending[0]] if pending else [])


def shell_blocks() -> list[Block]:
    return [b for page in doc_pages() for b in fenced_blocks(page)[0] if b.tag in SHELL_TAGS]


def logical_lines(body: str) -> list[str]:
    """Lines with backslash continuations joined; heredoc bodies are left out."""
    out, heredoc_end, joined = [], None, ""
    for line in body.splitlines():
        if heredoc_end is not None:
            heredoc_end = None if line.strip() == heredoc_end else heredoc_end
            continue
        joined += line
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        out.append(joined)
        if m := re.search(r"<<-?\s*['\"]?(\w+)['\"]?", joined):
            heredoc_end = m.group(1)
        joined = ""
    return out


def megarope_commands(body: str) -> list[list[str]]:
    return [shlex.split(line, comments=True) for line in logical_lines(body) if MEGAROPE.search(line)]


def with_overrides(body: str, overrides: list[str]) -> str:
    """``body`` with ``overrides`` appended to each ``-m megarope`` command (before its comment)."""
    # heredoc bodies are not in logical_lines: only blocks without them take overrides
    if re.search(r"<<-?\s*['\"]?\w+", body):
        raise AssertionError("doc-test overrides: not supported in a block with a heredoc")
    extra = " " + " ".join(shlex.quote(o) for o in overrides)
    out = []
    for line in logical_lines(body):
        if MEGAROPE.search(line):
            code, _, comment = line.partition(" #")
            if re.search(r"&&|\|\||;", code):
                raise AssertionError(f"doc-test overrides: put `{line.strip()}` on a line of its own")
            # after the command's own overrides (the last value wins), before hydra's flags
            # (`--cfg job`, argparse takes no overrides after those) and before a redirection or
            # a pipe into another command (`2>&1 | tee log`)
            end = re.compile(r"\s(?:--?\w|\d?>|\|)").search(code, MEGAROPE.search(code).end())
            at = end.start() if end else len(code.rstrip())
            line = code[:at] + extra + code[at:].rstrip() + (f"  #{comment}" if comment else "")
        out.append(line)
    return "\n".join(out) + "\n"


def scratch_checkout(tmp: Path) -> Path:
    """A folder that looks like the checkout (symlinks) but keeps what commands write."""
    root = tmp / "checkout"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in {".git", "runs", ".pytest_cache", "__pycache__"}:
            (root / entry.name).symlink_to(entry)
    return root


BLOCKS = shell_blocks()


def test_overrides_go_before_flags_and_pipes():
    body = "python -m megarope recipe=tiny 2>&1 | tee log  # why\npython -m megarope recipe=a --cfg job\n"
    assert with_overrides(body, ["train.steps=2"]) == (
        "python -m megarope recipe=tiny train.steps=2 2>&1 | tee log  # why\n"
        "python -m megarope recipe=a train.steps=2 --cfg job\n")
    with pytest.raises(AssertionError, match="on a line of its own"):
        with_overrides("cd x && python -m megarope recipe=tiny\n", ["train.steps=2"])


def test_every_fence_is_tagged():
    untagged = [b.id for page in doc_pages() for b in fenced_blocks(page)[0] if not b.tag]
    assert untagged == [], "tag these fences (bash, python, yaml, text, ...)"


def test_every_marker_is_above_a_shell_block():
    stray = [f"{p.relative_to(REPO)}:{n}" for p in doc_pages() for n in fenced_blocks(p)[1]]
    attached = [b.id for page in doc_pages() for b in fenced_blocks(page)[0] if b.marker and b.tag not in SHELL_TAGS]
    assert stray + attached == [], "a doc-test marker must sit right above a bash/sh/shell fence"


def test_parallel_runs_are_launched_by_torchrun():
    wrong = []
    for block in BLOCKS:
        for argv in megarope_commands(block.body):
            sizes = [int(v) for k, v in (a.split("=", 1) for a in argv if "=" in a)
                     if k.lstrip("+") in ("parallel.tp", "parallel.pp", "parallel.cp") and v.isdigit()]
            needed = math.prod(sizes)
            if needed == 1:
                continue
            nproc = _nproc(argv) if argv[0] == "torchrun" else None
            if nproc is None or nproc % needed:
                wrong.append(f"{block.id}: {shlex.join(argv)}")
    assert wrong == [], "needs `torchrun --nproc-per-node N` with N a multiple of tp*pp*cp"


def _nproc(argv: list[str]) -> int | None:
    for i, arg in enumerate(argv):
        for flag in ("--nproc-per-node", "--nproc_per_node"):
            value = arg[len(flag) + 1:] if arg.startswith(flag + "=") else argv[i + 1] if arg == flag else None
            if value is not None:
                return int(value) if value.isdigit() else None
    return None


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block_runs(block, tmp_path):
    script = block.body
    kind, _, args = (block.marker or "").partition(" ")
    if kind == "skip":
        assert args in SKIP_KINDS, f"{block.id}: `skip {args}`: the reasons are {sorted(SKIP_KINDS)}"
        pytest.skip(f"{block.id} {SKIP_KINDS[args]}")
    elif kind == "covered-by":
        paths = args.split()
        missing = [p for p in paths if not (REPO / p).exists()]
        assert paths and not missing, f"{block.id}: covered-by names no file or a missing one: {missing}"
        pytest.skip(f"{block.id} long; run by {', '.join(paths)}")
    elif kind == "overrides":
        assert args, f"{block.id}: `overrides` without any"
        script = with_overrides(block.body, shlex.split(args))
    else:
        assert block.marker is None, f"{block.id}: unknown doc-test marker {block.marker!r}"

    cwd = scratch_checkout(tmp_path)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{block.id} exited {proc.returncode}:\n{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
