"""squeeze: compress DeepSeek-format MoE models."""

from squeeze import _import_guard

_import_guard.install()

__version__ = "0.1.0"
