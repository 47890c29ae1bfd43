"""GPU paths against their plain counterparts (skipped without CUDA; run on the GPU machine)."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_engine_matches_reference_on_gpu_fp32():
    from test_engine import close, tiny_cfg, tiny_data

    from archsearch.cvfp.reference import reference_run
    from archsearch.cvfp.run import train_run

    for k, L in ((1, 1), (2, 2), (3, 3)):
        cfg = tiny_cfg(k, L, precision="fp32")  # "auto" would be bf16 on a GPU
        W, train, val = tiny_data()
        e = train_run(cfg, W, train, val, seed=3, device="cuda", keep_tensors=True)
        r = reference_run(cfg, W, train, val, seed=3, device="cuda")
        t = e.tensors
        assert close(t["contexts"], r["contexts"], 1e-4)
        assert close(t["train_cache"], r["train_cache"], 1e-4)
        assert close(t["val_cache"], r["val_cache"], 1e-4)
        assert e.val_ppl == pytest.approx(r["val_ppl"], rel=1e-4)
        assert e.metrics["val_er"] == pytest.approx(r["val_er"], rel=1e-4)
        assert e.val_loss_se == pytest.approx(r["val_loss_se"], rel=1e-3)


@pytest.mark.parametrize("L, C, T", [(1, 64, 300), (6, 768, 700), (9, 1152, 260)])
def test_triton_recurrent_pass_matches_plain_steps(L, C, T):
    from archsearch.cvfp.fast import recurrent as R

    g = torch.Generator(device="cuda").manual_seed(L)
    P = torch.randn(L, T, C, device="cuda", generator=g)
    Wc = [torch.randn(C, C, device="cuda", generator=g) * C**-0.5 for _ in range(L)]
    norms = [(torch.rand(C, device="cuda", generator=g) + 0.5, torch.randn(C, device="cuda", generator=g)) for _ in range(L)]
    torch.set_float32_matmul_precision("highest")
    ref = torch.empty(L, T, C, device="cuda")
    R._steps(torch.zeros(C, device="cuda"), P, Wc, norms, ref, 1e-5)
    out = R.triton_pass(P, Wc, norms, 1e-5)
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < 1e-4
    from archsearch.cvfp.fast.recurrent_kernels import recurrent_persistent

    G = torch.stack([g for g, _ in norms]).contiguous()
    B = torch.stack([b for _, b in norms]).contiguous()
    out = recurrent_persistent(P, torch.stack(Wc).contiguous(), G, B, 1e-5)
    assert out is not None and float((out - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.parametrize("L, C, T", [(2, 64, 1500), (6, 768, 1000)])
def test_persistent_pass_by_plan_gives_the_same_bits_every_time(L, C, T):
    """The validation pass is a study's measurement: repeated on the same inputs it must give the
    same bits. PLAN's 'flag' wait did not at L2/C64 (3 outputs in 5 repeats on an H200,
    2026-12-01); PLAN now waits on the atomic counter."""
    from archsearch.cvfp.fast import recurrent as REC
    from archsearch.cvfp.fast.device import sm_count
    from archsearch.cvfp.fast.recurrent_kernels import recurrent_batched

    g = torch.Generator().manual_seed(L * 1000 + C)
    P = (torch.randn(2, L, T, C, generator=g) * 0.5).cuda()
    W = (torch.randn(2, L, C, C, generator=g) * 0.8 / C**0.5).cuda()
    G, B = (1 + 0.1 * torch.randn(2, L, C, generator=g)).cuda(), (0.1 * torch.randn(2, L, C, generator=g)).cuda()
    rows = REC.tile_rows(C, sm_count(torch.device("cuda")))
    for R in (1, 2):
        v = next(v for v in REC.PLAN if v.rows == rows and v.runs == R)
        outs = [recurrent_batched(P[:R].contiguous(), W[:R].contiguous(), G[:R].contiguous(), B[:R].contiguous(), 1e-5,
                                  rows=v.rows, sub=v.sub, warps=v.warps, sync=v.sync) for _ in range(8)]  # fmt: skip
        assert outs[0] is not None
        differ = [i for i, o in enumerate(outs) if not torch.equal(o, outs[0])]
        assert not differ, (v, differ, max(float((o - outs[0]).abs().max()) for o in outs))


@pytest.mark.parametrize("L, C, T", [(6, 768, 400), (9, 1152, 150)])
def test_batched_recurrent_kernel_matches_one_pass_at_a_time(L, C, T):
    """Every synchronisation and tile of the persistent kernel with 1, 2 and 4 runs in one
    launch (where the device holds the grid): each run equals the same tile's one-run launch
    to the bit (the arithmetic of a program does not depend on its run or on the
    synchronisation), and today's one-run kernel (atomic, rows 8/16) to rounding, which equals
    the plain recurrence. Then recurrent_passes of four real blocks against one pass at a
    time. W_c ~ N(0, 1/C) keeps the random recurrence contractive, so rounding differences
    stay rounding-sized (at the model's init scale, N(0, 0.1^2), they grow to O(1) in ~100
    steps: scripts/bench_recurrent.py)."""
    from archsearch.cvfp.fast import recurrent as R
    from archsearch.cvfp.fast.recurrent_kernels import SYNC_MODES, recurrent_batched, recurrent_persistent, resident_programs

    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(C + L)
    Rmax = 4
    P = torch.randn(Rmax, L, T, C, device="cuda", generator=g)
    W = torch.randn(Rmax, L, C, C, device="cuda", generator=g) * C**-0.5
    G = 1 + 0.05 * torch.randn(Rmax, L, C, device="cuda", generator=g)
    B = 0.05 * torch.randn(Rmax, L, C, device="cuda", generator=g)
    torch.set_float32_matmul_precision("highest")
    today = [recurrent_persistent(P[r], W[r], G[r], B[r], 1e-5) for r in range(Rmax)]
    ref = torch.empty(L, T, C, device="cuda")
    R._steps(torch.zeros(C, device="cuda"), P[0], list(W[0]), list(zip(G[0], B[0])), ref, 1e-5)
    assert float((today[0] - ref).norm() / ref.norm()) < 1e-4
    ran = 0
    for rows, sub, warps in ((8, 8, None), (16, 16, None), (16, 8, None), (32, 8, None), (8, 8, 2)):
        alone = None  # this tile's one-run outputs
        for sync in SYNC_MODES:
            for runs in (1, 2, 4):
                if runs * -(-C // rows) > resident_programs(dev, L, C, rows, sub, warps, sync):
                    continue
                out = recurrent_batched(P[:runs].contiguous(), W[:runs].contiguous(), G[:runs].contiguous(), B[:runs].contiguous(),
                                        1e-5, rows=rows, sub=sub, warps=warps, sync=sync)  # fmt: skip
                assert out is not None and out.shape == (runs, L, T, C)
                ran += 1
                if alone is None:
                    alone = [recurrent_batched(P[r : r + 1], W[r : r + 1], G[r : r + 1], B[r : r + 1], 1e-5, rows=rows, sub=sub, warps=warps)[0]
                             for r in range(Rmax)]  # fmt: skip
                for r in range(runs):
                    assert torch.equal(out[r], alone[r]), (sync, rows, sub, warps, runs, r)
                    assert float((out[r] - today[r]).norm() / today[r].norm()) < 1e-5, (sync, rows, sub, warps, runs, r)
    assert ran >= 3 * 5  # every variant at least with one run
    # recurrent_passes over real blocks: by PLAN, against one pass at a time on the graphed kernels
    from test_engine import tiny_cfg

    from archsearch.cvfp.model import ContextBlock, TokenEmbedding, init_parameters

    cfg = tiny_cfg(1, L).replace(**{"model.context_dim": C, "engine.eval_batch_size": 64})
    emb = TokenEmbedding(torch.randn(100, 64, device="cuda", generator=g), 1)
    windows = emb.windows(torch.randint(0, 100, (T,), device="cuda", generator=g))
    blocks = []
    for seed in range(4):
        block = ContextBlock(cfg.model, 64)
        init_parameters(block, cfg.model, torch.Generator().manual_seed(seed))
        for layer in block.layers:
            layer.fc.weight.data[:, :C] *= C**-0.5 / cfg.model.init_std  # contractive, as above
        blocks.append(block.to("cuda").requires_grad_(False))
    batched = R.recurrent_passes(blocks, emb, windows, cfg)
    graphed = R.recurrent_passes(blocks, emb, windows, cfg.replace(**{"engine.recurrent": "graph"}))
    for a, b, block in zip(batched, graphed, blocks):
        assert a.shape == b.shape == (L, T, C)
        assert float((a - b).norm() / b.norm()) < 1e-4
        single = R.recurrent_pass(block, emb, windows, cfg)
        assert float((a - single).norm() / single.norm()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_tied_cross_entropy_matches_torch(dtype):
    import torch.nn.functional as F

    from archsearch.cvfp.fast.head import eval_sums, head_weight, train_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    n, E, V = 4096 + 37, 768, 50257
    W = (torch.randn(V, E, device="cuda", generator=g) * 0.1).to(dtype)
    head = head_weight(W.float(), "bf16" if dtype == torch.bfloat16 else "fp32")
    assert head.matrix.shape[0] % 64 == 0 and head.vocab_size == V
    h = torch.randn(n, E, device="cuda", generator=g, requires_grad=True)
    t = torch.randint(0, V, (n,), device="cuda", generator=g)
    loss = train_loss(h, head, t)
    loss.backward()
    h2 = h.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2.to(dtype) @ W.T).float(), t)
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float(loss.detach()) == pytest.approx(float(ref), rel=tol)
    assert float((h.grad - h2.grad).norm() / h2.grad.norm()) < (1e-4 if dtype == torch.float32 else 2e-2)
    ce, sq, hits = eval_sums(h.detach(), head, t)
    assert float(ce) / n == pytest.approx(float(ref), rel=tol)
    # the squares of the kernel's per-row losses (the validation loss's standard error) against torch's
    per_row = F.cross_entropy((h.detach().to(dtype) @ W.T).float(), t, reduction="none").double()
    assert float(sq) == pytest.approx(float(per_row.pow(2).sum()), rel=tol)
    logits = (h.detach().to(dtype) @ W.T).float()
    assert abs(int(hits) - int((logits.argmax(-1) == t).sum())) <= 2  # ties in bf16 may differ
    # row weights (how the captured phase-2 step runs an epoch's shorter last batch): 1/r on the
    # first r rows, 0 on the rest = the mean over the r rows, and rows of weight 0 get no gradient
    r = 1000
    w = torch.zeros(n, device="cuda")
    w[:r] = 1.0 / r
    h.grad = None
    weighted = train_loss(h, head, t, w)
    weighted.backward()
    h3 = h.detach()[:r].clone().requires_grad_()
    ref_r = F.cross_entropy((h3.to(dtype) @ W.T).float(), t[:r])
    ref_r.backward()
    assert float(weighted.detach()) == pytest.approx(float(ref_r), rel=tol)
    assert float((h.grad[:r] - h3.grad).norm() / h3.grad.norm()) < (1e-4 if dtype == torch.float32 else 2e-2)
    assert bool((h.grad[r:] == 0).all())


def test_bf16_run_is_close_to_fp32():
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.run import train_run

    g = torch.Generator().manual_seed(0)
    W = torch.randn(2000, 64, generator=g) * 0.5
    train, val = torch.randint(0, 2000, (20000,), generator=g), torch.randint(0, 2000, (3000,), generator=g)
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = run_config_from_dict({"model": {"num_layers": 3, "context_dim": 128, "num_input_tokens": 2},
                                    "phase1": {"batch_size": 4000}, "phase2": {"batch_size": 512, "max_epochs": 3},
                                    "engine": {"precision": precision}})  # fmt: skip
        out[precision] = train_run(cfg, W, train, val, seed=1, device="cuda")
    assert out["bf16"].val_ppl == pytest.approx(out["fp32"].val_ppl, rel=0.02)


def test_phase2_graph_replay_changes_nothing():
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.run import train_run

    g = torch.Generator().manual_seed(0)
    W = torch.randn(3000, 64, generator=g) * 0.5
    train, val = torch.randint(0, 3000, (9000,), generator=g), torch.randint(0, 3000, (1500,), generator=g)
    out = {}
    for graph in (False, True):
        cfg = run_config_from_dict({"model": {"num_layers": 2, "context_dim": 64, "num_input_tokens": 2},
                                    "phase1": {"batch_size": 2000}, "phase2": {"batch_size": 1000, "max_epochs": 3},
                                    "engine": {"precision": "fp32", "phase2_graph": graph}})  # fmt: skip
        out[graph] = train_run(cfg, W, train, val, seed=1, device="cuda")  # 9 steps per epoch, a partial last one
    assert [h["val_loss"] for h in out[True].history["phase2"]] == pytest.approx([h["val_loss"] for h in out[False].history["phase2"]], rel=1e-5)
    # PPL = exp(loss): the same criterion on the loss (rel 1e-5 of ~14.6 is 1.5e-4 of PPL; the PPL
    # held to rel 1e-5 was a 15x stricter test than the loss history's, and failed on an H200 by 2.2e-5)
    assert math.log(out[True].val_ppl) == pytest.approx(math.log(out[False].val_ppl), rel=1e-5)
    assert out[True].val_loss_se == pytest.approx(out[False].val_loss_se, rel=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("k, L, C", [(1, 3, 96), (3, 2, 64)])
@pytest.mark.parametrize("input_grads", [False, True])
def test_fused_residual_relu_norm_matches_plain_layers(precision, k, L, C, input_grads):
    """The fused layers (one autograd Function: concatenation, GEMM, LN(residual + ReLU(z)),
    and a backward that forms only the gradients asked for) give the same outputs and
    gradients as the plain modules, for both blocks (with and without the TokenLayer's
    projected residual), with the inputs constants (as in phase 2) or needing gradients."""
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp import model as M
    from archsearch.cvfp.fast.layers import FusedContextBlock, FusedTokenBlock
    from archsearch.cvfp.precision import precision_scope

    cfg = run_config_from_dict({"model": {"num_layers": L, "context_dim": C, "num_input_tokens": k}})
    E, n = 32, 1000
    g = torch.Generator(device="cuda").manual_seed(k)
    torch.manual_seed(k)
    blocks = (M.ContextBlock(cfg.model, E).cuda(), M.TokenBlock(cfg.model, E).cuda())
    fused_blocks = (FusedContextBlock(blocks[0]), FusedTokenBlock(blocks[1]))  # the same parameters
    assert [k for k in fused_blocks[0].state_dict()] == [k for k in blocks[0].state_dict()]
    assert [k for k in fused_blocks[1].state_dict()] == [k for k in blocks[1].state_dict()]
    ctx0 = torch.randn(n, C, device="cuda", generator=g)
    contexts = torch.randn(L, n, C, device="cuda", generator=g)
    tok = torch.randn(n, E * k, device="cuda", generator=g)
    # a random linear read-out: LN(.)^2 summed would be nearly constant (gradients ~ 0)
    rc, rh = torch.randn(n, C, device="cuda", generator=g), torch.randn(n, E, device="cuda", generator=g)
    inputs = (ctx0, contexts, tok)
    for x in inputs:
        x.requires_grad_(input_grads)

    def outputs_and_grads(fused: bool, prec: str) -> list[torch.Tensor]:
        run = fused_blocks if fused else blocks
        for b in blocks:
            b.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None
        with precision_scope(prec, torch.device("cuda")):
            c = run[0](ctx0, tok)
            h = run[1](contexts, tok)
        assert c.dtype == h.dtype == torch.float32
        ((c * rc).sum() + (h * rh).sum()).backward()
        grads = [x.grad.clone() for x in inputs] if input_grads else []
        return [c.detach(), h.detach()] + [p.grad.clone() for b in blocks for p in b.parameters()] + grads

    def rel(a, b):
        assert torch.isfinite(a).all()
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    truth = outputs_and_grads(False, "fp32")
    fused, plain = outputs_and_grads(True, precision), outputs_and_grads(False, precision)
    for f, p, t in zip(fused, plain, truth):
        if precision == "fp32":
            assert rel(f, t) < 1e-5
        else:  # bf16 rounds differently in the two paths: the fused one must be as close to fp32
            assert rel(f, t) <= 1.5 * rel(p, t) + 1e-3


@pytest.mark.parametrize("tuning", [None, (1024, 16, 8), (4096, 4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernel_groups_ties_and_padding(tuning, dtype):
    """The kernel keeps its row state per group of adjacent columns: loss, argmax (ties to the
    lowest index, as torch) and the gradient must not depend on how columns are grouped."""
    import torch.nn.functional as F

    from archsearch.cvfp.fast.kernels import ce_rows

    g = torch.Generator(device="cuda").manual_seed(7)
    n, V, VP = 67, 50257, 50304
    x = (torch.randn(n, VP, device="cuda", generator=g) * 4).to(dtype)
    x[0, 3], x[0, 40000] = 60, 60  # a tie across far-apart groups: the first wins
    x[1, 17], x[1, 18] = 60, 60  # a tie inside one group
    x[2, V - 1] = 60  # the max in the last real column, padding after it
    x[3, V:] = 1e4  # huge padding values take no part
    t = torch.randint(0, V, (n,), device="cuda", generator=g)
    ref = F.cross_entropy(x[:, :V].float(), t, reduction="none")
    kw = {} if tuning is None else dict(zip(("block_v", "group", "warps"), tuning))
    loss = torch.empty(n, device="cuda")
    am = torch.empty(n, device="cuda", dtype=torch.int32)
    ce_rows(x.clone(), t, loss, am, write_grad=False, vocab_size=V, **kw)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-5)
    assert am.long().tolist() == x[:, :V].float().argmax(-1).tolist()
    assert am[:4].tolist() == [3, 17, V - 1, int(x[3, :V].float().argmax())]
    grad = x.clone()
    scale = torch.rand(n, device="cuda", generator=g)
    ce_rows(grad, t, loss, None, write_grad=True, vocab_size=V, row_scale=scale, **kw)
    want = (torch.softmax(x[:, :V].float(), -1) - F.one_hot(t, V)) * scale[:, None]
    assert float((grad[:, :V].float() - want).abs().max()) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert bool((grad[:, V:] == 0).all())
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-5)


def test_kept_phase2_session_computes_what_a_new_one_does():
    """Runs of one shape in a thread reuse the captured phase-2 graphs (a trial's sizes): a
    run must give the same numbers, bit for bit, after another size, after another shape,
    and from a new session; and train_phase2 must leave the caller's TokenBlock trained."""
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.fast import graphs as EN
    from archsearch.cvfp.fast.layers import FusedTokenBlock
    from archsearch.cvfp.model import TokenBlock
    from archsearch.cvfp.phases import train_phase2
    from archsearch.cvfp.run import train_run

    g = torch.Generator().manual_seed(0)
    W = torch.randn(3000, 64, generator=g) * 0.5
    train, val = torch.randint(0, 3000, (9000,), generator=g), torch.randint(0, 3000, (1500,), generator=g)

    def cfg(C):
        return run_config_from_dict({"model": {"num_layers": 2, "context_dim": C, "num_input_tokens": 2},
                                     "phase1": {"batch_size": 2000}, "phase2": {"batch_size": 1000, "max_epochs": 3, "patience": 3},
                                     "engine": {"precision": "bf16"}})  # fmt: skip

    def history(C, N):
        r = train_run(cfg(C), W, train[:N], val, seed=1, device="cuda")
        return [(h["train_loss"], h["val_loss"], h["val_acc"]) for h in r.history["phase2"]]

    EN.release_phase2_graphs()
    fresh = history(64, 9000)  # 9 steps an epoch, a partial last one
    session = EN._SESSIONS.session
    history(64, 5500)  # another size: the same session
    assert EN._SESSIONS.session is session
    assert history(64, 9000) == fresh
    history(96, 9000)  # another shape: a new session
    assert EN._SESSIONS.session is not session
    assert history(64, 9000) == fresh
    EN.release_phase2_graphs()
    assert not hasattr(EN._SESSIONS, "session")

    # the session trains its own copy; the run copies it back into the caller's TokenBlock
    c = cfg(64)
    tb = FusedTokenBlock(TokenBlock(c.model, 64).cuda())
    before = [p.detach().clone() for p in tb.parameters()]
    n = 5000
    cache = torch.randn(2, n, 64, device="cuda", dtype=torch.bfloat16)
    from archsearch.cvfp.model import TokenEmbedding

    emb = TokenEmbedding(W.cuda(), 2)
    win = emb.windows(train[: n + 1].cuda())
    step, evaluate = EN.phase2_backends(tb, emb, (win[:n], train[1 : n + 1].cuda(), cache), (win[:1000], train[1:1001].cuda(), cache[:, :1000]), c)
    train_phase2(step, evaluate, n, c)
    trained = EN._SESSIONS.session.tblock
    assert step.tblock is trained and trained is not tb
    for p, q, b in zip(tb.parameters(), trained.parameters(), before):
        assert torch.equal(p, b) and not torch.equal(q, b)
    EN.release_phase2_graphs()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("k, L", [(1, 3), (2, 3)])
def test_packed_token_block_is_the_plain_one(precision, k, L):
    """The captured phase-2 step hands the TokenBlock per-layer GEMM inputs with the contexts
    already in place, and each fused layer writes its output into the next one's: the same
    products on the same values, so outputs and every gradient must be identical."""
    from archsearch.config import ModelConfig
    from archsearch.cvfp.fast.layers import FusedTokenBlock
    from archsearch.cvfp.model import TokenBlock, init_parameters
    from archsearch.cvfp.precision import precision_scope

    n, C, E = 300, 64, 48
    m = ModelConfig(num_layers=L, context_dim=C, num_input_tokens=k)
    g = torch.Generator(device="cuda").manual_seed(k)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    contexts = torch.randn(L, n, C, device="cuda", generator=g).to(dtype)
    tok = torch.randn(n, E * k, device="cuda", generator=g)
    weights = torch.randn(n, E, device="cuda", generator=g)

    def run(packed: bool):
        plain = TokenBlock(m, E).cuda()
        init_parameters(plain, m, torch.Generator().manual_seed(5))
        tb = FusedTokenBlock(plain)
        bufs = None
        if packed:
            bufs = [torch.full((n, layer.fc.in_features), float("nan"), device="cuda", dtype=dtype) for layer in tb.layers]
            for i, b in enumerate(bufs):
                b[:, :C].copy_(contexts[i])
        with precision_scope(precision, torch.device("cuda")):
            h = tb.forward_packed(tok, bufs) if packed else tb(contexts, tok)
        (h * weights).sum().backward()
        return [h.detach()] + [p.grad for p in tb.parameters()]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_variant_layer_runs_on_the_plain_path_on_gpu(caplog):
    """A changed layer (GELU) on a GPU: no fused layer, graph or recurrent kernel takes it;
    it trains on the plain path, as the same run with every fast option off does, and the run
    says so."""
    from test_engine import gelu_blocks, tiny_cfg, tiny_data

    from archsearch.cvfp.run import train_run

    W, train, val = tiny_data(4)
    cfg = tiny_cfg(2, 2, precision="fp32")
    events = []
    with caplog.at_level("WARNING", logger="archsearch.cvfp.run"):
        g = train_run(cfg, W, train, val, seed=3, device="cuda", progress=lambda e, **i: events.append(e), build_blocks=gelu_blocks)
    assert events.count("notice") == 1 and any("GeluContextLayer" in r.getMessage() for r in caplog.records)
    # the same run with every fast option off: the plain path on this GPU (a CPU run would draw
    # other random numbers: phase 1's noise comes from a generator on the run's device)
    plain = tiny_cfg(2, 2, precision="fp32", fused_layers=False, phase2_graph=False, recurrent="plain")
    p = train_run(plain, W, train, val, seed=3, device="cuda", build_blocks=gelu_blocks)
    assert g.val_ppl == pytest.approx(p.val_ppl, rel=1e-3)
    assert g.val_ppl != pytest.approx(train_run(cfg, W, train, val, seed=3, device="cuda").val_ppl, rel=1e-3)
    events.clear()
    train_run(cfg, W, train, val, seed=3, device="cuda", progress=lambda e, **i: events.append(e))
    assert "notice" not in events  # the standard form takes the fast paths silently


@pytest.mark.parametrize("C", [768, 1152])
def test_gram_effective_rank_matches_svd_on_gpu(C):
    """The engine's effective rank (Gram eigenvalues, float64, on the GPU) against an SVD in
    float64 on the CPU of the same rows, on LayerNorm'd uncentred rows with dominant directions."""
    from archsearch.cvfp.metrics import effective_rank
    from archsearch.cvfp.reference import Reference

    g = torch.Generator().manual_seed(C)
    x = torch.randn(20_000, 8, generator=g) @ (3 * torch.randn(8, C, generator=g)) + torch.randn(20_000, C, generator=g)
    x = torch.nn.functional.layer_norm(x + 2.0, (C,))
    got = effective_rank(x.cuda(), 10_000, torch.Generator().manual_seed(1))
    want = Reference.effective_rank(x.double(), 10_000, torch.Generator().manual_seed(1))
    assert got == pytest.approx(want, abs=1e-4)


def _gpu_numbers(r):
    """(what the recurrent validation pass does not touch, what it does) of a run."""
    m = {k: v for k, v in r.metrics.items() if not k.endswith(("_per_s", "_us", "_seconds"))}
    train = [r.history["phase1"], m.pop("train_er"), m.pop("phase1_iterations"), [h["train_loss"] for h in r.history["phase2"]]]
    return train, [r.val_loss, r.val_ppl, r.val_loss_se, r.val_acc, m.pop("val_er")]


def test_staged_runs_on_gpu_equal_one_after_another():
    """A trial's 4 sizes x 2 seeds staged on the GPU (cvfp.run.train_staged, as run_trial's
    train_many hands them over: phase 1 of all, one batched recurrent_passes call, each phase 2
    in order), bf16 with the fused layers, captured graphs and Triton kernels, against each run
    alone: every number to the bit (a batched launch uses the tile of the single pass:
    recurrent.PLAN, one tile per shape)."""
    import json

    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.phases import noop
    from archsearch.cvfp.run import train_run, train_staged

    g = torch.Generator().manual_seed(0)
    W = torch.randn(3000, 64, generator=g) * 0.5
    train, val = torch.randint(0, 3000, (24000,), generator=g), torch.randint(0, 3000, (1500,), generator=g)
    cfg = run_config_from_dict({"model": {"num_layers": 3, "context_dim": 96, "num_input_tokens": 2},
                                "phase1": {"batch_size": 2000}, "phase2": {"batch_size": 1000, "max_epochs": 3},
                                "engine": {"precision": "bf16"}})  # fmt: skip
    runs = [(train[:n], seed, noop) for n in (3000, 6000, 12000, 24000) for seed in (7, 8)]
    alone = [train_run(cfg, W, ids, val, seed=seed, device="cuda") for ids, seed, _ in runs]
    for _ in range(2):  # the second time with the kept phase-2 session of the first
        staged = list(train_staged(cfg, W, val, runs, device="cuda"))
        assert all(not isinstance(r, BaseException) for r in staged), staged
        for s, a in zip(staged, alone):
            (s_train, s_val), (a_train, a_val) = _gpu_numbers(s), _gpu_numbers(a)
            assert json.dumps(s_train) == json.dumps(a_train)  # NaN compares as text
            assert json.dumps(s_val) == json.dumps(a_val), "what reads the validation cache differs"


FUSED_FP32 = pytest.mark.xfail(strict=False, reason="on an H200 (2026-12-01) the fused iteration in fp32 differed from the plain one by "
                               "1.6e-3 (L6 C768) and 6.4e-4 (L2 C1152) relative, cause not found: fp32 runs take the plain iteration")  # fmt: skip


@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=FUSED_FP32), "bf16"])
@pytest.mark.parametrize("L, C, k", [(6, 768, 1), (2, 1152, 2)])
def test_fused_phase1_iteration_matches_plain_on_gpu(precision, L, C, k):
    """engine.phase1_fused's iteration (fast/phase1.py) against the plain one (phases.plain_iteration
    through the fused layers) on a real width: outputs, loss sums, convergence rate and every
    parameter's gradient, over spans of several batches and a partial last one; in bf16 the
    fused iteration must be as close to the fp32 plain iteration as the plain bf16 one is. Then
    NaN contexts in one batch: skipped by both, the gradients finite and equal."""
    import math

    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.fast.layers import FusedContextBlock
    from archsearch.cvfp.fast.phase1 import FusedPhase1
    from archsearch.cvfp.model import ContextBlock, TokenEmbedding, init_parameters
    from archsearch.cvfp.phases import plain_iteration

    dev = torch.device("cuda")
    B, N, E, V = 8000, 8000 * 5 + 1234, 768, 5000
    spans = [(0, 16000), (16000, 32000), (32000, 40000), (40000, N)]
    cfgs = {p: run_config_from_dict({"model": {"num_layers": L, "context_dim": C, "num_input_tokens": k},
                                     "engine": {"precision": p, "phase1_chunk_batches": 2, "phase1_fused": True}})
            for p in ("fp32", precision)}  # fmt: skip
    g = torch.Generator(device=dev).manual_seed(0)
    emb = TokenEmbedding(torch.randn(V, E, device=dev, generator=g) * 0.1, k).to(dev)
    win = emb.windows(torch.randint(0, V, (N,), device=dev, generator=g))
    cb = ContextBlock(cfgs["fp32"].model, E)
    init_parameters(cb, cfgs["fp32"].model, torch.Generator().manual_seed(1))
    cb = cb.to(dev)
    fcb = FusedContextBlock(cb)
    prev0 = torch.randn(N, C, device=dev, generator=g) * 0.5
    noise = torch.randn(N, C, device=dev, generator=g) * 0.1
    num_batches = math.ceil(N / B)

    def run(fused: bool, prec: str, prev):
        cfg = cfgs[prec]
        for p in cb.parameters():
            p.grad = None
        out = torch.empty_like(prev)
        if fused:
            sums, rate = FusedPhase1(fcb.layers, fcb.context_dim, emb, win, cfg).iteration(prev, noise.clone(), out, spans, num_batches)
        else:
            sums, rate = plain_iteration(fcb, emb, win, prev, noise.clone(), out, spans, num_batches, cfg)  # its own precision scope
        return [out, sums] + [p.grad.clone() for p in cb.parameters()], float(rate)

    def rel(a, b):
        keep = torch.isfinite(b).all(-1) if b.dim() > 1 else torch.ones_like(b, dtype=torch.bool)
        assert bool(torch.isfinite(a[keep]).all())
        return float((a[keep] - b[keep]).norm() / b[keep].norm().clamp_min(1e-12))

    for bad in (False, True):
        prev = prev0.clone()
        if bad:
            prev[17000:17003] = float("nan")  # the batch 16,000..23,999: skipped
        truth, rate_t = run(False, "fp32", prev)
        fused, rate_f = run(True, precision, prev)
        assert bool((torch.isfinite(fused[0]).all(1) == torch.isfinite(truth[0]).all(1)).all())
        if precision == "fp32":
            assert abs(rate_f - rate_t) < 1e-6
            names = ["out", "sums"] + [n for n, _ in cb.named_parameters()]
            diffs = {n: rel(f, t) for n, f, t in zip(names, fused, truth)}
            assert max(diffs.values()) < 1e-4, f"relative differences (bad batch {bad}): {diffs}"
        else:
            plain, rate_p = run(False, precision, prev)
            assert abs(rate_f - rate_t) <= abs(rate_p - rate_t) + 0.01
            for f, p, t in zip(fused, plain, truth):
                assert rel(f, t) <= 1.5 * rel(p, t) + 1e-3


