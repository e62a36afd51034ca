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

``use_cpu_kernel(enabled)`` switches it on or off for a block of code (the two paths must give
the same bits, and tests compare them) and counts the kernel's calls made inside the block.
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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["cpu_kernel", "use_cpu_kernel", "KernelUse", "build_directory", "build_inputs", "zero_at",
           "add_at"]

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).resolve().parent / "csrc" / "compensate_cpu.cpp"
_CFLAGS = ["-O3", "-ffp-contract=off"]  # no FMA contraction: the bits of the torch steps
_EMPTY = torch.empty(0)
_STAMP = "hvd_topk_built"  # written last, after a successful build: its inputs, one per line
# "built": the loaded module, or None (unavailable; tried once per process);
# "in_force": what the innermost use_cpu_kernel block put in force (absent outside blocks).
_state = {}


def cpu_kernel():
    """The compiled module, or None (built once per process; failures are logged once; None
    inside a ``use_cpu_kernel(False)`` block)."""
    if "in_force" in _state:
        return _state["in_force"]
    return _built()


def _built():
    if "built" not in _state:
        _state["built"] = None
        if os.environ.get("HVD_TOPK_CPU_KERNEL", "1") != "0":
            try:
                _state["built"] = _build()
            except Exception as e:  # no compiler/ninja, or a build error: the torch path works
                logger.warning("hvd_topk: CPU kernel unavailable (%s: %s); using the torch path",
                               type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return _state["built"]


def _flat_f32(*tensors) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous()
               for t in tensors)


def _positions(idx) -> bool:
    return (idx.device.type == "cpu" and idx.dim() == 1 and idx.is_contiguous()
            and idx.dtype in (torch.int32, torch.int64))


def zero_at(v, u, idx) -> bool:
    """``v[idx] = 0`` and, unless ``u`` is None, ``u[idx] = 0``, in one pass whose scattered
    lines are prefetched; the same bits as ``scatter_(0, idx, 0.0)`` on each. Returns False,
    having done nothing, where the kernel does not apply (not 1-D float32 on CPU, no kernel)."""
    kernel = cpu_kernel()
    if kernel is None or not _flat_f32(v, *(() if u is None else (u,))) or not _positions(idx):
        return False
    kernel.zero_at(v, _EMPTY if u is None else u, idx)
    return True


def add_at(out, idx, x) -> bool:
    """``out[idx[j]] += x[j]`` in the order of ``j``, its scattered lines prefetched; the same
    bits as ``out.index_add_(0, idx, x)`` on CPU. Returns False, having done nothing, where the
    kernel does not apply (not 1-D float32 on CPU, no kernel)."""
    kernel = cpu_kernel()
    if kernel is None or not _flat_f32(out, x) or not _positions(idx):
        return False
    kernel.add_at(out, idx, x)
    return True


class KernelUse:
    """What ran inside a ``use_cpu_kernel`` block.

    Attributes:
        enabled: whether the kernel was switched on in the block.
        calls: how many selections the compiled module made in the block (calls of
            ``topk_update``): 0 means every selection in it took the torch steps. Its
            scattered writes (``zero_at``, ``add_at``) are not counted.
    """

    __slots__ = ("enabled", "calls")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.calls = 0


class _Counted:
    """The compiled module seen through a ``KernelUse``: each call of ``topk_update`` adds one
    to ``use.calls``, then runs the function."""

    def __init__(self, module, use: KernelUse) -> None:
        self._module, self._use = module, use

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if name != "topk_update":
            return attr

        def counted(*args, **kwargs):
            self._use.calls += 1
            return attr(*args, **kwargs)
        return counted


@contextmanager
def use_cpu_kernel(enabled: bool) -> Iterator[KernelUse]:
    """Switch the CPU kernel on or off inside a ``with`` block; what was in force before
    comes back when the block ends.

    Arguments:
        enabled: ``False``: ``cpu_kernel()`` returns None in the block, so every selection
            takes the torch steps (the path CUDA tensors take). ``True``: the kernel is built or
            loaded now, and ``cpu_kernel()`` returns it (also inside an outer ``False`` block);
            raises ``RuntimeError`` when it is unavailable (no compiler or ninja, a failed
            build, ``HVD_TOPK_CPU_KERNEL=0``), so a block that asks for the kernel never
            silently runs without it.

    Yields:
        a ``KernelUse``; its ``calls`` counts the kernel's selections made in the block
        (nested ``True`` blocks included).

    Example::

        if cpu_kernel() is None:
            pytest.skip("CPU kernel not built")
        with use_cpu_kernel(True) as use:
            compressor.compress(grad, name="w")
        assert use.calls > 0  # the fused path ran
    """
    use = KernelUse(bool(enabled))
    before = _state.get("in_force", _ABSENT)
    module = None
    if use.enabled:
        built = _built()
        if built is None:
            raise RuntimeError("use_cpu_kernel(True): the CPU kernel is unavailable (no compiler or "
                               "ninja, a failed build, or HVD_TOPK_CPU_KERNEL=0; see the logged warning)")
        # Inside an outer True block, count through its view too.
        module = _Counted(before if isinstance(before, _Counted) else built, use)
    _state["in_force"] = module
    try:
        yield use
    finally:
        if before is _ABSENT:
            _state.pop("in_force", None)
        else:
            _state["in_force"] = before


_ABSENT = object()


def build_inputs():
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
    key = hashlib.sha1(b"\n".join([source, *(s.encode() for s in build_inputs())])).hexdigest()[:12]
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
    _write_atomic(stamp, "\n".join(build_inputs()).encode() + b"\n")
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
