"""Optimizer-side corrections: when the synchronized gradient is already an *update*.

Top-K with error feedback delays most of a gradient's entries. An optimizer with state
(SGD's momentum, Adam's moments) that is fed the sparse, delayed average misapplies it, so
for those optimizers each rank runs the optimizer's own recurrence on its *local*
gradients, before compression, and Top-K sends what the optimizer would have moved
(``TopKCompressor``'s ``momentum_correction`` and ``adam_correction``):

- ``MomentumCorrection`` (``torch.optim.SGD`` with momentum; Lin et al. 2018, DGC §3.2): the
  rank's velocity ``u = m u + g`` is accumulated and sent; the update is applied as
  ``p -= lr * update``.
- ``AdamCorrection`` (``torch.optim.Adam`` / ``AdamW``): the rank's Adam moments make its
  step ``lr * m_hat / (sqrt(s_hat) + eps)``, which is accumulated and sent; the update is
  applied as ``p -= update``, after AdamW's decoupled weight decay.

Each correction object belongs to one param group of the wrapped optimizer and is used by
``hvd_topk.DistributedOptimizer`` at four points of a step: ``local_grad`` in the backward
hook (coupled weight decay, in the gradient's loss-scaled units), ``start`` and
``compress_kwargs`` when its group is compressed, and ``apply`` in ``step()`` instead of the
wrapped optimizer. The arithmetic of the recurrences themselves is step 1 of the selection pipeline
(``selection.update_``, ``selection.adam_update_``), where the compressor keeps the per-rank
state by parameter name.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .update import AdamSettings

__all__ = ["MomentumCorrection", "AdamCorrection", "CorrectionSet", "correction_groups"]


class MomentumCorrection:
    """DGC momentum correction for one ``torch.optim.SGD`` param group."""

    def __init__(self, group: dict) -> None:
        self.group = group

    def key(self) -> tuple:
        """What a compression group's tensors must share: one pipeline run per value."""
        return ("momentum", self.group["momentum"], bool(self.group["nesterov"]))

    def local_grad(self, p: torch.Tensor, grad: torch.Tensor, scale) -> torch.Tensor:
        """SGD's weight decay, added locally (``_coupled_decay``)."""
        return _coupled_decay(self.group, p, grad, scale)

    def start(self, name: str, state: dict, comp) -> None:
        """The velocity starts at zero (DGC). A momentum buffer the wrapped optimizer built
        while the tensor went dense (the warm-up's first steps on a large world) is freed:
        the velocity replaces it, and one model-sized buffer is not kept twice."""
        state.pop("momentum_buffer", None)

    def compress_kwargs(self) -> dict:
        """``compress_group``'s arguments for this param group's recurrence."""
        return {"momentum": self.group["momentum"], "nesterov": bool(self.group["nesterov"])}

    def apply(self, p: torch.Tensor, update: torch.Tensor, at: Optional[torch.Tensor] = None) -> None:
        """``p -= lr * update``: the velocity, sent and averaged, is SGD's step direction
        (``at``: where ``update`` may be non-zero, or None)."""
        _add_scaled(p, update, self.group["lr"], self.group.get("maximize", False), at)

    def state_kind(self) -> tuple:
        """Which wrapped-optimizer state the correction's hvd_topk state stands for (see
        ``checkpoint.correction_entry``): SGD's ``momentum_buffer``."""
        return ("momentum", False)


