"""The library's time model (``hvd_topk/cost.py``, what ``TopKCompressor(exchange="auto")``
chooses by) for dense ring allreduce, Top-K allgather and Top-K sparse allreduce, from 2 workers
to 1024.

Per step and rank (P workers, n gradient entries of b bytes, k = ratio * n selected entries,
alpha the latency of one message, beta the link's bandwidth in bytes/s; the bytes are the wire's
own byte model, ``hvd_topk.exchange_bytes``)::

    allreduce (ring):         T_ar  = bytes_dense / beta                      (2 (P-1)/P n b)
    allgather (ring):         T_ag  = bytes_allgather / beta + scatter P k    ((P-1) k entries)
    sparse allreduce:         T_sar = (P-1) alpha + bytes_sar / beta + owner k + scatter P R
                                      (~3 k (P-1)/P entries; an unfused alltoall, then an allgather)
    step = floor + T (+ for Top-K: its compression)

Horovod fuses a step's allreduces and allgathers, so only the alltoall adds messages.
The allgather's bytes grow with P while the allreduce's stay ~2 n b: the allgather loses from
P ~ 1/ratio. The sparse allreduce's stay near 3 k b_entry whatever P, so only its 2 (P-1)
latencies and its owners' work grow. "auto" is what the time model picks (the whole model taken
as one tensor here; the optimizer decides per tensor).

Calibration (``--measured docs/performance/network.json`` from ``bench_network.py``, 2 hosts):
the floor, the effective bandwidth ``beta = dense bytes on the wire / (dense step - floor)`` and
the Top-K 1% overhead ``step - floor - T_ag`` of each model and link. ``--measured-sar`` (runs
of ``bench_network.py --hosts 3 / 4 --methods ...,topk1ag,topk1sar``): the sparse allreduce's
owners' work per selected entry (``owner`` in ``hvd_topk.cost.COMPUTE_NS``), and a check of
every such run against the model (its step time from the 2-host calibration and its own
floor, its bytes on rank 0's link against the byte model). Models without a measurement
(ResNet-50) use the nominal link and no floor: communication time only. Run::

    python scripts/scaling_model.py --measured docs/performance/network.json \
        --measured-3 docs/performance/hosts3/network.json \
        --measured-sar docs/performance/sparse_allreduce/hosts3/network.json \
                       docs/performance/sparse_allreduce/hosts4/network.json --out-dir docs/performance
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import hvd_topk
from hvd_topk.cost import CostModel, exchange_times, fastest_exchange
from hvd_topk.exchange import EXCHANGES, ring_allreduce_bytes

RATES = {"1gbit": 1e9 / 8, "10gbit": 10e9 / 8, "100gbit": 100e9 / 8}  # bytes/s
PARAMS = {"resnet18": 11_173_962, "mlp": 5_256_202, "mlp10m": 10_056_010,  # examples/models.py
          "resnet50": 25_557_032}  # torchvision resnet50, 1000 classes: not measured here
WORLDS = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
EXCHANGE_LABEL = {"dense": "allreduce", "allgather": "allgather", "sparse_allreduce": "sparse allreduce"}


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
    p.add_argument("--measured-sar", nargs="*", default=[],
                   help="network.json of runs with topk*ag / topk*sar methods on 3+ hosts")
    p.add_argument("--out-dir", default=None, help="write scaling.md and scaling.png")
    return p.parse_args(argv)


def model_for(n: int, compress_s: float, alpha: float, beta: float, scatter_s: float,
              sar_entry_s: float = 0.0) -> CostModel:
    """The library's ``CostModel`` for a link of ``alpha`` s latency and ``beta`` bytes/s and a
    model of ``n`` entries whose Top-K compression costs ``compress_s`` per step."""
    return CostModel(link_gbps=8 * beta / 1e9, latency_us=1e6 * alpha, select_ns=1e9 * compress_s / n,
                     scatter_ns=1e9 * scatter_s, owner_ns=1e9 * sar_entry_s)


def comm_s(p: int, n: int, grad_bytes: int, beta: float) -> float:
    """Seconds a dense ring allreduce of ``n`` entries of ``grad_bytes`` takes over ``p`` ranks."""
    return ring_allreduce_bytes(n * grad_bytes, p) / beta


def predict(p: int, n: int, ratio: float, floor_s: float, compress_s: float, alpha: float,
            beta: float, scatter_s: float, value_bytes: int = 4, index_bytes: int = 4,
            sar_entry_s: float = 0.0, capacity: float = 2.0) -> Dict[str, float]:
    """Predicted step seconds of dense, Top-K allgather, Top-K sparse allreduce, and of what
    the time model picks (``auto``; ``chosen`` names it): ``floor_s`` plus
    ``hvd_topk.exchange_times``. ``sar_entry_s``: the sparse allreduce's owners' work per
    selected entry (bucketing, the owners' sorts and sums). ``p >= 2``."""
    if p < 2:
        raise ValueError("the model is for 2 or more workers")
    k = hvd_topk.num_selected(n, ratio)
    costs = hvd_topk.exchange_bytes(n, k, p, value_bytes, value_bytes, index_bytes, capacity)
    model = model_for(n, compress_s, alpha, beta, scatter_s, sar_entry_s)
    comm = exchange_times(n, k, p, value_bytes, value_bytes, index_bytes, capacity, model)
    chosen = fastest_exchange(comm, EXCHANGES)
    times = {e: floor_s + t for e, t in comm.items()}
    return {**times, "auto": times[chosen], "chosen": chosen,
            **{f"bytes_{e}": float(b) for e, b in costs.items()}}


def load_multi_host(path: str) -> Tuple[int, List[dict]]:
    """A multi-host network.json: ``(hosts, results)``, the host count bench_network.py
    recorded (``--hosts``) and its results."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "hosts" not in data:
        raise SystemExit(f"{path}: no host count (written by an older bench_network.py)")
    return int(data["hosts"]), data["results"]


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
    t_ag = predict(2, n, 0.01, 0.0, 0.0, 0.0, beta, 0.0)["allgather"]  # its bytes alone
    compress = max(rows["topk1"]["step_ms"] / 1e3 - floor - t_ag, 0.0) if "topk1" in rows else 0.0
    return {"floor": floor, "beta": beta, "compress": compress, "n": n, "rows": rows, "sar_entry": 0.0}


def sar_entry(cal: Dict[str, float], rows: Dict[str, dict], p: int, alpha: float, scatter: float) -> float:
    """The sparse allreduce's extra work per selected entry at ``p`` hosts (bucketing, the
    owners' sorts and sums): its measured Top-K 1% step minus the allgather's, minus what the
    model already explains of the difference, over k."""
    if "topk1sar" not in rows or "topk1ag" not in rows:
        return 0.0
    base = dict(floor_s=rows["none"]["step_ms"] / 1e3 if "none" in rows else cal["floor"],
                compress_s=cal["compress"], alpha=alpha, beta=cal["beta"], scatter_s=scatter)
    r = predict(p, cal["n"], 0.01, **base)
    measured = (rows["topk1sar"]["step_ms"] - rows["topk1ag"]["step_ms"]) / 1e3
    extra = max(measured - (r["sparse_allreduce"] - r["allgather"]), 0.0)
    return extra / hvd_topk.num_selected(cal["n"], 0.01)


def build(args: argparse.Namespace) -> str:
    measured = load_results(args.measured) if args.measured else []
    sar_runs = [load_multi_host(path) for path in args.measured_sar]
    alpha, scatter = args.alpha_us * 1e-6, args.scatter_ns * 1e-9
    out = ["| model | link | calibrated | P | dense ms | Top-K 1% allgather ms | Top-K 1% sparse "
           "allreduce ms | Top-K 1% auto ms | auto picks | Top-K 0.1% auto ms | picks |",
           "|---|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
    checks, curves, cals = [], {}, {}
    for model in PARAMS:
        for rate, line_beta in RATES.items():
            calibrated = bool(measured) and any(r["model"] == model and r["rate"] == rate for r in measured)
            if calibrated:
                cal = calibrate(measured, model, rate)
            else:  # uncalibrated: nominal link, no floor
                cal = {"floor": 0.0, "beta": line_beta, "compress": 0.0, "n": PARAMS[model], "rows": {},
                       "sar_entry": 0.0}
            # The sparse allreduce's extra work, from the run with the fewest hosts (these
            # hosts share 2 cores: the fewer, the less the sharing inflates compute).
            for hosts, runs in sorted(sar_runs, key=lambda hr: -hr[0]):
                rows = {r["method"]: r for r in runs if r["model"] == model and r["rate"] == rate}
                if calibrated and rows:
                    cal["sar_entry"] = sar_entry(cal, rows, hosts, alpha, scatter)
            cals[(model, rate)] = cal
            n = cal["n"]
            kw = dict(floor_s=cal["floor"], compress_s=cal["compress"], alpha=alpha, beta=cal["beta"],
                      scatter_s=scatter, sar_entry_s=cal["sar_entry"])
            curve = []
            for p in WORLDS:
                r1, r01 = predict(p, n, 0.01, **kw), predict(p, n, 0.001, **kw)
                curve.append((p, r1, r01))
                out.append(f"| {model} | {rate} | {'yes' if calibrated else 'no'} | {p} | "
                           f"{1e3 * r1['dense']:.0f} | "
                           f"{1e3 * r1['allgather']:.0f} | {1e3 * r1['sparse_allreduce']:.0f} | "
                           f"{1e3 * r1['auto']:.0f} | {EXCHANGE_LABEL[r1['chosen']]} | "
                           f"{1e3 * r01['auto']:.0f} | {EXCHANGE_LABEL[r01['chosen']]} |")
            curves[(model, rate)] = curve
            rows = cal["rows"]
            for method, ratio, vb in (("fp16", None, 2), ("topk0.1", 0.001, 4)):
                if method not in rows:
                    continue
                if ratio is None:
                    pred = cal["floor"] + comm_s(2, n, vb, cal["beta"])
                else:
                    pred = predict(2, n, ratio, cal["floor"], cal["compress"], alpha, cal["beta"],
                                   scatter)["allgather"]
                checks.append(f"| {model} | {rate} | {method} | {1e3 * pred:.0f} | "
                              f"{rows[method]['step_ms']:.0f} |")
    text = "\n".join(out) + "\n"
    extras = [f"{m} {r}: {1e9 * c['sar_entry']:.0f} ns" for (m, r), c in cals.items() if c["sar_entry"]]
    if extras:
        text += ("\nThe sparse allreduce's extra work per selected entry, calibrated on the "
                 "fewest-host `--measured-sar` run (its hosts share 2 cores): " + "; ".join(extras) + ".\n")
    text += wins(curves)
    if args.measured_3:
        text += three_host_check(measured, load_results(args.measured_3), alpha, scatter)
    if sar_runs:
        text += sar_check(cals, sar_runs, alpha, scatter)
    if checks:
        text += ("\nHeld-out 2-host check (not used to calibrate):\n\n| model | link | method | "
                 "predicted ms | measured ms |\n|---|---|---|---:|---:|\n" + "\n".join(checks) + "\n")
    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "scaling.md").write_text(text)
        plot(curves, out_dir / "scaling.png")
    return text


def wins(curves) -> str:
    """Per model and link: where each exchange is the fastest Top-K 1% option, and whether
    Top-K 1% (auto) beats dense up to the largest P."""
    lines = ["\nWhere each exchange is fastest (Top-K 1%), and whether auto beats dense:\n",
             "| model | link | allgather fastest at P | sparse allreduce fastest at P | dense fastest at P "
             "| auto < dense up to P |", "|---|---|---|---|---|---|"]
    for (model, rate), curve in curves.items():
        best = {"dense": [], "allgather": [], "sparse_allreduce": []}
        beats = 0  # the largest P up to which auto beats dense at every P
        for p, r1, _ in curve:
            best[min(EXCHANGES, key=lambda e: r1[e])].append(p)
        for p, r1, _ in curve:
            if r1["auto"] >= r1["dense"]:
                break
            beats = p
        lines.append(f"| {model} | {rate} | " + " | ".join(_span(best[e]) for e in
                                                          ("allgather", "sparse_allreduce", "dense"))
                     + f" | {beats or '-'} |")
    return "\n".join(lines) + "\n"


def _span(ps: List[int]) -> str:
    return ", ".join(map(str, ps)) if ps else "-"


def sar_check(cals, sar_runs, alpha: float, scatter: float) -> str:
    """Each 3+-host run against the model: step time (the 2-host calibration, the run's own
    floor, the calibrated sparse-allreduce extra) and rank 0's bytes against the byte model."""
    lines = []
    for p, runs in sar_runs:
        for r in runs:
            cal = cals.get((r["model"], r["rate"]))
            if cal is None or r["method"] == "none":
                continue
            floor_rows = [q for q in runs if q["model"] == r["model"] and q["rate"] == r["rate"]
                          and q["method"] == "none"]
            floor = floor_rows[0]["step_ms"] / 1e3 if floor_rows else cal["floor"]
            kw = dict(floor_s=floor, compress_s=cal["compress"], alpha=alpha, beta=cal["beta"],
                      scatter_s=scatter, sar_entry_s=cal["sar_entry"])
            m = r["method"]
            if m == "dense":
                pred = predict(p, cal["n"], 0.01, **kw)["dense"]
            else:
                ratio = 0.01 if m.startswith("topk1") else 0.001
                exchange = "sparse_allreduce" if m.endswith("sar") else "allgather"
                pred = predict(p, cal["n"], ratio, **kw)[exchange]
            wire, model_b = r["bytes_per_step"], r.get("model_bytes")
            lines.append(f"| {r['model']} | {r['rate']} | {p} | {m} | {r['step_ms']:.0f} | "
                         f"{1e3 * pred:.0f} | "
                         f"{100 * (1e3 * pred - r['step_ms']) / r['step_ms']:+.0f}% | {wire / 1e6:.3f} | "
                         + (f"{model_b / 1e6:.3f} | {100 * (wire - model_b) / model_b:+.1f}% |"
                            if model_b else "- | - |"))
    if not lines:
        return ""
    return ("\nMulti-host runs (`bench_network.py --hosts 3 / 4`) against the model: step time from "
            "the 2-host calibration and the run's own floor; bytes rank 0's link carried (TCP/IP "
            "headers included) against the byte model (`comm_stats.link_bytes`):\n\n"
            "| model | link | hosts | method | measured ms | model ms | error | wire MB | model MB | "
            "wire vs model |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n")


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
                "dense": floor3 + comm_s(3, n, 4, cal["beta"]),
                "fp16": floor3 + comm_s(3, n, 2, cal["beta"]),
                "topk1": predict(3, n, 0.01, floor3, cal["compress"], alpha, cal["beta"],
                                 scatter)["allgather"],
                "topk0.1": predict(3, n, 0.001, floor3, cal["compress"], alpha, cal["beta"],
                                   scatter)["allgather"],
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
    return ("\n3-host check of the older runs (Open MPI's default algorithms, not rings: "
            "from the 2-host calibration; only the compute floor is the 3-host "
            "run's). *ring*: the alpha-beta model; *wire*: the same beta over the bytes rank 0's "
            "link really carried:\n\n| model | link | method | ring ms | error | ring MB | wire MB | "
            "wire ms | error | measured ms |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
            + "\n".join(lines) + "\n")


def _ring_bytes(p: int, n: int, method: str) -> float:
    """Bytes one rank's link carries per step in the byte model (``exchange_bytes``; ring
    algorithms, the Top-K methods by allgather)."""
    if method in ("dense", "fp16"):
        return ring_allreduce_bytes(n * (4 if method == "dense" else 2), p)
    k = hvd_topk.num_selected(n, 0.01 if method == "topk1" else 0.001)
    return hvd_topk.exchange_bytes(n, k, p, 4, 4, 4)["allgather"]


def plot(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in curves if key[0] in ("resnet18", "resnet50", "mlp10m")]
    cols = len(RATES)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (model, rate) in zip(axes.flat, keys):
        curve = curves[(model, rate)]
        ps = [c[0] for c in curve]
        ax.plot(ps, [1e3 * c[1]["dense"] for c in curve], "o-", label="dense allreduce")
        ax.plot(ps, [1e3 * c[1]["allgather"] for c in curve], "s--", label="Top-K 1%, allgather")
        ax.plot(ps, [1e3 * c[1]["sparse_allreduce"] for c in curve], "^-", label="Top-K 1%, sparse allreduce")
        ax.plot(ps, [1e3 * c[2]["auto"] for c in curve], "v:", label="Top-K 0.1%, auto")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers P")
        ax.set_title(f"{model}, {rate}", fontsize=9)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    axes[0][0].set_ylabel("predicted step time (ms)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(args: argparse.Namespace) -> str:
    text = build(args)
    print(text)
    return text


if __name__ == "__main__":
    main(parse_args())
