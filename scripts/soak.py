"""Soak test: many small Top-K steps on several ranks with random per-rank dynamic graphs.

Each step every rank draws, from its own RNG seeded by (seed, rank, step), a batch size and a
subset of the model's branches (an embedding path, a dense input path, several residual
blocks); some steps a rank does no backward at all. Parameters a rank did not use get no
gradient there, and ``hvd_topk.DistributedOptimizer`` sends zeros for them, so every rank
must still apply the same update. The run fails (exit code 1) when

1. the parameters and SGD momentum buffers differ between ranks, bitwise (a SHA-256 of them
   is allgathered every ``--check-every`` steps, and all parameters at the end), or
2. the error-feedback residuals grow without bound: the largest residual L2 norm of the
   last quarter of the steps after the Top-K warm-up exceeds ``--growth-limit`` times that
   of the first quarter (during the warm-up the ratio decays, so residuals rightly grow),
   or any residual, loss or parameter is non-finite.

Rank 0 prints a summary: steps, wall time, the largest residual norm per quarter, and the
bytes sent as a share of what dense allreduces would send.

Run it from a shell; it starts its own ranks (horovodrun --gloo, or mpirun) and kills the
whole process group when ``--timeout`` runs out::

    python scripts/soak.py --np 4 --steps 3000
    python scripts/soak.py --np 2 --steps 200 --backend mpi --ratio 0.001
    horovodrun -np 4 python scripts/soak.py --steps 3000   # already inside a job: runs as a rank
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Set by horovodrun (HOROVOD_RANK) or by mpirun (OMPI_COMM_WORLD_RANK, PMI_RANK).
RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--np", type=int, default=4, help="ranks to start (on this machine)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--ratio", type=float, default=0.01, help="Top-K ratio")
    p.add_argument("--min-numel", type=int, default=256,
                   help="tensors smaller than this go dense (small, so this small model goes sparse)")
    p.add_argument("--backend", default="gloo", choices=["gloo", "mpi"],
                   help="gloo: horovodrun --gloo; mpi: mpirun")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds before every rank is killed and the soak fails")
    p.add_argument("--seed", type=int, default=1234, help="model init and every rank's draws")
    p.add_argument("--lr", type=float, default=0.02, help="SGD learning rate")
    p.add_argument("--max-batch", type=int, default=16, help="per-rank batch size is drawn from 1..this")
    p.add_argument("--idle-prob", type=float, default=0.05,
                   help="probability that a rank does no backward at a step (all its grads None)")
    p.add_argument("--check-every", type=int, default=100,
                   help="compare a hash of the parameters across ranks every N steps")
    p.add_argument("--growth-limit", type=float, default=10.0,
                   help="fail if the last quarter's max residual norm exceeds this times the first's")
    p.add_argument("--diverge-at", type=int, default=-1, help=argparse.SUPPRESS)  # tests: the
    # last rank perturbs a parameter after this step, so the soak must report a disagreement
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args(argv)
    if args.steps < 4:
        p.error(f"--steps must be >= 4 (the report is per quarter), got {args.steps}")
    if args.np < 1:
        p.error(f"--np must be >= 1, got {args.np}")
    return args


# -- launcher (a copy of tests/launch.py's logic: scripts import nothing from tests/) -------------
def launcher(backend: str, np: int) -> list:
    if backend == "gloo":
        return [str(Path(sys.executable).parent / "horovodrun"), "-np", str(np),
                "-H", f"localhost:{np}", "--gloo"]
    cmd = [shutil.which("mpirun") or "mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none",
           "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo",
           "-x", "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED", "-x", "PYTHONPATH"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


def launch(args, argv) -> int:
    """Re-run this script as ``args.np`` ranks; kill the whole process group on a timeout."""
    cmd = launcher(args.backend, args.np) + [sys.executable, str(Path(__file__).resolve()),
                                              *argv, "--worker"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        proc.wait()
        print(f"soak: FAIL (hung: killed after {args.timeout:.0f}s)", flush=True)
        return 124
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    print(f"soak: launcher exited {rc} after {time.time() - t0:.1f}s (including start-up)", flush=True)
    return rc


# -- the ranks --------------------------------------------------------------------------------
def build_model(torch, nn):
    """Two input paths, four residual blocks and a head: a few thousand parameters each."""

    class Branchy(nn.Module):
        VOCAB, DIM, FEATURES, HIDDEN, BLOCKS, OUT = 256, 32, 24, 96, 4, 8

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(self.VOCAB, self.DIM, sparse=False)  # 8192
            self.dense_in = nn.Linear(self.FEATURES, self.DIM)  # 768 + 32
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(self.DIM, self.HIDDEN), nn.Tanh(),
                              nn.Linear(self.HIDDEN, self.DIM))  # 3072 + 96 + 3072 + 32
                for _ in range(self.BLOCKS))
            self.head = nn.Linear(self.DIM, self.OUT)  # 256 + 8

        def forward(self, tokens, features, use_embed, use_dense, blocks):
            h = 0
            if use_embed:
                h = h + self.embed(tokens)  # (B, DIM)
            if use_dense:
                h = h + self.dense_in(features)  # (B, DIM)
            for i in blocks:
                h = h + self.blocks[i](h)
            return self.head(h)  # (B, OUT)

    return Branchy()


def draw(seed: int, rank: int, step: int, args, model, torch):
    """This rank's batch and graph for this step; a pure function of (seed, rank, step)."""
    rng = random.Random(f"soak-{seed}-{rank}-{step}")
    if rng.random() < args.idle_prob:
        return None
    batch = rng.randint(1, args.max_batch)
    use_embed = rng.random() < 0.7
    use_dense = rng.random() < 0.7 or not use_embed  # at least one input path
    blocks = [i for i in range(model.BLOCKS) if rng.random() < 0.5]
    gen = torch.Generator().manual_seed(rng.getrandbits(62))
    tokens = torch.randint(0, model.VOCAB, (batch,), generator=gen)  # (B,)
    features = torch.randn(batch, model.FEATURES, generator=gen)  # (B, FEATURES)
    return tokens, features, use_embed, use_dense, blocks


