"""A fixed sequence of compressions whose payloads and residuals are digested step by step.

``tests/data/payload_trace.json`` holds the digests of a reference version; ``test_memory.py``
checks that the same inputs give the same bytes on the wire and the same residuals (the CPU
kernel, the torch path, groups, momentum correction, Adam correction, fp16 values, loss
scaling and the sparse allreduce, through a warm-up), and that the CPU kernel and the torch
path send the same bytes.

Some residuals' last bits depend on the CPU (torch's kernels take other instructions on
other processors), so a processor whose digests differ has a file of its own,
``tests/data/payload_trace_<machine()>.json``, recorded by the reference version on it; other
processors are held to ``payload_trace.json``. Regenerate only for a deliberate change of the
selection or of the payload's order, on each processor that has a file:
``python tests/payload_trace.py > tests/data/payload_trace.json`` (or ``..._<machine>.json``).
"""

from __future__ import annotations

import contextlib
import json
import zlib
from pathlib import Path

import torch

from hvd_topk import TopKCompressor
from hvd_topk import use_cpu_kernel
from hvd_topk.compression import AdamSettings
from hvd_topk.packing import payload_rows

SIZES = (30_000, 5_000, 700)
CONFIGS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    # Ranked by the owed displacement alone (adam_select="displacement"), by signal, and by agreement.
    "adam": {"adam": AdamSettings(0.9, 0.99, 1e-8, False, lr=1e-3), "adam_select": "displacement"},
    "adam_signal": {"adam": AdamSettings(0.9, 0.99, 1e-8, False, lr=1e-3), "adam_select": "signal"},
    "adam_agreement": {"adam": AdamSettings(0.9, 0.99, 1e-8, False, lr=1e-3), "adam_select": "agreement"},
    "fp16": {"value_dtype": torch.float16, "momentum": 0.9},
    "scaled": {"scale": 1024.0},
    "sparse_allreduce": {"exchange": "sparse_allreduce", "momentum": 0.9},
}


#: Configurations whose values depend on the CPU's vector instructions in their last bit (Adam's
#: moments and square root round differently with and without fused multiply-add): their
#: digests cover the header, the positions and the values' signs, and the residuals' signs.
ISA_DEPENDENT = ("adam", "adam_signal", "adam_agreement")


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().contiguous().view(torch.uint8).numpy().tobytes())


def _payload_crc(payload: torch.Tensor, ctx) -> int:
    """The digest of a payload without its values' low bits: header, positions, signs."""
    rows = payload_rows(payload, ctx.k, ctx.value_dtype, ctx.index_dtype, 1, ctx.header_words)
    header, values, indices = (rows.part(i) for i in range(3))
    return zlib.crc32(b"".join(t.numpy().tobytes() for t in
                               (header, indices, torch.sign(values.float()).to(torch.int8))))


def trace(config: str, grouped: bool, kernel: bool, steps: int = 12) -> list:
    """``[[payload crc, residual crc], ...]`` for ``steps`` steps of one configuration."""
    kw = dict(CONFIGS[config])
    value_dtype = kw.pop("value_dtype", None)
    exchange = kw.pop("exchange", "allgather")
    comp = TopKCompressor(0.01, warmup_steps=8, value_dtype=value_dtype, min_numel=0,
                          adam_select=kw.pop("adam_select", "agreement"))
    names = [f"t{i}" for i in range(len(SIZES))]
    gen = torch.Generator().manual_seed(len(config) * 7 + grouped)
    out = []
    # kernel=True: whatever this environment has (the digests are the same bits either way).
    with contextlib.nullcontext() if kernel else use_cpu_kernel(False):
        for _ in range(steps):
            grads = [torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4 for n in SIZES]
            if "scale" in kw:
                grads = [g * kw["scale"] for g in grads]
            batches = [(grads, names)] if grouped else [([g], [n]) for g, n in zip(grads, names)]
            row = []
            for tensors, ns in batches:
                payload, ctx = comp.compress_group(tensors, ns, world=1, exchange=exchange, **kw)
                row.append(_payload_crc(payload, ctx) if config in ISA_DEPENDENT else _crc(payload))
                if exchange == "sparse_allreduce":
                    payload = comp.reduce_regions(payload, ctx)
                comp.scatter(payload, ctx)
                comp.check([ctx])
            comp.step_done()
            residuals = [comp.state.residuals.get(n) for n in names]
            if config in ISA_DEPENDENT:
                residuals = [torch.sign(r).to(torch.int8) for r in residuals]
            row.append(zlib.crc32(b"".join(r.numpy().tobytes() for r in residuals)))
            out.append(row)
    return out


def machine() -> str:
    """The processor as far as the digests depend on it: torch's vector capability and the
    vendor (``AVX2_AuthenticAMD``)."""
    vendor = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{torch.backends.cpu.get_cpu_capability()}_{vendor}"


def recorded_traces() -> dict:
    """The recorded digests this processor is held to."""
    data = Path(__file__).parent / "data"
    own = data / f"payload_trace_{machine()}.json"
    return json.loads((own if own.exists() else data / "payload_trace.json").read_text())


def all_traces() -> dict:
    return {f"{config}/{'group' if grouped else 'single'}/{'kernel' if kernel else 'torch'}":
            trace(config, grouped, kernel)
            for config in CONFIGS for grouped in (False, True) for kernel in (True, False)}


if __name__ == "__main__":
    print(json.dumps(all_traces(), indent=1))