def test_fused_phase1_run_is_close_to_fp32_on_gpu():
    """A whole bf16 run with engine.phase1_fused meets what a bf16 run must (as
    test_bf16_run_is_close_to_fp32): PPL within 2 % of the fp32 run's, and phase 1 stops within
    one iteration of where the fp32 run's does."""
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.run import train_run

    g = torch.Generator().manual_seed(0)
    W = torch.randn(3000, 64, generator=g) * 0.5
    train, val = torch.randint(0, 3000, (30000,), generator=g), torch.randint(0, 3000, (2000,), generator=g)
    out = {}
    for precision, fused in (("fp32", False), ("bf16", True)):
        cfg = run_config_from_dict({"model": {"num_layers": 3, "context_dim": 128, "num_input_tokens": 2},
                                    "phase1": {"batch_size": 4000}, "phase2": {"batch_size": 1000, "max_epochs": 2},
                                    "engine": {"precision": precision, "phase1_fused": fused, "phase1_chunk_batches": 2}})  # fmt: skip
        out[precision] = train_run(cfg, W, train, val, seed=1, device="cuda")
    assert abs(out["bf16"].metrics["phase1_iterations"] - out["fp32"].metrics["phase1_iterations"]) <= 1
    assert out["bf16"].val_ppl == pytest.approx(out["fp32"].val_ppl, rel=0.02)


