"""``AdamPairing``: Adam correction for the DDP hook, paired with the user's own
``torch.optim.Adam`` / ``AdamW`` through the optimizer's public step hooks.

Top-K fed to Adam as a gradient misapplies it: Adam's moments of a sparse, delayed average are
not those of the gradient (the Horovod engine's README shows +24% validation loss at 1%). With
Adam correction each rank runs Adam's recurrence on its *own* gradient and Top-K sends the
rank's Adam step ``lr * m_hat / (sqrt(s_hat) + eps)``, accumulated in the residual
(``corrections.AdamCorrection``, ``selection.adam_update_``: the same arithmetic as the Horovod
engine). The averaged step is then a displacement, not a gradient, so the optimizer must not
run Adam on it again:

- ``optimizer.register_step_pre_hook``: the params whose bucket gradient is such a step are
  hidden from the optimizer (``grad = None``: torch's optimizers skip them);
- ``optimizer.register_step_post_hook``: their gradients come back and each is applied as
  ``p -= update`` after AdamW's decoupled decay ``p *= 1 - lr * weight_decay``
  (``AdamCorrection.apply``); Adam's coupled decay is added to the local gradient before.

Since those gradients are steps, scaling them between ``backward()`` and ``step()`` (a
``clip_grad_norm_``, a ``GradScaler``'s ``unscale_``) scales the update instead of a
gradient. The pairing notices it without reading a value: at the end of each backward pass
(after DDP has written the gradients) it notes their version counters, and before the step
it warns, once, if one moved; ``TopKState(local_clip_norm=...)`` is the clip that applies.

Everything else the optimizer does is unchanged: the tensors sent dense (biases, small ones)
get its own Adam step on their average, schedulers change ``lr`` (read at every step), and
``optimizer.load_state_dict`` rebuilds the pairing (torch makes new param groups). The pairing
holds no state of its own: the moments live in the hook's ``CompressorState`` (its
``state_dict``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, Sequence

import torch

from ..corrections import correction_groups
from ..layout import GroupLayout
from ..settings import TopKSettings
from ..state import CompressorState
from ..update import AdamMoments

__all__ = ["AdamPairing"]


class AdamPairing:
    """Adam correction for the params of ``optimizer`` a DDP hook sends sparse.

    Arguments:
        optimizer: the ``torch.optim.Adam`` / ``AdamW`` the training loop steps.
        names: ``id(param) -> name`` of the model's params (``TopKState``'s).
        settings: the hook's ``TopKSettings`` (``adam_correction``, ``adam_variance_steps``,
            ``adam_clip``, ``adam_select``, ``ratio``).
        rank_state: the hook's per-rank state, where the moments are kept by name.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: Dict[int, str], settings: TopKSettings,
                 rank_state: CompressorState) -> None:
        self.optimizer = optimizer
        self._settings = dataclasses.replace(settings, momentum_correction=False)  # the hook's own
        self._names = names
        self._state = rank_state
        self._sent: Dict[torch.Tensor, object] = {}  # this step's corrected params -> correction
        self._stash: Dict[torch.Tensor, torch.Tensor] = {}
        self._versions: Dict[torch.Tensor, int] = {}  # p -> p.grad._version after backward
        self._warned = False
        self.rebuild()
        if self._by_name:
            optimizer.register_step_pre_hook(self._hide)
            optimizer.register_step_post_hook(self._apply)
            optimizer.register_load_state_dict_post_hook(lambda opt: self.rebuild())

    def rebuild(self) -> None:
        """The corrections of the optimizer's current param groups, by param name
        (``corrections.correction_groups``: Adam/AdamW groups, ``ratio < 1`` unless required)."""
        found = correction_groups(self.optimizer, self._settings)
        self._by_name = {self._names[id(p)]: (p, c) for p, c in found.items() if id(p) in self._names}
        self._sent = {}

    def __bool__(self) -> bool:
        """Some param is corrected."""
        return bool(self._by_name)

    def covers(self, names: Sequence[str]) -> bool:
        """Whether the sparse tensors ``names`` of a bucket are corrected (all or none)."""
        have = [n in self._by_name for n in names]
        if any(have) and not all(have):
            missing = [n for n, h in zip(names, have) if not h]
            raise ValueError(f"a DDP bucket mixes parameters the Adam optimizer steps with others "
                             f"({missing[:3]}): give TopKState the optimizer of every parameter")
        return all(have) and bool(have)

    def moments(self, names: Sequence[str], layout: GroupLayout, g: torch.Tensor) -> AdamMoments:
        """This step's moments for the bucket's sparse tensors ``names`` (flat ``g`` in
        ``layout``): Adam's coupled decay added to ``g`` in place, moments the optimizer built
        while a tensor went dense taken over, and the params marked for ``_apply``."""
        pairs = [self._by_name[n] for n in names]
        adams = [c.compress_kwargs()["adam"] for _, c in pairs]
        first = adams[0]
        if any((a.beta1, a.beta2, a.eps, a.amsgrad) != (first.beta1, first.beta2, first.eps, first.amsgrad)
               for a in adams):
            raise ValueError(f"the parameters {list(names)[:3]}... share a DDP bucket but not their Adam "
                             "betas, eps or amsgrad: one bucket is one selection")
        lrs = [a.lr for a in adams]
        if any(isinstance(lr, torch.Tensor) for lr in lrs) or len(set(lrs)) > 1:  # per tensor
            per = torch.stack([torch.as_tensor(lr, dtype=torch.float32).reshape(()) for lr in lrs])
            lengths = layout.tensors(g.device)["lengths"]
            first = dataclasses.replace(first, lr=torch.repeat_interleave(per.to(g.device), lengths,
                                                                          output_size=layout.numel))
        for name, (p, c), off, size in zip(names, pairs, layout.offsets, layout.sizes):
            view = g[off:off + size]
            decayed = c.local_grad(p.detach().reshape(-1), view, 1.0)
            if decayed is not view:
                view.copy_(decayed)
            c.start(name, self.optimizer.state[p], self)
            self._sent[p] = c
        return self._state.adam_moments(names, layout, g, first, self._settings.adam_variance_steps,
                                        self._settings.adam_clip, self._settings.adam_select)

    # -- what AdamCorrection.start asks of a compressor -------------------------------------------
    def adam_started(self, name: str) -> bool:
        return name in self._state.adam_steps

    def start_adam(self, name, exp_avg, exp_avg_sq, step, max_exp_avg_sq=None) -> None:
        self._state.start_adam(name, exp_avg, exp_avg_sq, step, max_exp_avg_sq)

    # -- the end of backward -------------------------------------------------------------------
    def backward_started(self) -> None:
        """From the hook's first bucket of a backward pass: note the corrected gradients'
        versions once DDP has written them. DDP queues its own end-of-backward callback (which
        waits for the buckets and writes the gradients) after the first bucket's hook, so a
        callback queued now runs before it; the one it queues runs after it."""
        engine = torch.autograd.Variable._execution_engine
        try:
            engine.queue_callback(lambda: engine.queue_callback(self._note_versions))
        except RuntimeError:  # not inside a backward pass (DDP's Join shadows one): nothing to note
            self._versions = {}

    def _note_versions(self) -> None:
        self._versions = {p: p.grad._version for p in self._sent if p.grad is not None}

    # -- the optimizer's step hooks -------------------------------------------------------------
    def _hide(self, optimizer, args, kwargs) -> None:
        """Before the optimizer's step: the corrected params' gradients (their averaged Adam
        step) are taken away, so the optimizer skips them. Warns once if one was changed in
        place since backward (see the module's docstring)."""
        versions, self._versions = self._versions, {}
        if not self._warned and any(p.grad is not None and p in versions and p.grad._version != versions[p]
                                    for p in self._sent):
            self._warned = True
            warnings.warn(
                "hvd_topk.ddp: the gradients of parameters under Adam correction were changed in place "
                "between backward() and optimizer.step() (clip_grad_norm_, GradScaler.unscale_, ...). "
                "They hold each parameter's averaged Adam step, not a gradient, so this scaled the update. "
                "Clip each rank's gradient with TopKState(local_clip_norm=...) instead; with AMP, use bf16 "
                "autocast without a GradScaler.", stacklevel=3)
        self._stash = {p: p.grad for p in self._sent if p.grad is not None}
        for p in self._stash:
            p.grad = None

    def _apply(self, optimizer, args, kwargs) -> None:
        """After it: each corrected param moves by its averaged step (``AdamCorrection.apply``)."""
        stash, self._stash = self._stash, {}
        sent, self._sent = self._sent, {}
        with torch.no_grad():
            for p, update in stash.items():
                p.grad = update
                sent[p].apply(p, update.view_as(p))
