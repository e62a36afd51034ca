"""Alpha-beta model of dense ring allreduce vs Top-K allgather, from 2 hosts to 256.

Per step and rank (Thakur, Rabenseifner & Gropp 2005, ring algorithms; P workers, n gradient
entries of b bytes, k = ratio * n selected entries of b_v + b_i bytes, alpha the latency of one
message, beta the link's bandwidth in bytes/s)::

    allreduce (ring):  T_ar = 2 (P-1) alpha + 2 (P-1)/P * n b / beta
    allgather (ring):  T_ag =   (P-1) alpha +   (P-1)   * k (b_v + b_i) / beta
    step              = floor + T_comm (+ for Top-K: compress + P k * scatter cost)

The allgather's bytes grow with P while the allreduce's stay ~2 n b, so the sparse exchange
loses once P k (b_v + b_i) >= 2 n b, i.e. P >= 1/ratio with fp32 values and int32 indices. The
density-aware exchange (``hvd_topk.sparse_is_cheaper``) allreduces densely from there on.

Calibration (``--measured docs/performance/network.json`` from ``bench_network.py``): the floor,
the effective bandwidth ``beta = dense bytes on the wire / (dense step - floor)`` and the
Top-K 1% overhead ``step - floor - T_ag`` of each model and link. The 2-host rows of the other
methods (fp16, Top-K 0.1%) are held out and printed next to the model's prediction, and so are
3-host runs (``--measured-3``): their communication is predicted from the 2-host calibration
(only the compute floor is taken from the 3-host run, whose ranks share the same cores). Run::

    python scripts/scaling_model.py --measured docs/performance/network.json \
        --measured-3 docs/performance/hosts3/network.json --out-dir docs/performance
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List

import hvd_topk

RATES = {"1gbit": 1e9 / 8, "10gbit": 10e9 / 8}  # bytes/s
PARAMS = {"resnet18": 11_173_962, "mlp": 5_256_202, "mlp10m": 10_056_010}  # examples/models.py, 10 classes
WORLDS = [2, 8, 16, 32, 64, 128, 256]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--measured", default=None, help="network.json written by bench_network.py")
    p.add_argument("--alpha-us", type=float, default=50.0, help="per-message latency (us)")
    p.add_argument("--scatter-ns", type=float, default=2.0,
                   help="decompress cost per gathered entry (ns), scatter-add on one CPU core")
    p.add_argument("--measured-3", default=None,
                   help="network.json of a 3-host run (bench_network.py --hosts 3): predicted from "
                        "the 2-host calibration and its own floor, printed against the measurement")
    p.add_argument("--out-dir", default=None, help="write scaling.md and scaling.png")
    return p.parse_args(argv)


def ring_allreduce_s(p: int, nbytes: float, alpha: float, beta: float) -> float:
    """Seconds for a ring allreduce of ``nbytes`` per rank over ``p`` ranks."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes / beta


def ring_allgather_s(p: int, nbytes_per_rank: float, alpha: float, beta: float) -> float:
    """Seconds for a ring allgather where every rank contributes ``nbytes_per_rank``."""
    if p <= 1:
        return 0.0
    return (p - 1) * alpha + (p - 1) * nbytes_per_rank / beta


def predict(p: int, n: int, ratio: float, floor_s: float, compress_s: float, alpha: float,
            beta: float, scatter_s: float, value_bytes: int = 4, index_bytes: int = 4) -> Dict[str, float]:
    """Predicted step seconds of dense, Top-K (allgather always) and density-aware Top-K."""
    k = hvd_topk.num_selected(n, ratio)
    dense = floor_s + ring_allreduce_s(p, n * value_bytes, alpha, beta)
    sparse = (floor_s + compress_s + p * k * scatter_s
              + ring_allgather_s(p, k * (value_bytes + index_bytes), alpha, beta))
    cheaper = hvd_topk.sparse_is_cheaper(n, k, p, value_bytes, value_bytes + index_bytes)
    # Density-aware: the optimizer's decision (per tensor; here the model as a whole). The
    # dense path skips compress, so it costs exactly what dense training costs.
    aware = sparse if cheaper else dense
    return {"dense": dense, "topk": sparse, "aware": aware, "sparse_chosen": float(cheaper)}