class AdamCorrection:
    """Adam correction for one ``torch.optim.Adam`` / ``AdamW`` param group (see
    ``TopKCompressor``'s ``adam_correction``).

    Every hyperparameter keeps its meaning, read from the param group at each step (so
    schedulers work): ``lr`` and ``weight_decay`` (AdamW's decoupled ``p *= 1 - lr * wd``,
    applied to every entry at every step, identically on every rank; Adam's coupled form
    added to the local gradient), ``betas`` and ``eps`` (the local moments), ``amsgrad`` (the
    running max of the local second moment), ``maximize`` (the update is applied ascending).
    ``foreach``/``fused``/``capturable``/``differentiable`` choose the wrapped optimizer's
    implementation; the corrected params do not go through it.
    """

    def __init__(self, group: dict, index: int, decoupled: bool) -> None:
        self.group = group
        self.index = index
        self.decoupled = decoupled

    def key(self) -> tuple:
        """What a compression group's tensors must share: one pipeline run per value."""
        return ("adam", self.index)  # one param group: the same betas, eps and amsgrad

    def local_grad(self, p: torch.Tensor, grad: torch.Tensor, scale) -> torch.Tensor:
        """Adam's coupled weight decay, added locally; AdamW's is applied in ``apply``."""
        return grad if self.decoupled else _coupled_decay(self.group, p, grad, scale)

    def start(self, name: str, state: dict, comp) -> None:
        """At a tensor's first sparse step: if the wrapped optimizer stepped it while it was
        exchanged densely (the first steps of the warm-up on a large world), its moments --
        those of the average gradient, the same on every rank -- and step count seed the
        rank's own, instead of zeros. ``state`` is the wrapped optimizer's for the param."""
        if "exp_avg" not in state:
            return
        step = state.get("step", 0)
        if isinstance(step, torch.Tensor) and step.device.type == "cpu":
            step = int(step)  # a CPU tensor: no device involved
        # capturable/fused keep the count on the device: reading it would be a host sync, so
        # those moments are not handed over (the rank's own start from zero).
        if not comp.adam_started(name) and not isinstance(step, torch.Tensor):
            comp.start_adam(name, state["exp_avg"], state["exp_avg_sq"], step,
                            state.get("max_exp_avg_sq") if self.group.get("amsgrad") else None)
        state.clear()  # the compressor's moments replace them: a moment is never kept twice

    def compress_kwargs(self) -> dict:
        """``compress_group``'s arguments: this step's ``AdamSettings``."""
        beta1, beta2 = self.group["betas"]
        lr = self.group["lr"]
        return {"adam": AdamSettings(float(beta1), float(beta2), float(self.group["eps"]),
                                     bool(self.group.get("amsgrad", False)),
                                     lr if isinstance(lr, torch.Tensor) else float(lr))}

    def apply(self, p: torch.Tensor, update: torch.Tensor, at: Optional[torch.Tensor] = None) -> None:
        """AdamW's decay, then the owed displacement (its lr was applied when it was owed;
        ``at``: where ``update`` may be non-zero, or None)."""
        lr, wd = self.group["lr"], self.group["weight_decay"]
        if self.decoupled and wd:
            p.mul_(1 - lr * wd)
        _add_scaled(p, update, 1.0, self.group.get("maximize", False), at)

    def state_kind(self) -> tuple:
        """Which wrapped-optimizer state the correction's hvd_topk state stands for (see
        ``checkpoint.correction_entry``): Adam's moments (and ``max_exp_avg_sq``)."""
        return ("adam", bool(self.group.get("amsgrad", False)))


class CorrectionSet:
    """Owns the corrections of the wrapped optimizer (param -> its correction, from
    ``correction_groups``) and the params of the step whose synchronized gradient is a
    corrected update, which ``step`` applies in place of the wrapped optimizer.

    Per step: ``sent(params)`` once a group of corrected params is sent, then ``step``, or
    ``discard()`` when the step is not applied; ``rebuild`` after ``load_state_dict`` (torch
    makes new param-group dicts: the corrections must read lr, momentum, betas... from those,
    the ones schedulers now change).
    """

    def __init__(self) -> None:
        self._of: Dict[torch.Tensor, object] = {}
        self._sent: set = set()  # params whose synchronized grad is a corrected update
        self._touched: Dict[torch.Tensor, tuple] = {}  # p -> (positions, grad, its version)

    def rebuild(self, opt: torch.optim.Optimizer, comp) -> None:
        """The corrections of ``opt``'s param groups (see ``correction_groups``)."""
        self._of = correction_groups(opt, comp)
        if any(isinstance(c, AdamCorrection) for c in self._of.values()):
            comp.schedule_for_adam()  # an automatic warm-up takes Adam's length

    def get(self, p: torch.Tensor):
        """``p``'s correction, or None."""
        return self._of.get(p)

    def __bool__(self) -> bool:
        """Some param has a correction."""
        return bool(self._of)

    def sent(self, params) -> None:
        """``params``' synchronized gradients will be corrected updates."""
        self._sent.update(params)

    def scattered(self, p: torch.Tensor, positions: Optional[torch.Tensor]) -> None:
        """``p.grad``, as written by the exchange, is zero outside ``positions`` (None: not
        known): while it stays unchanged, ``step`` applies it there alone."""
        if positions is not None and p in self._of and p.is_contiguous() and p.grad.is_contiguous():
            self._touched[p] = (positions, p.grad, p.grad._version)

    def discard(self) -> None:
        """The step is not applied (or a state was loaded): no update is owed."""
        self._sent = set()
        self._touched = {}

    def step(self, wrapped_step, closure=None):
        """Apply the step: ``wrapped_step(closure)`` (the wrapped optimizer's) for the params
        without a corrected update, then each corrected update. Corrected params already carry
        the optimizer's recurrence (momentum, Adam): they are hidden from the wrapped optimizer
        (it skips params without grad) and their correction's ``apply`` moves them."""
        if not self._sent:
            return wrapped_step(closure)
        corrected, self._sent = self._sent, set()
        touched, self._touched = self._touched, {}
        stash = {p: p.grad for p in corrected}
        for p in corrected:
            p.grad = None
        try:
            loss = wrapped_step(closure)
        finally:
            for p, g in stash.items():
                p.grad = g
        with torch.no_grad():
            for p, g in stash.items():
                self._of[p].apply(p, g, _unchanged_positions(touched.get(p), g))
        return loss


