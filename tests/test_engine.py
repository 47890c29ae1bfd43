"""The engine computes exactly what cvfp.md describes: checked against the slow reference."""

import math

import pytest
import torch

from archsearch.config import param_counts, run_config_from_dict, token_widths
from archsearch.cvfp.run import train_run
from archsearch.cvfp.model import ContextBlock, ContextLayer, TokenBlock, TokenEmbedding, init_parameters
from archsearch.cvfp.reference import reference_run

TIMING_METRICS = {"phase1_tokens_per_s", "phase2_tokens_per_s", "val_step_us", "phase2_prepare_seconds"}


def numbers(r):
    """A run's result without its timings."""
    d = r.to_dict()
    del d["seconds"], d["phase_seconds"]
    d["metrics"] = {k: v for k, v in d["metrics"].items() if k not in TIMING_METRICS}
    return d


def tiny_cfg(k, L, **engine):
    return run_config_from_dict({
        "model": {"num_layers": L, "context_dim": 6, "num_input_tokens": k},
        # several phase-1 batches with a partial last one; convergence reachable in a few iterations
        "phase1": {"batch_size": 16, "max_iterations": 7, "min_iterations": 3, "min_converged_fraction": 0.5},
        "phase2": {"batch_size": 8, "max_epochs": 4, "lr": 0.01},
        "engine": {"phase1_chunk_batches": 2, "eval_batch_size": 7, "er_max_rows": 30, **engine},
    })


def tiny_data(seed=0, V=50, E=8, N=45, M=21):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, E, generator=g), torch.randint(0, V, (N,), generator=g), torch.randint(0, V, (M,), generator=g)


def close(a, b, tol=2e-5):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_engine_matches_reference(k, L):
    cfg = tiny_cfg(k, L)
    W, train, val = tiny_data()
    e = train_run(cfg, W, train, val, seed=3, keep_tensors=True)
    r = reference_run(cfg, W, train, val, seed=3)
    t = e.tensors
    assert close(t["contexts"], r["contexts"])
    assert t["train_cache"].shape == (L, len(train) - 1, 6)
    assert t["val_cache"].shape == (L, len(val) - 1, 6)
    assert close(t["train_cache"], r["train_cache"])
    assert close(t["val_cache"], r["val_cache"])
    assert e.metrics["phase1_iterations"] == r["phase1_iterations"]
    for he, hr in zip(e.history["phase1"][1:], r["phase1_history"][1:]):
        assert he["loss"] == pytest.approx(hr["loss"], rel=1e-5, abs=1e-6)
        assert he["convergence_rate"] == hr["convergence_rate"]
    assert [h["val_loss"] for h in e.history["phase2"]] == pytest.approx([h["val_loss"] for h in r["phase2_history"]], rel=1e-5)
    assert e.val_ppl == pytest.approx(r["val_ppl"], rel=1e-5)
    assert e.val_acc == pytest.approx(r["val_acc"], abs=1e-6)
    assert e.metrics["train_er"] == pytest.approx(r["train_er"], rel=1e-5)
    assert e.metrics["val_er"] == pytest.approx(r["val_er"], rel=1e-5)
    assert (e.metrics["phase2_best_epoch"], e.metrics["phase2_stopped_epoch"]) == (r["best_epoch"], r["stopped_epoch"])
    assert e.val_loss_se == pytest.approx(r["val_loss_se"], rel=1e-4) and e.val_loss_se > 0
    assert e.family == "cvfp" and e.params["total"] == e.params["phase1"] + e.params["phase2"]


def test_phase1_chunking_changes_nothing():
    W, train, val = tiny_data(1)
    a = train_run(tiny_cfg(2, 2, phase1_chunk_batches=1), W, train, val, seed=5)
    b = train_run(tiny_cfg(2, 2, phase1_chunk_batches=64), W, train, val, seed=5)
    assert a.val_ppl == pytest.approx(b.val_ppl, rel=1e-5)
    assert a.metrics["phase1_iterations"] == b.metrics["phase1_iterations"]


def test_phase1_fused_switch_is_speed_only_where_it_does_not_apply():
    """engine.phase1_fused (on by default) needs the fused ContextBlock (CUDA + Triton): on a CPU
    the default run is the plain one (phase1_fused=false) to the bit, and its run-cache key and
    its study signature's config are those of the switch off."""
    W, train, val = tiny_data(1)
    assert tiny_cfg(2, 2).engine.phase1_fused is True
    a = train_run(tiny_cfg(2, 2), W, train, val, seed=5)
    b = train_run(tiny_cfg(2, 2, phase1_fused=False), W, train, val, seed=5)
    assert numbers(a) == numbers(b)
    assert tiny_cfg(2, 2).key() == tiny_cfg(2, 2, phase1_fused=False).key()


