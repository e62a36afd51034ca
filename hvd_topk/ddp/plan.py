"""A DDP bucket's plan: which of its gradients Top-K sends and which are allreduced densely,
the sent ones as one group of the selection pipeline (``GroupLayout``), and the wire's dtypes.

Which gradients are sent sparse is the Horovod path's own decision, ``cost.choose_exchange``,
with the hook's one sparse exchange, the allgather, as the only candidate besides a dense
allreduce. Host numbers only (names, sizes, dtypes, the step's ratio, the world size), so every
rank builds the same plan, knows every rank's ``k`` and hence the size of every payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..cost import choose_exchange
from ..layout import GroupLayout, index_dtype, num_selected
from ..packing import payload_nbytes
from ..settings import TopKSettings

__all__ = ["BucketPlan", "build_plan", "travels_sparse", "HOOK_EXCHANGES"]

#: The sparse exchanges the hook has: what ``exchange="auto"`` chooses among (with a dense
#: allreduce where ``density_aware``). The Horovod path's sparse allreduce is not one of them.
HOOK_EXCHANGES = ("allgather",)


@dataclass(frozen=True)
class BucketPlan:
    """One bucket at one ratio.

    Arguments:
        names: the parameter name of each gradient of the bucket, in bucket order.
        sizes: their entries.
        sparse: bucket positions of the gradients Top-K sends, in bucket order.
        dense: bucket positions of those allreduced densely (small, or not floating).
        layout: the sparse gradients as one group (each with its own ``k``), or ``None``.
        ratio: the ratio the ``k``'s were taken at (the warm-up's at this step).
        value_dtype, index_dtype: the wire's dtypes of the sparse payload.
    """

    names: Tuple[str, ...]
    sizes: Tuple[int, ...]
    sparse: Tuple[int, ...]
    dense: Tuple[int, ...]
    layout: Optional[GroupLayout]
    ratio: float
    value_dtype: Optional[torch.dtype]
    index_dtype: torch.dtype

    @property
    def sparse_names(self) -> Tuple[str, ...]:
        return tuple(self.names[i] for i in self.sparse)

    @property
    def dense_names(self) -> Tuple[str, ...]:
        return tuple(self.names[i] for i in self.dense)

    @property
    def dense_sizes(self) -> Tuple[int, ...]:
        return tuple(self.sizes[i] for i in self.dense)

    def payload_bytes(self) -> int:
        """Bytes one rank's sparse payload holds: a flag word per sent tensor, ``K`` values,
        ``K`` indices (0 without sparse gradients)."""
        if self.layout is None:
            return 0
        return payload_nbytes(self.layout.k, self.value_dtype, self.index_dtype, self.layout.segments)


def travels_sparse(grad: torch.Tensor, settings: TopKSettings, ratio: float, world: int) -> bool:
    """Whether Top-K sends this gradient: ``cost.choose_exchange`` picks the allgather for it
    (a floating tensor of at least ``min_numel`` entries; with ``density_aware``, one whose
    allgather is cheaper than a dense allreduce: by bytes for ``exchange="allgather"``, by the
    time model for ``"auto"``; one rank is evaluated as two, as on the Horovod path)."""
    return choose_exchange(settings, grad, world, ratio, sparse_exchanges=HOOK_EXCHANGES) == "allgather"


def build_plan(names: Sequence[str], grads: Sequence[torch.Tensor], settings: TopKSettings,
               ratio: float, world: int) -> BucketPlan:
    """The plan of a bucket whose gradients are ``grads`` (named ``names``) at ``ratio``."""
    sparse = tuple(i for i, g in enumerate(grads) if travels_sparse(g, settings, ratio, world))
    dense = tuple(i for i in range(len(grads)) if i not in sparse)
    sizes = tuple(g.numel() for g in grads)
    layout = value_dtype = None
    if sparse:
        layout = GroupLayout(tuple(sizes[i] for i in sparse),
                             tuple(num_selected(sizes[i], ratio) for i in sparse))
        value_dtype = settings.value_dtype or grads[sparse[0]].dtype
    idx = index_dtype(layout.numel if layout is not None else 0)
    return BucketPlan(tuple(names), sizes, sparse, dense, layout, ratio, value_dtype, idx)
