"""The public surface of personify.embeddings, and what importing it costs."""

from __future__ import annotations

import inspect
import subprocess
import sys

import personify.embeddings as embeddings


def test_all_names_are_exported_and_documented() -> None:
    """Every name in __all__ exists, and every exported class or function has a docstring."""
    assert len(set(embeddings.__all__)) == len(embeddings.__all__)
    for name in embeddings.__all__:
        value = getattr(embeddings, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert (value.__doc__ or "").strip(), f"{name} has no docstring"


def test_import_loads_neither_torch_nor_faust() -> None:
    """Importing the package pulls in no torch, sentence-transformers or Faust (a library)."""
    probe = (
        "import sys, personify.embeddings; "
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers', 'faust') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]", done.stderr
