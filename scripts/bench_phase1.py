"""Phase 1 alone: milliseconds per iteration, TFLOP/s and % of peak for the bench's shapes,
with the code of the tree it runs in, plus a per-kernel profile of one iteration. JSON out.

    python scripts/bench_phase1.py --out benchmarks/h200_phase1.json
    python scripts/bench_phase1.py --cases L6_C768_k1 --sizes 240132 --no-profile

Shapes (those of scripts/bench_gpu.py): L6 C768 k1, L6 C768 k2, L6 C1152 k1, L9 C768 k1, each
at N = 240,132 and 587,970 positions; V = 50,257, E = 768, random embedding and token ids
(no data access), parameters initialised as a run does (model.init_parameters). The block is
what a run's fast path would train (cvfp.fast.select on this device).

Per case: ``train_phase1`` (the tree's own) with a fixed number of iterations, timed whole
with ``--iterations`` and with 2 (iteration 1 trains nothing, so 2 is one trained iteration):
``iteration_ms`` = the difference over the extra iterations (set-up and the first, untrained
iteration cancel out); each timing is the median of ``--repeats``. TFLOP/s are given two ways:
``nominal`` counts 6 * N * L * (C + E*k) * C per iteration (scripts/bench_gpu.py's convention,
its "27.7 %" of the issue), ``needed`` counts only the products phase 1 does (forward,
d W, d context; no d token vector): 2 * N * L * (2 * (C + E*k) * C + C * C).

A/B: each engine switch named in AB_SWITCHES that the tree's EngineConfig has is timed off
and on in the same call (absent in older trees: then only the defaults run), so that the old
and the new code can be run with one command line. ``--set engine.key=value`` overrides any
engine field for every case.

A variant that fails is recorded with its traceback and the others still run; the JSON is
rewritten after every case (a timed-out call keeps what it measured). ``peak_memory_gb``: the
CUDA allocator's peak over the timed calls (for ``--set engine.phase1_chunk_batches=16``).

``chunk_ms``: one chunk (``phase1.batch_size * engine.phase1_chunk_batches`` positions) forward
+ backward alone, through phases.phase1_span or, where the block runs it, the fused iteration
over that one span.

Profile (unless ``--no-profile``): torch.profiler over one trained iteration alone of the
first size of each case (from train_phase1's progress call after its set-up to the one after
that iteration: no block construction, no set-up, no untrained iteration 1), the kernels sorted
by CUDA time, per iteration and per 64k-position chunk (divided by ceil(N / chunk); the
iteration's spans, ``spans_per_iteration``, include the partial last batch), plus the profiler's
own table and the iteration's host<->device copies (``htod_copies``, ``dtoh_copies``: 0 and 1,
the one read-back of the losses and the rate, where nothing copies from the host). Until
2026-12-01 the window was the whole ``train_phase1`` call with the block built in it: the
"48 Memcpy HtoD (Pageable -> Device)" of that profile (L6 k1) were the bench's own ContextBlock
and TokenBlock parameters (24 + 24 tensors, 12 of them 4.7 MB) moved to the GPU, not the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from bench_timing import median_ms  # noqa: E402

from archsearch.config import EngineConfig, run_config_from_dict  # noqa: E402
from archsearch.cvfp import fast  # noqa: E402
from archsearch.cvfp.model import ContextBlock, TokenBlock, TokenEmbedding, init_parameters  # noqa: E402
from archsearch.cvfp.phases import train_phase1  # noqa: E402

V, E = 50_257, 768
PEAK_TFLOPS = {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}
CASES = {"L6_C768_k1": (6, 768, 1), "L6_C768_k2": (6, 768, 2), "L6_C1152_k1": (6, 1152, 1), "L9_C768_k1": (9, 768, 1)}
SIZES = (240_132, 587_970)
AB_SWITCHES = ("phase1_fused",)
"""Engine switches of the phase-1 fast path timed off and on where the tree has them."""


def flops(L: int, C: int, k: int, N: int) -> dict[str, float]:
    ek = E * k
    return {"nominal": 6.0 * N * L * (C + ek) * C, "needed": 2.0 * N * L * (2 * (C + ek) * C + C * C)}


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def git_state() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


class Case:
    """One shape at one size: data, embedding and a fresh block per timing (same init)."""

    def __init__(self, L: int, C: int, k: int, N: int, dev, precision: str, engine: dict):
        self.L, self.C, self.k, self.N, self.dev, self.precision, self.engine = L, C, k, N, dev, precision, engine
        g = torch.Generator(device=dev).manual_seed(0)
        self.emb = TokenEmbedding(torch.randn(V, E, device=dev, generator=g) * 0.1, k).to(dev)
        ids = torch.randint(0, V, (N,), device=dev, generator=g)
        self.win = self.emb.windows(ids)

    def cfg(self, iterations: int):
        return run_config_from_dict({
            "model": {"num_layers": self.L, "context_dim": self.C, "num_input_tokens": self.k},
            "phase1": {"min_iterations": iterations, "max_iterations": iterations},
            "engine": {"precision": self.precision, **self.engine},
        })  # fmt: skip

    def block(self, cfg):
        cb, tb = ContextBlock(cfg.model, E), TokenBlock(cfg.model, E)
        init_parameters(cb, cfg.model, torch.Generator().manual_seed(1))
        cb, tb = cb.to(self.dev), tb.to(self.dev)
        return fast.select(cb, tb, cfg, self.dev).context_block

    def run(self, iterations: int, progress=None):
        """(seconds, Phase1Result, block) of one train_phase1 call of ``iterations`` iterations
        (the block is built before the clock starts)."""
        cfg = self.cfg(iterations)
        block = self.block(cfg)
        gen = torch.Generator(device=self.dev).manual_seed(2)
        sync(self.dev)
        t0 = time.perf_counter()
        res = train_phase1(block, self.emb, self.win, cfg, gen, progress or (lambda *_, **__: None))
        sync(self.dev)
        return time.perf_counter() - t0, res, block


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def profile_iteration(case: Case, chunk_positions: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from archsearch.cvfp.phases import phase1_spans

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.dev.type == "cuda" else [])
    case.run(2)  # warm
    prof = profile(activities=acts)

    def window(event, iteration=0, **_):  # one trained iteration: after the set-up, to its end
        sync(case.dev)
        if iteration == 1:
            prof.start()
        elif iteration == 2:
            prof.stop()

    case.run(2, window)
    chunks = math.ceil(case.N / chunk_positions)
    cfg = case.cfg(2)
    spans = len(phase1_spans(case.N, cfg.phase1.batch_size, cfg.engine.phase1_chunk_batches))
    rows = []
    total = 0.0
    copies = {"htod_copies": 0, "dtoh_copies": 0}
    for ev in prof.key_averages():
        if ev.key.startswith("Memcpy HtoD"):
            copies["htod_copies"] += ev.count
        elif ev.key.startswith("Memcpy DtoH"):
            copies["dtoh_copies"] += ev.count
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if us <= 0:
            continue
        total += us
        rows.append({"name": ev.key, "count": ev.count, "self_cuda_us": us})
    rows.sort(key=lambda r: -r["self_cuda_us"])
    for r in rows:
        r["per_chunk_ms"] = r["self_cuda_us"] / 1e3 / chunks
    sort_key = "self_cuda_time_total" if case.dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=30, max_name_column_width=70)
    return {"chunks_per_iteration": chunks, "spans_per_iteration": spans, **copies,
            "chunk_positions": chunk_positions, "cuda_ms_total": total / 1e3,
            "cuda_ms_per_chunk": total / 1e3 / chunks, "top_kernels": rows[:40], "table": table}  # fmt: skip


def chunk_ms(case: Case) -> tuple[float, str]:
    """Milliseconds of one chunk's forward + backward (median of 5 after 2 warm-ups, CUDA
    events; wall clock off CUDA): phases.phase1_span, or the fused iteration over that one span
    where the block runs one (its weight casts and gradient hand-over included; until
    2026-12-01 a clone of the whole (N, C) noise was timed with it too, ~0.5 ms at N=240k)."""
    from archsearch.cvfp import phases

    cfg = case.cfg(2)
    block = case.block(cfg)
    n = phases.phase1_spans(case.N, cfg.phase1.batch_size, cfg.engine.phase1_chunk_batches)[0][1]  # the first span
    g = torch.Generator(device=case.dev).manual_seed(3)
    prev = torch.randn(case.N, case.C, device=case.dev, generator=g)
    noise = torch.randn(case.N, case.C, device=case.dev, generator=g) * 0.1
    out_all = torch.empty_like(prev)
    nb = math.ceil(case.N / cfg.phase1.batch_size)
    fast = block.phase1_fast(case.emb, case.win, cfg) if hasattr(block, "phase1_fast") else None
    work = noise.clone()
    if fast is not None:
        path = "fused iteration"

        def prep():  # the iteration turns the span's noise into its input contexts: restored untimed
            work[:n].copy_(noise[:n])

        def fn():
            fast.iteration(prev, work, out_all, [(0, n)], nb)
    else:
        path = "phase1_span"
        inputs = torch.roll(prev, 1, 0) + noise

        def prep():
            pass

        def fn():
            phases.phase1_span(block, case.emb, case.win, inputs, prev, out_all, 0, n, nb, cfg)

    return median_ms(fn, 5, prep=prep, cuda=case.dev.type == "cuda"), f"{path}, {n} positions"


def measure(L: int, C: int, k: int, N: int, dev, args, engine: dict, peak: float, profile: bool) -> dict:
    case = Case(L, C, k, N, dev, args.precision, engine)
    case.run(2)  # compile / warm up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    short, long_ = [], []
    for _ in range(args.repeats):
        short.append(case.run(2)[0])
        t, res, block = case.run(args.iterations)
        long_.append(t)
    ts, tl = median(short), median(long_)
    per_iter = (tl - ts) / (args.iterations - 2)
    f = flops(L, C, k, N)
    row = {
        "block": type(block).__name__, "iteration_ms": per_iter * 1e3,
        "run2_ms": ts * 1e3, f"run{args.iterations}_ms": tl * 1e3,
        "tflops_nominal": f["nominal"] / per_iter / 1e12, "tflops_needed": f["needed"] / per_iter / 1e12,
        "pct_peak_nominal": 100 * f["nominal"] / per_iter / 1e12 / peak,
        "pct_peak_needed": 100 * f["needed"] / per_iter / 1e12 / peak,
        "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else math.nan,
        "final_loss": res.history[-1]["loss"], "final_convergence_rate": res.convergence_rate,
        "contexts_checksum": float(res.contexts.double().abs().mean()),
    }  # fmt: skip
    row["chunk_ms"], row["chunk_path"] = chunk_ms(case)
    print(f"{f'L{L}_C{C}_k{k}':12} N={N:7d} {str(engine):40} {row['block']:18} {row['iteration_ms']:8.2f} ms/iter "
          f"{row['tflops_nominal']:6.1f} TF/s nominal ({row['pct_peak_nominal']:.1f} %), "
          f"{row['tflops_needed']:6.1f} needed ({row['pct_peak_needed']:.1f} %), loss {row['final_loss']:.5f}, "
          f"peak {row['peak_memory_gb']:.1f} GiB", flush=True)  # fmt: skip
    print(f"  one chunk: {row['chunk_ms']:.2f} ms ({row['chunk_path']})", flush=True)
    if profile:
        chunk = case.cfg(2).phase1.batch_size * case.cfg(2).engine.phase1_chunk_batches
        p = row["profile"] = profile_iteration(case, chunk)
        print(f"  profile: {p['cuda_ms_per_chunk']:.2f} ms CUDA per {p['chunk_positions']}-position chunk "
              f"({p['chunks_per_iteration']} chunks, {p['spans_per_iteration']} spans), host->device copies "
              f"{p['htod_copies']}, device->host {p['dtoh_copies']}")  # fmt: skip
        for r in p["top_kernels"][:15]:
            print(f"    {r['per_chunk_ms']:7.3f} ms/chunk  x{r['count']:<5} {r['name'][:90]}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=list(PEAK_TFLOPS))
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--sizes", nargs="*", type=int, default=list(SIZES))
    ap.add_argument("--iterations", type=int, default=5, help="iterations of the long timing (>= 3; 2 is the short one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="engine.KEY=VALUE")
    ap.add_argument("--no-ab", action="store_true", help="time only the tree's defaults (no switch off/on)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.iterations < 3:
        ap.error("--iterations must be at least 3")
    dev = torch.device(args.device)
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    engine: dict = {}
    for item in args.set:
        key, _, value = item.partition("=")
        name = key.removeprefix("engine.")
        if name not in fields or not _:
            ap.error(f"--set {item!r}: not engine.KEY=VALUE with KEY one of {sorted(fields)}")
        engine[name] = parse_value(value)
    switches = [] if args.no_ab else [s for s in AB_SWITCHES if s in fields and s not in engine]
    variants = [("default", {})] + [(f"{s}={not getattr(EngineConfig(), s)}", {s: not getattr(EngineConfig(), s)}) for s in switches]
    out: dict = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "git": git_state(), "precision": args.precision,
        "peak_tflops": PEAK_TFLOPS[args.precision], "engine_set": engine, "ab_switches": switches,
        "iterations": args.iterations, "repeats": args.repeats, "cases": [],
    }  # fmt: skip
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    peak = PEAK_TFLOPS[args.precision] if dev.type == "cuda" else math.nan
    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=2) + "\n")

    for name in args.cases:
        L, C, k = CASES[name]
        for N in args.sizes:
            for vname, extra in variants:
                head = {"case": name, "variant": vname, "engine": {**engine, **extra}, "L": L, "C": C, "k": k, "N": N}
                try:
                    row = {**head, **measure(L, C, k, N, dev, args, {**engine, **extra}, peak, profile=not args.no_profile and N == args.sizes[0])}
                except Exception:  # one failing variant must not cost the others' numbers
                    row = {**head, "error": traceback.format_exc(limit=8)[-4000:]}
                    print(f"{name:12} N={N:7d} {vname:24} FAILED\n{row['error']}", flush=True)
                out["cases"].append(row)
                save()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    save()
    if not args.out:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
