"""Step 1 of the selection pipeline: error feedback ``residual += alpha * g``, with DGC's
momentum correction or Adam correction, and the probes that flag NaN/Inf gradients without a
host sync (``finite_probe`` for a group, ``stacked_probe`` for the tensors sent dense)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ._cpu_kernel import cpu_kernel
from .layout import GroupLayout, segment_views

__all__ = ["finite_probe", "stacked_probe", "nonfinite_flag", "AdamSettings", "AdamMoments",
           "adam_direction_", "adam_update_", "update_", "clip_local"]


def finite_probe(g: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``(S,)`` bool, True where a segment of ``g`` holds a NaN/Inf: ``stacked_probe`` of the
    segments (their max-abs norms, which cannot overflow, in one multi-tensor kernel). One
    pass and no ``(n,)`` temporary (a sum in float64, or of ``g * 0``, would copy ``g``)."""
    return stacked_probe(segment_views(g, layout))


@dataclass(frozen=True)
class AdamSettings:
    """The Adam hyperparameters of one group's step, passed by the optimizer to
    ``compress_group(adam=...)`` or by the DDP hook's optimizer pairing (Adam correction):
    those of the ``torch.optim.Adam``/``AdamW`` param group the group's tensors belong to,
    read at this step."""

    beta1: float
    beta2: float
    eps: float
    amsgrad: bool = False
    lr: object = 1.0  # a float, a 0-dim or (n,) tensor: the residual owes lr * direction


