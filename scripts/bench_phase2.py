"""Phase 2's step alone: milliseconds per replayed step, old (graphs.Phase2Step: autograd, the
fused torch Adam) against new (fast/phase2.py FusedPhase2Step: no autograd, flat buffers, the
clip and Adam in two Triton kernels), both captured as a CUDA graph as a run captures them,
with the code of the tree it runs in. Standalone: torch, triton and this repository. JSON out.

    python scripts/bench_phase2.py --out benchmarks/h200_phase2.json
    python scripts/bench_phase2.py --cases L6_C768_k1 --profile
    TRITON_INTERPRET=1 python scripts/bench_phase2.py --smoke --out /tmp/p2.json   # CPU, no GPU

Shapes: L6 C768 k1, L6 C768 k2, L9 C768 k1, L6 C1152 k1; batches of 4,096 positions; V 50,257,
E 768; random embedding, token ids and context cache (no data access); parameters initialised
as a run does (model.init_parameters), the block a run's fast path trains (its fused view).

Per case and variant: the step is built and captured as in a kept session (graphs.Phase2Step
with ``torch.optim.Adam(fused=True, capturable=True)``, or FusedPhase2Step with ``graphed``),
then ``--warmup`` steps, then ``--steps`` steps over the case's ``--batches`` batches in order,
timed with CUDA events, ``--repeats`` times, the variants' repeats interleaved (a drift of the
GPU's clocks during the call falls on both alike): ``step_ms`` is the median per step of a call as a
run makes it (the batch's contexts, windows and targets copied into the graph's buffers, then
the replay); ``replay_ms`` the replays alone (the same batch, no copies). TFLOP/s count the
matrix products of a step, 2 per multiply-add: B * (6 * tok + 4 * E * V) with tok the
TokenBlock's multiply-adds per position (scripts/bench_gpu.py's phase-2 convention; the frozen
head has no weight gradient).

Agreement: both variants start from the same parameters and take the same ``--check-steps``
steps on the same batches; ``max_param_rel`` is the largest relative difference (norm of the
difference / norm) over the TokenBlock's parameters, ``loss_rel`` that of the summed losses
(bf16: rounding differs; the GPU test tests/test_gpu.py::test_fused_phase2_step_matches_autograd_step
holds the tolerance).

``--smoke``: tiny shapes on the CPU (run under TRITON_INTERPRET=1), eager steps (no graphs),
the new step against phases.EagerStepper in fp32; for tests/test_scripts.py. ``--profile``:
torch.profiler over ``--steps`` replayed steps of the first case, kernels sorted by CUDA time,
per step.
"""

from __future__ import annotations

import argparse
import copy
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

import torch  # noqa: E402

from archsearch.config import run_config_from_dict, token_widths  # noqa: E402
from archsearch.cvfp.fast import head  # noqa: E402
from archsearch.cvfp.fast.layers import FusedTokenBlock  # noqa: E402
from archsearch.cvfp.model import TokenBlock, TokenEmbedding, init_parameters  # noqa: E402

V, E = 50_257, 768
PEAK_TFLOPS = {"bf16": 989.4, "fp32": 66.9}
CASES = {"L6_C768_k1": (6, 768, 1), "L6_C768_k2": (6, 768, 2), "L9_C768_k1": (9, 768, 1), "L6_C1152_k1": (6, 1152, 1)}
SMOKE = {"V": 50, "E": 8, "B": 8, "cases": {"L2_C16_k2": (2, 16, 2), "L2_C16_k1": (2, 16, 1)}}


def git_state() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def step_flops(L: int, C: int, k: int, B: int, E_: int, V_: int) -> float:
    widths = token_widths(E_, k, L)
    tok = sum((C + a) * b + (a * b if a != b else 0) for a, b in zip(widths[:-1], widths[1:]))
    return float(B * (6 * tok + 4 * E_ * V_))


