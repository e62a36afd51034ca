"""hvd_topk: Top-K gradient sparsification with error feedback for Horovod + PyTorch.

Example::

    import horovod.torch as hvd
    import hvd_topk

    hvd.init()
    optimizer = hvd_topk.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(),
        compression=hvd_topk.TopKCompressor(ratio=0.01))
"""

from ._cpu_kernel import cpu_kernel, use_cpu_kernel
# The engine-independent core: selection, packing, the byte and time models.
from .cost import CostModel, exchange_times
from .exchange_core import EXCHANGES, exchange_bytes
from .packing import pack, payload_nbytes, unpack
from .selection import index_dtype, num_selected, select_topk
# The Horovod engine. hvd_topk.ddp (the PyTorch DDP hook) and the core need no Horovod:
# without it, `import hvd_topk.ddp` still works and these names say what is missing.
try:
    from .checkpoint import load_checkpoint, save_checkpoint
    from .compression import (AdamSettings, RankMismatchError, SparseCompressor, SparseContext,
                              TopKCompressor)
    from .elastic import register_elastic_handler
    from .memory import ResidualMemory, held_bytes
    from .optimizer import CommStats, DistributedOptimizer, TopKDistributedOptimizer
    from .registry import COMPRESSORS, make_compressor, register_compressor
except ImportError as _missing:
    if not (_missing.name or "").startswith("horovod"):
        raise
    _HOROVOD_MISSING = _missing
else:
    _HOROVOD_MISSING = None

__version__ = "0.1.0"

# hvd.elastic.TorchState(optimizer=...) then commits and restores hvd_topk's state too.
if _HOROVOD_MISSING is None:
    register_elastic_handler()

__all__ = [
    "TopKCompressor",
    "DistributedOptimizer",
    "TopKDistributedOptimizer",
    "RankMismatchError",
    "CommStats",
    "ResidualMemory",
    "held_bytes",
    "SparseContext",
    "SparseCompressor",
    "AdamSettings",
    "exchange_bytes",
    "exchange_times",
    "CostModel",
    "EXCHANGES",
    "select_topk",
    "num_selected",
    "index_dtype",
    "pack",
    "unpack",
    "payload_nbytes",
    "save_checkpoint",
    "load_checkpoint",
    "COMPRESSORS",
    "make_compressor",
    "register_compressor",
    "cpu_kernel",
    "use_cpu_kernel",
]

if _HOROVOD_MISSING is not None:
    _NEEDS_HOROVOD = frozenset(name for name in __all__ if name not in globals())
    __all__ = [name for name in __all__ if name not in _NEEDS_HOROVOD]

    def __getattr__(name):
        if name in _NEEDS_HOROVOD:
            raise ImportError(f"hvd_topk.{name} needs Horovod ({_HOROVOD_MISSING}); the PyTorch DDP "
                              "hook, hvd_topk.ddp, does not") from _HOROVOD_MISSING
        raise AttributeError(f"module 'hvd_topk' has no attribute {name!r}")
