"""Benchmark of the recurrent validation pass's kernel variants, R runs of one shape at once.

    python3 scripts/bench_recurrent.py --out benchmarks/h200_recurrent.json
    python3 scripts/bench_recurrent.py --shapes 6x768 --R 1,2 --T 2000 --out quick.json
    python3 scripts/bench_recurrent.py --summarise benchmarks/h200_recurrent.json

Needs only torch, triton and numpy (PYTHONPATH = the repo root, or run from it). For each
shape (L, C) and R runs it times, T steps of random inputs scaled like a real pass (W_c ~
N(0, 0.1^2) as model.py initialises it, P ~ N(0, 1), LayerNorm affine near 1 / 0):

- ``today``: the persistent kernel as main had it on 2026-12-01 (copied below as the
  baseline), the R runs one after another;
- ``today-streams``: R copies of it launched at once on R CUDA streams, each with its own
  barrier (only where R x its grid <= multiprocessors: then all programs are resident);
- ``batched-<sync>-r<rows>-s<sub>[-w<warps>]``: recurrent_kernels.recurrent_batched, ONE
  launch for the R runs, for every synchronisation (atomic | volatile | flag), rows per
  program, sub-tile and warp count listed in VARIANTS, only where the compiled kernel's
  residency (recurrent_kernels.resident_programs) admits the grid R x ceil(C / rows).

Each variant: us per step (all R runs), us per run-step, the compiled kernel's registers,
spills and residency, and the largest absolute difference of its outputs from ``today``'s,
per run: ``max_abs_diff`` on check inputs (W_c ~ N(0, 1/C), 256 steps: a contractive
recurrence, where rounding differences stay at rounding size), and on the timed inputs
``max_abs_diff_timed`` (all steps) and ``max_abs_diff_timed_first16``. With W_c ~ N(0, 0.1^2)
the random recurrence is chaotic (float64 against float32 on the CPU, L6/C768: 3e-6 apart
after the first step, 1e-3 after 10, O(1) after 100), so over all timed steps only a variant
with today's exact arithmetic (``bitwise_equal``) stays close.

The JSON is rewritten after every variant, so a run cut short keeps what it has; ``--budget``
seconds stop it from starting new variants (a full run of the three default shapes takes a
few minutes on an H200, most of it compiling; ``--shapes`` one at a time to be safe). A variant whose programs were
not all resident ends with an error (every wait gives up after recurrent_kernels.MAX_SPIN
polls) rather than hanging.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from bench_timing import median_ms  # noqa: E402

# (sync, rows, sub, warps); warps None = the module's default (4 up to C = 1024, else 8). The
# "atomic" poll compiles to a plain acquire load already, so "volatile" differs little: only
# the first two tiles try it.
TILES = [(8, 8, None), (16, 16, None), (16, 8, None), (16, 16, 8), (32, 8, None), (32, 16, None),
         (4, 4, 1), (8, 4, 1), (16, 4, 1), (4, 4, 2), (8, 8, 2), (16, 8, 2)]  # fewer warps: fewer block-wide barriers per layer
VARIANTS = [(sync, *tile) for tile in TILES for sync in ("atomic", "flag")] + [("volatile", *tile) for tile in TILES[:2]]


# today's kernel (archsearch/cvfp/fast/kernels.py on main, 2026-12-01), verbatim but for the P mask
# (a vector, which the interpreter needs) and
# device query (so that --interpret runs it): the baseline


@triton.jit
def _today_kernel(
    p_ptr, w_ptr, g_ptr, b_ptr, out_ptr, hbuf_ptr, bar_ptr, eps, T,
    L: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """The whole recurrence in one launch. Every program keeps the full context vector; per
    layer it computes ROWS rows of W_c c + P, publishes them, waits at a grid-wide barrier
    (an atomic counter), then reads the whole h and applies the residual and LayerNorm
    itself. All programs must be resident at once (the caller checks the grid size)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < C
    wmask = rmask[:, None] & cmask[None, :]
    wofs = rows[:, None] * C + cols[None, :]
    lo = pid * ROWS
    mine = cmask & (cols >= lo) & (cols < lo + ROWS)
    c = tl.zeros([BLOCK_C], tl.float32)
    w = tl.load(w_ptr + wofs, mask=wmask, other=0.0)  # layer 0's rows
    p = tl.load(p_ptr + rows, mask=rmask, other=0.0)  # P[0, 0]
    k = 0
    for t in range(T):
        for i in tl.static_range(L):
            h_rows = tl.sum(w * c[None, :], axis=1) + p
            tl.store(hbuf_ptr + (k % 2) * C + rows, h_rows, mask=rmask)
            # prefetch the next layer's rows of W_c and P: their latency hides behind the barrier
            ni = (i + 1) % L
            nt = t + 1 if i == L - 1 else t
            w = tl.load(w_ptr + ni * C * C + wofs, mask=wmask, other=0.0)
            p = tl.load(p_ptr + (ni * T + nt) * C + rows, mask=rmask & (rows * 0 + nt < T), other=0.0)
            k += 1
            tl.debug_barrier()  # the whole program's stores precede the release below
            tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
            target = k * nprog
            while tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu") < target:
                pass
            tl.debug_barrier()
            h = tl.load(hbuf_ptr + ((k - 1) % 2) * C + cols, mask=cmask, other=0.0, cache_modifier=".cg")
            z = c + tl.maximum(h, 0.0)
            mean = tl.sum(z, axis=0) / C
            d = tl.where(cmask, z - mean, 0.0)
            var = tl.sum(d * d, axis=0) / C
            gamma = tl.load(g_ptr + i * C + cols, mask=cmask, other=0.0)
            beta = tl.load(b_ptr + i * C + cols, mask=cmask, other=0.0)
            c = tl.where(cmask, d * tl.rsqrt(var + eps) * gamma + beta, 0.0)
            tl.store(out_ptr + (i * T + t) * C + cols, c, mask=mine)