def _unchanged_positions(record, grad: torch.Tensor) -> Optional[torch.Tensor]:
    """The positions of a ``scattered`` record if ``grad`` is still the gradient it describes,
    unmodified since (clipping, unscaling or any in-place change bumps its version)."""
    if record is None:
        return None
    positions, written, version = record
    return positions if grad is written and grad._version == version else None


def _coupled_decay(group: dict, p: torch.Tensor, grad: torch.Tensor, scale) -> torch.Tensor:
    """``grad + wd * p`` in the gradient's (loss-scaled) units, as SGD and Adam add it; with
    ``maximize`` torch negates the gradient first, which the ascending ``apply`` undoes, so
    the decay is added with the opposite sign here."""
    wd = group["weight_decay"]
    if not wd:
        return grad
    return grad + p.detach() * ((-wd if group.get("maximize") else wd) * scale)


def _add_scaled(p: torch.Tensor, update: torch.Tensor, lr, ascend: bool,
                at: Optional[torch.Tensor] = None) -> None:
    """``p -= lr * update`` (``+=`` when maximizing); ``lr`` a float or a tensor. ``at``: the
    flat positions outside which ``update`` is zero (duplicates allowed): only those entries
    are read and written, with the same operation, so the same bits as the whole tensor's."""
    if at is not None:
        flat = p.view(-1)
        part = flat.index_select(0, at)
        _add_scaled(part, update.reshape(-1).index_select(0, at), lr, ascend)
        flat.index_copy_(0, at, part)  # a duplicate position writes the same value again
    elif isinstance(lr, torch.Tensor):
        p.addcmul_(update, lr.to(p.device), value=1 if ascend else -1)
    else:
        p.add_(update, alpha=lr if ascend else -lr)


def correction_groups(opt: torch.optim.Optimizer, comp) -> Dict[torch.Tensor, object]:
    """Param -> its correction, for the params the compressor's ``momentum_correction`` and
    ``adam_correction`` settings give one (``None`` = auto: where the wrapped optimizer fits
    and ``ratio < 1``; ``True``: required, a ``ValueError`` where it does not fit)."""
    out: Dict[torch.Tensor, object] = {}
    name = type(opt).__mro__[1].__name__  # the wrapped optimizer's class
    for want, fits, make, required in (
            (comp.momentum_correction, _momentum_fits, _momentum, _MOMENTUM_REQUIRED),
            (comp.adam_correction, _adam_fits, _adam, _ADAM_REQUIRED)):
        if want is False or (want is None and comp.ratio >= 1.0):
            continue  # auto: nothing to correct when everything is sent
        found = 0
        for index, group in enumerate(opt.param_groups):
            why = fits(opt, group)
            if why is not None:
                if want and why != "":
                    raise ValueError(why)
                continue
            found += 1
            correction = make(opt, group, index)
            for p in group["params"]:
                out[p] = correction
        if want is True and not found:
            raise ValueError(required.format(name=name))
    return out


_MOMENTUM_REQUIRED = ("momentum_correction=True needs torch.optim.SGD with momentum > 0; got {name}. "
                      "Use momentum_correction=None (auto) to apply it only where it fits.")
_ADAM_REQUIRED = ("adam_correction=True needs torch.optim.Adam or AdamW; got {name}. Use "
                  "adam_correction=None (auto) to apply it only where it fits.")


def _momentum_fits(opt, group) -> Optional[str]:
    """None if momentum correction applies to ``group``; "" if it does not (quietly); else
    the error for ``momentum_correction=True``."""
    if not isinstance(opt, torch.optim.SGD) or group.get("momentum", 0) <= 0:
        return ""
    if group.get("dampening", 0) != 0:
        return f"momentum_correction=True needs SGD without dampening (got dampening={group['dampening']})"
    return None


def _momentum(opt, group, index):
    return MomentumCorrection(group)


def _adam_fits(opt, group) -> Optional[str]:
    return None if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) else ""


def _adam(opt, group, index):
    # torch >= 2.5: AdamW is Adam with decoupled_weight_decay=True; older: its own class.
    decoupled = isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
    return AdamCorrection(group, index, decoupled)