def load_results(path: str) -> List[dict]:
    """bench_network.py's network.json: ``{"results": [...], "runs": [...]}`` (or, from older
    runs, the list of results itself)."""
    data = json.loads(Path(path).read_text())
    return data["results"] if isinstance(data, dict) else data


def calibrate(measured: List[dict], model: str, rate: str) -> Dict[str, float]:
    rows = {r["method"]: r for r in measured if r["model"] == model and r["rate"] == rate}
    floor = rows["none"]["step_ms"] / 1e3
    comm = max(rows["dense"]["step_ms"] / 1e3 - floor, 1e-6)
    beta = rows["dense"]["bytes_per_step"] / comm  # effective bytes/s, non-overlapped
    n = rows["dense"].get("params", PARAMS[model])
    k = hvd_topk.num_selected(n, 0.01)
    t_ag = ring_allgather_s(2, k * 8, 0.0, beta)
    compress = max(rows["topk1"]["step_ms"] / 1e3 - floor - t_ag, 0.0) if "topk1" in rows else 0.0
    return {"floor": floor, "beta": beta, "compress": compress, "n": n, "rows": rows}


def build(args: argparse.Namespace) -> str:
    measured = load_results(args.measured) if args.measured else []
    alpha, scatter = args.alpha_us * 1e-6, args.scatter_ns * 1e-9
    out = ["| model | link | P | dense ms | Top-K 1% allgather ms | Top-K 1% density-aware ms | "
           "exchange picked | Top-K 0.1% ms |", "|---|---|---:|---:|---:|---:|---|---:|"]
    checks, curves = [], {}
    for model in PARAMS:
        for rate, line_beta in RATES.items():
            if measured and any(r["model"] == model and r["rate"] == rate for r in measured):
                cal = calibrate(measured, model, rate)
            else:  # uncalibrated: nominal link, no floor
                cal = {"floor": 0.0, "beta": line_beta, "compress": 0.0, "n": PARAMS[model], "rows": {}}
            n = cal["n"]
            curve = []
            for p in WORLDS:
                r1 = predict(p, n, 0.01, cal["floor"], cal["compress"], alpha, cal["beta"], scatter)
                r01 = predict(p, n, 0.001, cal["floor"], cal["compress"], alpha, cal["beta"], scatter)
                curve.append((p, r1, r01))
                picked = "allgather" if r1["sparse_chosen"] else "allreduce"
                out.append(f"| {model} | {rate} | {p} | {1e3 * r1['dense']:.0f} | {1e3 * r1['topk']:.0f} | "
                           f"{1e3 * r1['aware']:.0f} | {picked} | {1e3 * r01['aware']:.0f} |")
            curves[(model, rate)] = curve
            rows = cal["rows"]
            for method, ratio, vb in (("fp16", None, 2), ("topk0.1", 0.001, 4)):
                if method not in rows:
                    continue
                if ratio is None:
                    pred = cal["floor"] + ring_allreduce_s(2, n * vb, alpha, cal["beta"])
                else:
                    pred = predict(2, n, ratio, cal["floor"], cal["compress"], alpha, cal["beta"],
                                   scatter)["topk"]
                checks.append(f"| {model} | {rate} | {method} | {1e3 * pred:.0f} | "
                              f"{rows[method]['step_ms']:.0f} |")
    text = "\n".join(out) + "\n"
    if args.measured_3:
        text += three_host_check(measured, load_results(args.measured_3), alpha, scatter)
    if checks:
        text += ("\nHeld-out 2-host check (not used to calibrate):\n\n| model | link | method | "
                 "predicted ms | measured ms |\n|---|---|---|---:|---:|\n" + "\n".join(checks) + "\n")
    crossover = math.ceil(1 / 0.01)
    text += (f"\nWith fp32 values and int32 indices the allgather moves more bytes than the ring "
             f"allreduce from P >= 1/ratio: P >= {crossover} at 1%, P >= 1000 at 0.1%.\n")
    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "scaling.md").write_text(text)
        plot(curves, out_dir / "scaling.png")
    return text


