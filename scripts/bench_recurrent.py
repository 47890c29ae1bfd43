"""Benchmark of the recurrent validation pass's kernel variants, R runs of one shape at once.

    python3 scripts/bench_recurrent.py --out benchmarks/h200_recurrent.json
    python3 scripts/bench_recurrent.py --shapes 6x768 --R 1,2 --T 2000 --out quick.json

Needs only torch, triton and numpy (PYTHONPATH = the repo root, or run from it). For each
shape (L, C) and R runs it times, T steps of random inputs scaled like a real pass (W_c ~
N(0, 0.1^2) as model.py initialises it, P ~ N(0, 1), LayerNorm affine near 1 / 0):

- ``today``: kernels.recurrent_persistent, the R runs one after another (the baseline);
- ``today-streams``: R copies of it launched at once on R CUDA streams, each with its own
  barrier (only where R x its grid <= multiprocessors: then all programs are resident);
- ``batched-<sync>-r<rows>-s<sub>[-w<warps>]``: recurrent_kernels.recurrent_batched, ONE
  launch for the R runs, for every synchronisation (atomic | volatile | flag), rows per
  program, sub-tile and warp count listed in VARIANTS, only where the compiled kernel's
  residency (recurrent_kernels.resident_programs) admits the grid R x ceil(C / rows).

Each variant: us per step (all R runs), us per run-step, the largest absolute difference of
its outputs from ``today``'s, per run, and the compiled kernel's registers, spills and
residency. The JSON is rewritten after every variant, so a run cut short keeps what it has;
``--budget`` seconds stop it from starting new variants (a full run of the three default
shapes takes a few minutes on an H200, most of it compiling). A variant whose programs were
not all resident ends with an error (every wait gives up after recurrent_kernels.MAX_SPIN
polls) rather than hanging.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# (sync, rows, sub, warps); warps None = the module's default (4 up to C = 1024, else 8)
TILES = [(8, 8, None), (16, 16, None), (16, 8, None), (16, 16, 8), (32, 8, None), (32, 16, None), (32, 32, 16), (64, 8, None)]
VARIANTS = [(sync, *tile) for tile in TILES for sync in ("atomic", "volatile", "flag")]


def variant_name(sync: str, rows: int, sub: int, warps) -> str:
    return f"batched-{sync}-r{rows}-s{sub}" + (f"-w{warps}" if warps else "")


def inputs(R: int, L: int, T: int, C: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    P = torch.randn(R, L, T, C, device="cuda", generator=g)  # (R, L, T, C)
    W = torch.randn(R, L, C, C, device="cuda", generator=g) * 0.1  # (R, L, C, C)
    G = 1 + 0.05 * torch.randn(R, L, C, device="cuda", generator=g)  # (R, L, C)
    B = 0.05 * torch.randn(R, L, C, device="cuda", generator=g)
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


def timed(fn, reps: int) -> tuple[float, object]:
    """(median seconds of ``reps`` calls after one warm-up, the last call's result)."""
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2], out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="6x768,9x768,6x1152", help="LxC, comma-separated")
    p.add_argument("--R", default="1,2,4", help="runs per call, comma-separated")
    p.add_argument("--T", type=int, default=8000, help="steps")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default="", help="run only variants whose name contains this")
    p.add_argument("--budget", type=float, default=540.0, help="seconds after which no new variant starts")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_recurrent.py: needs a CUDA GPU")
    from archsearch.cvfp.fast import recurrent_kernels as RK
    from archsearch.cvfp.fast.kernels import recurrent_persistent, sm_count

    t_start = time.perf_counter()
    dev = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    res = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
        "triton": __import__("triton").__version__, "python": platform.python_version(), "T": args.T,
        "reps": args.reps, "results": [],
    }  # fmt: skip
    out_path = Path(args.out)

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=1))

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget

    eps, T = 1e-5, args.T
    sms = sm_count(dev)
    for shape in args.shapes.split(","):
        L, C = (int(x) for x in shape.lower().split("x"))
        Rs = [int(r) for r in args.R.split(",")]
        Rmax = max(Rs)
        P, W, G, B = inputs(Rmax, L, T, C)
        today_rows = next((r for r in (8, 16, 32) if -(-C // r) <= sms), None)
        ref = [recurrent_persistent(P[r], W[r], G[r], B[r], eps) for r in range(Rmax)]  # (L, T, C) each
        torch.cuda.synchronize()
        steps = min(T, 64)
        check = max(float((ref[r][:, :steps] - eager(P[r], W[r], G[r], B[r], eps, steps)).abs().max()) for r in range(Rmax))
        res.setdefault("today_vs_eager", {})[shape] = {"steps": steps, "max_abs_diff": check, "today_rows": today_rows}
        print(f"{shape}: today's kernel rows {today_rows}, vs eager over {steps} steps: {check:.2e}", flush=True)
        for R in Rs:
            Pr, Wr, Gr, Br = P[:R].contiguous(), W[:R].contiguous(), G[:R].contiguous(), B[:R].contiguous()

            def record(name: str, **fields) -> None:
                row = {"L": L, "C": C, "R": R, "variant": name, **fields}
                res["results"].append(row)
                save()
                shown = {k: v for k, v in fields.items() if k in ("us_per_step", "us_per_run_step", "max_abs_diff", "skipped", "error")}
                print(f"  L{L} C{C} R{R} {name}: {shown}", flush=True)

            def measure(name: str, fn, **extra) -> None:
                if args.only and args.only not in name:
                    return
                if over_budget():
                    record(name, skipped="budget", **extra)
                    return
                try:
                    sec, outs = timed(fn, args.reps)
                    diffs = [float((outs[r] - ref[r]).abs().max()) for r in range(R)]
                    record(name, us_per_step=sec / T * 1e6, us_per_run_step=sec / T / R * 1e6, max_abs_diff=diffs, **extra)
                except Exception as e:  # a variant that fails is recorded, the others still run
                    record(name, error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc(limit=4)[-1500:], **extra)
                    torch.cuda.synchronize()

            measure("today", lambda: [recurrent_persistent(Pr[r], Wr[r], Gr[r], Br[r], eps) for r in range(R)], rows=today_rows)
            if R > 1:
                if today_rows is not None and R * -(-C // today_rows) <= sms:
                    streams = [torch.cuda.Stream(dev) for _ in range(R)]

                    def on_streams():
                        outs = [None] * R
                        main = torch.cuda.current_stream(dev)
                        for r, s in enumerate(streams):
                            s.wait_stream(main)
                            with torch.cuda.stream(s):
                                outs[r] = recurrent_persistent(Pr[r], Wr[r], Gr[r], Br[r], eps)
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
                    resident = RK.resident_programs(dev, L, C, rows, sub, warps, sync)
                    info = dict(RK.compiled_info(dev, L, C, rows, sub, warps, sync))
                except Exception as e:
                    record(name, error=f"compile: {type(e).__name__}: {e}"[:500], grid=grid)
                    continue
                info.update(rows=rows, sub=sub, warps=warps, sync=sync, grid=grid, resident=resident)
                if grid > resident:
                    record(name, skipped=f"grid {grid} > {resident} resident programs", **info)
                    continue
                measure(name, lambda: RK.recurrent_batched(Pr, Wr, Gr, Br, eps, rows=rows, sub=sub, warps=warps, sync=sync), **info)
        del P, W, G, B, ref
        torch.cuda.empty_cache()
    res["seconds"] = time.perf_counter() - t_start
    save()
    print(f"wrote {out_path} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
