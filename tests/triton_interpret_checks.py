"""The Triton kernels and the fast drop-ins built on them, on tiny CPU shapes under Triton's
interpreter, each against its plain PyTorch twin. Run as a script by test_triton_interpret.py
with TRITON_INTERPRET=1 set before triton is imported; prints one JSON object: check name ->
null (passed) or the failure's text.

The persistent recurrent kernel (recurrent_kernels.recurrent_batched) only with one program per
run (C <= rows): a run's programs wait for each other at every layer, and the interpreter runs
programs one after another, so with two programs in a run the first would wait (until its
give-up guard). Its multi-program grids are checked on a GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@check
def ce_rows_loss_argmax_grad():
    from archsearch.cvfp.fast.kernels import ce_rows

    g = torch.Generator().manual_seed(0)
    n, V, VP = 6, 300, 320  # VP - V padding columns
    x = torch.randn(n, VP, generator=g) * 3
    x[0, 3], x[0, 250] = 20, 20  # a tie across groups: the lower index wins, as in torch
    x[1, V:] = 1e4  # padding takes no part
    t = torch.randint(0, V, (n,), generator=g)
    ref = F.cross_entropy(x[:, :V], t, reduction="none")
    kw = dict(block_v=64, group=4, warps=1)
    loss, am = torch.empty(n), torch.empty(n, dtype=torch.int32)
    ce_rows(x.clone(), t, loss, am, write_grad=False, vocab_size=V, **kw)
    assert torch.allclose(loss, ref, atol=1e-5), (loss, ref)
    assert am.long().tolist() == x[:, :V].argmax(-1).tolist()
    grad, scale = x.clone(), torch.rand(n, generator=g)
    ce_rows(grad, t, loss, None, write_grad=True, vocab_size=V, row_scale=scale, **kw)
    want = (torch.softmax(x[:, :V], -1) - F.one_hot(t, V)) * scale[:, None]
    assert float((grad[:, :V] - want).abs().max()) < 1e-6
    assert bool((grad[:, V:] == 0).all())


@check
def res_relu_ln_forward_and_backward():
    from archsearch.cvfp.fast.kernels import res_relu_ln_bwd, res_relu_ln_fwd

    g = torch.Generator().manual_seed(1)
    n, D, eps = 7, 24, 1e-5
    z, r = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    zb, gamma, beta = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g)
    packed = torch.full((n, D + 5), float("nan"))  # the next layer's GEMM input: y lands in its last D columns
    y, mean, rstd = res_relu_ln_fwd(z, r, gamma, beta, eps, zb, packed[:, 5:])
    leaves = [t.clone().requires_grad_() for t in (z, r, zb, gamma, beta)]
    zl, rl, zbl, gl, bl = leaves
    ref = F.layer_norm(rl + F.relu(zl + zbl), (D,), gl, bl, eps)
    assert rel(y, ref.detach()) < 1e-5 and torch.equal(packed[:, 5:], y)
    dy = torch.randn(n, D, generator=g)
    ref.backward(dy)
    dz, dr, dg, db, dzb = res_relu_ln_bwd(dy, z, r, gamma, mean, rstd, True, zb)
    for got, leaf in zip((dz, dr, dzb, dg, db), leaves):
        assert rel(got, leaf.grad) < 1e-5, (got, leaf.grad)


@check
def norm_forward_kernel_serves_the_layers_and_phase1_alike():
    """The one forward kernel in its two forms: the layers' (z contiguous, y16 a column slice of
    a wider buffer) and phase 1's (z a column slice of the (n, L*C) buffer, y16 contiguous),
    against F.layer_norm and against each other bit for bit, on widths that are not powers of two
    and row counts that are not multiples of the rows a program takes (16 here)."""
    from archsearch.cvfp.fast.kernels import res_relu_ln_fwd
    from archsearch.cvfp.fast.phase1_kernels import ln_fwd

    g = torch.Generator().manual_seed(10)
    eps = 1e-5
    for n, D, dtype in ((7, 24, torch.float32), (33, 100, torch.float32), (17, 24, torch.bfloat16)):
        r = torch.randn(n, D, generator=g)
        zb, gamma, beta = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g)
        Z = torch.randn(n, 3 * D, generator=g).to(dtype)  # phase 1's buffer: layer 1's z is its middle third
        z = Z[:, D : 2 * D]
        want = F.layer_norm(r + F.relu(z.float() + zb), (D,), gamma, beta, eps)
        packed = torch.full((n, D + 3), float("nan"), dtype=dtype)
        y, mean, rstd = res_relu_ln_fwd(z.contiguous(), r, gamma, beta, eps, zb, packed[:, 3:])
        y1, y16 = torch.full((n, D), float("nan")), torch.full((n, D), float("nan"), dtype=dtype)
        mean1, rstd1 = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
        ln_fwd(z, zb, r, gamma, beta, eps, y1, y16, mean1, rstd1)
        assert rel(y, want) < 1e-5, (n, D, dtype, rel(y, want))
        for a, b in ((y, y1), (mean, mean1), (rstd, rstd1), (packed[:, 3:], y16)):
            assert torch.equal(a, b), (n, D, dtype)
        # y16 is y in the narrower dtype (the interpreter's bf16 rounding is not torch's: no bit check)
        assert rel(y16.float(), y1) < (1e-2 if dtype == torch.bfloat16 else 1e-7), (n, D, dtype)
        assert bool(packed[:, :3].isnan().all())  # the columns before the slice are left alone
        x = r + F.relu(z.float() + zb)
        assert rel(mean, x.mean(1)) < 1e-5 and rel(rstd, (x.var(1, unbiased=False) + eps).rsqrt()) < 1e-5


@check
def col_sum_is_a_column_sum_and_col_acc_adds_it():
    from archsearch.cvfp.fast.kernels import col_sum
    from archsearch.cvfp.fast.phase1_kernels import col_acc

    g = torch.Generator().manual_seed(2)
    for P, W in ((37, 100), (1, 72), (64, 5)):  # row blocks of 32 (a partial last one), column blocks of 64
        x = torch.randn(P, W, generator=g)
        s = col_sum(x)
        assert torch.allclose(s, x.sum(0), atol=1e-5), (P, W)
        out0 = torch.randn(W, generator=g)
        out = out0.clone()
        col_acc(x, out)
        assert torch.equal(out, out0 + s), (P, W)  # the same sum, added
        col_acc(x, out)
        assert torch.equal(out, out0 + s + s), (P, W)


@check
def recurrent_step_kernel_chain_matches_plain_steps():
    from archsearch.cvfp.fast import recurrent as R

    g = torch.Generator().manual_seed(3)
    L, T, C = 2, 5, 12
    P = torch.randn(L, T, C, generator=g)
    Wc = [torch.randn(C, C, generator=g) * C**-0.5 for _ in range(L)]
    norms = [(torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)) for _ in range(L)]
    ref = torch.empty(L, T, C)
    R._steps(torch.zeros(C), P, Wc, norms, ref, 1e-5)
    out = R.triton_pass(P, Wc, norms, 1e-5, rows=4, use_graph=False, steps=2)  # chunks of 2 steps, a partial last one
    assert out.shape == ref.shape and rel(out, ref) < 1e-5


def _plain_runs(P, W, G, B):
    from archsearch.cvfp.fast import recurrent as R

    refs = []
    for r in range(P.shape[0]):
        ref = torch.empty(P.shape[1:])
        R._steps(torch.zeros(P.shape[-1]), P[r], list(W[r]), list(zip(G[r], B[r])), ref, 1e-5)
        refs.append(ref)
    return refs


@check
def recurrent_batched_kernel_matches_one_run_at_a_time():
    from archsearch.cvfp.fast.recurrent_kernels import SYNC_MODES, recurrent_batched

    g = torch.Generator().manual_seed(7)
    R, L, T, C = 3, 2, 5, 12
    P = torch.randn(R, L, T, C, generator=g)
    W = torch.randn(R, L, C, C, generator=g) * C**-0.5
    G, B = torch.rand(R, L, C, generator=g) + 0.5, torch.randn(R, L, C, generator=g)
    refs = _plain_runs(P, W, G, B)
    for sync in SYNC_MODES:
        for rows, sub in ((16, 16), (16, 8), (32, 4)):  # the tile in registers; sub-tiles (a partial last one)
            out = recurrent_batched(P, W, G, B, 1e-5, rows=rows, sub=sub, sync=sync, check_residency=False)
            assert out.shape == (R, L, T, C), (sync, rows, sub, out.shape)
            for r in range(R):
                assert rel(out[r], refs[r]) < 1e-5, (sync, rows, sub, r, rel(out[r], refs[r]))


@check
def recurrent_passes_batched_equal_one_pass_at_a_time_and_the_plain_pass():
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.fast import recurrent as R
    from archsearch.cvfp.model import ContextBlock, TokenEmbedding, init_parameters
    from archsearch.cvfp.phases import val_context_cache

    cfg = run_config_from_dict({"model": {"num_layers": 2, "context_dim": 6, "num_input_tokens": 2}, "engine": {"eval_batch_size": 4}})
    g = torch.Generator().manual_seed(8)
    emb = TokenEmbedding(torch.randn(30, 8, generator=g), 2)
    windows = emb.windows(torch.randint(0, 30, (9,), generator=g))  # (9, 2)
    blocks = []
    for seed in range(3):  # a trial's sizes: one shape, other weights
        block = ContextBlock(cfg.model, 8)
        init_parameters(block, cfg.model, torch.Generator().manual_seed(seed))
        blocks.append(block.requires_grad_(False))
    # two runs in one launch, then the third alone: the plan's split and the unstacking
    plan = (R.Variant(2, "flag", 8), R.Variant(1, "atomic", 16, 8))
    got = R._batched_passes(blocks, emb, windows, cfg, plan=plan, interpret=True)
    one = R.recurrent_passes(blocks, emb, windows, cfg)  # on the CPU: one eager pass after another
    assert len(got) == len(one) == 3
    for block, a, b in zip(blocks, got, one):
        plain = val_context_cache(block, emb, windows, cfg)  # the block called step by step
        assert a.shape == b.shape == plain.shape == (2, 9, 6)
        assert rel(a, b) < 1e-5 and rel(a, plain) < 1e-5
        assert torch.equal(b, R.recurrent_pass(block, emb, windows, cfg))
    assert not torch.equal(got[0], got[1])  # the runs did not read each other's weights


@check
def fused_blocks_match_plain_blocks():
    from archsearch.config import ModelConfig
    from archsearch.cvfp.fast.layers import FusedContextBlock, FusedTokenBlock
    from archsearch.cvfp.model import ContextBlock, TokenBlock, init_parameters

    m = ModelConfig(num_layers=2, context_dim=6, num_input_tokens=2)
    E, n = 8, 9
    g = torch.Generator().manual_seed(4)
    cb, tb = ContextBlock(m, E), TokenBlock(m, E)
    init_parameters(cb, m, torch.Generator().manual_seed(5))
    init_parameters(tb, m, torch.Generator().manual_seed(5))
    ctx0 = torch.randn(n, 6, generator=g, requires_grad=True)
    contexts = torch.randn(2, n, 6, generator=g)
    tok = torch.randn(n, 2 * E, generator=g, requires_grad=True)
    rc, rh = torch.randn(n, 6, generator=g), torch.randn(n, E, generator=g)

    def run(c_block, t_block):
        for p in [*cb.parameters(), *tb.parameters(), ctx0, tok]:
            p.grad = None
        c, h = c_block(ctx0, tok), t_block(contexts, tok)
        ((c * rc).sum() + (h * rh).sum()).backward()
        return [c.detach(), h.detach(), ctx0.grad.clone(), tok.grad.clone()] + [p.grad.clone() for p in [*cb.parameters(), *tb.parameters()]]

    plain = run(cb, tb)
    fcb, ftb = FusedContextBlock(cb), FusedTokenBlock(tb)
    assert list(fcb.state_dict()) == list(cb.state_dict()) and list(ftb.state_dict()) == list(tb.state_dict())
    for a, b in zip(run(fcb, ftb), plain):
        assert rel(a, b) < 1e-5
    # the packed form (the captured graphs' GEMM inputs with the contexts in place)
    bufs = [torch.full((n, layer.fc.in_features), float("nan")) for layer in tb.layers]
    for i, b in enumerate(bufs):
        b[:, :6].copy_(contexts[i])
    with torch.no_grad():
        assert rel(ftb.forward_packed(tok.detach(), bufs), tb(contexts, tok.detach())) < 1e-5


def _forced_fused(cb):
    """A FusedContextBlock whose phase 1 takes the fused iteration whatever the precision: the
    product's gate gives fp32 runs the plain one (layers.FusedContextBlock.phase1_fast), and
    these checks run in fp32 under the interpreter."""
    from archsearch.cvfp.fast.layers import FusedContextBlock
    from archsearch.cvfp.fast.phase1 import FusedPhase1

    class Forced(FusedContextBlock):
        def phase1_fast(self, emb, windows, cfg):
            return FusedPhase1(self.layers, self.context_dim, emb, windows, cfg)

    return Forced(cb)


def _phase1_setup(N=50, L=2, C=6, k=2, E=8, V=30, batch=8, chunk_batches=2, precision="fp32"):
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.model import ContextBlock, TokenEmbedding, init_parameters

    cfg = run_config_from_dict({"model": {"num_layers": L, "context_dim": C, "num_input_tokens": k},
                                "phase1": {"batch_size": batch, "min_iterations": 3, "max_iterations": 3},
                                "engine": {"precision": precision, "phase1_chunk_batches": chunk_batches, "phase1_fused": True}})  # fmt: skip
    g = torch.Generator().manual_seed(7)
    emb = TokenEmbedding(torch.randn(V, E, generator=g), k)
    win = emb.windows(torch.randint(0, V, (N,), generator=g))
    cb = ContextBlock(cfg.model, E)
    init_parameters(cb, cfg.model, torch.Generator().manual_seed(8))
    return cfg, emb, win, cb


@check
def fused_phase1_iteration_matches_plain():
    """One iteration (outputs, loss sums, convergence rate, every parameter's gradient) on spans
    of two whole batches, a lone whole batch and a partial last batch; then with NaN contexts in
    one batch (skipped by both: the gradients stay finite and equal); then one layer and spans of
    whole batches only, and fewer positions than one batch."""
    import math

    from archsearch.cvfp.phases import phase1_spans, plain_iteration

    for N, L, k, bad in ((50, 2, 2, False), (50, 2, 2, True), (40, 1, 1, False), (5, 3, 1, False)):
        cfg, emb, win, cb = _phase1_setup(N=N, L=L, k=k)
        C, B = cfg.model.context_dim, cfg.phase1.batch_size
        fast = _forced_fused(cb).phase1_fast(emb, win, cfg)
        assert fast is not None
        spans = phase1_spans(N, B, 2)  # N = 50: [(0, 16), (16, 32), (32, 48), (48, 50)]
        num_batches = math.ceil(N / B)
        g = torch.Generator().manual_seed(9)
        prev = torch.randn(N, C, generator=g) * 0.5
        noise = torch.randn(N, C, generator=g) * 0.1
        if bad:
            prev[20:23] = float("nan")  # batch 16..23 reads and targets NaN
        runs = []
        for runner in (None, fast):
            for p in cb.parameters():
                p.grad = None
            out = torch.empty_like(prev)
            if runner is None:
                sums, rate = plain_iteration(cb, emb, win, prev, noise.clone(), out, spans, num_batches, cfg)
            else:
                sums, rate = runner.iteration(prev, noise.clone(), out, spans, num_batches)
            runs.append((out, sums, float(rate), [p.grad.clone() for p in cb.parameters()]))
        (o1, s1, r1, g1), (o2, s2, r2, g2) = runs
        keep = torch.isfinite(o1).all(1)
        assert bool((keep == torch.isfinite(o2).all(1)).all()) and int((~keep).sum()) == (3 if bad else 0), (N, bad, keep)
        assert rel(o2[keep], o1[keep]) < 1e-5 and rel(s2, s1) < 1e-5 and abs(r1 - r2) < 1e-6, (bad, s1, s2, r1, r2)
        for a, b in zip(g2, g1):
            assert bool(torch.isfinite(a).all()) and rel(a, b) < 1e-4, (bad, rel(a, b))


@check
def fused_phase1_training_matches_plain():
    """train_phase1 through the fused iteration against the plain one: contexts and history."""
    from archsearch.cvfp.phases import train_phase1

    cfg, emb, win, cb = _phase1_setup(N=45, chunk_batches=3)
    state = {k: v.clone() for k, v in cb.state_dict().items()}
    plain = train_phase1(cb, emb, win, cfg, torch.Generator().manual_seed(3))
    cb.load_state_dict(state)
    fused = train_phase1(_forced_fused(cb), emb, win, cfg, torch.Generator().manual_seed(3))
    assert fused.iterations == plain.iterations == 3
    assert rel(fused.contexts, plain.contexts) < 1e-4
    for a, b in zip(fused.history[1:], plain.history[1:]):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["convergence_rate"] - b["convergence_rate"]) < 1e-6, (a, b)


@check
def fused_tied_head_matches_torch():
    from archsearch.cvfp.fast import head

    g = torch.Generator().manual_seed(6)
    n, E, V = 10, 8, 100
    hw = head.HeadWeight(torch.randn(V, E, generator=g), "fp32")
    hw.fused = True  # the CUDA-only path, here under the interpreter
    hw.chunk_rows = 4  # several row chunks
    h = torch.randn(n, E, generator=g, requires_grad=True)
    t = torch.randint(0, V, (n,), generator=g)
    loss = head.train_loss(h, hw, t)
    loss.backward()
    h2 = h.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ hw.matrix.T, t)
    ref.backward()
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-5 and rel(h.grad, h2.grad) < 1e-5
    ce, sq, hits = head.eval_sums(h.detach(), hw, t)
    per_row = F.cross_entropy(h.detach() @ hw.matrix.T, t, reduction="none").double()
    assert abs(float(ce) - float(per_row.sum())) < 1e-4 and abs(float(sq) - float(per_row.pow(2).sum())) < 1e-3
    assert int(hits) == int(((h.detach() @ hw.matrix.T).argmax(-1) == t).sum())


def _phase2_setup(L=2, C=16, k=2, E=8, V=50, n=29, batch=8, seed=11, clip=0.5):
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.model import TokenBlock, TokenEmbedding, init_parameters

    cfg = run_config_from_dict({"model": {"num_layers": L, "context_dim": C, "num_input_tokens": k},
                                "phase2": {"batch_size": batch, "lr": 0.01, "grad_clip": clip},
                                "engine": {"precision": "fp32", "phase2_fused": True}})  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    emb = TokenEmbedding(torch.randn(V, E, generator=g), k)
    ids = torch.randint(0, V, (n + 1,), generator=g)
    windows, targets = emb.windows(ids)[:n], ids[1:]
    cache = torch.randn(L, n, C, generator=g)
    tb = TokenBlock(cfg.model, E)
    init_parameters(tb, cfg.model, torch.Generator().manual_seed(seed + 1))
    return cfg, emb, (windows, targets, cache), tb


@check
def fused_phase2_step_matches_autograd_step():
    """Two epochs of steps (batches of 8 over 29 positions: a short last batch) of the fused
    phase-2 step (fp32, fast/phase2.py) against phases.EagerStepper (autograd, clip_grad_norm_,
    torch's Adam): every parameter and the loss sums, with projected residuals (k 2) and
    without (k 1), the clip active (grad_clip 0.5) and not (1e3). Then the captured graph's
    form of the step: every batch on all 8 rows of the buffers, the last one's stale rows
    weighted 0."""
    import copy

    from archsearch.cvfp.fast import head
    from archsearch.cvfp.fast.layers import FusedTokenBlock
    from archsearch.cvfp.fast.phase2 import FusedPhase2Step
    from archsearch.cvfp.phases import EagerStepper

    for k, graph_form, clip in ((2, False, 0.5), (1, False, 0.5), (2, True, 0.5), (1, False, 1e3)):
        cfg, emb, train, tb = _phase2_setup(k=k, clip=clip)
        windows, targets, cache = train
        n, B = targets.shape[0], cfg.phase2.batch_size
        plain_tb = copy.deepcopy(tb)
        plain = EagerStepper(plain_tb, emb, emb.weight, cfg, train)
        fused = FusedPhase2Step(FusedTokenBlock(tb), emb, head.head_weight(emb.weight, "fp32"), cfg, cache, windows, targets, graphed=False)
        assert fused.B == B and fused.S is None
        for epoch in range(2):
            plain.loss_sum.zero_()
            fused.loss_sum.zero_()
            for s in range(0, n, B):
                e = min(s + B, n)
                plain(s, e)
                if graph_form:  # what a replay computes: all B rows, weights 1/r and 0
                    fused._fill(s, e)
                    fused._set_rows(e - s)
                    fused._compute(B)
                else:
                    fused(s, e)
            assert abs(float(fused.loss_sum) - float(plain.loss_sum)) <= 1e-5 * abs(float(plain.loss_sum)), (k, epoch)
        names = [name for name, _ in plain_tb.named_parameters()]
        for name, a, b in zip(names, tb.parameters(), plain_tb.parameters()):
            d = rel(a.detach(), b.detach())
            assert d < 1e-5, (k, graph_form, clip, name, d)
        # the parameters are views of the flat buffer, which the optimizer kernel wrote
        assert all(fused.P.data_ptr() <= p.data_ptr() < fused.P.data_ptr() + 4 * fused.numel for p in tb.parameters())
        assert float(fused.adam[0]) == 2 * ((n + B - 1) // B)
        moved = min(rel(a.detach(), b.detach()) for a, b in zip(tb.parameters(), _phase2_setup(k=k, clip=clip)[3].parameters()))
        assert moved > 1e-3, moved  # the steps did train every parameter


@check
def phase2_gather_and_loss_kernels():
    """phase2_kernels.gather_tokens against model.token_vectors (into a strided GEMM input, with
    and without the contiguous copy; the zero row of "before the stream" too), fill_contexts
    against the rows it copies (nothing else written), add_loss against the weighted sum it
    stands for."""
    from archsearch.cvfp.fast import phase2_kernels as K2
    from archsearch.cvfp.model import TokenEmbedding, token_vectors

    g = torch.Generator().manual_seed(12)
    for k, n, E in ((1, 7, 8), (3, 21, 20)):
        emb = TokenEmbedding(torch.randn(30, E, generator=g), k)
        win = emb.windows(torch.randint(0, 30, (n,), generator=g)).contiguous()
        want = token_vectors(emb.normed, win)
        packed = torch.full((n, 5 + k * E), float("nan"))
        out32 = torch.empty(n, k * E)
        K2.gather_tokens(emb.normed, win, packed[:, 5:], out32)
        assert torch.equal(packed[:, 5:], want) and torch.equal(out32, want) and bool(packed[:, :5].isnan().all())
        packed2 = torch.zeros(n, k * E)
        K2.gather_tokens(emb.normed, win, packed2)
        assert torch.equal(packed2, want)
    # a batch's contexts into every layer's GEMM input (one buffer), from an fp32 and a bf16 cache
    L, n, C, rows = 3, 40, 6, 9
    widths = [C + 5, C + 4, C + 3]
    flat = torch.full((sum(rows * w + 7 for w in widths),), float("nan"))
    starts = [sum(rows * w + 7 for w in widths[:i]) for i in range(L)]
    packed = [flat[o : o + rows * w].view(rows, w) for o, w in zip(starts, widths)]
    meta = K2.layer_inputs_meta(flat, packed)
    for cache in (torch.randn(L, n, C, generator=g), torch.randn(L, n, C, generator=g).to(torch.bfloat16)):
        K2.fill_contexts(cache, 31, 38, flat, meta)
        for i, buf in enumerate(packed):
            assert torch.equal(buf[:7, :C], cache[i, 31:38].float()) and bool(buf[7:].isnan().all()) and bool(buf[:, C:].isnan().all())
    loss, w = torch.rand(3000, generator=g), torch.rand(3000, generator=g)
    total = torch.full((), 2.5, dtype=torch.float64)
    K2.add_loss(loss, w, torch.full((), 7.0, dtype=torch.float64), total)
    assert abs(float(total) - (2.5 + 7.0 * float((loss.double() * w.double()).sum()))) < 1e-6 * float(total)


@check
def phase2_clip_adam_matches_torch():
    """phase2_kernels.clip_adam over a flat buffer split among several norm programs (the last
    one to finish sums the partials) against clip_grad_norm_ + torch.optim.Adam, three steps,
    the clip active and not; the shadow is the parameters' copy in its dtype; the count of
    programs done is back at 0 after each launch."""
    from archsearch.cvfp.fast import phase2_kernels as K2

    g = torch.Generator().manual_seed(13)
    n = 3 * K2.SQ_BLOCK + 5
    assert K2.partial_programs(n) == 4
    for max_norm in (0.5, 1e4):
        p0 = torch.randn(n, generator=g)
        ref = p0.clone().requires_grad_()
        opt = torch.optim.Adam([ref], lr=0.01)
        p, m, v, shadow = p0.clone(), torch.zeros(n), torch.zeros(n), torch.empty(n, dtype=torch.float64)
        scratch, state = K2.norm_scratch(n, p.device), K2.adam_state((0.9, 0.999), p.device)
        for _ in range(3):
            grad = torch.randn(n, generator=g) * 0.3
            ref.grad = grad.clone()
            torch.nn.utils.clip_grad_norm_([ref], max_norm)
            opt.step()
            K2.clip_adam(p, grad, m, v, shadow, scratch, state, 0.01, (0.9, 0.999), 1e-8, max_norm)
            assert int(scratch[1]) == 0
        assert rel(p, ref.detach()) < 1e-6 and torch.equal(shadow, p.double()) and float(state[0]) == 3.0, (max_norm, rel(p, ref.detach()))


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before triton is imported"
    names = sys.argv[1:] or list(CHECKS)
    out = {}
    for name in names:
        try:
            CHECKS[name]()
            out[name] = None
        except Exception:
            out[name] = traceback.format_exc(limit=6)[-3000:]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
