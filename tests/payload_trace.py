"""A fixed sequence of compressions whose payloads and residuals are digested step by step.

``tests/data/payload_trace.json`` holds the digests of a reference version (release
ad5504e); ``test_memory.py`` checks that the same inputs give the same bytes on the wire and
the same residuals (the CPU kernel, the torch path, groups, momentum
correction, Adam correction, fp16 values, loss scaling and the sparse allreduce, through a
warm-up). Regenerate only for a deliberate change of the selection: ``python
tests/payload_trace.py > tests/data/payload_trace.json``.
"""

from __future__ import annotations

import contextlib
import json
import zlib

import torch

from hvd_topk import TopKCompressor
from hvd_topk import use_cpu_kernel
from hvd_topk.compression import AdamSettings

SIZES = (30_000, 5_000, 700)
CONFIGS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "adam": {"adam": AdamSettings(0.9, 0.99, 1e-8, False, lr=1e-3)},
    "fp16": {"value_dtype": torch.float16, "momentum": 0.9},
    "scaled": {"scale": 1024.0},
    "sparse_allreduce": {"exchange": "sparse_allreduce", "momentum": 0.9},
}


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().contiguous().view(torch.uint8).numpy().tobytes())


def trace(config: str, grouped: bool, kernel: bool, steps: int = 12) -> list:
    """``[[payload crc, residual crc], ...]`` for ``steps`` steps of one configuration."""
    kw = dict(CONFIGS[config])
    value_dtype = kw.pop("value_dtype", None)
    exchange = kw.pop("exchange", "allgather")
    comp = TopKCompressor(0.01, warmup_steps=8, value_dtype=value_dtype, min_numel=0)
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
                row.append(_crc(payload))
                if exchange == "sparse_allreduce":
                    payload = comp.reduce_regions(payload, ctx)
                comp.scatter(payload, ctx)
                comp.check([ctx])
            comp.step_done()
            row.append(zlib.crc32(b"".join(comp.state.residuals.get(n).numpy().tobytes() for n in names)))
            out.append(row)
    return out


def all_traces() -> dict:
    return {f"{config}/{'group' if grouped else 'single'}/{'kernel' if kernel else 'torch'}":
            trace(config, grouped, kernel)
            for config in CONFIGS for grouped in (False, True) for kernel in (True, False)}


if __name__ == "__main__":
    print(json.dumps(all_traces(), indent=1))
