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

``optimizer.state_dict()`` carries one rank's hvd_topk state too (``pack_topk_state`` /
``unpack_topk_state`` below, used by ``hvd_topk.DistributedOptimizer``): under the key
``"hvd_topk"``, the rank's compressor state with what it was saved from (world size, ratio,
rank, the parameters' names and shapes), also referenced from the first param group, which is
how ``hvd.broadcast_optimizer_state`` carries it to every rank. For the params whose update a
correction computes, the ``"state"`` entries show the rank's velocity as ``momentum_buffer``
and its Adam moments and step under Adam's keys, so that the state has the shape a stock
optimizer's has on every rank (``hvd.broadcast_optimizer_state`` needs that).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import horovod.torch as hvd
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "STATE_KEY", "pack_topk_state",
           "unpack_topk_state", "split_topk_state"]

logger = logging.getLogger(__name__)
FORMAT = "hvd_topk.checkpoint/1"
STATE_KEY = "hvd_topk"  # in optimizer.state_dict() and in its first param group
STATE_FORMAT = "hvd_topk.optimizer_state/1"


def save_checkpoint(path: str, model: torch.nn.Module, optimizer, **extra: Any) -> None:
    """Write model, optimizer, every rank's hvd_topk state and ``extra`` to ``path`` (rank 0).

    ``extra`` values must be tensors, numbers, strings, lists or dicts of them.
    """
    topk = optimizer.topk_state_dict() if hasattr(optimizer, "topk_state_dict") else {}
    states = hvd.allgather_object(topk, name="hvd_topk.checkpoint.save")  # one per rank
    if hvd.rank() == 0:
        # Every rank's state is in "topk": the optimizer's own copy of rank 0's is left out.
        opt_state, _ = split_topk_state(optimizer.state_dict())
        ckpt = {"format": FORMAT, "world_size": hvd.size(), "model": model.state_dict(),
                "optimizer": opt_state, "topk": states, "extra": extra}
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


def param_shapes(named) -> List[str]:
    """``"name (shape)"`` of every named parameter, sorted: what a state must match."""
    return sorted(f"{n} {tuple(p.shape)}" for n, p in named)


def correction_entry(kind: Tuple[str, bool], name: str, topk: Dict[str, Any],
                     p: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The wrapped optimizer's state entry for a corrected param, from the rank's hvd_topk
    state ``topk`` (zeros where it has none yet). ``kind``: ``("momentum", _)`` for SGD's
    ``momentum_buffer`` (the velocity), ``("adam", amsgrad)`` for Adam's keys."""
    def shaped(key):
        t = topk.get(key, {}).get(name)
        return torch.zeros_like(p) if t is None else t.view(p.shape).to(p.device)
    if kind[0] == "momentum":
        return {"momentum_buffer": shaped("velocities")}
    entry = {"step": torch.tensor(float(topk.get("adam_steps", {}).get(name, 0)), dtype=torch.float32),
             "exp_avg": shaped("exp_avg"), "exp_avg_sq": shaped("exp_avg_sq")}
    if kind[1]:
        entry["max_exp_avg_sq"] = shaped("max_exp_avg_sq")
    return entry


def has_correction_state(kind: Tuple[str, bool], name: str, topk: Dict[str, Any]) -> bool:
    """Whether ``topk`` holds the correction state of ``name`` (see ``correction_entry``)."""
    return name in topk.get("velocities" if kind[0] == "momentum" else "adam_steps", {})


def pack_topk_state(state: Dict[str, Any], topk: Dict[str, Any], meta: Dict[str, Any],
                    corrected: List[Tuple[int, str, Tuple[str, bool], torch.Tensor, bool]]) -> None:
    """Add one rank's hvd_topk state ``topk`` (``TopKCompressor.state_dict()``) to ``state``,
    an ``optimizer.state_dict()`` of the wrapped optimizer, in place.

    ``meta``: world size, rank, ratio and ``param_shapes`` of the run. ``corrected``: for each
    param with a correction, ``(index in state, name, kind, param, show)``; with ``show`` its
    ``"state"`` entry is replaced by ``correction_entry`` where hvd_topk holds its state, and
    made where the wrapped optimizer has none -- so that every rank's state has the same
    entries (``hvd.broadcast_optimizer_state`` broadcasts them by position) -- and its index
    listed under ``"shown"`` (``split_topk_state`` removes them again)."""
    shown = []
    for index, name, kind, p, show in corrected:
        if show and (has_correction_state(kind, name, topk) or index not in state["state"]):
            state["state"][index] = correction_entry(kind, name, topk, p)
            shown.append(index)
    blob = dict(meta, format=STATE_FORMAT, shown=shown, state=topk)
    state[STATE_KEY] = blob
    if state["param_groups"]:
        # hvd.broadcast_optimizer_state broadcasts param-group options (not extra keys) and
        # sets them on every rank's optimizer: this is how rank 0's state reaches the others.
        state["param_groups"][0][STATE_KEY] = blob


def split_topk_state(state: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """``(the wrapped optimizer's state, hvd_topk's blob or None)`` of an ``optimizer.state_dict()``
    (not modified): the blob's key and the entries ``pack_topk_state`` showed are removed."""
    blob = state.get(STATE_KEY)
    groups = []
    for g in state.get("param_groups", []):
        g = dict(g)
        found = g.pop(STATE_KEY, None)
        blob = blob if blob is not None else found
        groups.append(g)
    out = {k: v for k, v in state.items() if k != STATE_KEY}
    if "param_groups" in state:
        out["param_groups"] = groups
    if blob is not None and "state" in state:
        shown = set(blob.get("shown", []))
        out["state"] = {i: e for i, e in state["state"].items() if i not in shown}
    return out, blob


def unpack_topk_state(blob: Dict[str, Any], meta: Dict[str, Any]) -> Dict[str, Any]:
    """The compressor state in ``blob``, after checking that it was saved by a run like this one
    (``meta``: world size, ratio, parameters); else a ``ValueError`` naming what differs."""
    if not isinstance(blob, dict) or blob.get("format") != STATE_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"optimizer state_dict['{STATE_KEY}'] is not hvd_topk's optimizer state "
                         f"(format {found!r}, expected {STATE_FORMAT!r})")
    problems = []
    if blob["world_size"] != meta["world_size"]:
        problems.append(f"it was saved at {blob['world_size']} ranks, this run has {meta['world_size']} "
                        "(residuals belong to ranks: hvd_topk.save_checkpoint / load_checkpoint "
                        "resume at another world size, from the old ranks' mean residual)")
    if blob["ratio"] != meta["ratio"]:
        problems.append(f"it was saved with ratio {blob['ratio']}, this TopKCompressor has {meta['ratio']}")
    if blob["params"] != meta["params"]:
        old, new = set(blob["params"]), set(meta["params"])
        diff = [f"{x!r} only in the saved state" for x in sorted(old - new)]
        diff += [f"{x!r} only in this model" for x in sorted(new - old)]
        problems.append(f"the parameters differ: {'; '.join(diff[:6])}"
                        + (f"; and {len(diff) - 6} more" if len(diff) > 6 else ""))
    if problems:
        raise ValueError("hvd_topk: cannot load this optimizer state: " + "; ".join(problems)
                         + f". To start hvd_topk's state afresh instead, delete state_dict['{STATE_KEY}'] "
                         f"and state_dict['param_groups'][0]['{STATE_KEY}'] before load_state_dict().")
    return blob["state"]

