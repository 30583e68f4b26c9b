"""Checkpoint I/O: DeepSeek configs, lazy sharded reads, atomic sharded writes, block-FP8."""

from squeeze.checkpoint.config import ModelConfig, load_config, parse_config
from squeeze.checkpoint.fp8 import dequantize_fp8_block, quantize_fp8_block
from squeeze.checkpoint.reader import CheckpointReader, open_checkpoint
from squeeze.checkpoint.writer import CheckpointWriter, check_output_dir

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "ModelConfig",
    "check_output_dir",
    "dequantize_fp8_block",
    "load_config",
    "open_checkpoint",
    "parse_config",
    "quantize_fp8_block",
]
