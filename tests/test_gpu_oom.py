"""A real CUDA out-of-memory in a run, on the GPU (skipped without CUDA; the lead engineer
runs it on the H200): the failed run leaves nothing allocated and the next run of the same
process works and computes what a clean one does (tests/test_oom_recovery.py: the CPU side)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_real_oom_frees_the_run_and_the_next_run_equals_a_clean_one():
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.fast import graphs
    from archsearch.errors import is_out_of_memory
    from archsearch.families import RunData, get_family
    from archsearch.trial import free_memory, train_run_once

    family = get_family("cvfp")
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8000, 128, generator=g) * 0.5
    data = RunData(W, torch.randint(0, 8000, (40_000,), generator=g), torch.randint(0, 8000, (4000,), generator=g))

    def cfg(C, L):
        return run_config_from_dict({"model": {"num_layers": L, "context_dim": C, "num_input_tokens": 2},
                                     "phase1": {"batch_size": 4000, "max_iterations": 6, "min_iterations": 2},
                                     "phase2": {"batch_size": 1000, "max_epochs": 2, "patience": 2}, "engine": {"precision": "bf16"}})  # fmt: skip

    def run(c):
        r = train_run_once(family, c, data, 1, "cuda", lambda *a, **k: None)
        return r.val_loss, [(h["train_loss"], h["val_loss"]) for h in r.history["phase2"]]

    small, big = cfg(64, 1), cfg(1024, 4)
    graphs.release_phase2_graphs()
    free_memory()
    run(small)  # cuBLAS handles, Triton kernels, capture streams: created once per process
    graphs.release_phase2_graphs()
    free_memory()
    base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()  # what earlier tests left (graph pools)
    torch.cuda.reset_peak_memory_stats()
    clean = run(big)
    peak = torch.cuda.max_memory_allocated() - base
    graphs.release_phase2_graphs()
    free_memory()
    assert torch.cuda.memory_allocated() <= base + (16 << 20)  # a finished run keeps nothing either

    run(small)  # a kept session of another shape, as a worker's earlier trial leaves it
    assert getattr(graphs._SESSIONS, "session", None) is not None
    torch.cuda.empty_cache()  # its cached blocks, not the session: the big run gets only what is left free below
    free_bytes, _ = torch.cuda.mem_get_info()
    filler = torch.empty(free_bytes - peak // 2, dtype=torch.uint8, device="cuda")  # room for half of the big run
    with pytest.raises(Exception) as e:  # noqa: PT011 - an OOM inside a graph capture surfaces as the capture's error
        run(big)  # fails, is retried once without the kept session, fails again
    assert is_out_of_memory(e.value)
    del e
    assert getattr(graphs._SESSIONS, "session", None) is None
    held = torch.cuda.memory_allocated() - filler.numel() - base
    cached = torch.cuda.memory_reserved() - filler.numel() - base_reserved
    print(f"after the failed runs: {held / 2**20:.1f} MB allocated, {cached / 2**20:.1f} MB reserved above the base; {torch.cuda.memory_summary(abbreviated=True)}")
    assert held <= 16 << 20, f"the failed runs still hold {held / 2**20:.1f} MB"  # cuBLAS slack
    assert cached <= 64 << 20, f"{cached / 2**20:.1f} MB cached"  # their cached blocks went back to the driver
    del filler
    assert run(big) == clean  # the same process trains the next run as a fresh one would
    graphs.release_phase2_graphs()
    free_memory()
