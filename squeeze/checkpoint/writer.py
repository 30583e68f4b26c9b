"""Write a sharded safetensors checkpoint atomically.

Everything goes to a hidden temporary directory next to the destination; only when the last shard,
the index and config.json are complete is the directory moved into place with one rename. An
exception, Ctrl-C or a full disk removes the temporary directory, so a failed run leaves nothing
that looks like a checkpoint. Tensors are flushed shard by shard as they arrive, so a writer fed one
layer at a time never holds more than one shard in memory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file

from squeeze.checkpoint.reader import INDEX_NAME
from squeeze.errors import CheckpointError, SqueezeError

DEFAULT_SHARD_BYTES = 2 * 1024**3  # the public DeepSeek release uses shards of a few GB


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing destination up front, before any expensive work starts."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise SqueezeError(f"output directory {out} already exists (choose another path or pass --overwrite)")
    if not out.parent.exists():
        raise SqueezeError(f"parent directory of {out} does not exist")
    return out


class CheckpointWriter:
    """Context manager that writes shards + index + config and publishes them atomically."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False) -> None:
        self.out = check_output_dir(out_dir, overwrite)
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._sizes: dict[str, int] = {}
        self._config: dict[str, Any] | None = None

    # ---- context ----------------------------------------------------------------------------
    def __enter__(self) -> CheckpointWriter:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            try:
                self._finalize()
                return
            except BaseException as e:  # noqa: BLE001 - any failure here must clean up, then re-raise
                shutil.rmtree(self.tmp, ignore_errors=True)
                _raise_disk_full(e, self.out)
                raise
        shutil.rmtree(self.tmp, ignore_errors=True)
        if exc is not None:
            _raise_disk_full(exc, self.out)

    # ---- content ----------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; a shard is written as soon as the queue passes the shard size."""
        if name in self._sizes or name in self._pending:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._pending[name] = t
        self._pending_bytes += nbytes

    def add_many(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.add(name, t)

    def flush(self) -> None:
        """Write queued tensors as the next shard (named for real at the end, when the count is known)."""
        if not self._pending:
            return
        idx = len(self._shards)
        save_file(self._pending, str(self.tmp / f"shard-{idx}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        for name, t in self._pending.items():
            self._sizes[name] = t.numel() * t.element_size()
        self._pending = {}
        self._pending_bytes = 0

    def set_config(self, config: dict[str, Any]) -> None:
        self._config = config

    def add_file(self, name: str, source: str | Path | bytes) -> None:
        """Copy a side file (tokenizer, recipe, README) into the checkpoint."""
        dest = self.tmp / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            dest.write_bytes(source)
        else:
            shutil.copyfile(source, dest)

    # ---- publish ----------------------------------------------------------------------------
    def _finalize(self) -> None:
        self.flush()
        if self._config is None:
            raise CheckpointError("internal: checkpoint written without a config")
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / f"shard-{i}.tmp", self.tmp / final)
            for name in names:
                weight_map[name] = final
        index = {"metadata": {"total_size": sum(self._sizes.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(self._config, indent=2) + "\n")
        if self.out.exists():  # only reachable with overwrite=True
            trash = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, trash)
            os.replace(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)


def _raise_disk_full(exc: BaseException, out: Path) -> None:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise SqueezeError(f"disk full while writing {out}; nothing was written") from None
