"""The loss scale of mixed-precision training, read once per step without a host sync."""

from __future__ import annotations

__all__ = ["LossScale", "check_grad_scaler"]


def check_grad_scaler(grad_scaler):
    """The optimizer's ``grad_scaler`` argument: None or a ``torch.amp.GradScaler``, else a ``TypeError``."""
    if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")


class LossScale:
    """Owns the loss scale of the step being exchanged: the ``grad_scaler``'s (a
    ``torch.amp.GradScaler``, or None: 1.0), taken at the step's first ``get()`` and kept
    until ``end_step()``. Gradients arrive multiplied by it; residuals and velocities are
    kept unscaled."""

    def __init__(self, grad_scaler):
        self._scaler = grad_scaler
        self._scale = None

    def get(self):
        """The scaler's current scale (1.0 without one): its own 0-dim tensor, left on the
        device (``get_scale()`` would read it back, a host sync in the backward hook); a
        float for a scaler that has not made its tensor yet."""
        if self._scale is None:
            scaler = self._scaler
            if scaler is None or not scaler.is_enabled():
                self._scale = 1.0
            elif getattr(scaler, "_scale", None) is not None:
                self._scale = scaler._scale.detach().clone()  # its value for this step
            else:
                self._scale = float(scaler.get_scale())  # before the first scale(): no tensor
        return self._scale

    def end_step(self):
        """The step is over: the next ``get()`` reads the scaler again."""
        self._scale = None
