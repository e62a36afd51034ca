"""No host-device synchronisation in the backward hooks, at most one per optimizer step.

The generic torch path (what CUDA tensors take) runs here on CPU with the C++ kernel off; a
TorchDispatchMode records every op that would force a sync on CUDA (``sync_ops.py``).
"""

import ast

import pytest
import torch
from launch import run_ranks
from sync_ops import recording

import hvd_topk
from hvd_topk import use_cpu_kernel


@pytest.fixture
def no_kernel():
    with use_cpu_kernel(False):
        yield


ADAM = hvd_topk.AdamSettings(0.9, 0.999, 1e-8, amsgrad=True)


@pytest.mark.parametrize("momentum", [0.0, 0.9, "adam"])
@pytest.mark.parametrize("scale,value_dtype", [(1.0, None), (8.0, torch.float16)])
def test_compress_group_makes_no_sync(no_kernel, momentum, scale, value_dtype):
    comp = hvd_topk.TopKCompressor(0.01, warmup_steps=0, value_dtype=value_dtype, local_clip_norm=None,
                                   adam_variance_steps=1)  # the second step: a frozen variance
    kwargs = {"adam": ADAM} if momentum == "adam" else {"momentum": momentum}
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) for n in (300_000, 5000, 70_000)]
    names = ["a", "b", "c"]
    for _ in range(2):
        with recording() as rec:
            payload, ctx = comp.compress_group(grads, names, scale=scale, **kwargs)
            ctx.world = 1
            comp.scatter(payload, ctx)
        assert rec.syncs == []
        with recording() as rec:
            comp.check([ctx])
        assert [op for op, _ in rec.syncs] == ["Tensor.tolist"]  # the one allowed point
        comp.step_done()


@pytest.mark.parametrize("value_dtype", [None, torch.float16])
def test_sparse_allreduce_makes_no_sync(no_kernel, value_dtype):
    """Both phases of the sparse allreduce (bucketing, the owner's sums, the scatter, the
    residual's take-back, a region refresh) on one rank: no sync until ``check``."""
    comp = hvd_topk.TopKCompressor(0.01, warmup_steps=0, value_dtype=value_dtype, region_refresh=1)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) for n in (300_000, 5000, 70_000)]
    for _ in range(2):
        with recording() as rec:
            rows, ctx = comp.compress_group(grads, ["a", "b", "c"], momentum=0.9, world=1,
                                            exchange="sparse_allreduce")
            comp.scatter(comp.reduce_regions(rows, ctx), ctx)
        assert rec.syncs == []
        with recording() as rec:
            comp.check([ctx])
        assert [op for op, _ in rec.syncs] == ["Tensor.tolist"]
        comp.step_done()


