"""The optional CPU kernel (``csrc/compensate_cpu.cpp``): compensate + candidate scan fused.

Built on first use with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja; Horovod's
own build needs the compiler already) and cached in torch's extensions directory
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), under a name keyed by the
source, the torch version and the Python version: checkouts and environments with the same
key share one build, and different ones never overwrite each other's. Concurrent ranks wait on
torch's file lock while one builds. ``scripts/install.sh`` builds it ahead of time. Without
it -- no compiler, a failed build, or ``HVD_TOPK_CPU_KERNEL=0`` -- ``selection.py`` runs the
same computation with torch/NumPy operations (about 2x slower at 1% of 25M).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
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
                _state["module"] = _build()
            except Exception as e:  # no compiler/ninja, or a build error: the torch path works
                logger.warning("hvd_topk: CPU kernel unavailable (%s: %s); using the torch path",
                               type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return _state["module"]


def _build():
    import torch
    from torch.utils.cpp_extension import get_default_build_root, load

    source = _SOURCE.read_bytes()
    key = hashlib.sha1(source + f"|{torch.__version__}|{sys.version}".encode()).hexdigest()[:12]
    name = f"hvd_topk_cpu_{key}"
    build_dir = Path(get_default_build_root()) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    # Compile a copy inside the build directory: its path is then the same for every checkout,
    # so ninja never sees a changed command and rebuilds.
    copy = build_dir / _SOURCE.name
    if not copy.exists() or copy.read_bytes() != source:
        fd, tmp = tempfile.mkstemp(dir=build_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(source)
        os.replace(tmp, copy)  # atomic: ranks racing here write the same bytes
    return load(name, [str(copy)], extra_cflags=["-O3"], build_directory=str(build_dir), verbose=False)
