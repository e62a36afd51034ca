"""Checkpoints that keep hvd_topk's state: every rank's residuals, with the model and optimizer.

``save_checkpoint`` and ``load_checkpoint`` are collective: call them on every rank. Rank 0
writes one file holding the model, the optimizer and each rank's hvd_topk state (gathered);
on load, rank 0 reads it with ``torch.load(weights_only=True)`` (no arbitrary pickle), and the
model, optimizer and per-rank states are broadcast/scattered back.

World-size policy: resumed at the same world size, rank r gets back exactly its residuals, so
training continues bit-identically. At another world size residuals cannot be mapped to ranks
that hold other data; every new rank gets the *mean* of the old ranks' residuals (and of their
momentum-correction velocities and Adam-correction moments; the Adam step counts are rank
0's). With ``hvd.Average`` the update still owed,
``(1/P) * sum_r e_r``, is then the same before and after, so nothing is lost on average; a
warning is logged. The warm-up step count is rank 0's (every rank had the same).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict

import horovod.torch as hvd
import torch

__all__ = ["save_checkpoint", "load_checkpoint"]

logger = logging.getLogger(__name__)
FORMAT = "hvd_topk.checkpoint/1"


def save_checkpoint(path: str, model: torch.nn.Module, optimizer, **extra: Any) -> None:
    """Write model, optimizer, every rank's hvd_topk state and ``extra`` to ``path`` (rank 0).

    ``extra`` values must be tensors, numbers, strings, lists or dicts of them.
    """
    topk = optimizer.topk_state_dict() if hasattr(optimizer, "topk_state_dict") else {}
    states = hvd.allgather_object(topk, name="hvd_topk.checkpoint.save")  # one per rank
    if hvd.rank() == 0:
        ckpt = {"format": FORMAT, "world_size": hvd.size(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "topk": states, "extra": extra}
        tmp = f"{path}.tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint behind
    hvd.barrier()


def load_checkpoint(path: str, model: torch.nn.Module, optimizer) -> Dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; returns its ``extra`` dict (on every rank)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True) if hvd.rank() == 0 else None
    # An explicit name: the default one is the type name, None on ranks other than 0.
    ckpt = hvd.broadcast_object(ckpt, root_rank=0, name="hvd_topk.checkpoint.load")
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an hvd_topk checkpoint (format {ckpt.get('format')!r})")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    states = ckpt["topk"]
    if hasattr(optimizer, "load_topk_state_dict") and any(states):
        if ckpt["world_size"] == hvd.size():
            optimizer.load_topk_state_dict(states[hvd.rank()])
        else:
            logger.warning("checkpoint from %d ranks resumed on %d: every rank starts from the "
                           "old ranks' mean residual", ckpt["world_size"], hvd.size())
            optimizer.load_topk_state_dict(_redistribute(states))
    return ckpt.get("extra", {})


def _redistribute(states) -> Dict[str, Any]:
    """One hvd_topk state for every new rank: the old ranks' mean residual, velocity and
    Adam moments (the mean of the ranks' local moments is the moment of their mean gradient)."""
    out = dict(states[0])
    for key in ("residuals", "velocities", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        merged: Dict[str, torch.Tensor] = {}
        for s in states:
            for name, r in s.get(key, {}).items():
                merged[name] = merged[name] + r if name in merged else r.clone()
        out[key] = {n: r / len(states) for n, r in merged.items()}
    return out