def state_digest(model, opt) -> bytes:
    """SHA-256 of every parameter and every SGD momentum buffer, in parameter order."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
        buf = opt.state.get(p, {}).get("momentum_buffer")
        h.update(b"-" if buf is None else buf.contiguous().numpy().tobytes())
    return h.digest()


def worker(args) -> int:
    import horovod.torch as hvd
    import torch
    import torch.nn.functional as F
    from torch import nn

    import hvd_topk
    from hvd_topk import CommStats

    hvd.init()
    torch.set_num_threads(1)
    rank, world = hvd.rank(), hvd.size()
    rank0 = rank == 0
    torch.manual_seed(args.seed)
    model = build_model(torch, nn)
    torch.manual_seed(args.seed + 1)
    teacher = build_model(torch, nn).requires_grad_(False)  # the same fixed target on every rank
    every_block = list(range(model.BLOCKS))

    comp = hvd_topk.TopKCompressor(ratio=args.ratio, min_numel=args.min_numel)
    opt = hvd_topk.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        named_parameters=model.named_parameters(), compression=comp, log_every=0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    if rank0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"soak: {world} ranks, {args.steps} steps, {n_params} params in "
              f"{len(list(model.parameters()))} tensors, {comp!r}", flush=True)

    def digests_agree() -> bool:
        mine = torch.frombuffer(bytearray(state_digest(model, opt)), dtype=torch.uint8)  # (32,)
        return bool((hvd.allgather(mine).view(world, -1) == mine).all())  # (world, 32)

    resid_max = []  # per step: the largest residual L2 norm on this rank
    nonfinite = []  # steps where this rank saw a non-finite loss or residual
    first_mismatch = -1
    log_every = max(1, args.steps // 10)
    # Quarters are taken over the steps after the warm-up, when there are enough of them.
    warm = comp.warmup_steps if args.steps - comp.warmup_steps >= 4 else 0
    at_warm = CommStats()
    t0 = time.time()
    for step in range(args.steps):
        opt.zero_grad()
        drawn = draw(args.seed, rank, step, args, model, torch)
        loss = None
        if drawn is not None:
            tokens, features, use_embed, use_dense, blocks = drawn
            with torch.no_grad():
                target = teacher(tokens, features, True, True, every_block)  # (B, OUT)
            loss = F.mse_loss(model(tokens, features, use_embed, use_dense, blocks), target)
            loss.backward()
        opt.step()
        if step == args.diverge_at and rank == world - 1:
            with torch.no_grad():
                model.head.bias[0] += 1e-6
        if step + 1 == warm:
            at_warm = CommStats(**asdict(opt.comm_totals))
        norms = comp.state.residuals.norms().values()
        peak = max(norms, default=0.0)
        resid_max.append(peak)
        if not math.isfinite(peak) or (loss is not None and not math.isfinite(loss.item())):
            nonfinite.append(step)
        if (step + 1) % args.check_every == 0 and first_mismatch < 0 and not digests_agree():
            first_mismatch = step + 1
        if rank0 and (step + 1) % log_every == 0:
            print(f"soak: step {step + 1:6d}  {time.time() - t0:7.1f}s  "
                  f"loss {'-' if loss is None else f'{loss.item():.4g}'}  "
                  f"max residual (last {log_every} steps) {max(resid_max[-log_every:]):.4g}", flush=True)
    wall = time.time() - t0

    # Verdict from allgathered data, so that every rank reaches the same exit code.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # (n_params,)
    everyone = hvd.allgather(flat.unsqueeze(0))  # (world, n_params)
    identical = all(torch.equal(everyone[r], flat) for r in range(world))
    max_diff = (everyone - flat).abs().max().item()
    final_agree = digests_agree()
    steady = resid_max[warm:]
    q = len(steady) // 4
    quarters = [max(steady[i * q:(i + 1) * q if i < 3 else None]) for i in range(4)]
    per_rank = hvd.allgather(torch.tensor([quarters + [float(len(nonfinite))]],
                                          dtype=torch.float64))  # (world, 5)
    quarters = per_rank[:, :4].max(0).values.tolist()
    bad_steps = int(per_rank[:, 4].sum().item())
    tot = opt.comm_totals
    stats = hvd.allgather(torch.tensor([[tot.bytes_sent, tot.dense_bytes,
                                         tot.bytes_sent - at_warm.bytes_sent,
                                         tot.dense_bytes - at_warm.dense_bytes]],
                                       dtype=torch.float64)).sum(0)  # (4,)
    share = (stats[0] / stats[1]).item() if stats[1] else 1.0
    steady_share = (stats[2] / stats[3]).item() if stats[3] else 1.0
    finite = (bad_steps == 0 and all(math.isfinite(x) for x in quarters)
              and bool(torch.isfinite(everyone).all()))
    bounded = finite and quarters[3] <= args.growth_limit * max(quarters[0], 1e-12)

    failures = []
    if not identical or not final_agree or first_mismatch > 0:
        failures.append(f"ranks disagree (first hash mismatch at step {first_mismatch}, "
                        f"final max |diff| {max_diff:.3g})")
    if not finite:
        failures.append(f"non-finite values ({bad_steps} rank-steps with a non-finite loss/residual)")
    elif not bounded:
        failures.append(f"residuals grew: last quarter {quarters[3]:.4g} > {args.growth_limit:g} x "
                        f"first quarter {quarters[0]:.4g}")
    if rank0:
        print("soak: summary", flush=True)
        print(f"  steps            {args.steps} on {world} ranks, ratio {args.ratio}, "
              f"min_numel {args.min_numel}, seed {args.seed}")
        print(f"  wall time        {wall:.1f} s ({1e3 * wall / args.steps:.1f} ms/step)")
        print(f"  max residual L2  steps {warm + 1}-{args.steps} in quarters: "
              + "  ".join(f"Q{i + 1} {x:.4g}" for i, x in enumerate(quarters))
              + f"  (Q4/Q1 {quarters[3] / max(quarters[0], 1e-12):.2f}, limit {args.growth_limit:g})")
        after = f", {100 * steady_share:.2f}% after the warm-up" if warm else ""
        print(f"  bytes sent       {100 * share:.2f}% of dense allreduce bytes overall{after} "
              f"({stats[0].item() / 1e6:.2f} MB sent by all ranks)")
        print(f"  ranks identical  {identical and final_agree and first_mismatch < 0} "
              f"(hash compared every {args.check_every} steps and at the end; max |diff| {max_diff:.3g})")
        verdict = "PASS" if not failures else "FAIL: " + "; ".join(failures)
        print(f"soak: {verdict} {args.steps} steps on {world} ranks in {wall:.1f}s", flush=True)
    hvd.shutdown()
    return 1 if failures else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    if args.worker or any(v in os.environ for v in RANK_VARS):
        return worker(args)
    return launch(args, argv)


if __name__ == "__main__":
    sys.exit(main())
