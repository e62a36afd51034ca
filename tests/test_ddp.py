"""``hvd_topk.ddp``: the Top-K DDP communication hook on Gloo, 2 and 3 ranks.

The ranks are started by ``torchrun --standalone`` from the test (``launch``: a hang fails
with every rank's output), once per world size, and run every scenario of
``tests/workers/ddp_worker.py``; each rank saves what it saw, and the references and
tolerances are here:

- the sparse gradients DDP leaves equal, bit for bit, the average over ranks of each rank's
  own ``torch.topk`` of its compensated gradient (residual + gradient), densified: the hook
  divides each value by P and sums in rank order, and so does the reference. The dense ones
  (biases) equal the ranks' average within ``rtol=1e-6, atol=1e-8``: Gloo's allreduce may sum
  three ranks in another order (a few ulps), two ranks exactly;
- ratio 1 equals DDP's default allreduce hook within the same tolerance;
- the ranks' parameters are bit-identical after training; a checkpoint restored mid warm-up
  continues bit for bit as the uninterrupted run;
- a NaN on one rank makes that tensor NaN on every rank, and nothing of the step is lost;
- ranks given other settings all raise at construction;
- with ``optimizer=`` an AdamW, each rank's own Adam step is what Top-K sends, and AdamW
  applies the averaged step after its decay (an independent reference in plain torch);
- the hook and its callbacks run no op that would sync a CUDA device with the host.
"""

import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from launch import BIN, REPO, WORKERS, launch, worker_env

from hvd_topk.cost import choose_exchange
from hvd_topk.ddp.plan import build_plan
from hvd_topk.layout import num_selected
from hvd_topk.settings import TopKSettings

SCENARIOS = ("exact", "sar", "exact_bounded", "sar_bounded", "groups", "groups_bounded", "ratio_one",
             "dense_large", "identical", "resume", "identical_sar", "resume_sar", "nonfinite", "disagree",
             "nonfinite_policy", "adam", "adam_clip", "no_sync")
MIN_NUMEL = 256  # the worker's: the weights are sparse, the biases dense
DENSE_TOL = {"rtol": 1e-6, "atol": 1e-8}


