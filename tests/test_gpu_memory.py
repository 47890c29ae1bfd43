"""The CVFP memory estimate against what runs allocate on a GPU (skipped without CUDA; the lead
engineer runs it on the GPU machine; scripts/check_memory_estimate.py prints the full table)."""

from __future__ import annotations

import gc

import pytest
import torch

from archsearch.config import run_config_from_dict
from archsearch.cvfp.fast.graphs import release_phase2_graphs
from archsearch.cvfp.memory import estimate_run_memory
from archsearch.cvfp.run import train_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

V, E, M = 30_522, 384, 6_000


@pytest.mark.parametrize("model", [{"num_layers": 2, "context_dim": 256}, {"num_layers": 3, "context_dim": 512, "num_input_tokens": 2}])
def test_runs_allocate_no_more_than_estimated(model):
    """A trial's two sizes in a row (the second finds the first's phase-2 session kept): every
    run's peak allocation is within its estimate plus what the run before it kept, and the
    estimate is not wildly loose."""
    cfg = run_config_from_dict({"model": model, "phase1": {"max_iterations": 3, "min_iterations": 2}, "phase2": {"max_epochs": 1}})
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(V, E, generator=g)
    train, val = torch.randint(0, V, (70_000,), generator=g), torch.randint(0, V, (M,), generator=g)
    release_phase2_graphs()
    gc.collect()
    torch.cuda.empty_cache()
    kept = 0  # what the previous run left (its phase-2 session), live beside this run's phases
    for n in (20_000, 70_000):
        torch.cuda.reset_peak_memory_stats()
        train_run(cfg, embedding, train[:n], val, seed=42, device="cuda")
        measured, est = torch.cuda.max_memory_allocated(), estimate_run_memory(cfg, n, M, V, E)
        assert 0.3 * est.peak < measured <= est.peak + kept, (n, measured, kept, est.to_dict())
        kept = est.kept
    release_phase2_graphs()


def test_the_fused_phase2_step_allocates_what_the_estimate_counts():
    """fast/phase2.FusedPhase2Step at the report's baseline shape (L6, C768, MiniLM's V and E):
    what its constructor leaves allocated is memory.phase2_step_bytes less the block's own
    parameters, which it re-points at its flat buffer (their storage freed), up to the
    allocator's 512-byte rounding of each tensor."""
    from types import SimpleNamespace

    from archsearch.config import phase2_params
    from archsearch.cvfp.fast import head
    from archsearch.cvfp.fast.layers import FusedTokenBlock
    from archsearch.cvfp.fast.phase2 import FusedPhase2Step
    from archsearch.cvfp.memory import phase2_step_bytes
    from archsearch.cvfp.model import TokenBlock

    dev = torch.device("cuda")
    cfg = run_config_from_dict({"model": {"num_layers": 6, "context_dim": 768}, "engine": {"precision": "bf16"}})
    n = 20_000  # phase 2's training positions
    _fresh()
    tb = FusedTokenBlock(TokenBlock(cfg.model, E).to(dev))
    weight = head.head_weight(torch.randn(V, E, device=dev), "bf16")
    emb = SimpleNamespace(normed=torch.randn(V + 1, E, device=dev))
    cache = torch.randn(6, n, 768, device=dev, dtype=torch.bfloat16)
    windows, targets = torch.randint(0, V, (n, 1), device=dev), torch.randint(0, V, (n,), device=dev)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    step = FusedPhase2Step(tb, emb, weight, cfg, cache, windows, targets, graphed=True)
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    expected = phase2_step_bytes(cfg, n + 1, V, E) - 4 * phase2_params(cfg.model, E)
    tensors = 20 + len(list(tb.parameters()))  # the step's (about 20) and the parameters' freed ones, each rounded
    assert abs(grown - expected) <= 512 * tensors, (grown, expected)
    del step, tb
    _fresh()


