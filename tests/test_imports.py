"""The checkout's top-level folders must not break the packages squeeze depends on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import squeeze

ROOT = Path(squeeze.__file__).resolve().parent.parent


def test_transformers_imports_its_kernels_package_from_the_checkout_root() -> None:
    """With the checkout root first on sys.path (``python -m pytest`` / ``python -m squeeze`` from the checkout),
    the top-level name ``kernels`` is the PyPI package transformers requires, not the ``kernels/`` folder: the
    folder's shadowing failed every transformers model load with "cannot import name 'CUDAProperties'"."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import squeeze; "
        "import transformers.integrations.hub_kernels; "
        "m = sys.modules.get('kernels'); print(getattr(m, '__file__', None))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = run.stdout.strip().splitlines()[-1]
    assert loaded == "None" or Path(loaded).resolve().parent != ROOT / "kernels"
