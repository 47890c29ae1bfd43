"""Where a run's GPU time goes: per-kernel profiles of phase-2 steps and a phase-1 iteration,
and timings of the head's pieces and of the recurrent-pass variants. JSON + tables out.

    python scripts/profile_gpu.py --out benchmarks/h200_profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_timing import median_ms  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from archsearch.config import run_config_from_dict  # noqa: E402
from archsearch.cvfp.fast import head  # noqa: E402
from archsearch.cvfp.fast.graphs import Phase2Step  # noqa: E402
from archsearch.cvfp.fast.layers import FusedContextBlock, FusedTokenBlock  # noqa: E402
from archsearch.cvfp.model import ContextBlock, TokenBlock, TokenEmbedding  # noqa: E402
from archsearch.cvfp.phases import phase1_span  # noqa: E402
from archsearch.cvfp.precision import precision_scope  # noqa: E402

V, E = 50_257, 768


def cuda_time(fn, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs (after two warm-ups)."""
    return median_ms(fn, reps)


def table(prof, n=30) -> str:
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=n, max_name_column_width=60)


def phase2_breakdown(cfg, emb, cache, win, ids, val_tokens: int = 31_024) -> dict:
    """Where one run's phase 2 spends its wall time, with a new phase-2 session (the first run
    of a shape in a thread: warm-up step and captures) and with a kept one (the next sizes of
    a trial): train_phase2 timed whole, then again with a device sync around each part (the
    session's preparation, eager steps, replays, evaluations)."""
    import time

    from archsearch.cvfp.fast import graphs as EN
    from archsearch.cvfp.phases import train_phase2

    dev = ids.device
    n = cache.shape[1] - val_tokens - 1
    train = (win[:n], ids[1 : n + 1], cache[:, :n])
    val = (win[n : n + val_tokens], ids[n + 1 : n + 1 + val_tokens], cache[:, n : n + val_tokens])

    def run(new_session: bool) -> float:
        if new_session:
            EN.release_phase2_graphs()
        tb = TokenBlock(cfg.model, E).to(dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step, evaluate = EN.phase2_backends(FusedTokenBlock(tb), emb, train, val, cfg)
        train_phase2(step, evaluate, n, cfg)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(True)  # compile everything once
    res = {"train_tokens": n}
    for case, new_session in (("new_session", True), ("kept_session", False)):
        out = {"wall_s": run(new_session)}
        parts = {"prepare": 0.0, "eager_steps": 0.0, "replays": 0.0, "evaluate": 0.0}
        counts = dict.fromkeys(parts, 0)

        def timed(name, fn, parts=parts, counts=counts):
            def wrapper(*a, **k):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                r = fn(*a, **k)
                torch.cuda.synchronize()
                parts[name] += time.perf_counter() - t0
                counts[name] += 1
                return r

            return wrapper

        orig_call, orig_prepare, orig_eval = EN.Phase2Step.__call__, EN.Phase2Step.prepare, EN.Evaluation.__call__

        def call(self, s, e, timed=timed, orig_call=orig_call):
            name = "replays" if self.graph is not None else "eager_steps"
            return timed(name, orig_call)(self, s, e)

        EN.Phase2Step.__call__, EN.Phase2Step.prepare, EN.Evaluation.__call__ = call, timed("prepare", orig_prepare), timed("evaluate", orig_eval)
        try:
            out["synced_wall_s"] = run(new_session)
        finally:
            EN.Phase2Step.__call__, EN.Phase2Step.prepare, EN.Evaluation.__call__ = orig_call, orig_prepare, orig_eval
        out.update({f"{k}_s": v for k, v in parts.items()}, counts=counts)
        res[case] = out
    return res


def head_overlap(h, Wp, t, V) -> dict:
    """Forward GEMM, cross-entropy kernel and gradient GEMM of the head for B rows, split in
    row chunks, on one stream or with the (memory-bound) cross-entropy of chunk i on a second
    stream beside the (compute-bound) GEMMs of chunks i+1 and i-1: milliseconds per B rows."""
    from archsearch.cvfp.fast.kernels import ce_rows

    B = h.shape[0]
    logits = torch.empty(B, Wp.shape[0], device=h.device, dtype=Wp.dtype)
    gh = torch.empty_like(h)
    loss = torch.empty(B, device=h.device)
    side = torch.cuda.Stream()

    def run(chunks: int, streams: bool) -> None:
        c = B // chunks
        main = torch.cuda.current_stream()
        done = []
        for i in range(chunks + 1):
            if i < chunks:
                r = slice(i * c, (i + 1) * c)
                torch.matmul(h[r], Wp.T, out=logits[r])
                if streams:
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        ce_rows(logits[r], t[r], loss[r], None, 1.0 / B, True, vocab_size=V)
                        ev = torch.cuda.Event()
                        ev.record(side)
                    done.append(ev)
                else:
                    ce_rows(logits[r], t[r], loss[r], None, 1.0 / B, True, vocab_size=V)
            if i >= 1:
                r = slice((i - 1) * c, i * c)
                if streams:
                    main.wait_event(done[i - 1])
                torch.matmul(logits[r], Wp, out=gh[r])

    res = {}
    for chunks in (1, 2, 4, 8):
        for streams in ((False, True) if chunks > 1 else (False,)):
            res[f"chunks_{chunks}_{'two_streams' if streams else 'one_stream'}_ms"] = cuda_time(lambda: run(chunks, streams))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda")
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    L, C, k = 6, 768, 1
    cfg = run_config_from_dict({"model": {"num_layers": L, "context_dim": C, "num_input_tokens": k}, "engine": {"precision": args.precision}})
    g = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(V, E, device=dev, generator=g) * 0.1
    emb = TokenEmbedding(W, k).to(dev)
    N = 122_795
    ids = torch.randint(0, V, (N,), device=dev, generator=g)
    win = emb.windows(ids)

    # ---- phase 2 steps
    tblock = FusedTokenBlock(TokenBlock(cfg.model, E).to(dev))
    cache = torch.randn(L, N, C, device=dev, generator=g).to(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    weight = head.head_weight(emb.weight, args.precision)
    opt = torch.optim.Adam(tblock.parameters(), lr=1e-3, fused=True)
    B = cfg.phase2.batch_size

    def p2_step(s):
        e = s + B
        with precision_scope(args.precision, dev):
            h = tblock(cache[:, s:e], emb.vectors(win[s:e]))
            loss = head.train_loss(h, weight, ids[s + 1 : e + 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tblock.parameters(), 1.0)
        opt.step()

    def p2_steps():
        for i in range(8):
            p2_step(i * B)

    out["phase2_step_ms"] = cuda_time(p2_steps, 5) / 8

    def graphed_step_ms(fused: bool) -> float:
        """Milliseconds per phase-2 step as a run does it: replays of the captured step."""
        tb = TokenBlock(cfg.model, E).to(dev)
        tb = FusedTokenBlock(tb) if fused else tb
        o = torch.optim.Adam(tb.parameters(), lr=1e-3, fused=True, capturable=True)
        st = Phase2Step(tb, emb, weight, o, cfg, cache, win, ids[1:])
        st.prepare()  # one eager warm-up step, then the capture
        return cuda_time(lambda: [st(i * B, (i + 1) * B) for i in range(20)], 5) / 20

    for fused in (False, True):  # LN(residual + ReLU(z)) as one kernel each way, or as plain ops
        out[f"phase2_graphed_step_ms_fused_norm_{fused}"] = graphed_step_ms(fused)
    cfg5 = run_config_from_dict({"model": {"num_layers": L, "context_dim": C, "num_input_tokens": k},
                                 "engine": {"precision": args.precision}, "phase2": {"max_epochs": 5, "patience": 5}})  # fmt: skip
    out["phase2_run_breakdown"] = phase2_breakdown(cfg5, emb, cache, win, ids)
    print("phase 2 of one run (5 epochs):", out["phase2_run_breakdown"])
    print({k: round(v, 3) for k, v in out.items() if k.startswith("phase2") and isinstance(v, float)})
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        p2_steps()
        torch.cuda.synchronize()
    print("=== phase 2, 8 steps of 4096 positions ===")
    print(table(prof))

    # ---- the head's pieces
    Wp = weight.matrix  # padded to a multiple of 64 rows
    Wu = Wp[:V].contiguous()  # unpadded, for comparison
    h = torch.randn(B, E, device=dev, generator=g).to(Wp.dtype)
    t = ids[1 : B + 1]
    logits = h @ Wp.T
    from archsearch.cvfp.fast.kernels import ce_rows

    loss = torch.empty(B, device=dev)
    out["head_logits_gemm_ms"] = cuda_time(lambda: h @ Wp.T)
    out["head_logits_gemm_unpadded_ms"] = cuda_time(lambda: h @ Wu.T)
    out["head_ce_kernel_ms"] = cuda_time(lambda: ce_rows(logits, t, loss, None, 1.0, True, vocab_size=V))
    out["head_grad_gemm_ms"] = cuda_time(lambda: logits @ Wp)
    lu = h @ Wu.T
    out["head_grad_gemm_unpadded_ms"] = cuda_time(lambda: lu @ Wu)
    out["head_torch_ce_ms"] = cuda_time(lambda: torch.nn.functional.cross_entropy(lu.float(), t))
    # (the cross-entropy kernel's variants were swept on 2026-11-28: see benchmarks/NOTES.md)
    out["head_overlap"] = head_overlap(h, Wp, t, V)
    print("head, chunks and streams:", out["head_overlap"])

    # ---- the norm backward's reduction of per-program partial sums (528 x 3*768 on an H200)
    from archsearch.cvfp.fast.kernels import col_sum

    part = torch.randn(528, 3 * 768, device=dev, generator=g)

    def graphed_us(fn) -> float:
        """Microseconds per call of ``fn`` on the GPU: 100 calls captured as one CUDA graph (a
        loop of launches from the host would time the launches)."""
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(100):
                fn()
        return cuda_time(graph.replay) * 10

    out["partial_sums_reduction_us"] = {"torch_sum": graphed_us(lambda: part.sum(0)), "col_sum_kernel": graphed_us(lambda: col_sum(part))}
    print("partial sums, per reduction:", out["partial_sums_reduction_us"])

    # ---- a phase-1 chunk (8 batches of 8000) forward + backward
    cblock = ContextBlock(cfg.model, E).to(dev)
    prev = torch.randn(N, C, device=dev, generator=g)
    inputs = torch.randn(N, C, device=dev, generator=g)
    out_all = torch.empty_like(prev)

    fused_cblock = FusedContextBlock(cblock)

    def p1_chunk(block=fused_cblock):
        phase1_span(block, emb, win, inputs, prev, out_all, 0, 64_000, 16, cfg)  # 8 batches of phase1.batch_size 8000

    for fused in (False, True):
        out[f"phase1_chunk_64k_ms_fused_norm_{fused}"] = cuda_time(lambda fused=fused: p1_chunk(fused_cblock if fused else cblock), 5)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        p1_chunk()
        torch.cuda.synchronize()
    print("=== phase 1, one chunk of 64,000 positions ===")
    print(table(prof))

    # the same chunk through phase 1's fused iteration (engine.phase1_fused: fast/phase1.py),
    # with its per-iteration weight casts and gradient hand-over
    cfg_f = cfg.replace(**{"engine.phase1_fused": True})
    fused_p1 = fused_cblock.phase1_fast(emb, win, cfg_f)
    noise = torch.randn(N, C, device=dev, generator=g)  # becomes the inputs in place: they drift from call to call (timing only)

    def p1_fused_chunk():
        fused_p1.iteration(prev, noise, out_all, [(0, 64_000)], 16)

    out["phase1_chunk_64k_ms_fused_iteration"] = cuda_time(p1_fused_chunk, 5)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        p1_fused_chunk()
        torch.cuda.synchronize()
    print("=== phase 1, one chunk of 64,000 positions, fused iteration (engine.phase1_fused) ===")
    print(table(prof))

    # ---- recurrent variants
    from archsearch.cvfp.fast import recurrent as R
    from archsearch.cvfp.fast.recurrent_kernels import recurrent_persistent

    for L2, C2 in ((6, 768), (9, 768), (6, 1152)):
        T = 4000
        P = torch.randn(L2, T, C2, device=dev, generator=g)
        Wc = [torch.randn(C2, C2, device=dev, generator=g) * C2**-0.5 for _ in range(L2)]
        norms = [(torch.ones(C2, device=dev), torch.zeros(C2, device=dev)) for _ in range(L2)]
        G = torch.stack([a for a, _ in norms])
        Bt = torch.stack([b for _, b in norms])
        Ws = torch.stack(Wc)
        per = {}
        per["persistent_us_per_step"] = cuda_time(lambda: recurrent_persistent(P, Ws, G, Bt, 1e-5), 3) * 1e3 / T
        per["graph_us_per_step"] = cuda_time(lambda: R.triton_pass(P, Wc, norms, 1e-5), 3) * 1e3 / T
        out[f"recurrent_L{L2}_C{C2}"] = per
        print(f"recurrent L={L2} C={C2}: " + ", ".join(f"{k} {v:.1f}" for k, v in per.items()))
    print(json.dumps({k: v for k, v in out.items()}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
