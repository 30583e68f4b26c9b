"""Keep the checkout's ``kernels/`` folder from shadowing the PyPI ``kernels`` package.

The folder installs as ``squeeze.kernels`` (pyproject's package-dir), but with the checkout root on
``sys.path`` (``python -m pytest`` or ``python -m squeeze`` run from the checkout) it is also importable as
the top-level ``kernels``. transformers (5.2x) requires the PyPI package of that name and imports
``from kernels import CUDAProperties`` when it is installed, which then found the folder and failed with
"cannot import name 'CUDAProperties' from 'kernels'" (30 tests, every transformers load). The finder
below resolves the top-level name ``kernels`` against ``sys.path`` without the checkout root; when no
installed package is found there, the usual finders carry on as before.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


class _InstalledKernelsFirst(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "kernels":
            return None
        search = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
        return importlib.machinery.PathFinder.find_spec(name, search)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _InstalledKernelsFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstalledKernelsFirst())