def three_host_check(measured2: List[dict], measured3: List[dict], alpha: float, scatter: float) -> str:
    """P = 3 predicted from the P = 2 calibration (beta, compress) and the 3-host floor."""
    lines = []
    for model in PARAMS:
        for rate in RATES:
            rows3 = {r["method"]: r for r in measured3 if r["model"] == model and r["rate"] == rate}
            if "none" not in rows3 or not any(r["model"] == model and r["rate"] == rate for r in measured2):
                continue
            cal = calibrate(measured2, model, rate)
            floor3, n = rows3["none"]["step_ms"] / 1e3, cal["n"]
            preds = {
                "dense": floor3 + ring_allreduce_s(3, n * 4, alpha, cal["beta"]),
                "fp16": floor3 + ring_allreduce_s(3, n * 2, alpha, cal["beta"]),
                "topk1": predict(3, n, 0.01, floor3, cal["compress"], alpha, cal["beta"], scatter)["topk"],
                "topk0.1": predict(3, n, 0.001, floor3, cal["compress"], alpha, cal["beta"], scatter)["topk"],
            }
            for method, pred in preds.items():
                if method in rows3:
                    got = rows3[method]["step_ms"]
                    ring_mb = _ring_bytes(3, n, method) / 1e6
                    # The same beta applied to the bytes the link really carried (MPI may not
                    # run a ring), plus the calibrated compression cost for Top-K.
                    extra = cal["compress"] if method.startswith("topk") else 0.0
                    by_bytes = floor3 + extra + rows3[method]["bytes_per_step"] / cal["beta"]
                    lines.append(f"| {model} | {rate} | {method} | {1e3 * pred:.0f} | "
                                 f"{100 * (1e3 * pred - got) / got:+.0f}% | {ring_mb:.2f} | "
                                 f"{rows3[method]['bytes_per_step'] / 1e6:.2f} | {1e3 * by_bytes:.0f} | "
                                 f"{100 * (1e3 * by_bytes - got) / got:+.0f}% | {got:.0f} |")
    if not lines:
        return ""
    return ("\n3-host check (from the 2-host calibration; only the compute floor is the 3-host "
            "run's). *ring*: the alpha-beta model; *wire*: the same beta over the bytes rank 0's "
            "link really carried:\n\n| model | link | method | ring ms | error | ring MB | wire MB | "
            "wire ms | error | measured ms |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
            + "\n".join(lines) + "\n")


def _ring_bytes(p: int, n: int, method: str) -> float:
    """Bytes one rank sends per step in the model (ring algorithms)."""
    if method in ("dense", "fp16"):
        return 2 * (p - 1) / p * n * (4 if method == "dense" else 2)
    k = hvd_topk.num_selected(n, 0.01 if method == "topk1" else 0.001)
    return (p - 1) * k * 8


def plot(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.8), squeeze=False)
    for ax, ((model, rate), curve) in zip(axes[0], curves.items()):
        ps = [c[0] for c in curve]
        ax.plot(ps, [1e3 * c[1]["dense"] for c in curve], "o-", label="dense allreduce")
        ax.plot(ps, [1e3 * c[1]["topk"] for c in curve], "s--", label="Top-K 1%, allgather")
        ax.plot(ps, [1e3 * c[1]["aware"] for c in curve], "^-", label="Top-K 1%, density-aware")
        ax.plot(ps, [1e3 * c[2]["aware"] for c in curve], "v-", label="Top-K 0.1%, density-aware")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers P")
        ax.set_title(f"{model}, {rate}")
    axes[0][0].set_ylabel("predicted step time (ms)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace) -> str:
    text = build(args)
    print(text)
    return text


if __name__ == "__main__":
    main(parse_args())
