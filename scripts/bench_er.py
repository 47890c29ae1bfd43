"""Effective ranks on the device: an SVD (svdvals, float32: the engine before) against the
Gram matrix's eigenvalues in float64 (archsearch.cvfp.metrics, now), timed and compared; JSON out.

    python scripts/bench_er.py --out benchmarks/h200_er.json

Per context width C (768, 1152: the report's) and row count (the 10,000 rows that
engine.er_max_rows samples; 31,023: a whole validation cache, more than the cap, for scale),
on three inputs: Gaussian, LayerNorm'd uncentred rows with a few dominant directions (what
contexts look like), and a matrix with a condition number of 1e6. Then the contexts and the last
validation cache of one real engine run (baseline, 62,891 tokens, random data as
scripts/bench_gpu.py; ``--no-real`` leaves it out). Times are medians of ``--repeats`` calls
with a device synchronisation around each, the row sampling included, as the engine calls it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from archsearch.cvfp.metrics import effective_rank  # noqa: E402


def svd_effective_rank(x: torch.Tensor, max_rows: int, generator: torch.Generator) -> float:
    """The engine's effective rank before: svdvals of the float32 rows."""
    n, c = x.shape
    if n > max_rows:
        x = x[torch.randperm(n, generator=generator)[:max_rows].to(x.device)]
    s = torch.linalg.svdvals(x.float())
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p + 1e-10)).sum())) / c


def oracle(x: torch.Tensor, max_rows: int, seed: int) -> float:
    """float64 SVD on the CPU of the same rows (reference.py's definition)."""
    from archsearch.cvfp.reference import Reference

    return Reference.effective_rank(x.double().cpu(), max_rows, torch.Generator().manual_seed(seed))


def timed(fn, device, repeats: int) -> tuple[float, float]:
    times, value = [], math.nan
    for _ in range(repeats + 1):  # the first call: warm-up (cuSOLVER handles, workspaces)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), value


def inputs(n: int, c: int, device, g: torch.Generator):
    yield "gaussian", torch.randn(n, c, generator=g).to(device)
    k = 8
    x = torch.randn(n, k, generator=g) @ (3 * torch.randn(k, c, generator=g)) + torch.randn(n, c, generator=g)
    yield "layernormed, 8 dominant directions", torch.nn.functional.layer_norm(x + 2.0, (c,)).to(device)
    u, _ = torch.linalg.qr(torch.randn(n, c, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    yield "condition 1e6", ((u * torch.logspace(0, -6, c, dtype=torch.float64)) @ v.T).float().to(device)


def compare(name, x, max_rows, device, repeats) -> dict:
    t_svd, er_svd = timed(lambda: svd_effective_rank(x, max_rows, torch.Generator().manual_seed(0)), device, repeats)
    t_gram, er_gram = timed(lambda: effective_rank(x, max_rows, torch.Generator().manual_seed(0)), device, repeats)
    ref = oracle(x, max_rows, 0)
    row = {"input": name, "rows": int(x.shape[0]), "C": int(x.shape[1]), "max_rows": max_rows,
           "svd_ms": 1e3 * t_svd, "gram_ms": 1e3 * t_gram, "speedup": t_svd / t_gram,
           "er_svd_fp32": er_svd, "er_gram_fp64": er_gram, "er_oracle_fp64_cpu": ref,
           "abs_diff_gram_vs_oracle": abs(er_gram - ref), "abs_diff_svd_vs_oracle": abs(er_svd - ref)}  # fmt: skip
    print(f"{name:>36} {row['rows']:>6} x {row['C']:>4}: svd {row['svd_ms']:7.2f} ms, gram {row['gram_ms']:7.2f} ms "
          f"({row['speedup']:.1f}x) | |gram - oracle| {row['abs_diff_gram_vs_oracle']:.1e}, |svd - oracle| {row['abs_diff_svd_vs_oracle']:.1e}", flush=True)  # fmt: skip
    return row


def real_run(device) -> list[tuple[str, torch.Tensor]]:
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.run import train_run

    g = torch.Generator().manual_seed(0)
    W = torch.randn(50_257, 768, generator=g) * 0.1
    train, val = torch.randint(0, 50_257, (62_891,), generator=g), torch.randint(0, 50_257, (31_024,), generator=g)
    cfg = run_config_from_dict({"model": {"num_layers": 6, "context_dim": 768, "num_input_tokens": 1},
                                "phase1": {"min_iterations": 7, "max_iterations": 7}, "phase2": {"max_epochs": 1, "patience": 1}})  # fmt: skip
    r = train_run(cfg, W, train, val, seed=42, device=device, keep_tensors=True)
    return [("real run: contexts", r.tensors["contexts"]), ("real run: last validation cache", r.tensors["val_cache"][-1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-rows", type=int, default=10_000, help="engine.er_max_rows")
    ap.add_argument("--dims", default="768,1152")
    ap.add_argument("--no-real", action="store_true", help="leave out the real engine run's contexts")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(0)
    rows = []
    for c in [int(d) for d in args.dims.split(",")]:
        for n in (args.max_rows, 31_023):
            for name, x in inputs(n, c, device, g):
                rows.append(compare(name, x, args.max_rows, device, args.repeats))
    if not args.no_real:
        for name, x in real_run(device):
            rows.append(compare(name, x, args.max_rows, device, args.repeats))
    out = {
        "benchmark": "effective rank: svdvals (fp32) vs Gram eigvalsh (fp64)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "repeats": args.repeats,
        "max_abs_diff_gram_vs_oracle": max(r["abs_diff_gram_vs_oracle"] for r in rows),
        "per_run_two_ers_ms": {"svd": None, "gram": None},
        "results": rows,
    }
    cap = [r for r in rows if r["rows"] >= args.max_rows and r["input"].startswith("layernormed")]
    if cap:  # a run takes two effective ranks of er_max_rows rows
        out["per_run_two_ers_ms"] = {"svd": 2 * statistics.mean(r["svd_ms"] for r in cap), "gram": 2 * statistics.mean(r["gram_ms"] for r in cap)}
    print(f"largest |gram - oracle|: {out['max_abs_diff_gram_vs_oracle']:.2e}; two ERs per run (layernormed inputs): "
          f"svd {out['per_run_two_ers_ms']['svd']:.1f} ms, gram {out['per_run_two_ers_ms']['gram']:.1f} ms")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