def test_staged_trial_on_gpu_equals_one_after_another(tiny_corpus):
    """run_trial on CUDA with engine.stage_sizes true and false: the same records and fit."""
    from test_stage_sizes import SIZES, numbers

    from archsearch.plan import prepare_space_data
    from archsearch.space import parse_space
    from archsearch.trial import TrialPlan, run_trial
    from helpers import tiny_space

    space = parse_space(tiny_space(tiny_corpus, data=dict(tiny_space(tiny_corpus)["data"], sizes={"tokens": SIZES})))
    data = prepare_space_data(space)

    def plan(stage):
        params = {"num_layers": 2, "context_dim": 32, "num_input_tokens": 2, "engine.stage_sizes": stage}
        return TrialPlan(params=params, config=space.run_config(params).to_dict(), sizes=SIZES, size_unit="tokens", seeds=[42, 7],
                         objectives=[o.__dict__ for o in space.objectives], data_path=str(data.path), device="cuda")  # fmt: skip

    seq, staged = numbers(run_trial(plan(False))), numbers(run_trial(plan(True)))
    assert [r["size"] for r in staged[0]] == SIZES
    for a, b in zip(staged[0], seq[0]):  # name the first size and field that differ
        assert {k: v for k, v in a.items() if v != b.get(k)} == {}, f"size {a['size']}: staged {a} vs one after another {b}"
    assert staged == seq  # to the bit, as on the CPU