class Case:
    """One shape: embedding, data (``batches`` batches of B positions) and a fresh block per variant."""

    def __init__(self, L, C, k, dev, precision, B, batches, V_=V, E_=E):
        self.L, self.C, self.k, self.dev, self.precision, self.B = L, C, k, dev, precision, B
        self.V, self.E = V_, E_
        g = torch.Generator(device=dev).manual_seed(0)
        self.emb = TokenEmbedding(torch.randn(V_, E_, device=dev, generator=g) * 0.1, k).to(dev)
        n = B * batches
        ids = torch.randint(0, V_, (n + 1,), device=dev, generator=g)
        self.windows, self.targets = self.emb.windows(ids)[:n], ids[1:].contiguous()
        self.cache = torch.randn(L, n, C, device=dev, generator=g)
        self.n = n
        self.cfg = run_config_from_dict({
            "model": {"num_layers": L, "context_dim": C, "num_input_tokens": k},
            "phase2": {"batch_size": B},
            "engine": {"precision": precision},
        })  # fmt: skip
        tb = TokenBlock(self.cfg.model, E_)
        init_parameters(tb, self.cfg.model, torch.Generator().manual_seed(1))
        self.initial = tb.to(dev)

    def step(self, variant: str, graphed: bool):
        """(stepper, the module it trains) of ``variant`` (old | new | eager), captured where graphed."""
        tb = copy.deepcopy(self.initial)
        if variant == "eager":  # the plain autograd step (CPU smoke reference)
            from archsearch.cvfp.phases import EagerStepper

            return EagerStepper(tb, self.emb, self.emb.weight, self.cfg, (self.windows, self.targets, self.cache)), tb
        ftb = FusedTokenBlock(tb)
        weight = head.head_weight(self.emb.weight, self.precision)
        if variant == "old":
            from archsearch.cvfp.fast.graphs import Phase2Step

            cuda = self.dev.type == "cuda"
            opt = torch.optim.Adam(tb.parameters(), lr=self.cfg.phase2.lr, fused=cuda, capturable=cuda and graphed)
            step = Phase2Step(ftb, self.emb, weight, opt, self.cfg, self.cache, self.windows, self.targets)
            if graphed:
                step.prepare()
        else:
            from archsearch.cvfp.fast.phase2 import FusedPhase2Step

            step = FusedPhase2Step(ftb, self.emb, weight, self.cfg, self.cache, self.windows, self.targets, graphed=graphed)
            step.prepare()
        return step, tb


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def timed(dev, fn, count: int) -> float:
    """Milliseconds per call of ``fn`` over ``count`` calls (CUDA events; wall clock off CUDA)."""
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(count):
            fn(i)
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / count
    t0 = time.perf_counter()
    for i in range(count):
        fn(i)
    return (time.perf_counter() - t0) * 1e3 / count


def agreement(case: Case, variants: tuple[str, str], steps: int, graphed: bool) -> dict:
    """Both variants from the same parameters over the same ``steps`` batches."""
    runs = []
    for v in variants:
        step, tb = case.step(v, graphed)
        step.loss_sum.zero_()
        for i in range(steps):
            s = (i * case.B) % case.n
            step(s, s + case.B)
        sync(case.dev)
        runs.append((float(step.loss_sum), [p.detach().clone() for p in tb.parameters()]))
        del step, tb
    (la, pa), (lb, pb) = runs
    rels = [float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(pb, pa)]
    names = [name for name, _ in case.initial.named_parameters()]
    moved = [float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(pb, [p.detach() for p in case.initial.parameters()])]
    return {"variants": list(variants), "steps": steps, "max_param_rel": max(rels), "max_param": names[rels.index(max(rels))],
            "param_rel": dict(zip(names, rels)), "loss_rel": abs(lb - la) / abs(la), "min_param_moved_rel": min(moved)}  # fmt: skip


def measure(case: Case, variants, args, graphed: bool) -> dict:
    """Per variant: its step built (and captured), warmed, then timed; the variants' repeats
    interleaved (old, new, old, new, ...), so that a drift of the GPU's clocks during the call
    falls on both alike."""
    nb = case.n // case.B
    steps, calls = {}, {}
    for v in variants:
        step, _ = case.step(v, graphed)
        steps[v] = step

        def call(i, step=step):
            s = (i % nb) * case.B
            step(s, s + case.B)

        calls[v] = call
        for i in range(args.warmup):
            call(i)
    sync(case.dev)
    times: dict = {v: [] for v in variants}
    replays: dict = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            times[v].append(timed(case.dev, calls[v], args.steps))
    for _ in range(args.repeats):
        for v in variants:
            graph = getattr(steps[v], "graph", None)
            if graph is not None:
                replays[v].append(timed(case.dev, lambda i, graph=graph: graph.replay(), args.steps))
    rows = {}
    for v in variants:
        row = {"step_ms": median(times[v]), "step_ms_all": times[v]}
        if replays[v]:
            row["replay_ms"] = median(replays[v])
        if args.profile_case == (case.L, case.C, case.k) and case.dev.type == "cuda":
            row["profile"] = profile(steps[v], calls[v], args.steps)
        rows[v] = row
    return rows


