"""squeeze: compress DeepSeek-format MoE models."""

__version__ = "0.1.0"
