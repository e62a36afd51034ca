"""Error-feedback memory: what Top-K did not send, per parameter name; and ``held_bytes``,
the memory an optimizer or compressor keeps alive."""

from __future__ import annotations

import types
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import torch

__all__ = ["ResidualMemory", "held_bytes"]


class ResidualMemory:
    """Residuals of error feedback, keyed by parameter *name*.

    Names, not ``id()``: ids differ between ranks and between runs, names survive a restart.
    Each residual is a flat tensor in the gradient's dtype and device, a view of its group's
    buffer (``group_buffer``). The compressor adds the gradient into the buffer *in place*,
    selects from it, then zeroes the sent entries -- so the buffer goes gradient+residual ->
    new residual without a copy.

    Example::

        memory = ResidualMemory()
        flat = memory.group_buffer(["fc.weight", "fc2.weight"], [5120, 100], grad)
        ...  # flat += grads; send some entries; zero them in flat
        torch.save(memory.state_dict(), "residuals.pt")
    """

    def __init__(self) -> None:
        self._residuals: Dict[str, torch.Tensor] = {}
        self._groups: Dict[Tuple[str, ...], torch.Tensor] = {}  # names -> their flat buffer
        self._views: Dict[Tuple[str, ...], List[torch.Tensor]] = {}

    def group_buffer(self, names: Sequence[str], sizes: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """One flat buffer holding the residuals of ``names`` back to back (``sizes`` entries
        each), on ``like``'s device and dtype, for the group pipeline to update in place.

        Each name's residual is a view of that buffer, so ``get(name)`` and ``state_dict()``
        still see one tensor per parameter. Built once per group: a name seen for the first
        time (or with another size) starts at zero (-0.0); a residual that existed (loaded from a
        checkpoint, or in another group before) is copied in.
        """
        key = tuple(names)
        flat = self._groups.get(key)
        if flat is not None and flat.device == like.device and flat.dtype == like.dtype and all(
                self._residuals.get(n) is v for n, v in zip(names, self._views[key])):
            return flat
        # -0.0, not 0.0: the additive identity for every float, -0.0 included, so the first
        # update leaves exactly the gradient (bit for bit) in a new residual.
        flat = torch.full((sum(sizes),), -0.0, dtype=like.dtype, device=like.device)
        views, off = [], 0
        for name, n in zip(names, sizes):
            view = flat[off:off + n]
            old = self._residuals.get(name)
            if old is not None and old.numel() == n:
                view.copy_(old.reshape(-1))
            self._residuals[name] = view
            views.append(view)
            off += n
        # A group that held one of these names is superseded (the frozen set or the ratio
        # regrouped the tensors): forget it, so that its buffer is freed once no view of it
        # remains a residual.
        for other in [k for k in self._groups if not set(k).isdisjoint(key)]:
            del self._groups[other], self._views[other]
        self._groups[key], self._views[key] = flat, views
        return flat

    def set(self, name: str, value: torch.Tensor) -> None:
        """Replace ``name``'s residual (a copy, flat); its group buffer takes it in at the
        group's next ``group_buffer`` call."""
        self._residuals[name] = value.detach().clone().reshape(-1)

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
        self._groups.clear()
        self._views.clear()

    def norms(self) -> Dict[str, float]:
        """L2 norm of every residual (for monitoring that error feedback stays bounded)."""
        return {n: float(r.float().norm()) for n, r in self._residuals.items()}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Residuals as ``{name: tensor}`` (detached CPU copies), safe for ``torch.save``."""
        return {n: r.detach().cpu().clone() for n, r in self._residuals.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Replace the residuals; each moves to its gradient's device on first use."""
        self._residuals = {n: t.detach().clone().reshape(-1) for n, t in state.items()}
        self._groups.clear()  # rebuilt (and the loaded residuals copied in) at the next step
        self._views.clear()


def held_bytes(*roots, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensor storages reachable from ``roots`` (an optimizer, a compressor, ...),
    each storage counted once, whatever the views of it: the memory those objects keep alive.

    Follows dicts, lists, tuples, sets and the attributes (``__dict__``, ``__slots__``) of
    objects, but not into tensors' own attributes or modules. Storages of ``exclude`` (the
    parameters and their gradients, which dense training holds too) are not counted. What
    Horovod keeps in C++ (its fusion buffer) is not visible here.
    """
    skip = {_storage_key(t) for t in exclude if isinstance(t, torch.Tensor)}
    seen_objects, storages = set(), {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            key = _storage_key(obj)
            if key is not None and key not in skip:
                storages[key] = obj.untyped_storage().nbytes()
            continue
        if id(obj) in seen_objects or isinstance(obj, (str, bytes, int, float, bool, type(None),
                                                       torch.dtype, torch.device, type)):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif not isinstance(obj, (torch.nn.Module, types.ModuleType, types.FunctionType)):
            stack.extend(getattr(obj, "__dict__", {}).values())
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if isinstance(slot, str) and hasattr(obj, slot):
                        stack.append(getattr(obj, slot))
    return sum(storages.values())


def _storage_key(t: torch.Tensor):
    if t.is_sparse or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr())