def profile(step, call, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            call(i)
        torch.cuda.synchronize()
    rows, total = [], 0.0
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if us <= 0:
            continue
        total += us
        rows.append({"name": ev.key, "count_per_step": ev.count / steps, "us_per_step": us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"cuda_ms_per_step": total / 1e3 / steps, "top_kernels": rows[:40]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", default=None)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=8, help="distinct batches of data per case")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--check-steps", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="profile the first case's steps (CUDA)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU shapes, eager steps (run under TRITON_INTERPRET=1)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    smoke = args.smoke
    cases = SMOKE["cases"] if smoke else CASES
    names = args.cases or list(cases)
    for name in names:
        if name not in cases:
            ap.error(f"--cases: {name!r} is not one of {sorted(cases)}")
    if args.steps < 1 or args.repeats < 1 or args.batches < 1 or args.batch < 1:
        ap.error("--steps, --repeats, --batches and --batch must be at least 1")
    dev = torch.device(args.device or ("cpu" if smoke else "cuda" if torch.cuda.is_available() else "cpu"))
    if not smoke and dev.type != "cuda":
        ap.error("the bench times CUDA graphs: it needs a CUDA device (--smoke runs the tiny CPU form)")
    precision = "fp32" if smoke else "bf16"
    graphed = not smoke
    variants = ("eager", "new") if smoke else ("old", "new")
    args.profile_case = cases[names[0]] if args.profile else None
    B = SMOKE["B"] if smoke else args.batch
    out: dict = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "git": git_state(), "precision": precision, "smoke": smoke, "graphed": graphed,
        "batch": B, "batches": args.batches, "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
        "peak_tflops": PEAK_TFLOPS[precision], "variants": list(variants), "cases": [],
    }  # fmt: skip
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=2) + "\n")

    for name in names:
        L, C, k = cases[name]
        row: dict = {"case": name, "L": L, "C": C, "k": k}
        case = None
        try:
            case = Case(L, C, k, dev, precision, B, args.batches, *((SMOKE["V"], SMOKE["E"]) if smoke else (V, E)))
            f = step_flops(L, C, k, B, case.E, case.V)
            row["flops_per_step"] = f
            try:
                measured = measure(case, variants, args, graphed)
            except Exception:
                err = traceback.format_exc(limit=8)[-4000:]
                measured = {v: {"error": err} for v in variants}
            for v in variants:
                r = measured[v]
                if "error" not in r:
                    r["tflops"] = f / (r["step_ms"] * 1e-3) / 1e12
                    r["pct_peak"] = 100 * r["tflops"] / PEAK_TFLOPS[precision] if dev.type == "cuda" else math.nan
                row[v] = r
                msg = r.get("error") or (f"{r['step_ms']:.3f} ms/step" + (f" (replay {r['replay_ms']:.3f})" if "replay_ms" in r else "")
                                         + f", {r['tflops']:.1f} TF/s ({r['pct_peak']:.1f} %)")  # fmt: skip
                print(f"{name:12} {v:5} {msg}", flush=True)
                if "profile" in r:
                    for kr in r["profile"]["top_kernels"][:25]:
                        print(f"    {kr['us_per_step']:8.1f} us/step x{kr['count_per_step']:<5.1f} {kr['name'][:100]}")
            if all("step_ms" in row.get(v, {}) for v in variants):
                row["speedup"] = row[variants[0]]["step_ms"] / row[variants[1]]["step_ms"]
            row["agreement"] = agreement(case, variants, args.check_steps, graphed)
            a = row["agreement"]
            print(f"{name:12} agreement over {a['steps']} steps: max param rel {a['max_param_rel']:.2e} ({a['max_param']}), "
                  f"loss rel {a['loss_rel']:.2e}", flush=True)  # fmt: skip
        except Exception:
            row["error"] = traceback.format_exc(limit=8)[-4000:]
            print(f"{name:12} FAILED\n{row['error']}", flush=True)
        out["cases"].append(row)
        save()
        case = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    save()
    if not args.out:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
