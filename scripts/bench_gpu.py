"""Benchmark of the report's whole workload: 4 configs x 4 sizes, phases timed, JSON out.

    python scripts/bench_gpu.py --out benchmarks/h200_bench.json                 # staged, as archsearch run on a GPU
    python scripts/bench_gpu.py --stage-sizes false --out benchmarks/h200_bench_unstaged.json

``--stage-sizes auto|true|false`` (default auto, what ``archsearch run`` does with this grid on
a GPU): each trial's runs go through the CVFP family's ``train_many`` exactly as
``archsearch.trial.run_trial`` hands them over (``engine.stage_sizes``; archsearch.cvfp.run's
train_staged: phase 1 of the trial's sizes, one batched validation call, then each size's
phase 2), or, where it declines (``false``, a CPU under auto), through ``train_run`` one after
another. ``--concurrency N`` (bench only, no ``archsearch run`` setting does this): N trials at
once in threads of the bench, each on its own CUDA stream.

The report's shapes with random data (no data access needed): V = 50,257, E = 768, training
streams of 62,891 / 122,795 / 240,132 / 587,970 tokens, a 31,024-token validation stream,
fixed work (phase 1: 7 iterations, 10 for context_dim 1152; phase 2: 5 epochs). Per run and
phase it reports seconds, tokens/s, achieved TFLOP/s and the fraction of the device's peak
for the precision used; then the total wall time. Runs go as a search runs them: one trial per
config, its sizes smallest first in one thread (a trial's runs share their phase-2 graphs),
the largest trials first. ``--reference`` also times the plain
reference implementation against the engine on a small subset, on the same device.
Needs only PyTorch and PyYAML (and Triton on GPUs for the fused kernels); the configs and sizes
are those of spaces/grid_4arch_offline.yaml.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import queue
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from archsearch.config import param_counts, run_config_from_dict, token_widths  # noqa: E402
from archsearch.cvfp.run import train_run  # noqa: E402
from archsearch.space import load_space  # noqa: E402
from archsearch.families import RunData  # noqa: E402
from archsearch.families.cvfp import train_many  # noqa: E402

# the report's grid: its configs and training-token counts, as the shipped space file has them
GRID = load_space(Path(__file__).resolve().parent.parent / "spaces" / "grid_4arch_offline.yaml")
REPORT_SIZES = list(GRID.data.sizes)
VAL_TOKENS = 31_024
V, E = 50_257, 768
MODELS = {name: GRID.run_config(params).model for name, params in GRID.configs.items()}
CONFIGS = {name: (m.num_layers, m.context_dim, m.num_input_tokens) for name, m in MODELS.items()}  # (L, C, k)
# dense peak by datasheet (H100 SXM); the measured matmul rate is reported beside it
PEAK_TFLOPS = {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}


RECURRENT = "auto"
STAGE_SIZES: str | bool = "auto"


def run_config(L: int, C: int, k: int, precision: str, iterations: int, epochs: int):
    return run_config_from_dict({
        "model": {"num_layers": L, "context_dim": C, "num_input_tokens": k},
        "phase1": {"min_iterations": iterations, "max_iterations": iterations},
        "phase2": {"max_epochs": epochs, "patience": epochs},
        "engine": {"precision": precision, "recurrent": RECURRENT, "stage_sizes": STAGE_SIZES},
    })  # fmt: skip


def flops(L: int, C: int, k: int, N: int, M: int, iterations: int, epochs: int) -> dict[str, float]:
    """Matrix-product FLOPs of each phase (2 per multiply-add; LayerNorms etc. left out)."""
    ek = E * k
    ctx_layer = (C + ek) * C  # MACs per position per ContextLayer
    widths = token_widths(E, k, L)
    tok = sum((C + a) * b + (a * b if a != b else 0) for a, b in zip(widths[:-1], widths[1:]))
    return {
        "phase1": (iterations - 1) * N * L * 6 * ctx_layer,  # forward 2 + backward 4
        "contexts": (N - 1) * L * 2 * ctx_layer + (M - 1) * L * 2 * ctx_layer,
        "phase2": epochs * ((N - 1) * (6 * tok + 4 * E * V) + (M - 1) * (2 * tok + 2 * E * V)),  # frozen head: no weight grad
    }


def measured_matmul_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12


_PARTS = threading.local()


def _timed_parts() -> None:
    """Time, per run, phase 2's validation passes with a device sync around each (they start
    with the GPU idle: the epoch's loss has just been read back, so the syncs cost next to
    nothing). Phase 2's preparation (getting its session: for a new one the warm-up step and
    the captures) runs while the recurrent pass does, in the contexts phase; the engine
    reports its CPU time as phase2_prepare_seconds."""
    from archsearch.cvfp.fast import graphs as EN

    def wrap(fn, part):
        def timed(*a, **k):
            dev = torch.cuda.current_device() if torch.cuda.is_available() else None
            if dev is not None:
                torch.cuda.current_stream(dev).synchronize()
            t0 = time.perf_counter()
            r = fn(*a, **k)
            if dev is not None:
                torch.cuda.current_stream(dev).synchronize()
            d = _PARTS.__dict__.setdefault("parts", {})
            d[part] = d.get(part, 0.0) + time.perf_counter() - t0
            return r

        return timed

    EN.Evaluation.__call__ = wrap(EN.Evaluation.__call__, "phase2_validation_s")


def job_config(job, precision, epochs):
    name, (L, C, k), N = job
    return run_config(L, C, k, precision, 10 if C == 1152 else 7, epochs)


def describe(job, r, cfg, val, device, precision):
    """The bench's record of one run's RunResult."""
    name, (L, C, k), N = job
    m, ps = r.metrics, r.phase_seconds
    f = flops(L, C, k, N, len(val), m["phase1_iterations"], m["phase2_stopped_epoch"])
    peak = PEAK_TFLOPS[precision] if device.type == "cuda" else float("nan")
    phases = {}
    for phase in ("phase1", "contexts", "phase2"):
        secs = ps[phase]
        tflops = f[phase] / secs / 1e12
        tokens = {"phase1": N * (m["phase1_iterations"] - 1), "contexts": N + len(val), "phase2": (N + len(val)) * m["phase2_stopped_epoch"]}[phase]
        phases[phase] = {"seconds": secs, "tokens_per_s": tokens / secs, "tflops": tflops, "fraction_of_peak": tflops / peak, "flop": f[phase]}
    return {
        "config": name, "train_tokens": N, "val_tokens": len(val), "phase1_iterations": m["phase1_iterations"],
        "phase2_epochs": m["phase2_stopped_epoch"], "seconds": r.seconds,
        "val_step_us": m["val_step_us"],  # per step of the pass the run's validation went through (shared when staged)
        "er_seconds": ps["er"],  # the two effective ranks, between the phases, in no phase's time
        "phase2_prepare_s": m["phase2_prepare_seconds"],  # CPU time, in the contexts phase, overlapped: see _timed_parts
        "phase2_validation_s": _PARTS.parts.get("phase2_validation_s", 0.0),  # within phase 2
        "val_ppl": r.val_ppl, "phases": phases, **param_counts(cfg.model, E),
    }  # fmt: skip


def one_run(job, W, train, val, device, precision, epochs):
    cfg = job_config(job, precision, epochs)
    _PARTS.parts = {}
    r = train_run(cfg, W, train[: job[2]], val, seed=42, device=device)
    return describe(job, r, cfg, val, device, precision)


def trial_runs(trial, W, train, val, device, precision, epochs):
    """A trial's records (or the exception a run failed with), in size order, the way
    archsearch.trial.run_trial trains them: through the family's train_many where it takes
    them (engine.stage_sizes), else one run after another."""
    cfg = job_config(trial[0], precision, epochs)
    runs = [(lambda n=job[2]: RunData(W, train[:n], val), 42, None) for job in trial]
    staged = train_many(cfg, runs, str(device), may_stop=False)
    if staged is None:
        for job in trial:
            try:
                yield one_run(job, W, train, val, device, precision, epochs)
            except Exception as e:  # reported, not raised
                yield e
        return
    for job in trial:
        _PARTS.parts = {}
        r = next(staged, None)
        if isinstance(r, BaseException) or r is None:
            yield r if r is not None else RuntimeError("train_many yielded fewer runs than it was given")
            return
        yield describe(job, r, cfg, val, device, precision)


def reference_speedup(W, train, val, device, precision) -> dict:
    """Engine vs the plain reference implementation on a small subset, same device."""
    from archsearch.cvfp.reference import reference_run

    N, M = 3000, 600
    cfg = run_config_from_dict({
        "model": {"num_layers": 6, "context_dim": 768, "num_input_tokens": 1},
        "phase1": {"min_iterations": 3, "max_iterations": 3, "batch_size": 1000},
        "phase2": {"max_epochs": 1, "patience": 1, "batch_size": 512},
        "engine": {"precision": "fp32"},
    })  # fmt: skip
    t0 = time.perf_counter()
    ref = reference_run(cfg, W, train[:N], val[:M], seed=0, device=device)
    t_ref = time.perf_counter() - t0
    train_run(cfg, W, train[:N], val[:M], seed=0, device=device)  # warm-up (kernel compilation)
    t0 = time.perf_counter()
    eng = train_run(cfg, W, train[:N], val[:M], seed=0, device=device)
    t_eng = time.perf_counter() - t0
    return {"subset": {"train_tokens": N, "val_tokens": M, "config": "baseline", "phase1_iterations": 3, "phase2_epochs": 1, "precision": "fp32"},
            "reference_seconds": t_ref, "engine_seconds": t_eng, "speedup": t_ref / t_eng,
            "val_ppl_reference": ref["val_ppl"], "val_ppl_engine": eng.val_ppl}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="a device, or several separated by commas (cuda:0,cuda:1): runs are spread over them")
    ap.add_argument("--precision", default="bf16", choices=list(PEAK_TFLOPS))
    ap.add_argument("--concurrency", type=int, default=1, help="trials sharing the device at once (threads of the bench, one CUDA stream each; bench only)")
    ap.add_argument("--stage-sizes", default="auto", choices=["auto", "true", "false"], help="engine.stage_sizes of every trial, as archsearch run passes it (default auto: staged on a GPU with Triton)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every size (for a quick smoke run)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--reference", action="store_true", help="also time the reference implementation on a subset")
    ap.add_argument("--recurrent", default="auto", help="engine.recurrent: auto | persistent | graph | eager")
    ap.add_argument("--hang-after", type=float, default=240, help="with concurrency: dump every thread's stack and exit after this many seconds")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    global RECURRENT, STAGE_SIZES
    RECURRENT = args.recurrent
    STAGE_SIZES = {"auto": "auto", "true": True, "false": False}[args.stage_sizes]

    _timed_parts()
    devices = [torch.device(d) for d in args.device.split(",")]
    devices = [torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d for d in devices]
    device = devices[0]
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, E, generator=g) * 0.1
    sizes = [max(64, int(s * args.scale)) for s in REPORT_SIZES]
    train = torch.randint(0, V, (sizes[-1],), generator=g)
    val = torch.randint(0, V, (max(64, int(VAL_TOKENS * min(1.0, args.scale))),), generator=g)
    # one trial per config, as a search runs them: its sizes smallest first, in one thread
    trials = [[(name, CONFIGS[name], N) for N in sizes] for name in args.configs.split(",")]
    trials.sort(key=lambda t: -t[0][1][0] * t[0][1][1] * (1 + t[0][1][2]))  # biggest first: better packing when concurrent

    # warm-up: kernel compilation (one per model shape; a staged trial's batched pass for as
    # many runs as a trial has), cuBLAS handles and the first use of each product shape (the
    # full validation stream's too) stay out of the timings, as they do for every trial of a
    # search but its first; the phase-2 sessions it leaves are dropped, so every trial below
    # starts a new one (warm-up step and captures), as a trial of a search does
    from archsearch.cvfp.fast.graphs import release_phase2_graphs

    for d in devices:
        if d.type == "cuda":
            torch.cuda.set_device(d)
        for L, C, k in sorted({CONFIGS[name] for name in args.configs.split(",")}):
            warm = [("warmup", (L, C, k), 4 * 4096 + 100 + i) for i in range(len(sizes))]
            for r in trial_runs(warm, W, train, val, d, args.precision, 1):
                if isinstance(r, BaseException):
                    raise r
    release_phase2_graphs()
    if args.concurrency > 1:  # a stuck run shows where it is stuck
        import faulthandler

        faulthandler.dump_traceback_later(args.hang_after, exit=True)
    matmul = measured_matmul_tflops(device)

    results, errors = [], []
    todo: queue.Queue = queue.Queue()
    for t in trials:
        todo.put(t)

    def worker(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # Triton launches on the current device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        while True:
            try:
                trial = todo.get_nowait()
            except queue.Empty:
                return

            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                done = list(trial_runs(trial, W, train, val, device, args.precision, args.epochs))
            for job, r in zip(trial, done):
                try:
                    if isinstance(r, Exception):
                        raise r
                    results.append(r)
                    p = r["phases"]
                    print(f"{r['config']:>17} {r['train_tokens']:>8,}: {r['seconds']:6.2f} s | phase 1 {p['phase1']['seconds']:5.2f} s "
                          f"{p['phase1']['tflops']:6.1f} TF/s | contexts {p['contexts']['seconds']:5.2f} s ({r['val_step_us']:.1f} us/step) | "
                          f"phase 2 {p['phase2']['seconds']:5.2f} s {p['phase2']['tflops']:6.1f} TF/s ({100 * p['phase2']['fraction_of_peak']:.0f}%)", flush=True)  # fmt: skip
                except Exception as e:  # report, keep going
                    errors.append(f"{job[0]} {job[2]}: {type(e).__name__}: {e}")
                    print("ERROR", errors[-1], flush=True)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(d,)) for d in devices for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)
    wall = time.perf_counter() - t0
    if args.concurrency > 1:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()

    totals = {}
    peak = PEAK_TFLOPS[args.precision] if device.type == "cuda" else math.nan
    for phase in ("phase1", "contexts", "phase2"):
        secs = sum(r["phases"][phase]["seconds"] for r in results)
        fl = sum(r["phases"][phase]["flop"] for r in results)
        totals[phase] = {"seconds": secs, "tflops": fl / secs / 1e12 if secs else math.nan, "fraction_of_peak": fl / secs / 1e12 / peak if secs else math.nan}
    total_flop = sum(r["phases"][p]["flop"] for r in results for p in r["phases"])
    base = [r for r in results if r["config"] == "baseline"]
    out = {
        "benchmark": "report workload (4 configs x 4 sizes)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "precision": args.precision,
        "concurrency": args.concurrency,
        "stage_sizes": args.stage_sizes,
        "devices": [str(d) for d in devices],
        "recurrent": args.recurrent,
        "scale": args.scale,
        "run_order": "trials: one per config, sizes smallest first in one thread, largest trials first",
        "runs": len(results),
        "errors": errors,
        "wall_seconds": wall,
        "sum_of_run_seconds": sum(r["seconds"] for r in results),
        "total_pflop": total_flop / 1e15,
        "overall_tflops": total_flop / wall / 1e12,
        "peak_tflops_datasheet": PEAK_TFLOPS[args.precision],
        "measured_bf16_matmul_tflops": matmul,
        "phase_totals": totals,
        "val_step_us_baseline": sum(r["val_step_us"] for r in base) / len(base) if base else None,
        "results": sorted(results, key=lambda r: (r["config"], r["train_tokens"])),
    }
    if args.reference:
        out["reference"] = reference_speedup(W, train, val, device, args.precision)
    print(f"\n{len(results)} runs, {args.precision}, concurrency {args.concurrency} per device on {len(devices)} x {out['device']}: wall {wall:.1f} s "
          f"({out['total_pflop']:.2f} PFLOP, {out['overall_tflops']:.0f} TFLOP/s overall)")  # fmt: skip
    for phase, t in totals.items():
        print(f"  {phase:>8}: {t['seconds']:7.2f} s summed over runs, {t['tflops']:6.1f} TFLOP/s, {100 * t['fraction_of_peak']:.1f}% of {args.precision} peak")
    print(f"  recurrent validation pass, baseline: {out['val_step_us_baseline']:.1f} us/step" if base else "")
    if matmul:
        print(f"  measured bf16 matmul: {matmul:.0f} TFLOP/s (datasheet {PEAK_TFLOPS['bf16']})")
    if args.reference:
        r = out["reference"]
        print(f"  reference implementation on a subset: {r['reference_seconds']:.1f} s vs engine {r['engine_seconds']:.3f} s: {r['speedup']:.0f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
