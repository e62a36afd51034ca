"""A DDP bucket's plan: which of its gradients Top-K sends, by which exchange, and which are
allreduced densely; the sent ones as groups of the selection pipeline (``GroupLayout``) per
exchange, each of at most the Horovod path's group size, and the wire's dtypes.

Each gradient's exchange is the Horovod path's own decision, ``cost.choose_exchange``, among
the hook's exchanges (the allgather and the sparse allreduce) and a dense allreduce. Host
numbers only (names, sizes, dtypes, the step's ratio, the world size), so every rank builds
the same plan, knows every rank's ``k`` and hence the size of every payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..cost import choose_exchange
from ..exchange_core import header_words
from ..layout import GroupLayout, group_runs, index_dtype, num_selected
from ..packing import payload_nbytes
from ..settings import TopKSettings

__all__ = ["BucketPlan", "SparseGroup", "build_plan", "HOOK_EXCHANGES"]

#: The sparse exchanges the hook has: what ``exchange="auto"`` chooses among (with a dense
#: allreduce where ``density_aware``), by the Horovod path's rule.
HOOK_EXCHANGES = ("allgather", "sparse_allreduce")


@dataclass(frozen=True)
class SparseGroup:
    """The gradients of a bucket one sparse exchange sends, as one group of the selection
    pipeline.

    Arguments:
        exchange: ``"allgather"`` or ``"sparse_allreduce"``.
        members: their bucket positions, in bucket order.
        names: their parameter names.
        layout: the group (each tensor with its own ``k``).
        value_dtype, index_dtype: the wire's dtypes (the allgather sends group positions,
            the sparse allreduce each tensor's own indices).
    """

    exchange: str
    members: Tuple[int, ...]
    names: Tuple[str, ...]
    layout: GroupLayout
    value_dtype: torch.dtype
    index_dtype: torch.dtype

    def payload_bytes(self) -> int:
        """Bytes one rank's allgather payload holds: its header (signature and flags,
        ``exchange_core.header_words``), ``K`` values, ``K`` indices."""
        words = header_words(self.layout.segments)
        return payload_nbytes(self.layout.k, self.value_dtype, self.index_dtype, words)


@dataclass(frozen=True)
class BucketPlan:
    """One bucket at one ratio.

    Arguments:
        names: the parameter name of each gradient of the bucket, in bucket order.
        sizes: their entries.
        groups: the sparse gradients, in groups per exchange that sends some.
        dense: bucket positions of those allreduced densely (small, not floating, or where
            a dense allreduce is the better exchange).
        ratio: the ratio the ``k``'s were taken at (the warm-up's at this step).
    """

    names: Tuple[str, ...]
    sizes: Tuple[int, ...]
    groups: Tuple[SparseGroup, ...]
    dense: Tuple[int, ...]
    ratio: float

    @property
    def sparse(self) -> Tuple[int, ...]:
        """Bucket positions of the gradients Top-K sends, in bucket order."""
        return tuple(sorted(i for g in self.groups for i in g.members))


def build_plan(names: Sequence[str], grads: Sequence[torch.Tensor], settings: TopKSettings,
               ratio: float, world: int, trained_bytes: Optional[int] = None) -> BucketPlan:
    """The plan of a bucket whose gradients are ``grads`` (named ``names``) at ``ratio``: each
    gradient's exchange is ``cost.choose_exchange``'s (a floating tensor of at least
    ``min_numel`` entries goes sparse; with ``density_aware``, where its exchange beats a
    dense allreduce: by bytes for a named exchange, by the time model for ``"auto"``; one rank
    is evaluated as two, as on the Horovod path). The gradients of an exchange form groups of
    at most the Horovod path's group size (``TopKSettings.group_bytes_for``, of a model of
    ``trained_bytes``), in bucket order: a group's copy, selection and receive scale with the
    group, and a bucket can hold most of the model (DDP's first iteration). During the
    warm-up, a gradient whose exchange would hold more than a quarter of the in-flight budget
    (an eighth of ``trained_bytes``, at most 32 MiB) and more than it will after the warm-up is
    allreduced densely (``choose_exchange``'s ``trained_bytes``), as on the Horovod path: at
    the warm-up's first ratios one large gradient's selection, payload and gathered buffer
    would otherwise weigh like a fraction of the model on top of its residual."""
    kinds = [choose_exchange(settings, g, world, ratio, sparse_exchanges=HOOK_EXCHANGES,
                             trained_bytes=trained_bytes) for g in grads]
    sizes = tuple(g.numel() for g in grads)
    groups = []
    for exchange in HOOK_EXCHANGES:
        members = [i for i, kind in enumerate(kinds) if kind == exchange]
        if not members:
            continue
        cap = settings.group_bytes_for(grads[members[0]].device, exchange, trained_bytes)
        for part in group_runs(members, lambda i: grads[i].numel() * grads[i].element_size(),
                               key=lambda i: None, cap=lambda i, c=cap: c):
            part = tuple(part)
            layout = GroupLayout(tuple(sizes[i] for i in part),
                                 tuple(num_selected(sizes[i], ratio) for i in part))
            span = layout.numel if exchange == "allgather" else max(layout.sizes)
            groups.append(SparseGroup(exchange, part, tuple(names[i] for i in part), layout,
                                      settings.value_dtype or grads[part[0]].dtype, index_dtype(span)))
    dense = tuple(i for i, kind in enumerate(kinds) if kind == "dense")
    return BucketPlan(tuple(names), sizes, tuple(groups), dense, ratio)
