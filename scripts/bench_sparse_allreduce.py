"""How close the sparse allreduce's global selection is to the exact global top-k.

One process simulates P ranks through the pipeline's own pure steps
(``hvd_topk/sparse_allreduce.py``: ``to_regions`` -> ``reduce_region`` -> ``finish`` ->
``refresh_bounds``). Every rank r sends its exact local top-k of ``c_r``; ``u = sum_r c_r[S_r]``
is what those entries sum to (what the allgather path applies, times P). The sparse allreduce
applies ``u`` on its selection G of ``P ceil(k/P)`` positions (each region's largest sums, the
entries that fit the ``c = ceil(2k/P)`` slots). Printed per case, P and refresh round:

- *recall*: the share of the exact top-k of ``|u|`` (k positions) that G holds;
- *energy*: ``|u_G|^2 / |u_topk|^2``, the share of the exact top-k's squared mass G applies;
- *cut*: the share of the ranks' local entries that did not fit their region's slots.

Gradients: ``gaussian`` (i.i.d. per rank), ``shared`` (a common heavy-tailed signal plus
per-rank noise) and ``clustered`` (the shared signal concentrated in a few contiguous blocks of
the tensor, as rows of a weight matrix are: the case the regions must adapt to). Round 0 uses
equal regions; rounds 1-2 regions refreshed from the previous round's statistics (the same
distribution, a fresh draw). Run::

    python scripts/bench_sparse_allreduce.py --out docs/performance/sparse_allreduce/selection.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hvd_topk import num_selected
from hvd_topk import sparse_allreduce as sar
from hvd_topk.selection import GroupLayout


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--numel", type=int, default=1_000_000)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--worlds", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--capacity", type=float, default=2.0)
    p.add_argument("--out", default=None, help="write the table (markdown) here")
    return p.parse_args(argv)


def profile(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """(n,) the scale of the shared signal, fixed over the rounds (the model's structure)."""
    if kind != "clustered":
        return torch.ones(n)
    scale = torch.full((n,), 0.1)  # 4 hot blocks of 1% of the tensor each
    for start in torch.randint(0, n - n // 100, (4,), generator=gen).tolist():
        scale[start:start + n // 100] = 10.0
    return scale


def gradients(kind: str, scale: torch.Tensor, world: int, gen: torch.Generator):
    """(P, n) compensated gradients of one step: a fresh draw of the same distribution."""
    n = scale.numel()
    noise = torch.randn(world, n, generator=gen)
    if kind == "gaussian":
        return noise
    signal = torch.randn(n, generator=gen) * torch.empty(n).exponential_(generator=gen) * scale
    return signal + 0.5 * noise


def one_round(cs, layout, world, bounds, capacity):
    plan = sar.RegionPlan(layout, world, capacity)
    sig = torch.tensor([1], dtype=torch.int32)
    n, k = layout.numel, layout.k
    rows, cut, u = [], 0, torch.zeros(n)
    for c in cs:
        sel = torch.topk(c.abs(), k).indices
        payload, in_cap = sar.to_regions(sel, c[sel], plan, bounds, sig, torch.int32)
        rows.append(payload.view(world, -1))
        cut += int((~in_cap).sum())
        u.index_add_(0, sel, c[sel])
    header = torch.tensor([1, 0], dtype=torch.int32)
    owners = [sar.reduce_region(torch.stack([rows[r][j] for r in range(world)]).reshape(-1), plan, 1,
                                header, 1, torch.float32, torch.float32, torch.int32)
              for j in range(world)]
    out = torch.zeros(n)
    _, kept, stats = sar.finish(torch.cat(owners), plan, 2, torch.float32, torch.int32, out)
    chosen = kept.nonzero().squeeze(1)
    top = torch.topk(u.abs(), k).indices
    recall = torch.isin(top, chosen).float().mean().item()
    energy = (u[chosen].square().sum() / u[top].square().sum()).item()
    return recall, energy, cut / (world * k), sar.refresh_bounds(bounds, stats, layout)


def main(args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    n = args.numel
    k = num_selected(n, args.ratio)
    layout = GroupLayout((n,), (k,))
    lines = [f"n = {n:,}, ratio {args.ratio} (k = {k:,}), region capacity {args.capacity}", "",
             "| gradients | P | round | regions | recall of exact top-k | energy | cut by capacity |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for kind in ("gaussian", "shared", "clustered"):
        for world in args.worlds:
            gen = torch.Generator().manual_seed(world)
            bounds = sar.uniform_bounds(layout, world, "cpu")
            scale = profile(kind, n, gen)
            for rnd in range(args.rounds):
                cs = gradients(kind, scale, world, gen)
                recall, energy, cut, bounds = one_round(cs, layout, world, bounds, args.capacity)
                lines.append(f"| {kind} | {world} | {rnd} | {'equal' if rnd == 0 else 'refreshed'} | "
                             f"{100 * recall:.1f}% | {100 * energy:.1f}% | {100 * cut:.1f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main(parse_args())