@pytest.mark.parametrize("fused", [True, False])
def test_phase1_iteration_copies_nothing_from_the_host_on_gpu(fused):
    """One trained phase-1 iteration (train_phase1 from its progress call after the set-up to the
    one after the iteration, kernels compiled before) makes no host-to-device copy, on the default
    fused iteration and on the fused layers' path (phase1_fused=false); the fused iteration reads
    back once (the losses and the rate together: one host sync per iteration)."""
    from torch.profiler import ProfilerActivity, profile

    from archsearch.config import run_config_from_dict
    from archsearch.cvfp import fast
    from archsearch.cvfp.model import ContextBlock, TokenBlock, TokenEmbedding, init_parameters
    from archsearch.cvfp.phases import train_phase1

    dev = torch.device("cuda")
    cfg = run_config_from_dict({"model": {"num_layers": 3, "context_dim": 256, "num_input_tokens": 2},
                                "phase1": {"batch_size": 1000, "min_iterations": 2, "max_iterations": 2},
                                "engine": {"precision": "bf16", "phase1_fused": fused, "phase1_chunk_batches": 2}})  # fmt: skip
    g = torch.Generator(device=dev).manual_seed(0)
    emb = TokenEmbedding(torch.randn(3000, 128, device=dev, generator=g) * 0.1, 2).to(dev)
    win = emb.windows(torch.randint(0, 3000, (5500,), device=dev, generator=g))
    cb, tb = ContextBlock(cfg.model, 128), TokenBlock(cfg.model, 128)
    init_parameters(cb, cfg.model, torch.Generator().manual_seed(1))
    block = fast.select(cb.to(dev), tb.to(dev), cfg, dev).context_block
    assert (block.phase1_fast(emb, win, cfg) is not None) == fused
    train_phase1(block, emb, win, cfg, torch.Generator(device=dev).manual_seed(2))  # compile, first use
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def window(event, iteration=0, **_):
        torch.cuda.synchronize()
        if iteration == 1:
            prof.start()
        elif iteration == 2:
            prof.stop()

    train_phase1(block, emb, win, cfg, torch.Generator(device=dev).manual_seed(2), window)
    counts = {ev.key: ev.count for ev in prof.key_averages() if ev.key.startswith("Memcpy")}
    assert not any(k.startswith("Memcpy HtoD") for k in counts), counts
    if fused:
        assert sum(v for k, v in counts.items() if k.startswith("Memcpy DtoH")) == 1, counts


