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


def test_the_driver_reads_gpu_memory_without_making_a_cuda_context():
    """What `archsearch run` reads in its driver for resources.gpus: auto (runner.local_gpu_memory):
    every visible device's memory, and no CUDA context (which would hold device memory for the
    whole run) on the GPU the trials share."""
    import json
    import subprocess
    import sys

    from helpers import ROOT

    code = ("import json, torch; from archsearch.search.runner import local_gpu_memory; m = local_gpu_memory(); "
            "print(json.dumps([m, bool(torch._C._cuda_hasPrimaryContext(0))]))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    memory, context = json.loads(r.stdout.strip().splitlines()[-1])
    assert memory == [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    assert not context