def test_a_device_loss_scale_makes_no_sync(no_kernel):
    """GradScaler's scale stays a tensor: the residual is kept unscaled without reading it."""
    comp = hvd_topk.TopKCompressor(0.01, warmup_steps=0)
    ref = hvd_topk.TopKCompressor(0.01, warmup_steps=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        grads = [torch.randn(n, generator=gen) * 1024 for n in (300_000, 5000)]
        with recording() as rec:
            payload, _ = comp.compress_group(grads, ["a", "b"], momentum=0.9, scale=torch.tensor(1024.0))
        assert rec.syncs == []
        want, _ = ref.compress_group(grads, ["a", "b"], momentum=0.9, scale=1024.0)
        assert torch.equal(payload, want)  # a power-of-two scale: the same bits either way
        assert torch.equal(comp.state.residuals.get("a"), ref.state.residuals.get("a"))
        comp.step_done()
        ref.step_done()


def test_clipping_and_nesterov_make_no_sync(no_kernel):
    comp = hvd_topk.TopKCompressor(0.01, warmup_steps=0, local_clip_norm=1.0)
    grads = [torch.randn(100_000), torch.randn(9000)]
    with recording() as rec:
        comp.compress_group(grads, ["a", "b"], momentum=0.9, nesterov=True, world=4)
    assert rec.syncs == []


def test_recorder_sees_syncs():
    """The recorder is not blind: .item(), nonzero and boolean masks are caught."""
    x = torch.randn(100)
    with recording() as rec:
        x.sum().item()
        torch.nonzero(x > 0)
        x[x > 0]
        x.tolist()
    ops = [op for op, _ in rec.syncs]
    assert "aten::_local_scalar_dense" in ops and "aten::nonzero" in ops and "Tensor.tolist" in ops
    assert any(op.startswith("aten::index") for op in ops)


@pytest.mark.parametrize("momentum,group_bytes,amp,optimizer", [
    (0.0, None, "", "sgd"), (0.9, 1 << 30, "", "sgd"), (0.9, 1 << 30, "amp", "sgd"),
    (0.0, 1 << 30, "amp", "adamw")])
def test_a_training_step_syncs_once(momentum, group_bytes, amp, optimizer):
    """Whole steps on one rank with hooks: nothing in the hooks, one sync in step() (with a
    GradScaler too: its scale stays on the device; with AdamW's Adam correction too)."""
    out = run_ranks("sync_worker.py", momentum, group_bytes or 0, amp or "-", optimizer, backend="mpi",
                    np=1, timeout=240,
                    env={"HOROVOD_ELASTIC": "1", "HVD_TOPK_CPU_KERNEL": "0"})
    lines = [ln for ln in out.splitlines() if ln.startswith("STEP ")]
    assert len(lines) == 4, out
    for ln in lines:
        _, hooks, step = ln.split("|")
        hooks, step = ast.literal_eval(hooks), ast.literal_eval(step)
        assert hooks == [], ln
        # The first step also compares the ranks' models: an allgather of pickled host bytes
        # (CPU tensors whatever the model's device), not a device sync.
        step = [(op, where) for op, where in step if not where.endswith(":_check_same_model")]
        assert [op for op, _ in step] == ["Tensor.tolist"], ln
        assert step[0][1].startswith("headers.py:") and step[0][1].endswith(":resolve"), ln  # the one read
    assert "SPARSE 3 DENSE 3" in out, out


# Ops that only make views or read metadata: no kernel on a GPU.
_VIEW_OPS = {"view", "detach", "slice", "select", "squeeze", "expand", "as_strided", "reshape",
             "_unsafe_view", "unsqueeze", "t", "permute", "alias", "split", "split_with_sizes", "unbind"}


class _Launches(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that are not views: what would be kernel launches (or allocations)
    on a GPU, where this path is bound by them (about 27 us each on one H200, docs/performance.md)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _VIEW_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _launches_per_step(sizes, momentum=0.0):
    comp = hvd_topk.TopKCompressor(0.01, warmup_steps=0)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) for n in sizes]
    names = [f"p{i}" for i in range(len(sizes))]

    def step():
        payload, ctx = comp.compress_group(grads, names, momentum=momentum)
        ctx.world = 1
        comp.scatter(payload, ctx)
        comp.check([ctx])
        comp.step_done()

    step()
    counter = _Launches()
    with counter:
        step()
    return counter.count


def test_launches_per_group_do_not_grow_with_its_tensors(no_kernel):
    """A group's compress + scatter + check + commit is a fixed number of ops whatever the
    number of tensors in it, and each ``k``-sized table is built once per step: 5 and 20
    tensors take the same count, at most 116 (153 when the slot tables were rebuilt by every
    user; the non-finite probe's max-abs norms take one op more than a sum of ``g * 0``, and
    no copy of the group), against ~7 per tensor for a naive ``torch.topk`` loop."""
    five = _launches_per_step([100_000, 50_000, 20_000, 8192, 300_000])
    twenty = _launches_per_step([100_000, 50_000, 20_000, 8192, 300_000] + [9000] * 15)
    assert five == twenty, (five, twenty)
    assert five <= 116, five
    assert _launches_per_step([100_000, 50_000, 20_000, 8192, 300_000], momentum=0.9) <= 119
    assert _launches_per_step([1_000_000]) <= 80