def test_the_driver_reads_gpu_memory_without_making_a_cuda_context():
    """What `archsearch run` reads in its driver for resources.gpus: auto (runner.local_gpu_memory):
    every visible device's memory, and no CUDA context (which would hold device memory for the
    whole run) on the GPU the trials share."""
    import json
    import subprocess
    import sys

    from helpers import ROOT

    code = ("import json, sys; from archsearch.search.runner import local_gpu_memory; m = local_gpu_memory(); t = 'torch' in sys.modules; "
            "import torch; print(json.dumps([m, t, bool(torch._C._cuda_hasPrimaryContext(0))]))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    memory, torch_in_driver, context = json.loads(r.stdout.strip().splitlines()[-1])
    assert memory == [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    assert not context
    assert not torch_in_driver  # read by a child process: the driver imports no torch


def _fresh() -> int:
    release_phase2_graphs()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def test_a_staged_trial_of_the_report_shape_allocates_no_more_than_estimated():
    """The report's baseline (L6, C768, k1) at its four sizes with MiniLM's shapes, staged as auto
    stages a trial's runs on CUDA (every phase 1, one batched validation pass, each finish):
    the peak allocation is within memory.trial_memory's peak plus one phase-2 session (the
    trial's own, live during its finishes), and after the trial only the kept
    phase-2 session is left, holding no training data (run.py drops its train cache)."""
    from archsearch.cvfp.fast import graphs
    from archsearch.cvfp.memory import trial_memory
    from archsearch.cvfp.run import train_staged
    from archsearch.result import RunResult

    V, E, M = 30_522, 384, 30_000
    sizes = [62_891, 122_795, 240_132, 587_970]
    cfg = run_config_from_dict({"phase1": {"max_iterations": 3, "min_iterations": 2}, "phase2": {"max_epochs": 1}})
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(V, E, generator=g)
    train, val = torch.randint(0, V, (max(sizes),), generator=g), torch.randint(0, V, (M,), generator=g)
    base = _fresh()
    results = list(train_staged(cfg, embedding, val, [(train[:n], 42, lambda *a, **k: None) for n in sizes], "cuda"))
    measured = torch.cuda.max_memory_allocated() - base
    peak, kept = trial_memory(cfg, sizes, M, V, E, staged=True)
    assert all(isinstance(r, RunResult) for r in results), results
    assert 0.5 * peak < measured <= peak + kept, (measured, peak, kept, torch.cuda.memory_summary(abbreviated=True))
    session = graphs._SESSIONS.session
    assert session.step.cache is None and session.step.windows is None  # the kept session keeps no run's data
    gc.collect()
    left = torch.cuda.memory_allocated() - base
    assert left <= kept, (left, kept)
    release_phase2_graphs()


def test_a_sharing_worker_reserves_no_more_than_its_cap_and_fails_beyond_it():
    """A worker at 0.25 of the GPU (auto's share of 4 trials), in a process of its own as Ray
    starts it: gpu_share.configure_worker caps its allocator before its first CUDA allocation
    and turns on expandable segments; a staged trial then reserves within the cap, and an
    allocation beyond the cap is an out-of-memory error in that process, which goes on."""
    import json
    import os
    import subprocess
    import sys

    from helpers import ROOT

    code = """
import json, torch
from archsearch.gpu_share import configure_worker
share = configure_worker(0.25)
from archsearch.config import run_config_from_dict
from archsearch.cvfp.run import train_staged
from archsearch.errors import is_out_of_memory
V, E, M = 30522, 384, 6000
cfg = run_config_from_dict({"model": {"num_layers": 3, "context_dim": 512}, "phase1": {"max_iterations": 3, "min_iterations": 2},
                            "phase2": {"max_epochs": 1}})
g = torch.Generator().manual_seed(0)
emb, train, val = torch.randn(V, E, generator=g), torch.randint(0, V, (120000,), generator=g), torch.randint(0, V, (M,), generator=g)
out = list(train_staged(cfg, emb, val, [(train[:n], 42, lambda *a, **k: None) for n in (30000, 120000)], "cuda"))
reserved = torch.cuda.max_memory_reserved()
try:
    torch.empty(share.cap_bytes, dtype=torch.uint8, device="cuda")
    over = None
except Exception as e:
    over = is_out_of_memory(e)
after = float(torch.ones(1024, device="cuda").sum())
segments = torch.cuda.memory_snapshot()
print(json.dumps({"share": share.to_dict(), "ok": all(hasattr(r, "val_ppl") for r in out), "reserved": reserved, "over": over,
                  "after": after, "expandable": [s.get("is_expandable") for s in segments]}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    share = got["share"]
    assert got["ok"] and share["alloc_conf"] == "expandable_segments:True" and share["cap_bytes"] > 0
    assert got["reserved"] <= share["cap_bytes"], got
    assert got["over"] is True and got["after"] == 1024.0, got
    if any(e is not None for e in got["expandable"]):  # the snapshot says which segments are expandable (torch 2.1+)
        assert True in got["expandable"], got["expandable"]