@dataclass
class AdamMoments:
    """Step 1's Adam correction for one group: this rank's *local* Adam moments (flat
    ``(n,)`` buffers in the group's layout, like the residual) and this step's constants.

    ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq`` as in ``torch.optim.Adam``, but of this
    rank's own gradients; ``bias1 = 1 - beta1^t``, ``bias2 = 1 - beta2^t`` (floats, or ``(n,)``
    tensors when the group's tensors have taken different numbers of steps).
    ``update_variance``: False once the variance is frozen (only the first moment moves); an
    ``(n,)`` bool tensor when it is frozen for some of the group's tensors only. ``lr``: the
    step's learning rate (a float or 0-dim tensor), which scales what ``v`` accumulates.
    ``clip``: the direction is clipped to ``[-clip, clip]`` (None: not clipped).
    ``select``: what Top-K ranks the residual's entries by (``score``;
    ``TopKSettings.adam_select``).
    """

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: Optional[torch.Tensor]
    beta1: float
    beta2: float
    eps: float
    bias1: object
    bias2: object
    update_variance: object = True
    lr: object = 1.0
    clip: Optional[float] = None
    select: str = "displacement"

    def score(self, residual: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What Top-K ranks ``residual``'s entries by (only its magnitude counts; the values
        sent are the residual's): ``"displacement"``: ``residual`` itself; ``"momentum"``:
        ``exp_avg * residual``; ``"signal"``: ``exp_avg / (sqrt(s) + eps) * residual``, ``s``
        the denominator's second moment (AMSGrad's running max); ``"agreement"``: the
        signal where it is positive (the momentum still points the way the residual owes),
        0 elsewhere. The score is in float32 for narrower dtypes (a product of two small
        magnitudes would underflow to ties), written into ``out`` -- a spent ``(n,)`` buffer,
        the step's consumed gradient (``adam_update_``) -- where its dtype is the score's,
        else into one ``(n,)`` temporary."""
        if self.select == "displacement":
            return residual
        wide = residual.dtype in (torch.float32, torch.float64)
        m = self.exp_avg if wide else self.exp_avg.float()
        r = residual if wide else residual.float()
        if out is not None and (out.dtype != m.dtype or out.shape != m.shape):
            out = None
        if self.select == "momentum":
            return torch.mul(m, r, out=out)
        s = self.exp_avg_sq if self.max_exp_avg_sq is None else self.max_exp_avg_sq
        if out is not None:
            w = torch.sqrt(s, out=out)
        else:
            w = s.sqrt() if wide else s.float().sqrt_()
        score = torch.div(m, w.add_(self.eps), out=w).mul_(r)
        return score.clamp_(min=0) if self.select == "agreement" else score


#: ``adam_direction_`` computes the direction in this many slices of the group.
DIRECTION_SLICES = 8


def adam_direction_(m: AdamMoments, g: torch.Tensor) -> torch.Tensor:
    """The rank's Adam update direction ``(m / bias1) / (sqrt(s / bias2) + eps)`` after
    taking in ``g`` (finite, unscaled), with torch.optim.Adam's arithmetic: ``m = b1 m +
    (1 - b1) g``; unless frozen ``s = b2 s + (1 - b2) g^2`` (AMSGrad: the running max of
    ``s`` is the denominator's); then clipped to ``[-clip, clip]``. ``g`` is consumed: its
    buffer becomes the direction (the step's temporaries are an eighth of ``(n,)``)."""
    m.exp_avg.lerp_(g, 1 - m.beta1)
    if isinstance(m.update_variance, torch.Tensor):  # (n,) bool: some tensors' is frozen
        moved = (m.exp_avg_sq * m.beta2).addcmul_(g, g, value=1 - m.beta2)
        m.exp_avg_sq.copy_(torch.where(m.update_variance, moved, m.exp_avg_sq))
    elif m.update_variance:
        m.exp_avg_sq.mul_(m.beta2).addcmul_(g, g, value=1 - m.beta2)
    if m.update_variance is not False and m.max_exp_avg_sq is not None:
        torch.maximum(m.max_exp_avg_sq, m.exp_avg_sq, out=m.max_exp_avg_sq)
    s = m.exp_avg_sq if m.max_exp_avg_sq is None else m.max_exp_avg_sq
    bias2 = m.bias2 ** 0.5 if not isinstance(m.bias2, torch.Tensor) else m.bias2.sqrt()
    # The direction into g's buffer (g is taken in), an eighth of it at a time: the
    # denominator's temporary is an eighth of the group's, and each entry's arithmetic is
    # the same whatever the slicing.
    n = g.numel()
    step = max(1, -(-n // DIRECTION_SLICES))
    for i in range(0, n, step):
        part = slice(i, i + step)
        b1 = m.bias1[part] if isinstance(m.bias1, torch.Tensor) else m.bias1
        b2 = bias2[part] if isinstance(bias2, torch.Tensor) else bias2
        denom = (s[part].sqrt() / b2).add_(m.eps)
        torch.div(m.exp_avg[part], b1, out=g[part]).div_(denom)
        del denom
    return g if m.clip is None else g.clamp_(-m.clip, m.clip)


def _cleaned(g: torch.Tensor, layout: GroupLayout, alpha, owned: bool):
    """``(g, alpha, bad)``: ``g`` with its NaN/Inf entries as 0 (in place where ``owned``,
    else a copy), a device scale folded in; ``bad`` the segments that held a NaN/Inf."""
    bad = finite_probe(g, layout)
    clean = torch.Tensor.nan_to_num_ if owned else torch.nan_to_num
    g = clean(g, nan=0.0, posinf=0.0, neginf=0.0)
    if isinstance(alpha, torch.Tensor):  # a loss scale's inverse on the device (not read)
        g, alpha = g.mul_(alpha), 1.0
    return g, alpha, bad


def adam_update_(v: torch.Tensor, g: torch.Tensor, layout: GroupLayout, adam: AdamMoments, *,
                 alpha=1.0, owned: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 1 under Adam correction, in place: the rank's local moments take in ``alpha g``
    and ``v`` accumulates the rank's Adam step, ``lr`` times its direction
    (``adam_direction_``); NaN/Inf entries of ``g`` are added as 0, as in ``update_``.
    Returns ``(bad, spent)``: the segments whose ``g`` held a NaN/Inf, and the ``(n,)``
    buffer that held the direction -- the step's own (``g`` where ``owned``, else its
    cleaned copy), free for the ranking's score (``AdamMoments.score(out=)``)."""
    g, alpha, bad = _cleaned(g, layout, alpha, owned)
    if alpha != 1.0:
        g = g.mul_(alpha)  # the cleaned copy, or the step's own buffer
    d = adam_direction_(adam, g)
    if isinstance(adam.lr, torch.Tensor):
        v.add_(d.mul_(adam.lr.to(d.device)))
    else:
        v.add_(d, alpha=adam.lr)
    return bad, d


def update_(v: torch.Tensor, g: torch.Tensor, layout: GroupLayout, *, alpha=1.0,
            u: Optional[torch.Tensor] = None, momentum: float = 0.0,
            nesterov: bool = False, owned: bool = False) -> torch.Tensor:
    """Step 1, in place: ``v += alpha g`` -- or, with a velocity ``u``, DGC momentum
    correction ``u = m u + alpha g; v += u`` (Nesterov: ``v += alpha g + m u``); under Adam
    correction ``adam_update_`` takes its place. NaN/Inf entries of ``g`` are added as 0.
    ``owned``: ``g`` is the step's own buffer (a group's concatenation), cleaned in place
    instead of copied.

    Returns:
        ``(S,)`` bool: the segments whose ``g`` held a NaN/Inf.
    """
    g, alpha, bad = _cleaned(g, layout, alpha, owned)
    if u is None:
        v.add_(g, alpha=alpha)
        return bad
    u.mul_(momentum).add_(g, alpha=alpha)
    if nesterov:
        v.add_(g * alpha + momentum * u)
    else:
        v.add_(u)
    return bad


#: On CPU, while the CPU kernel is in force (``cpu_kernel()``), tensors of at least this many
#: entries are probed one by one (``nonfinite_flag``): there the max-abs norm of one large
#: tensor takes 7 to 20 times as long as ``aminmax`` (one core: 15-18 against 0.8-2.1 ms for 4M
#: float32 entries, 0.65 against 0.03 ms for 65K), while the one multi-tensor kernel stays the
#: cheaper way to probe many small ones. The generic torch path (the kernel off) probes as CUDA
#: tensors are probed, so that its ops on CPU count what a GPU launches.
CPU_PROBE_ONE_BY_ONE = 1 << 15


def stacked_probe(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """``(len(tensors),)`` bool on the first tensor's device, True where a tensor holds a
    NaN/Inf. Their max-abs norms in one multi-tensor kernel (``torch._foreach_norm``, as
    ``clip_grad_norm_`` uses; a max cannot overflow), stacked: no host sync, and a handful of
    kernels for the hundred small tensors (norms, biases) a model leaves dense. On CPU with
    the CPU kernel in force the large ones (``CPU_PROBE_ONE_BY_ONE`` entries) are probed by
    ``nonfinite_flag`` instead."""
    if not tensors:
        return None
    device = tensors[0].device
    real = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
    # An empty tensor has no max-abs norm; it is finite: probe one zero in its place.
    real = [t if t.numel() else t.new_zeros(1) for t in real]
    large = [i for i, t in enumerate(real) if t.device.type == "cpu" and t.numel() >= CPU_PROBE_ONE_BY_ONE]
    if large and cpu_kernel() is not None:
        flags = [None] * len(real)
        for i in large:
            flags[i] = nonfinite_flag(real[i]).to(device)
        small = [i for i in range(len(real)) if flags[i] is None]
        if small:
            for i, bad in zip(small, stacked_probe([real[i] for i in small])):
                flags[i] = bad
        return torch.stack(flags)
    norms = torch._foreach_norm(real, float("inf"))
    # Stacked in a dtype that holds each norm (float32 would turn a finite float64 into Inf).
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    # Not below Inf: Inf or NaN (two ops; isfinite is four).
    return torch.stack([n.to(device=device, dtype=dtype) for n in norms]).lt(float("inf")).logical_not_()


def nonfinite_flag(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool on ``t``'s device: whether one (large) tensor holds a NaN or an Inf.
    ``aminmax``: one pass and two scalars (min and max carry any NaN and the infinities),
    where ``isfinite(t)`` would make temporaries of some 5 bytes an entry and take about 30
    times as long on CPU, and a max-abs norm 7-20 times (``CPU_PROBE_ONE_BY_ONE``);
    ``stacked_probe`` is for many tensors at once, and calls this for large ones on CPU."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def clip_local(g: torch.Tensor, layout: GroupLayout, inv, limit: float) -> torch.Tensor:
    """DGC's local gradient clipping (3.3): each tensor of the group clipped to the norm
    ``limit``, the norm taken of the unscaled (``* inv``), finite gradient."""
    clean = torch.nan_to_num(g.float(), nan=0.0, posinf=0.0, neginf=0.0)
    if layout.segments == 1:
        sq = clean.square().sum().reshape(1)
    else:
        sq = torch.segment_reduce(clean.square(), "sum", lengths=layout.tensors(g.device)["lengths"],
                                  unsafe=True)  # see finite_probe
    factor = (limit / (sq.sqrt() * inv + 1e-6)).clamp(max=1.0).to(g.dtype)  # (S,)
    if layout.segments > 1:
        factor = torch.repeat_interleave(factor, layout.tensors(g.device)["lengths"],
                                         output_size=layout.numel)
    return g * factor