def today_persistent(P, W, G, B, eps: float):
    """(L, T, C) layer outputs of the recurrence, context starting at zero; None when the
    grid would not fit on the device at once (then the caller uses another path)."""
    L, T, C = P.shape
    block = triton.next_power_of_2(C)
    sms = torch.cuda.get_device_properties(P.device).multi_processor_count if P.device.type == "cuda" else 1  # (--interpret)
    rows = next((r for r in (8, 16, 32) if triton.cdiv(C, r) <= sms), None)
    if rows is None:  # at most one program per multiprocessor: co-residency is guaranteed
        return None
    grid = triton.cdiv(C, rows)
    out = torch.empty_like(P)
    hbuf = torch.zeros(2, C, device=P.device)
    bar = torch.zeros(1, device=P.device, dtype=torch.int32)
    _today_kernel[(grid,)](P, W, G, B, out, hbuf, bar, eps, T, L=L, C=C, BLOCK_C=block, ROWS=rows,
                           num_warps=4 if block <= 1024 else 8)  # fmt: skip
    return out


def variant_name(sync: str, rows: int, sub: int, warps) -> str:
    return f"batched-{sync}-r{rows}-s{sub}" + (f"-w{warps}" if warps else "")


def inputs(R: int, L: int, T: int, C: int, w_std: float, dev, seed: int = 0):
    g = torch.Generator(device=dev).manual_seed(seed)
    P = torch.randn(R, L, T, C, device=dev, generator=g)  # (R, L, T, C)
    W = torch.randn(R, L, C, C, device=dev, generator=g) * w_std  # (R, L, C, C)
    G = 1 + 0.05 * torch.randn(R, L, C, device=dev, generator=g)  # (R, L, C)
    B = 0.05 * torch.randn(R, L, C, device=dev, generator=g)
    return P, W, G, B


def eager(P, W, G, B, eps: float, steps: int) -> torch.Tensor:
    """(L, steps, C): the plain recurrence of one run, for a sanity check of the baseline."""
    L, _, C = P.shape
    out = torch.empty(L, steps, C, device=P.device)
    c = torch.zeros(C, device=P.device)
    for t in range(steps):
        for i in range(L):
            c = F.layer_norm(c + torch.relu(torch.addmv(P[i, t], W[i], c)), (C,), G[i], B[i], eps)
            out[i, t] = c
    return out


