"""Where documents come from, through Hugging Face ``datasets``: ``DataConfig.source`` is
``"builtin"`` (the Python standard library's own ``.py`` files, no download), a local file or
folder (``text``, ``json`` or ``parquet`` builder by suffix; ``.txt`` files are one document each),
or the name of a hub dataset already in the HF cache (offline). The train/fitness/eval split is by hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any, Optional, Union

from megarope.atomic import atomic_output
from megarope.data.config import FORMATS, DataConfig, DataError, check_config

_SUFFIX_FORMAT = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# datasets decompresses these itself, so "x.jsonl.gz" is json.
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
# encodings/ holds generated codec tables (in-window perplexity ~1.9 for a real model): as a long
# evaluation document they reward copying, so no scaling beat PI beyond the window on them
_BUILTIN_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings"}
# the corpus file's name changes with what it holds, so an older cache is not read back
_BUILTIN_CORPUS_VERSION = 2


def _cache_dir(cache_dir: Optional[str]) -> Path:
    if cache_dir:
        return Path(os.path.expanduser(cache_dir))
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "megarope"


def builtin_corpus(cache_dir: Optional[str] = None) -> str:
    """Write the standard library's ``.py`` files once as JSONL (``{"path", "text"}`` per file, sorted
    by path, test, site-packages and codec-table folders left out) and return the file's path."""
    root = sysconfig.get_paths()["stdlib"]
    version = ".".join(map(str, sys.version_info[:3]))
    out = _cache_dir(cache_dir) / f"stdlib-v{_BUILTIN_CORPUS_VERSION}-py{version}.jsonl"
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _BUILTIN_EXCLUDED_DIRS]  # prune: site-packages is huge
        rel = os.path.relpath(folder, root)
        files += [Path(rel, n).as_posix() if rel != "." else n for n in names if n.endswith(".py")]
    # several ranks may build it at once: each writes its own temp file, renamed atomically
    with atomic_output(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rel in sorted(files):
            text = Path(root, rel).read_text(encoding="utf-8", errors="replace")
            if text.strip():
                f.write(json.dumps({"path": rel, "text": text}) + "\n")
    return str(out)


def _format_of(path: Union[str, Path]) -> Optional[str]:
    name = str(path).lower()
    for ext in _COMPRESSION:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return _SUFFIX_FORMAT.get(os.path.splitext(name)[1])


def _load_local(path: Path, fmt: str, cfg: DataConfig):
    import datasets

    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _format_of(p))
        if fmt != "auto":
            files = [f for f in files if _format_of(f) == fmt]
        if not files:
            raise DataError("data.source", f"{cfg.source!r}: the folder holds no data files of "
                            f"data.format={fmt!r} (suffixes {sorted(_SUFFIX_FORMAT)})")
    else:
        files = [str(path)]
    if fmt == "auto":
        found = {_format_of(f) for f in files}
        if None in found:
            raise DataError("data.format", f"'auto' cannot tell the format of {files[0]!r} from its suffix: "
                            f"set data.format to one of {FORMATS}")
        if len(found) > 1:
            raise DataError("data.format", f"'auto': {cfg.source!r} mixes formats {sorted(found)}; set it")
        fmt = found.pop()
    extra = {"sample_by": "document"} if fmt == "text" else {}
    try:
        return datasets.load_dataset(
            fmt, data_files=files, split="train", cache_dir=str(_cache_dir(cfg.cache_dir) / "datasets"), **extra
        )
    except Exception as err:  # the loaders' parse errors name neither the file nor the line
        where = _first_bad_json_line(files) if fmt == "json" else None
        raise DataError("data.source", where or f"{cfg.source!r} does not load as {fmt}: "
                        f"{str(err).splitlines()[0]}") from err


def _first_bad_json_line(files: list[str]) -> str | None:
    """``file:line: ...`` of the first record of a JSON Lines file that is not a JSON object."""
    for file in files:
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    return f"{file}:{number}: not valid JSON ({err.msg}, column {err.colno})"
                if not isinstance(record, dict):
                    return f"{file}:{number}: a record must be a JSON object, got {type(record).__name__}"
    return None


def _load_raw(cfg: DataConfig):
    if cfg.source == "builtin":
        return _load_local(Path(builtin_corpus(cfg.cache_dir)), "json", cfg)
    path = Path(os.path.expanduser(cfg.source))
    if path.exists():
        return _load_local(path, cfg.format, cfg)
    if os.path.isabs(cfg.source) or cfg.source.startswith((".", "~")) or _format_of(cfg.source):
        raise DataError("data.source", f"dataset path {cfg.source!r} does not exist")
    import datasets

    try:
        return datasets.load_dataset(cfg.source, split="train")
    except Exception as e:
        raise DataError("data.source", f"{cfg.source!r} is no existing path, and loading it as a hub dataset "
                        f"failed (offline it must already be in the Hugging Face cache): {e}") from e


def content_column(ds, cfg: DataConfig) -> str:
    names = ds.column_names
    if cfg.kind == "lm":
        if cfg.text_key not in names:
            raise DataError("data.text_key", f"{cfg.text_key!r} is not a column of {cfg.source!r}; columns: {names}")
        return cfg.text_key
    for key in ("conversations", "messages"):
        if key in names:
            return key
    raise DataError(
        "data.kind", f"'sft' needs a 'conversations' (ShareGPT) or 'messages' column in {cfg.source!r}; "
        f"columns: {names}"
    )


SPLITS = ("train", "eval", "fitness", "all")


def _split_of(key: Any, cfg: DataConfig) -> str:
    """"fitness" for the first ``fitness_fraction`` of the held-out hash range, "eval" for the rest
    of it, "train" past it. Stable across processes and Python versions, unlike ``hash()``."""
    text = key if isinstance(key, str) else json.dumps(key, sort_keys=True)
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2**64
    if h >= cfg.eval_fraction:
        return "train"
    return "fitness" if h < cfg.eval_fraction * cfg.fitness_fraction else "eval"



def load_documents(cfg: DataConfig, split: str = "train"):
    """The ``datasets.Dataset`` of documents (or conversations) of ``split``: "train", "eval",
    "fitness" or "all".

    A document is held out when the hash of its ``path`` column (if any, else its content) falls in
    the first ``eval_fraction`` of the hash range, so the split never depends on order or sharding;
    the first ``fitness_fraction`` of that part is "fitness" (the LongRoPE search's documents), the
    rest "eval" (every evaluation's).
    """
    check_config(cfg)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    ds = _load_raw(cfg)
    content = content_column(ds, cfg)
    if split == "all":
        return ds
    key = "path" if "path" in ds.column_names else content
    ds = ds.filter(lambda keys: [_split_of(k, cfg) == split for k in keys], input_columns=[key], batched=True)
    if len(ds) == 0:
        raise DataError("data.eval_fraction",
                        f"{cfg.eval_fraction}: the {split!r} split of data.source={cfg.source!r} is empty")
    return ds
