"""The optional CPU kernel (``csrc/compensate_cpu.cpp``): compensate + candidate scan fused.

Built on first use with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja; Horovod's
own build needs the compiler already) and cached per torch version in torch's extensions
directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); concurrent ranks
wait on torch's file lock while one builds. ``scripts/install.sh`` builds it ahead of time.
Without it -- no compiler, a failed build, or ``HVD_TOPK_CPU_KERNEL=0`` -- ``selection.py``
runs the same computation with torch/NumPy operations (about 2x slower at 1% of 25M).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["cpu_kernel"]

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).resolve().parent / "csrc" / "compensate_cpu.cpp"
_state = {}


def cpu_kernel():
    """The compiled module, or None (built once per process; failures are logged once)."""
    if "module" not in _state:
        _state["module"] = None
        if os.environ.get("HVD_TOPK_CPU_KERNEL", "1") != "0":
            try:
                from torch.utils.cpp_extension import load
                _state["module"] = load("hvd_topk_compensate_cpu", [str(_SOURCE)],
                                        extra_cflags=["-O3"], verbose=False)
            except Exception as e:  # no compiler/ninja, or a build error: the torch path works
                logger.warning("hvd_topk: CPU kernel unavailable (%s: %s); using the torch path",
                               type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return _state["module"]