def timed(fn, reps: int, cuda: bool = True) -> tuple[float, object]:
    """(median seconds of ``reps`` calls after one warm-up, the last call's result); with
    ``cuda`` false (--interpret: a smoke test of this script on the CPU) by the wall clock."""
    last = []

    def call():
        last[:] = [fn()]

    return median_ms(call, reps, warmup=1, cuda=cuda) / 1e3, last[0]


def summarise(path: str, top: int = 4, tol: float = 1e-4) -> None:
    """Print, per shape and R, the fastest variants per run-step whose check outputs are within
    ``tol`` of today's (what recurrent.PLAN is ordered by)."""
    res = json.loads(Path(path).read_text())
    rows = [r for r in res["results"] if "us_per_run_step" in r]
    for key in sorted({(r["L"], r["C"], r["R"]) for r in rows}):
        these = [r for r in rows if (r["L"], r["C"], r["R"]) == key and max(r["max_abs_diff"]) <= tol]
        base = next((r["us_per_run_step"] for r in rows if (r["L"], r["C"], r["R"]) == key and r["variant"] == "today"), float("nan"))
        best = sorted(these, key=lambda r: r["us_per_run_step"])[:top]
        shown = ", ".join(f"{r['variant']} {r['us_per_run_step']:.2f}" for r in best)
        print(f"L{key[0]} C{key[1]} R{key[2]}: today {base:.2f} us per run-step; fastest: {shown}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summarise", metavar="JSON", help="print the fastest correct variants of a finished run and exit")
    p.add_argument("--out")
    p.add_argument("--shapes", default="6x768,9x768,6x1152", help="LxC, comma-separated")
    p.add_argument("--R", default="1,2,4", help="runs per call, comma-separated")
    p.add_argument("--T", type=int, default=8000, help="steps")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--w-std", type=float, default=0.1, help="std of the timed inputs' W_c (model init: 0.1)")
    p.add_argument("--only", default="", help="run only variants whose name contains this")
    p.add_argument("--budget", type=float, default=540.0, help="seconds after which no new variant starts")
    p.add_argument("--interpret", action="store_true", help="smoke test on the CPU under TRITON_INTERPRET=1 (shapes with C <= 4)")
    args = p.parse_args()
    if args.summarise:
        summarise(args.summarise)
        return
    if not args.out:
        p.error("--out is required")
    cuda = not args.interpret
    if cuda and not torch.cuda.is_available():
        sys.exit("bench_recurrent.py: needs a CUDA GPU")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench_recurrent.py --interpret: set TRITON_INTERPRET=1")
    from archsearch.cvfp.fast import recurrent_kernels as RK

    t_start = time.perf_counter()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if cuda else 1
    res = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu (interpreter)", "sms": sms, "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "T": args.T,
        "reps": args.reps, "results": [],
    }  # fmt: skip
    out_path = Path(args.out)

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=1))

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget

    eps, T = 1e-5, args.T
    for shape in args.shapes.split(","):
        L, C = (int(x) for x in shape.lower().split("x"))
        Rs = [int(r) for r in args.R.split(",")]
        Rmax = max(Rs)
        timed_in = inputs(Rmax, L, T, C, args.w_std, dev)  # P, W, G, B
        check_in = inputs(Rmax, L, 256 if cuda else 8, C, C**-0.5, dev, seed=1)
        today_rows = next((r for r in (8, 16, 32) if -(-C // r) <= sms), None)

        def today_each(P, W, G, B, runs: int):
            return [today_persistent(P[r], W[r], G[r], B[r], eps) for r in range(runs)]  # (L, T, C) each

        ref_timed, ref_check = today_each(*timed_in, Rmax), today_each(*check_in, Rmax)
        sanity = {}
        for label, (P, W, G, B), ref in (("timed", timed_in, ref_timed), ("check", check_in, ref_check)):
            steps = min(P.shape[2], 16 if label == "timed" else 256)
            sanity[label] = {"steps": steps, "max_abs_diff": max(float((ref[r][:, :steps] - eager(P[r], W[r], G[r], B[r], eps, steps)).abs().max())
                                                                 for r in range(Rmax))}  # fmt: skip
        res.setdefault("today_vs_eager", {})[shape] = {"today_rows": today_rows, **sanity}
        print(f"{shape}: today's kernel rows {today_rows}, against eager fp32: {sanity}", flush=True)
        for R in Rs:
            timed_R = [x[:R].contiguous() for x in timed_in]
            check_R = [x[:R].contiguous() for x in check_in]

            def record(name: str, **fields) -> None:
                row = {"L": L, "C": C, "R": R, "variant": name, **fields}
                res["results"].append(row)
                save()
                shown = {k: v for k, v in fields.items() if k in ("us_per_step", "us_per_run_step", "max_abs_diff", "skipped", "error")}
                print(f"  L{L} C{C} R{R} {name}: {shown}", flush=True)

            def measure(name: str, fn, **extra) -> None:
                """fn(P, W, G, B) -> R (L, T, C) outputs."""
                if over_budget():
                    record(name, skipped="budget", **extra)
                    return
                try:
                    sec, outs = timed(lambda: fn(*timed_R), args.reps, cuda)
                    timed_diff = [float((outs[r] - ref_timed[r]).abs().max()) for r in range(R)]
                    first = [float((outs[r][:, :16] - ref_timed[r][:, :16]).abs().max()) for r in range(R)]
                    bitwise = all(torch.equal(outs[r], ref_timed[r]) for r in range(R))
                    del outs
                    checked = fn(*check_R)
                    diff = [float((checked[r] - ref_check[r]).abs().max()) for r in range(R)]
                    record(name, us_per_step=sec / T * 1e6, us_per_run_step=sec / T / R * 1e6, max_abs_diff=diff, max_abs_diff_timed=timed_diff,
                           max_abs_diff_timed_first16=first, bitwise_equal=bitwise, **extra)  # fmt: skip
                except Exception as e:  # a variant that fails is recorded, the others still run
                    record(name, error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc(limit=4)[-1500:], **extra)
                    if cuda:
                        torch.cuda.synchronize()

            if not args.only or args.only in "today":
                measure("today", lambda P, W, G, B: today_each(P, W, G, B, R), rows=today_rows)
            if R > 1 and cuda and (not args.only or args.only in "today-streams"):
                if today_rows is not None and R * -(-C // today_rows) <= sms:
                    streams = [torch.cuda.Stream(dev) for _ in range(R)]

                    def on_streams(P, W, G, B):
                        outs = [None] * R
                        main = torch.cuda.current_stream(dev)
                        for r, s in enumerate(streams):
                            s.wait_stream(main)
                            with torch.cuda.stream(s):
                                outs[r] = today_persistent(P[r], W[r], G[r], B[r], eps)
                        for s in streams:
                            main.wait_stream(s)
                        return outs

                    measure("today-streams", on_streams, rows=today_rows)
                else:
                    record("today-streams", skipped=f"R x grid > {sms} multiprocessors")
            for sync, rows, sub, warps in VARIANTS:
                name = variant_name(sync, rows, sub, warps)
                if args.only and args.only not in name:
                    continue
                grid = R * -(-C // rows)
                try:
                    if cuda:
                        resident = RK.resident_programs(dev, L, C, rows, sub, warps, sync)
                        info = dict(RK.compiled_info(dev, L, C, rows, sub, warps, sync))
                    else:  # the interpreter runs one program at a time: one program per run
                        resident, info = (R if C <= rows else 0), {}
                except Exception as e:
                    record(name, error=f"compile: {type(e).__name__}: {e}"[:500], grid=grid)
                    continue
                info.update(rows=rows, sub=sub, warps=warps, sync=sync, grid=grid, resident=resident)
                if grid > resident:
                    record(name, skipped=f"grid {grid} > {resident} resident programs", **info)
                    continue

                def batched(P, W, G, B, rows=rows, sub=sub, warps=warps, sync=sync):
                    return RK.recurrent_batched(P, W, G, B, eps, rows=rows, sub=sub, warps=warps, sync=sync, check_residency=cuda)

                measure(name, batched, **info)
        del timed_in, check_in, ref_timed, ref_check
        if cuda:
            torch.cuda.empty_cache()
    res["seconds"] = time.perf_counter() - t_start
    save()
    print(f"wrote {out_path} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
