"""Record the aten operations that force a host-device synchronisation on CUDA.

On a CPU they cost nothing, but the generic torch path runs the same operations on every
device, so counting them on CPU counts the syncs a CUDA run would make (the C++ kernel is
turned off for this: ``HVD_TOPK_CPU_KERNEL=0``).
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operations that read a device value on the host, or whose output shape depends on data.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique",
            "_unique", "_unique2", "unique_consecutive", "unique_dim"}


def _is_sync(func, args) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in SYNC_OPS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        # boolean-mask indexing is a nonzero in disguise
        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])
    return False


class SyncRecorder(TorchDispatchMode):
    """Records ``(op, where)`` for every sync-forcing op, and every ``Tensor.tolist`` /
    ``.cpu()`` / ``.numpy()`` / ``.item()`` call (which on CUDA copy to the host)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_sync(func, args):
            self.syncs.append((func._schema.name, _where()))
        return func(*args, **(kwargs or {}))


def _where() -> str:
    """The innermost hvd_topk frame; "outside hvd_topk" if none, and "wrapped optimizer" for
    what torch.optim does inside it (the user's optimizer on its dense params -- e.g. Adam
    reads its CPU ``step`` counters -- as under stock Horovod)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/optim/" in frame.filename:
            return "wrapped optimizer"
        if "/hvd_topk/" in frame.filename:
            return f"{frame.filename.split('/hvd_topk/')[-1]}:{frame.lineno}:{frame.name}"
    return "outside hvd_topk"


@contextlib.contextmanager
def recording():
    """Yield a SyncRecorder; host copies (``tolist``/``cpu``/``numpy``) are recorded too."""
    rec = SyncRecorder()
    originals = {}

    def wrap(name):
        orig = getattr(torch.Tensor, name)
        originals[name] = orig

        def counted(self, *a, **k):
            rec.syncs.append((f"Tensor.{name}", _where()))
            return orig(self, *a, **k)
        setattr(torch.Tensor, name, counted)

    for name in ("tolist", "cpu", "numpy"):
        wrap(name)
    try:
        with rec:
            yield rec
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)