@dataclass
class Ranks:
    world: int
    out: Path

    def load(self, scenario: str) -> list:
        return [torch.load(self.out / f"{scenario}_rank{r}.pt", weights_only=False)
                for r in range(self.world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["np2", "np3"])
def ranks(request, tmp_path_factory) -> Ranks:
    world = request.param
    out = tmp_path_factory.mktemp(f"ddp_np{world}")
    cmd = [BIN / "torchrun", "--standalone", "--nproc-per-node", world, WORKERS / "ddp_worker.py", out,
           *SCENARIOS]
    code, output = launch(cmd, timeout=240, env=worker_env(), check=False)
    assert code == 0, f"DDP worker exited {code}; output:\n{output}"
    return Ranks(world, out)


def sent_by(c: torch.Tensor, ratio: float, weight=None) -> torch.Tensor:
    """The reference selection: the largest ``|c|`` -- or, with ``weight``, ``c * weight``
    where positive, else 0 (``adam_select="agreement"``) -- ties: the lower index, as
    ``torch.topk`` picks them; a stable sort says so explicitly, for Adam's first steps, where
    ``|c|`` is ``lr`` nearly everywhere; densified."""
    score = c.abs() if weight is None else (c * weight).clamp(min=0)
    idx = torch.sort(score, descending=True, stable=True).indices[:num_selected(c.numel(), ratio)]
    return torch.zeros_like(c).index_copy_(0, idx, c[idx])


@pytest.mark.parametrize("exchange", ["exact", "sar", "groups"])
def test_buckets_finished_early_give_the_same_bits(ranks, exchange):
    """With an in-flight budget of 0 the hook first waits for and scatters each group's
    exchange before the next group's selection (the bound on a step's payloads in flight;
    ``groups``: several groups of one bucket): the gradients DDP leaves and the residuals are
    those of the unbounded run, bit for bit."""
    if exchange == "groups":
        assert max(ranks.load("groups")[0]["large"]) >= 2  # a bucket of two groups or more
    for free, bounded in zip(ranks.load(exchange), ranks.load(exchange + "_bounded")):
        for a, b in zip(free["steps"], bounded["steps"]):
            for key in ("grad_out", "residual_after"):
                for name, t in a[key].items():
                    assert (t is None and b[key][name] is None) or torch.equal(t, b[key][name]), (key, name)


def test_sparse_average_of_each_ranks_topk(ranks):
    results = ranks.load("exact")
    assert all(r["steps_counted"] == 3 for r in results)
    for step in range(3):
        recs = [r["steps"][step] for r in results]
        ratio = recs[0]["ratio"]
        assert ratio == pytest.approx(0.25 * 0.2 ** (step / 2))  # the warm-up, 0.25 -> 0.05
        for name, g0 in recs[0]["grad_in"].items():
            if g0.numel() < MIN_NUMEL:
                dense = sum(rec["grad_in"][name] for rec in recs) / ranks.world
                for rec in recs:
                    torch.testing.assert_close(rec["grad_out"][name], dense, **DENSE_TOL)
                    assert rec["residual_after"][name] is None
                continue
            expected = torch.zeros(g0.numel())
            for rec in recs:
                before = rec["residual_before"][name]
                c = rec["grad_in"][name].reshape(-1) + (0 if before is None else before)
                sent = sent_by(c, ratio)
                expected += sent / ranks.world
                assert torch.equal(rec["residual_after"][name], c - sent), (name, step)
            for rec in recs:
                assert torch.equal(rec["grad_out"][name].reshape(-1), expected), (name, step)


def sar_reference(cs: list, ratio: float, capacity: float = 2.0):
    """The sparse allreduce of every rank's compensated gradient ``cs[r]`` (n,) over equal
    regions, computed densely: each rank's top-k, at most ``c`` of its largest per region to
    that region's owner, who sums them in rank order and keeps its ``R`` largest sums.
    Returns ``(the result divided by P (n,), each rank's positions some owner kept)``."""
    world, n = len(cs), cs[0].numel()
    k = num_selected(n, ratio)
    cap, keep = min(k, math.ceil(capacity * k / world)), math.ceil(k / world)
    bounds = [(j * n) // world for j in range(world + 1)]
    total = torch.zeros(n)
    kept = [set() for _ in range(world)]
    sent = []
    for c in cs:
        top = sent_by(c, ratio).nonzero().flatten().tolist()
        sent.append([sorted((i for i in top if bounds[j] <= i < bounds[j + 1]),
                            key=lambda i, c=c: -abs(c[i].item()))[:cap] for j in range(world)])
    for j in range(world):
        acc, touched = torch.zeros(n), []
        for r in range(world):  # rank order
            for i in sent[r][j]:
                acc[i] += cs[r][i]
                touched += [] if i in touched else [i]
        best = sorted(touched, key=lambda i: -abs(acc[i].item()))[:keep]
        total[best] = acc[best]
        for r in range(world):
            kept[r] |= set(best) & set(sent[r][j])
    return total / world, kept


def test_sparse_allreduce_against_reference(ranks):
    """``exchange="sparse_allreduce"``: what DDP leaves is every owner's kept sums, bit for bit,
    and each rank's residual keeps what no owner kept; the regions are the same everywhere."""
    results = ranks.load("sar")
    for step in range(3):
        recs = [r["steps"][step] for r in results]
        for name, g0 in recs[0]["grad_in"].items():
            if g0.numel() < MIN_NUMEL:
                continue
            cs = []
            for rec in recs:
                before = rec["residual_before"][name]
                cs.append(rec["grad_in"][name].reshape(-1) + (0 if before is None else before))
            expected, kept = sar_reference(cs, 0.05)
            for r, rec in enumerate(recs):
                assert torch.equal(rec["grad_out"][name].reshape(-1), expected), (name, step, r)
                owed = cs[r].clone()
                owed[sorted(kept[r])] = 0
                assert torch.equal(rec["residual_after"][name], owed), (name, step, r)
    for result in results:
        totals = result["comm_totals"]
        assert totals["sparse_allreduce_tensors"] == totals["sparse_tensors"] == 9  # 3 weights, 3 steps
        mine, first = result["regions"]["regions"], results[0]["regions"]["regions"]
        assert mine and len(mine) == len(first)
        for a, b in zip(mine, first):
            assert (a["names"], a["world"]) == (b["names"], b["world"])
            assert torch.equal(a["bounds"], b["bounds"])


def test_byte_counters(ranks):
    """``state.comm_totals`` / ``comm_stats``: what each rank sent and received over the three
    ``exact`` steps: the weights' payloads (``k`` float32 values and int32 indices each, plus
    a header of two words, signature and flags, per tensor: one tensor per group here), the
    biases at their size; the link carries ``P - 1`` payloads and
    a ring allreduce's share of the biases."""
    world = ranks.world
    rec = ranks.load("exact")[0]["steps"]
    weights = [g.numel() for g in rec[0]["grad_in"].values() if g.numel() >= MIN_NUMEL]
    biases = sum(g.numel() for g in rec[0]["grad_in"].values() if g.numel() < MIN_NUMEL)
    ks = sum(num_selected(n, r["ratio"]) for r in rec for n in weights)
    payloads = 8 * ks + 8 * len(weights) * 3
    dense = 4 * biases * 3
    for result in ranks.load("exact"):
        totals, last = result["comm_totals"], result["comm_stats"]
        assert totals["steps"] == 3 and last["steps"] == 1
        assert totals["sparse_tensors"] == totals["allgather_tensors"] == 3 * len(weights)
        assert totals["dense_tensors"] == 3 * (len(rec[0]["grad_in"]) - len(weights))
        assert totals["dense_bytes"] == 3 * 4 * (sum(weights) + biases)
        assert totals["bytes_sent"] == payloads + dense
        assert totals["bytes_received"] == world * payloads + dense
        ring = sum(-(-2 * (world - 1) * 4 * g.numel() // world) for g in rec[0]["grad_in"].values()
                   if g.numel() < MIN_NUMEL)
        assert totals["link_bytes"] == (world - 1) * payloads + 3 * ring
        assert 0 < totals["density"] < 1 and totals["compress_ms"] > 0


def test_ratio_one_equals_default_allreduce(ranks):
    for result in ranks.load("ratio_one"):
        for hooked, plain in result["pairs"]:
            for name in plain:
                torch.testing.assert_close(hooked[name], plain[name], **DENSE_TOL)


def test_large_dense_gradients_reduced_in_place_with_momentum(ranks):
    """Gradients sent dense, the large ones reduced where they lie in the bucket: the
    average of DDP's default allreduce, under Nesterov momentum correction ``u = m u + avg``,
    ``avg + m u``, within the dense tolerance."""
    for result in ranks.load("dense_large"):
        velocity = {}
        for hooked, plain in result["pairs"]:
            for name, avg in plain.items():
                u = velocity[name] = 0.9 * velocity.get(name, torch.zeros_like(avg)) + avg
                torch.testing.assert_close(hooked[name], avg + 0.9 * u, **DENSE_TOL)
        assert result["dense_bytes"] == 3 * 4 * sum(g.numel() for g in result["pairs"][0][1].values())


def test_ranks_bit_identical(ranks):
    results = ranks.load("identical")
    for name, p in results[0]["params"].items():
        assert all(torch.equal(r["params"][name], p) for r in results[1:]), name
    # the residuals are each rank's own
    assert not torch.equal(results[0]["residuals"]["0.weight"], results[1]["residuals"]["0.weight"])


@pytest.mark.parametrize("suffix", ["", "_sar"], ids=["allgather", "sparse_allreduce"])
def test_resume_equals_uninterrupted(ranks, suffix):
    straights = ranks.load("identical" + suffix)
    for name, p in straights[0]["params"].items():  # the ranks agree
        assert all(torch.equal(r["params"][name], p) for r in straights[1:]), name
    for straight, resumed in zip(straights, ranks.load("resume" + suffix)):
        assert resumed["steps"] == straight["steps"] == 6
        for name, p in straight["params"].items():
            assert torch.equal(resumed["params"][name], p), name
            r, q = straight["residuals"][name], resumed["residuals"][name]
            assert (r is None and q is None) or torch.equal(q, r), name


def test_nonfinite_tensor_is_nan_everywhere_and_nothing_is_lost(ranks):
    for result in ranks.load("nonfinite"):
        finite, poisoned = result["steps"]
        for name, g in poisoned["grad_out"].items():
            assert bool(g.isnan().all()) if name == "2.weight" else bool(g.isfinite().all()), name
        for name, after in poisoned["residual_after"].items():
            if after is None:
                continue
            g = poisoned["grad_in"][name].reshape(-1)
            if result["poisoned"] and name == "2.weight":  # the NaN column was added as 0
                g = g.reshape(48, 64).index_fill(1, torch.tensor([3]), 0.0).reshape(-1)
            assert torch.equal(after, poisoned["residual_before"][name] + g), name  # all still owed
        # the finite step did send: its residuals lost their sent entries
        c = finite["grad_in"]["0.weight"].reshape(-1)  # the first step's residual started empty
        assert not torch.equal(finite["residual_after"]["0.weight"], c)


def test_nonfinite_policy_at_the_optimizer_step(ranks):
    """``nonfinite="raise"``: ``FloatingPointError`` from ``optimizer.step()`` on every rank at
    the poisoned step only, parameters untouched; ``"skip"``: the step applies nothing on
    every rank and training goes on, finite."""
    for result in ranks.load("nonfinite_policy"):
        raised = result["raise"]["steps"]
        assert [s["raised"] is not None for s in raised] == [False, True, False]
        assert [s["moved"] for s in raised] == [True, False, True]
        skip = result["skip"]
        assert [s["raised"] for s in skip["steps"]] == [None] * 3
        assert [s["moved"] for s in skip["steps"]] == [True, False, True]
        assert all(s["finite"] for s in skip["steps"] + raised) and skip["skipped"] == 1


def test_ranks_with_other_settings_all_raise(ranks):
    last = ranks.world - 1  # it asked for ratio 0.02, the others for 0.01
    for rank, result in enumerate(ranks.load("disagree")):
        others = list(range(last)) if rank == last else [last]
        assert f"rank(s) {others} have other settings" in result["error"]
        assert "ratio=0.02" in result["error"] and "ratio=0.01" in result["error"]


def test_adam_correction_through_the_optimizer_pairing(ranks):
    """Reference, plain torch: each rank's own Adam moments of its gradient, ``c = e + lr *
    clip(m_hat / (sqrt(s_hat) + eps), 10)``, its top-k by ``c m / (sqrt(s) + eps)`` where positive
    sent (``adam_select="agreement"``), the average applied as ``p =
    p (1 - lr wd) - avg``; the dense biases take AdamW on their average. AdamW keeps no state
    for the corrected weights (their moments are the hook's, per rank)."""
    results = ranks.load("adam")
    P, b1, b2, eps, wd = ranks.world, 0.9, 0.999, 1e-8, 0.1
    params = {n: p.clone() for n, p in results[0]["initial"].items()}
    dense = {n: p.clone().requires_grad_() for n, p in params.items() if p.numel() < MIN_NUMEL}
    ref_opt = torch.optim.AdamW(list(dense.values()), lr=1e-2, weight_decay=wd)
    moments = {(r, n): [torch.zeros(p.numel()), torch.zeros(p.numel()), torch.zeros(p.numel())]
               for r in range(P) for n, p in params.items() if p.numel() >= MIN_NUMEL}
    for t in range(4):
        recs = [res["steps"][t] for res in results]
        ratio, lr = recs[0]["ratio"], recs[0]["lr"]
        for group in ref_opt.param_groups:
            group["lr"] = lr
        for n, p in dense.items():
            p.grad = sum(rec["grad_in"][n] for rec in recs) / P
        ref_opt.step()
        for n, p in params.items():
            if n in dense:
                params[n] = dense[n].detach().clone()
                continue
            avg = torch.zeros(p.numel())
            for r, rec in enumerate(recs):
                m, s, e = moments[(r, n)]
                g = rec["grad_in"][n].reshape(-1)
                m.lerp_(g, 1 - b1)
                s.mul_(b2).addcmul_(g, g, value=1 - b2)
                d = (m / (1 - b1 ** (t + 1))) / (s.sqrt() / (1 - b2 ** (t + 1)) ** 0.5 + eps)
                c = e + lr * d.clamp(-10, 10)
                sent = sent_by(c, ratio, weight=m / (s.sqrt() + eps))
                e.copy_(c - sent)
                avg += sent / P
            params[n] = p * (1 - lr * wd) - avg.view_as(p)
        for rec in recs:
            for n, p in params.items():
                torch.testing.assert_close(rec["after"][n], p, rtol=1e-5, atol=1e-7, msg=f"{n} step {t}")
    for res in results:
        assert res["opt_state"] == {n: n in dense for n in params}


def test_changing_corrected_gradients_after_backward_warns_once(ranks):
    """``clip_grad_norm_`` after ``backward()`` scales the averaged Adam steps: one warning, at
    that step, with either gradient layout; plain steps warn nothing."""
    for result in ranks.load("adam_clip"):
        for view, seen in result.items():
            assert [len(w) for w in seen] == [0, 0, 1, 0], (view, seen)
            assert "local_clip_norm" in seen[2][0]


def test_hook_makes_no_host_sync(ranks):
    for result in ranks.load("no_sync"):
        assert result["syncs"] == []


def test_imports_and_runs_without_horovod(tmp_path):
    """``import hvd_topk.ddp`` and a one-rank step of the sparse path with Horovod unimportable;
    ``hvd_topk``'s Horovod names then say what is missing."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["horovod"] = None  # any import of horovod now fails
        import torch, torch.distributed as dist
        import hvd_topk, hvd_topk.ddp
        assert "DistributedOptimizer" not in hvd_topk.__all__ and "cpu_kernel" in hvd_topk.__all__
        try:
            hvd_topk.DistributedOptimizer
        except ImportError as e:
            assert "needs Horovod" in str(e)
        else:
            raise AssertionError("hvd_topk.DistributedOptimizer without Horovod")
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        model = torch.nn.Linear(64, 8)
        state = hvd_topk.ddp.TopKState(model, ratio=0.1, min_numel=100, warmup_steps=0, density_aware=False)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(state, hvd_topk.ddp.topk_hook)
        ddp(torch.randn(4, 64)).square().sum().backward()
        assert int((model.weight.grad != 0).sum()) == 52  # k = ceil(0.1 * 512)
        assert state.steps == 1
        assert not [m for m, mod in sys.modules.items() if m.startswith("horovod") and mod is not None]
        dist.destroy_process_group()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=worker_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bucket_split_follows_the_horovod_paths_rule():
    """Each gradient's exchange is ``cost.choose_exchange``'s, among the hook's (the allgather
    and the sparse allreduce) and a dense allreduce: by bytes for a named exchange (a tie stays
    dense; one rank is evaluated as two), by the time model under "auto"."""
    named = TopKSettings(0.01, exchange="allgather")
    w = torch.zeros(10_000)  # P = 2: dense 2 (P-1)/P * 40000 = 40000 bytes, allgather 8 + 8 k
    assert build_plan(["w"], [w], named, 0.49975, 2).sparse == (0,)  # k = 4998: 39992 bytes
    assert build_plan(["w"], [w], named, 0.49985, 2).sparse == ()  # k = 4999: 40000, a tie
    assert build_plan(["w"], [w], named, 0.49975, 1).sparse == (0,)
    auto, big, bias = TopKSettings(0.01), torch.zeros(1_000_000), torch.zeros(10)
    for world, want in ((2, "allgather"), (64, "sparse_allreduce"), (256, "sparse_allreduce")):
        plan = build_plan(["w", "b"], [big, bias], auto, 0.01, world)
        assert choose_exchange(auto, big, world, 0.01) == want
        assert [g.exchange for g in plan.groups] == [want] and (plan.sparse, plan.dense) == ((0,), (1,))
    plan = build_plan(["w"], [big], TopKSettings(0.01, exchange="allgather"), 0.01, 256)
    assert plan.sparse == ()  # named, but it would move more bytes than a dense allreduce
    assert build_plan(["i"], [torch.zeros(100_000, dtype=torch.int64)], auto, 0.01, 2).sparse == ()


def test_warmup_sends_large_gradients_dense_while_their_exchange_outweighs_the_budget():
    """With the model's trained bytes, a gradient whose allgather would gather more than a
    quarter of the in-flight budget (an eighth of the model) at the warm-up's ratio, and more
    than it will at the final ratio, is allreduced densely; the small ones and the final
    ratio are untouched."""
    s = TopKSettings(0.01)
    big, small = torch.zeros(1 << 20), torch.zeros(1 << 14)  # 4 MiB and 64 KiB
    trained = 32 << 20  # a quarter of the budget: 1 MiB; big at 0.25: P K 8 = 4 MiB gathered
    plan = build_plan(["w", "v"], [big, small], s, 0.25, 2, trained_bytes=trained)
    assert (plan.sparse, plan.dense) == ((1,), (0,))
    assert build_plan(["w"], [big], s, 0.25, 2).sparse == (0,)  # no model size known: no limit
    assert build_plan(["w"], [big], s, 0.05, 2, trained_bytes=trained).sparse == (0,)  # 0.8 MiB
    # 8 ranks, the allgather named, the limit at its 1 MiB floor: at 2% it gathers 8 * 20972 *
    # 8 bytes, over the limit; a warm-up ratio that selects as many still goes sparse, one
    # that selects more does not.
    named = TopKSettings(0.02, exchange="allgather")
    for ratio, sparse in ((0.02, (0,)), (0.02 + 1e-9, (0,)), (0.022, ())):
        assert build_plan(["w"], [big], named, ratio, 8, trained_bytes=1 << 20).sparse == sparse, ratio


@pytest.mark.parametrize("kwargs,error,words", [
    ({"ratio": 0.0}, ValueError, "ratio must be in (0, 1]"),
    ({"ratio": 0.01, "exchange": "ring"}, ValueError, "exchange must be 'auto', 'allgather' or"),
    ({"ratio": 0.01, "group_bytes": 1 << 20}, TypeError, "does not take: ['group_bytes']"),
    ({"ratio": 0.01, "adam_correction": True}, ValueError, "adam_correction=True needs optimizer="),
    ({"ratio": 0.01, "momentum": 1.0}, ValueError, "momentum must be in [0, 1)"),
    ({"ratio": 0.01, "nesterov": True}, ValueError, "nesterov=True needs momentum > 0"),
])
def test_state_validates_its_arguments(kwargs, error, words):
    with pytest.raises(error) as info:
        from hvd_topk.ddp import TopKState
        TopKState(torch.nn.Linear(2, 2), **kwargs)
    assert words in str(info.value)


def test_adam_pairing_lengthens_an_automatic_warmup_below_one_percent(tmp_path):
    import torch.distributed as dist
    from hvd_topk.ddp import TopKState
    model = torch.nn.Linear(64, 8)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for optimizer, ratio, length in [(torch.optim.AdamW(model.parameters()), 0.001, 316),
                                         (torch.optim.AdamW(model.parameters()), 0.01, 100),
                                         (None, 0.001, 100)]:
            state = TopKState(model, ratio=ratio, optimizer=optimizer)
            schedule = []
            for steps in (0, length - 1, length):
                state.rank_state.steps = steps
                schedule.append(state.current_ratio())
            assert schedule[0] == 0.25 and schedule[1] > ratio and schedule[2] == ratio, schedule
    finally:
        dist.destroy_process_group()