@pytest.mark.parametrize("L, C, k", [(6, 768, 1), (3, 768, 2)])
def test_fused_phase2_step_matches_autograd_step_on_gpu(L, C, k):
    """engine.phase2_fused's step (fast/phase2.py, captured) against today's autograd step
    (graphs.Phase2Step, captured, fused torch Adam) on a real width: five steps (four full
    batches, then a partial one replayed with row weights), every parameter and the summed loss;
    the bf16 fused step must be as close to the fp32 autograd step as the bf16 autograd step
    is (the phase-1 fused test's tolerance). k 2: the projected residuals."""
    import copy

    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.fast import head
    from archsearch.cvfp.fast.graphs import Phase2Step
    from archsearch.cvfp.fast.layers import FusedTokenBlock
    from archsearch.cvfp.fast.phase2 import FusedPhase2Step
    from archsearch.cvfp.model import TokenBlock, TokenEmbedding, init_parameters

    dev = torch.device("cuda")
    B, E, V = 4096, 768, 50257
    n = 4 * B + 1000
    cfgs = {p: run_config_from_dict({"model": {"num_layers": L, "context_dim": C, "num_input_tokens": k},
                                     "engine": {"precision": p}}) for p in ("fp32", "bf16")}  # fmt: skip
    g = torch.Generator(device=dev).manual_seed(0)
    emb = TokenEmbedding(torch.randn(V, E, device=dev, generator=g) * 0.1, k).to(dev)
    ids = torch.randint(0, V, (n + 1,), device=dev, generator=g)
    windows, targets = emb.windows(ids)[:n], ids[1:].contiguous()
    cache = torch.randn(L, n, C, device=dev, generator=g)
    tb0 = TokenBlock(cfgs["fp32"].model, E)
    init_parameters(tb0, cfgs["fp32"].model, torch.Generator().manual_seed(1))
    tb0 = tb0.to(dev)

    def run(fused: bool, prec: str):
        cfg = cfgs[prec]
        tb = copy.deepcopy(tb0)
        weight = head.head_weight(emb.weight, prec)
        if fused:
            step = FusedPhase2Step(FusedTokenBlock(tb), emb, weight, cfg, cache, windows, targets, graphed=True)
        else:
            opt = torch.optim.Adam(tb.parameters(), lr=cfg.phase2.lr, fused=True, capturable=True)
            step = Phase2Step(FusedTokenBlock(tb), emb, weight, opt, cfg, cache, windows, targets)
        step.prepare()
        step.loss_sum.zero_()
        for s in range(0, n, B):
            step(s, min(s + B, n))
        assert step.graph is not None
        return [step.loss_sum.float().reshape(1)] + [p.detach().clone() for p in tb.parameters()]

    def rel(a, b):
        assert bool(torch.isfinite(a).all())
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    truth, plain, fused = run(False, "fp32"), run(False, "bf16"), run(True, "bf16")
    names = ["loss_sum"] + [name for name, _ in tb0.named_parameters()]
    moved = min(rel(f, t) for f, t in zip(fused[1:], [p.detach() for p in tb0.parameters()]))
    assert moved > 1e-4, "the steps trained every parameter"
    bad = {name: (rel(f, t), rel(p, t)) for name, f, p, t in zip(names, fused, plain, truth) if rel(f, t) > 1.5 * rel(p, t) + 1e-3}
    assert not bad, f"(fused vs fp32, autograd bf16 vs fp32) relative differences: {bad}"


