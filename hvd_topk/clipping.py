"""``clip_grad_norm``: each rank's gradient clipped to a total 2-norm before it enters error
feedback and the corrections (after the corrections, ``p.grad`` is an update, not a gradient)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

__all__ = ["GradClipper", "clip_factor", "HELD", "check_clip_grad_norm", "warn_unclipped_updates"]

HELD = object()  # the handle of a gradient that clip_grad_norm holds until the step's last one


def check_clip_grad_norm(clip_grad_norm, sparse):
    """The optimizer's ``clip_grad_norm`` argument: None, or a norm > 0 with a sparse compressor
    (``sparse``); else a ``ValueError`` that says why."""
    if clip_grad_norm is not None and not (sparse and float(clip_grad_norm) > 0):
        raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}" if sparse else
                         "clip_grad_norm needs a sparse compressor (hvd_topk.TopKCompressor); with "
                         "Horovod's compressors p.grad after synchronize() is the averaged gradient: "
                         "clip it there")


def clip_factor(grads, max_norm, scale=1.0):
    """``torch.nn.utils.clip_grad_norm_``'s factor ``min(1, max_norm / (norm + 1e-6))`` for the
    total 2-norm of the unscaled gradients ``grads / scale`` (``scale``: the loss scale, a
    float or a 0-dim device tensor), as a 0-dim tensor on the device: nothing is read back.
    Where the norm is not finite the factor is 1, so that the non-finite check still finds
    (and names) the tensor that holds the NaN/Inf."""
    flat = [g.coalesce().values() if g.is_sparse else g for g in grads]
    flat = [torch.view_as_real(g) if g.is_complex() else g for g in flat]
    total = torch.nn.utils.get_total_norm(flat)  # (,) on the first gradient's device
    if isinstance(scale, torch.Tensor):
        total = total / scale.to(total.device)
    elif scale != 1.0:
        total = total / scale
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    return torch.where(torch.isfinite(total), coef, torch.ones_like(coef))


class GradClipper:
    """Owns the clipping of a step: the gradients held until the last trained one is in (the
    total norm needs all of them), then all multiplied by ``clip_factor`` (a device tensor,
    no host sync) and released to be sent. So nothing is compressed or sent before backward
    ends.

    Per step: ``hold(p, trained)`` in each hook (None while gradients are still missing, then
    the held params to send, clipped), sent inside ``releasing()``; ``end_step()``.
    """

    def __init__(self, max_norm, loss_scale):
        self.max_norm = max_norm
        self._loss_scale = loss_scale  # LossScale: the norm is of the unscaled gradients
        self._held = []
        self.released = False  # inside releasing(): the hooks send instead of holding

    def hold(self, p, trained):
        """Hold ``p``'s gradient (``p.grad``) until every param of ``trained`` (this step's,
        in the param groups' order) is in: None while some are missing; then every held
        param, ``p`` last, with every gradient multiplied by the clip factor, to send inside
        ``releasing()``."""
        held = self._held
        held.append(p)
        if len(held) < len(trained):
            return None
        self._held = []
        # In the param groups' order, as clip_grad_norm_(model.parameters()) sums them.
        grads = [q.grad for q in trained]
        factor = clip_factor(grads, self.max_norm, self._loss_scale.get())
        for g in grads:
            g.mul_(factor.to(g.device))
        return held

    @contextmanager
    def releasing(self):
        """While the held gradients are sent: the hooks send them instead of holding them."""
        self.released = True
        try:
            yield
        finally:
            self.released = False

    def end_step(self):
        """The step is over (or abandoned): hold nothing."""
        self._held = []


def warn_unclipped_updates():
    """Warn, from an explicit ``optimizer.synchronize()`` (the caller warns once), that with
    momentum or Adam correction clipping ``p.grad`` now would clip corrected updates."""
    warnings.warn(
        "hvd_topk: with momentum or Adam correction, p.grad after optimizer.synchronize() holds "
        "the corrected update (a velocity, or an Adam displacement in units of the learning "
        "rate) for the sparsely sent parameters, not the averaged gradient: clipping it there "
        "(torch.nn.utils.clip_grad_norm_) does not clip gradients. Pass clip_grad_norm=max_norm "
        "to hvd_topk.DistributedOptimizer instead: each rank's gradient is then clipped before "
        "it enters error feedback.", stacklevel=3)
