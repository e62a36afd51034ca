"""The optional CPU kernel (``csrc/compensate_cpu.cpp``): compensate + candidate scan fused.

Built once with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja; Horovod's own
build needs the compiler already) into torch's extensions directory (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``), then only loaded:

1. the build is keyed by everything that goes into the compile command: the source, the torch
   version, the Python version, the compiler (``$CXX`` or ``c++``, resolved, with the
   ccache/sccache wrapper torch would put in front) and the include paths. Checkouts and
   environments with the same key share one build; different keys never overwrite each other;
2. a finished build leaves a stamp beside the library. With the stamp there, the library is
   imported directly and ninja is never run again. Running ninja each time rebuilt the kernel
   whenever two contexts found different ninja binaries on PATH (``scripts/install.sh`` the
   system's 1.11, a rank inside the activated venv the pip one, 1.13): the same
   ``build.ninja``, but each ninja rewrote ``.ninja_log`` in its own format version (v5, v7)
   and the other then took the object for stale and recompiled it, about 50 s each time;
3. concurrent ranks wait on torch's file lock while one builds.

``scripts/install.sh`` builds it ahead of time. Without it -- no compiler, a failed build, or
``HVD_TOPK_CPU_KERNEL=0`` -- ``selection.py`` runs the same computation with torch/NumPy
operations (about 2x slower at 1% of 25M).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

__all__ = ["cpu_kernel"]

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).resolve().parent / "csrc" / "compensate_cpu.cpp"
_CFLAGS = ["-O3"]
_STAMP = "hvd_topk_built"  # written last, after a successful build: its inputs, one per line
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


def _build_inputs():
    """What the compile command is made of, as strings (torch's own choices, see its
    ``cpp_extension``: ``$CXX`` or ``c++``, a ccache/sccache wrapper found on PATH, the torch
    and Python include directories)."""
    import torch
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    wrapper = None
    if not os.environ.get("TORCH_NO_COMPILER_WRAPPER"):
        wrapper = next((w for w in ("ccache", "sccache") if shutil.which(w)), None)
    return [
        f"torch {torch.__version__}",
        f"python {sys.version}",
        f"cxx {cxx} -> {os.path.realpath(shutil.which(cxx) or cxx)}",
        f"wrapper {wrapper}",
        f"cflags {' '.join(_CFLAGS)}",
        *(f"include {p}" for p in cpp_extension.include_paths()),
        f"include {sysconfig.get_path('include', scheme='posix_prefix')}",
    ]


def build_directory():
    """(directory, module name) of the build for this environment's key; may not exist yet."""
    from torch.utils.cpp_extension import get_default_build_root

    source = _SOURCE.read_bytes()
    key = hashlib.sha1(b"\n".join([source, *(s.encode() for s in _build_inputs())])).hexdigest()[:12]
    name = f"hvd_topk_cpu_{key}"
    # get_default_build_root() ignores TORCH_EXTENSIONS_DIR (only load()'s own default honours it)
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / name, name


def _build():
    from torch.utils.cpp_extension import load

    build_dir, name = build_directory()
    library = build_dir / f"{name}.so"
    stamp = build_dir / _STAMP
    if stamp.exists() and library.exists():
        return _import(name, library)
    build_dir.mkdir(parents=True, exist_ok=True)
    # Compile a copy inside the build directory: its path is then the same for every checkout,
    # so the command (and the key) does not depend on where the checkout is.
    source = _SOURCE.read_bytes()
    copy = build_dir / _SOURCE.name
    if not copy.exists() or copy.read_bytes() != source:
        _write_atomic(copy, source)  # ranks racing here write the same bytes
    module = load(name, [str(copy)], extra_cflags=_CFLAGS, build_directory=str(build_dir), verbose=False)
    _write_atomic(stamp, "\n".join(_build_inputs()).encode() + b"\n")
    return module


def _import(name, library):
    """Import the built extension without running ninja (what ``load`` does after its build)."""
    import torch  # noqa: F401  (the extension links against libtorch: load it first)

    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_atomic(path, data):
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
