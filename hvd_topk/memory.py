"""Error-feedback memory: what Top-K did not send, per parameter name."""

from __future__ import annotations

from typing import Dict, Iterator

import torch

__all__ = ["ResidualMemory"]


class ResidualMemory:
    """Residuals of error feedback, keyed by parameter *name*.

    Names, not ``id()``: ids differ between ranks and between runs, names survive a restart.
    Each residual is a flat tensor in the gradient's dtype and device. The compressor adds
    the gradient into the residual *in place* (``compensate``), selects from it, then zeroes
    the sent entries -- so the buffer goes gradient+residual -> new residual without a copy.

    Example::

        memory = ResidualMemory()
        buf = memory.compensate("fc.weight", grad.view(-1))  # buf = grad + old residual
        ...  # send some entries of buf, then zero them in buf
        torch.save(memory.state_dict(), "residuals.pt")
    """

    def __init__(self) -> None:
        self._residuals: Dict[str, torch.Tensor] = {}

    def compensate(self, name: str, flat_grad: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """Return this name's residual buffer after adding ``alpha * flat_grad`` into it in place.

        The first time a name is seen (or when its shape changed) the buffer starts as
        ``alpha * flat_grad``, i.e. a zero residual. ``alpha`` is ``1 / loss_scale`` under
        mixed precision, so residuals stay in the units of the true gradient.
        """
        buf = self._matching(name, flat_grad)
        if buf is None:
            return self._start(name, flat_grad, alpha)
        return buf.add_(flat_grad) if alpha == 1.0 else buf.add_(flat_grad, alpha=alpha)

    def decay_add(self, name: str, flat_grad: torch.Tensor, decay: float,
                  alpha: float = 1.0) -> torch.Tensor:
        """``buf = decay * buf + alpha * flat_grad`` in place (a momentum buffer); starts at
        ``alpha * flat_grad``."""
        buf = self._matching(name, flat_grad)
        if buf is None:
            return self._start(name, flat_grad, alpha)
        buf.mul_(decay)
        return buf.add_(flat_grad) if alpha == 1.0 else buf.add_(flat_grad, alpha=alpha)

    def buffer(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """This name's buffer, on ``like``'s device and dtype, for an in-place update by the
        caller (e.g. ``selection.compensate_and_select``); None when there is none of
        ``like``'s shape yet (then ``compensate`` starts one)."""
        return self._matching(name, like)

    def _matching(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """This name's buffer on ``like``'s device and dtype (moved once, e.g. after a load),
        or None when there is none of ``like``'s shape."""
        buf = self._residuals.get(name)
        if buf is None or buf.shape != like.shape:
            return None
        if buf.device != like.device or buf.dtype != like.dtype:
            buf = self._residuals[name] = buf.to(device=like.device, dtype=like.dtype)
        return buf

    def _start(self, name: str, flat_grad: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        buf = flat_grad.detach().clone() if alpha == 1.0 else flat_grad.detach() * alpha
        self._residuals[name] = buf
        return buf

    def get(self, name: str) -> torch.Tensor | None:
        return self._residuals.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._residuals

    def __iter__(self) -> Iterator[str]:
        return iter(self._residuals)

    def __len__(self) -> int:
        return len(self._residuals)

    def clear(self) -> None:
        self._residuals.clear()

    def norms(self) -> Dict[str, float]:
        """L2 norm of every residual (for monitoring that error feedback stays bounded)."""
        return {n: float(r.float().norm()) for n, r in self._residuals.items()}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Residuals as ``{name: tensor}`` (detached CPU copies), safe for ``torch.save``."""
        return {n: r.detach().cpu().clone() for n, r in self._residuals.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Replace the residuals; each moves to its gradient's device on first use."""
        self._residuals = {n: t.detach().clone().reshape(-1) for n, t in state.items()}