def test_phase2_fused_switch_is_speed_only_where_it_does_not_apply():
    """engine.phase2_fused (on by default) needs a bf16 run on CUDA with Triton: on a CPU the
    default run is the autograd step's (phase2_fused=false) to the bit, and the switch is not
    part of the run-cache key; a value other than true/false is a config error naming the field."""
    from archsearch.errors import ConfigError

    W, train, val = tiny_data(1)
    assert tiny_cfg(2, 2).engine.phase2_fused is True
    a = train_run(tiny_cfg(2, 2), W, train, val, seed=5)
    b = train_run(tiny_cfg(2, 2, phase2_fused=False), W, train, val, seed=5)
    assert numbers(a) == numbers(b)
    assert tiny_cfg(2, 2).key() == tiny_cfg(2, 2, phase2_fused=False).key()
    with pytest.raises(ConfigError, match="engine.phase2_fused"):
        tiny_cfg(2, 2, phase2_fused="yes")


def test_gpu_engine_version_changes_gpu_run_keys_only(monkeypatch):
    """Phase 1's fused iteration, the GPU default now, rounds otherwise than the path GPU runs took
    before it, so a GPU run's cache key carries GPU_ENGINE_VERSION; a CPU run's key is the one it
    was before (pinned: the default config's key on main before the change)."""
    import archsearch.runcache as rc
    from archsearch.config import RunConfig

    cfg = RunConfig()
    cpu = rc.run_key(cfg, "fp", 1, "cpu")
    assert cpu == rc.run_key(cfg, "fp", 1) == "2ddadf731037b1e5ff81f5507b3e1fc9b2d4b22420c01be5ef7fa6f2909e19f4"
    gpu = rc.run_key(cfg, "fp", 1, "cuda:0")
    assert gpu != cpu and gpu == rc.run_key(cfg, "fp", 1, "cuda")
    monkeypatch.setattr(rc, "GPU_ENGINE_VERSION", rc.GPU_ENGINE_VERSION + 1)
    assert rc.run_key(cfg, "fp", 1, "cuda") != gpu and rc.run_key(cfg, "fp", 1, "cpu") == cpu
    monkeypatch.setattr(rc, "ENGINE_VERSION", rc.ENGINE_VERSION + 1)  # an engine change of every device
    assert rc.run_key(cfg, "fp", 1, "cpu") != cpu


def test_same_seed_identical_metrics_different_seed_not():
    W, train, val = tiny_data(2)
    cfg = tiny_cfg(1, 2)
    a = train_run(cfg, W, train, val, seed=11)
    b = train_run(cfg, W, train, val, seed=11)
    c = train_run(cfg, W, train, val, seed=12)
    assert numbers(a) == numbers(b)
    assert a.val_ppl != c.val_ppl


def test_windows_are_oldest_first_with_zero_padding():
    W = torch.randn(10, 4)
    emb = TokenEmbedding(W, num_input_tokens=3)
    ids = torch.tensor([4, 7, 2])
    win = emb.windows(ids)
    assert win.tolist() == [[10, 10, 4], [10, 4, 7], [4, 7, 2]]  # 10 = V = the zero row
    vec = emb.vectors(win)
    assert vec.shape == (3, 12)
    assert torch.equal(vec[0, :8], torch.zeros(8))
    normed = torch.nn.functional.layer_norm(W, (4,))
    assert torch.allclose(vec[2], torch.cat([normed[4], normed[7], normed[2]]))


def test_parameter_counts_match_the_modules():
    for k, L, C in [(1, 6, 32), (2, 3, 16), (3, 5, 8), (4, 2, 12)]:
        cfg = run_config_from_dict({"model": {"num_layers": L, "context_dim": C, "num_input_tokens": k}})
        E = 24
        counts = param_counts(cfg.model, E)
        assert counts["phase1_params"] == sum(p.numel() for p in ContextBlock(cfg.model, E).parameters())
        assert counts["phase2_params"] == sum(p.numel() for p in TokenBlock(cfg.model, E).parameters())
        widths = token_widths(E, k, L)
        assert widths[0] == E * k and widths[-1] == E


