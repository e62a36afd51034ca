"""Compressors by name, for command lines and config files (``--compressor topk``)."""

from __future__ import annotations

from typing import Callable, Dict

from horovod.torch.compression import Compression

from .compression import TopKCompressor

__all__ = ["COMPRESSORS", "make_compressor", "register_compressor"]

COMPRESSORS: Dict[str, Callable] = {
    "none": lambda **_: Compression.none,
    "fp16": lambda **_: Compression.fp16,
    "topk": TopKCompressor,
}


def register_compressor(name: str, factory: Callable) -> None:
    """Make ``factory(**kwargs)`` available as ``make_compressor(name, **kwargs)``."""
    COMPRESSORS[name] = factory


def make_compressor(name: str, **kwargs):
    """Build a compressor by name: ``make_compressor("topk", ratio=0.01)``."""
    if name not in COMPRESSORS:
        raise ValueError(f"compressor must be one of {sorted(COMPRESSORS)}, got {name!r}")
    return COMPRESSORS[name](**kwargs)