@pytest.mark.parametrize("n", [9000, 3500])
def test_fused_phase2_run_is_close_to_the_autograd_run_on_gpu(n):
    """Whole bf16 runs with engine.phase2_fused on and off: the validation PPL within 0.5 %, the
    epochs' losses alike; 9,000 positions are replayed from a graph (9 steps an epoch, a partial
    last one), 3,500 (fewer than 4 batches) step eagerly. The fused run's GPU session then
    gives the same numbers again, to the bit, when kept (another size in between) and when new."""
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.fast import graphs as EN
    from archsearch.cvfp.run import train_run

    g = torch.Generator().manual_seed(0)
    W = torch.randn(3000, 64, generator=g) * 0.5
    train, val = torch.randint(0, 3000, (n,), generator=g), torch.randint(0, 3000, (1500,), generator=g)

    def run(fused: bool, N: int = n):
        cfg = run_config_from_dict({"model": {"num_layers": 3, "context_dim": 128, "num_input_tokens": 2},
                                    "phase1": {"batch_size": 2000}, "phase2": {"batch_size": 1000, "max_epochs": 3, "patience": 3},
                                    "engine": {"precision": "bf16", "phase2_fused": fused}})  # fmt: skip
        return train_run(cfg, W, train[:N], val, seed=1, device="cuda")

    EN.release_phase2_graphs()
    plain, fused = run(False), run(True)
    assert fused.val_ppl == pytest.approx(plain.val_ppl, rel=5e-3)
    for a, b in zip(fused.history["phase2"], plain.history["phase2"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=5e-3) and a["val_loss"] == pytest.approx(b["val_loss"], rel=5e-3)
    if n >= 4000:
        session = EN._SESSIONS.session
        from archsearch.cvfp.fast.phase2 import FusedPhase2Step

        assert isinstance(session.step, FusedPhase2Step)
        run(True, 5500)
        assert EN._SESSIONS.session is session
        assert run(True).history["phase2"] == fused.history["phase2"]
        EN.release_phase2_graphs()
        assert run(True).history["phase2"] == fused.history["phase2"]
    EN.release_phase2_graphs()


@pytest.mark.parametrize("graphed", [True, False])
def test_fused_phase2_steps_copy_nothing_from_the_host_on_gpu(graphed):
    """Fused phase-2 steps (fast/phase2.py), kernels compiled and the graph captured before: no
    host-to-device copy and no device-to-host one (the step count, the clip and the loss sum stay
    on the device), replayed or eager, a partial last batch included."""
    from torch.profiler import ProfilerActivity, profile

    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.fast import head
    from archsearch.cvfp.fast.layers import FusedTokenBlock
    from archsearch.cvfp.fast.phase2 import FusedPhase2Step
    from archsearch.cvfp.model import TokenBlock, TokenEmbedding, init_parameters

    dev = torch.device("cuda")
    cfg = run_config_from_dict({"model": {"num_layers": 3, "context_dim": 256, "num_input_tokens": 2},
                                "phase2": {"batch_size": 1000}, "engine": {"precision": "bf16"}})  # fmt: skip
    g = torch.Generator(device=dev).manual_seed(0)
    emb = TokenEmbedding(torch.randn(3000, 128, device=dev, generator=g) * 0.1, 2).to(dev)
    n = 4500
    ids = torch.randint(0, 3000, (n + 1,), device=dev, generator=g)
    cache = torch.randn(3, n, 256, device=dev, generator=g)
    tb = TokenBlock(cfg.model, 128)
    init_parameters(tb, cfg.model, torch.Generator().manual_seed(1))
    step = FusedPhase2Step(FusedTokenBlock(tb.to(dev)), emb, head.head_weight(emb.weight, "bf16"), cfg, cache,
                           emb.windows(ids)[:n], ids[1:].contiguous(), graphed=graphed)  # fmt: skip
    step.prepare()
    assert (step.graph is not None) == graphed
    spans = [(s, min(s + 1000, n)) for s in range(0, n, 1000)]
    for s, e in spans:  # warm: every row count once
        step(s, e)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for s, e in spans:
            step(s, e)
        torch.cuda.synchronize()
    counts = {ev.key: ev.count for ev in prof.key_averages() if ev.key.startswith("Memcpy")}
    assert not any(k.startswith(("Memcpy HtoD", "Memcpy DtoH")) for k in counts), counts
    assert math.isfinite(float(step.loss_sum))


@pytest.mark.parametrize("fused", [True, False])
def test_kept_phase2_session_replays_equal_a_new_one_step_by_step(fused):
    """The kept-session check of test_kept_phase2_session_computes_what_a_new_one_does, step by
    step and without phases 1 and the caches (synthetic data of its shapes: L2 C64 k2, E 64,
    batches of 1,000, 8,999 and 5,499 positions): a new session's run, another size's run in
    the same session, then the first run again; the TokenBlock's parameters after every step and
    the validation sums after every epoch must be equal to the bit, and the failure names the
    first step (or epoch) and parameter that differ. fused: engine.phase2_fused's step; else
    graphs.Phase2Step."""
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.fast import graphs as EN
    from archsearch.cvfp.fast.layers import FusedTokenBlock
    from archsearch.cvfp.model import TokenBlock, TokenEmbedding, init_parameters

    dev = torch.device("cuda")
    cfg = run_config_from_dict({"model": {"num_layers": 2, "context_dim": 64, "num_input_tokens": 2},
                                "phase2": {"batch_size": 1000}, "engine": {"precision": "bf16", "phase2_fused": fused}})  # fmt: skip
    g = torch.Generator(device=dev).manual_seed(0)
    emb = TokenEmbedding(torch.randn(3000, 64, device=dev, generator=g) * 0.5, 2).to(dev)
    ids = torch.randint(0, 3000, (9000,), device=dev, generator=g)
    vids = torch.randint(0, 3000, (1500,), device=dev, generator=g)
    vwin = emb.windows(vids)
    val = (vwin[:-1], vids[1:], torch.randn(2, 1499, 64, device=dev, generator=g))
    tb0 = TokenBlock(cfg.model, 64)
    init_parameters(tb0, cfg.model, torch.Generator().manual_seed(1))
    tb0 = tb0.to(dev)

    def data(N):
        win = emb.windows(ids[:N])
        return win[:-1], ids[1:N], torch.randn(2, N - 1, 64, device=dev, generator=torch.Generator(device=dev).manual_seed(N))

    def run(N):
        train = data(N)
        tb = FusedTokenBlock(tb0)
        session = EN.prepare_phase2(tb, emb, train, val, cfg)
        step, evaluate = EN.phase2_backends(tb, emb, train, val, cfg, session)
        params, evals = [], []
        for _ in range(3):
            for s in range(0, N - 1, 1000):
                step(s, min(s + 1000, N - 1))
                params.append([p.detach().clone() for p in step.tblock.parameters()])
            r = evaluate()
            evals.append((r.loss, r.acc, float(step.loss_sum)))
            step.loss_sum.zero_()
        return session, params, evals

    names = [n for n, _ in tb0.named_parameters()]
    EN.release_phase2_graphs()
    session, fresh_p, fresh_e = run(9000)
    assert type(session.step).__name__ == ("FusedPhase2Step" if fused else "Phase2Step")
    run(5500)
    kept, kept_p, kept_e = run(9000)
    assert kept is session
    for i, (a, b) in enumerate(zip(kept_p, fresh_p)):
        diff = [n for n, x, y in zip(names, a, b) if not torch.equal(x, y)]
        assert not diff, f"step {i} (epoch {i // 9 + 1}): parameters differ from the new session's: {diff}"
    assert kept_e == fresh_e, f"validation (loss, acc, train loss sum) per epoch: kept {kept_e}, new {fresh_e}"
    EN.release_phase2_graphs()