def test_report_phase1_parameter_counts_at_e768():
    expected = {(6, 768, 1): 7.09e6, (6, 768, 2): 10.63e6, (6, 1152, 1): 13.29e6, (9, 768, 1): 10.64e6}
    for (L, C, k), n in expected.items():
        cfg = run_config_from_dict({"model": {"num_layers": L, "context_dim": C, "num_input_tokens": k}})
        assert round(param_counts(cfg.model, 768)["phase1_params"] / 1e6, 2) == n / 1e6


def test_nonfinite_loss_raises():
    from archsearch.errors import NonFiniteLoss

    W, train, val = tiny_data(3)
    W[train[5]] = float("nan")  # a poisoned embedding row makes every loss NaN
    with pytest.raises(NonFiniteLoss):
        train_run(tiny_cfg(1, 1), W, train, val, seed=0)


def test_weighted_head_loss_is_the_mean_over_the_weighted_rows():
    """The captured phase-2 step runs an epoch's shorter last batch (r rows) as a full one with
    row weights 1/r and 0: the loss is then the mean over the r rows and the other rows get
    exactly zero gradient (the plain PyTorch path here; the fused GPU path in test_gpu.py)."""
    import torch.nn.functional as F

    from archsearch.cvfp.fast.head import head_weight, train_loss

    g = torch.Generator().manual_seed(0)
    n, r, E, V = 64, 23, 16, 300
    head = head_weight(torch.randn(V, E, generator=g), "fp32")
    h = torch.randn(n, E, generator=g, requires_grad=True)
    t = torch.randint(0, V, (n,), generator=g)
    w = torch.zeros(n)
    w[:r] = 1.0 / r
    loss = train_loss(h, head, t, w)
    loss.backward()
    h2 = h.detach()[:r].clone().requires_grad_()
    ref = F.cross_entropy(h2 @ head.matrix.T, t[:r])
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    assert torch.allclose(h.grad[:r], h2.grad, rtol=1e-5, atol=1e-8)
    assert bool((h.grad[r:] == 0).all())


@pytest.mark.parametrize("grad_clip", [1e-3, 1e3])  # clipping every step / never
def test_clip_folded_into_fused_adam_matches_clip_then_adam(grad_clip):
    """With a fused Adam the phase-2 step hands the clip's factor to Adam's kernel (its
    grad_scale) instead of scaling the gradients first: the same parameters, up to rounding."""
    from archsearch.cvfp.fast import head
    from archsearch.cvfp.fast.graphs import Phase2Step
    from archsearch.cvfp.model import TokenBlock, init_parameters

    cfg = run_config_from_dict({"model": {"num_layers": 2, "context_dim": 6, "num_input_tokens": 2},
                                "phase2": {"batch_size": 8, "lr": 0.01, "grad_clip": grad_clip}, "engine": {"precision": "fp32"}})  # fmt: skip
    W, ids, _ = tiny_data(V=50, E=8, N=40)
    emb = TokenEmbedding(W, 2)
    win = emb.windows(ids)
    cache = torch.randn(2, 39, 6, generator=torch.Generator().manual_seed(1))
    weight = head.head_weight(emb.weight, "fp32")
    blocks = []
    for fused in (False, True):
        tb = TokenBlock(cfg.model, 8)
        init_parameters(tb, cfg.model, torch.Generator().manual_seed(2))
        opt = torch.optim.Adam(tb.parameters(), lr=0.01, fused=fused)
        step = Phase2Step(tb, emb, weight, opt, cfg, cache, win[:-1], ids[1:])
        assert (step.grad_scale is not None) == fused
        for s in range(0, 39, 8):
            step(s, min(s + 8, 39))
        blocks.append(tb)
    for a, b in zip(*(list(t.parameters()) for t in blocks)):
        assert close(b.detach(), a.detach(), 1e-5)
    if grad_clip < 1:  # the clip was active: the folded factor must have been > 1 on the last step
        assert float(step.grad_scale) > 1.0


class GeluContextLayer(ContextLayer):
    """A changed layer: GELU instead of ReLU. Not the standard form, so no fast path takes it."""

    def activation(self, z):
        return torch.nn.functional.gelu(z)


def gelu_blocks(m, E):
    cblock, tblock = ContextBlock(m, E), TokenBlock(m, E)
    token_dim = E * m.num_input_tokens
    cblock.layers = torch.nn.ModuleList(GeluContextLayer(m.context_dim, token_dim, m.layernorm_eps) for _ in range(m.num_layers))
    return cblock, tblock


def test_variant_layer_trains_on_the_plain_path_with_a_notice(caplog):
    """A subclass with another activation trains (CPU), computes something else than the
    standard layer, and the run says once that it runs on the plain path."""
    W, train, val = tiny_data(4)
    cfg = tiny_cfg(2, 2)
    events = []
    with caplog.at_level("WARNING", logger="archsearch.cvfp.run"):
        v = train_run(cfg, W, train, val, seed=3, progress=lambda event, **info: events.append((event, info)), build_blocks=gelu_blocks)
    notices = [info["message"] for event, info in events if event == "notice"]
    assert len(notices) == 1 and "GeluContextLayer" in notices[0] and "plain path" in notices[0]
    assert any("GeluContextLayer" in rec.getMessage() for rec in caplog.records)
    assert v.val_ppl > 1 and all(math.isfinite(x) for x in (v.val_loss, v.val_loss_se, v.metrics["val_er"]))
    s = train_run(cfg, W, train, val, seed=3)
    assert s.val_ppl != v.val_ppl


def test_split_recurrence_is_the_plain_step_by_step_pass():
    """fast/recurrent.py's split form (token half batched; what every standard run uses) and
    the plain pass calling the ContextBlock step by step give the same validation contexts."""
    W, train, val = tiny_data(5)
    a = train_run(tiny_cfg(2, 3), W, train, val, seed=1, keep_tensors=True)
    b = train_run(tiny_cfg(2, 3, recurrent="plain"), W, train, val, seed=1, keep_tensors=True)
    assert close(a.tensors["val_cache"], b.tensors["val_cache"], 1e-5)
    assert a.val_ppl == pytest.approx(b.val_ppl, rel=1e-5)


def test_caps_are_flagged():
    W, train, val = tiny_data(6)
    cfg = tiny_cfg(1, 1).replace(**{"phase1.max_iterations": 2, "phase1.min_iterations": 1, "phase1.min_converged_fraction": 1.0,
                                    "phase2.max_epochs": 1})  # fmt: skip
    r = train_run(cfg, W, train, val, seed=0)
    assert r.metrics["phase1_iterations"] == 2 and r.metrics["phase1_convergence_rate"] < 1.0
    assert r.metrics["phase2_best_epoch"] == 1
    assert r.capped == ["phase1_max_iterations", "max_epochs"]
    roomy = tiny_cfg(1, 1).replace(**{"phase1.convergence_threshold": 10.0, "phase2.max_epochs": 50, "phase2.lr": 0.05})
    assert train_run(roomy, W, train, val, seed=0).capped == []


def test_loss_stats_is_the_standard_error_of_the_mean():
    from archsearch.cvfp.phases import loss_stats

    x = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    st = loss_stats(float(x.sum()), float((x * x).sum()), 321, 1000)
    assert st.loss == pytest.approx(float(x.mean()))
    assert st.loss_se == pytest.approx(float(x.std() / math.sqrt(1000)), rel=1e-9)
    assert st.acc == 0.321


def test_fast_phase2_pair_is_a_drop_in_for_the_eager_one():
    """fast/graphs.py's stepper and evaluator (uncaptured here: no CUDA) through the same
    phases.train_phase2 as the eager pair: the same numbers, the same trained parameters."""
    from archsearch.cvfp.fast.graphs import phase2_backends
    from archsearch.cvfp.phases import EagerEvaluator, EagerStepper, train_phase2

    cfg = tiny_cfg(2, 2)
    W, ids, val_ids = tiny_data(7, N=60, M=30)
    emb = TokenEmbedding(W, 2)
    win, vwin = emb.windows(ids), emb.windows(val_ids)
    g = torch.Generator().manual_seed(1)
    train = (win[:-1], ids[1:], torch.randn(2, 59, 6, generator=g))
    val = (vwin[:-1], val_ids[1:], torch.randn(2, 29, 6, generator=g))
    out = []
    for fast in (False, True):
        tb = TokenBlock(cfg.model, 8)
        init_parameters(tb, cfg.model, torch.Generator().manual_seed(2))
        if fast:
            step, evaluate = phase2_backends(tb, emb, train, val, cfg)
        else:
            step, evaluate = EagerStepper(tb, emb, emb.weight, cfg, train), EagerEvaluator(tb, emb, emb.weight, cfg, val)
        res = train_phase2(step, evaluate, 59, cfg)
        out.append((res, [p.detach().clone() for p in tb.parameters()]))
    (a, pa), (b, pb) = out
    assert a.history == b.history and (a.val_loss, a.val_loss_se, a.val_acc) == (b.val_loss, b.val_loss_se, b.val_acc)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
