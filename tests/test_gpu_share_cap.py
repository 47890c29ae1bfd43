"""A sharing worker's allocator cap and settings (archsearch.gpu_share), the budgets that read
the cap, and the estimate's terms for what a worker holds (pure parts and fakes of torch.cuda:
no GPU, no Ray; tests/test_gpu_memory.py checks the same on a GPU)."""

from __future__ import annotations

import pytest
import torch

from archsearch import gpu_share
from archsearch.config import run_config_from_dict
from archsearch.cvfp import run as engine
from archsearch.cvfp.memory import estimate_run_memory, held_bytes, trial_memory
from archsearch.resources import CUDA_CONTEXT_BYTES, GPU_MEMORY_FRACTION, allocator_cap, gpus_for, trials_per_gpu

H200 = 150_109_880_320  # total_memory of the H200 (benchmarks)
GRID = ([62_891, 122_795, 240_132, 587_970], 30_000, 30_522, 384)  # the offline grid's sizes, validation, V, E (MiniLM)


class _Torch:
    """Stands in for the torch calls of configure_worker, recording them."""

    def __init__(self, total=H200):
        self.total, self.fractions, self.settings = total, [], []

    def kwargs(self, environ):
        return {"environ": environ, "total_memory": lambda d: self.total, "set_fraction": lambda f, d: self.fractions.append((f, d)),
                "apply_conf": self.settings.append, "cuda": True, "device": 0}  # fmt: skip


@pytest.mark.parametrize("k", [2, 3, 4])
def test_auto_share_gives_each_worker_a_cap_that_k_of_them_fit_in_together(k):
    """From auto's decision (k trials, 1/k of the GPU each as Ray hands it) to the fraction each
    worker passes to torch.cuda.set_per_process_memory_fraction: k caps and k CUDA contexts
    stay within GPU_MEMORY_FRACTION of the GPU, and a worker whose estimate auto fitted is
    within its cap."""
    process = int(GPU_MEMORY_FRACTION * H200 / k)  # the largest process estimate that auto fits k times
    per_gpu, _ = trials_per_gpu(process, H200, 1, k)
    assert per_gpu == k
    fake = _Torch()
    share = gpu_share.configure_worker(gpus_for(per_gpu), **fake.kwargs({}))
    (fraction, device), = fake.fractions
    assert device == 0 and fraction == share.fraction and abs(share.cap_bytes - fraction * H200) < 1
    assert k * (share.cap_bytes + CUDA_CONTEXT_BYTES) <= GPU_MEMORY_FRACTION * H200
    assert share.cap_bytes + CUDA_CONTEXT_BYTES >= process - 1e-4 * GPU_MEMORY_FRACTION * H200  # Ray's 1e-4 steps of 1/k at most
    assert share.to_dict()["gpus"] == gpus_for(k)


def test_a_fractional_gpu_count_caps_by_its_own_share():
    assert allocator_cap(0.5, H200) == int(0.5 * GPU_MEMORY_FRACTION * H200) - CUDA_CONTEXT_BYTES
    assert allocator_cap(0.3, 16 * 2**30) == int(0.3 * GPU_MEMORY_FRACTION * 16 * 2**30) - CUDA_CONTEXT_BYTES
    assert allocator_cap(0.01, 2**30) == 256 * 2**20  # a share below its context: the floor (its runs then fail out_of_memory)


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_a_worker_with_a_gpu_of_its_own_or_none_is_left_as_it_is(gpus):
    fake, environ = _Torch(), {}
    share = gpu_share.configure_worker(gpus, **fake.kwargs(environ))
    assert share.cap_bytes is None and fake.fractions == [] and fake.settings == [] and environ == {}


def test_a_sharing_worker_without_cuda_records_its_share_and_sets_nothing():
    environ = {}
    share = gpu_share.configure_worker(0.25, environ=environ, cuda=False)
    assert (share.gpus, share.cap_bytes, share.reason) == (0.25, None, "no CUDA device in this worker") and environ == {}


def test_a_sharing_worker_runs_expandable_segments():
    fake, environ = _Torch(), {}
    share = gpu_share.configure_worker(0.25, **fake.kwargs(environ))
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert fake.settings == ["expandable_segments:True"] and share.alloc_conf == "expandable_segments:True"
    assert len(fake.fractions) == 1  # and its cap


@pytest.mark.parametrize("var", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_the_users_own_allocator_settings_are_kept(var):
    fake, environ = _Torch(), {var: "max_split_size_mb:128"}
    share = gpu_share.configure_worker(0.5, **fake.kwargs(environ))
    assert environ == {var: "max_split_size_mb:128"} and fake.settings == []
    assert share.alloc_conf == "max_split_size_mb:128" and len(fake.fractions) == 1  # the cap still applies


def test_available_memory_is_what_the_cap_leaves():
    GiB = 2**30
    # free 100 GiB on the device, 10 GiB reserved of which 4 allocated: 106 GiB without a cap
    assert gpu_share.available_bytes(None, info=lambda: (100 * GiB, 140 * GiB, 10 * GiB, 4 * GiB, None)) == 106 * GiB
    assert gpu_share.available_bytes(None, info=lambda: (100 * GiB, 140 * GiB, 10 * GiB, 4 * GiB, 30 * GiB)) == 26 * GiB
    assert gpu_share.available_bytes(None, info=lambda: (100 * GiB, 140 * GiB, 10 * GiB, 34 * GiB, 30 * GiB)) == 0


def test_staged_budget_reads_the_cap(monkeypatch):
    """cvfp.run.stage_budget (half of what the process may still allocate) under a sharing
    worker's cap, with torch.cuda's memory queries faked: the cap, not the device's free
    memory, decides how many of a trial's runs are staged together."""
    GiB = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (120 * GiB, 140 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * GiB)
    device = torch.device("cuda", 0)
    monkeypatch.setattr(gpu_share, "memory_cap", lambda d: None)
    assert engine.stage_budget(device) == 60 * GiB
    monkeypatch.setattr(gpu_share, "memory_cap", lambda d: 10 * GiB)
    budget = engine.stage_budget(device)
    assert budget == 4 * GiB
    cfg = run_config_from_dict({"model": {"num_layers": 9}})
    sizes, M, _, E = GRID
    need = [held_bytes(cfg, n, M, E) for n in sizes]
    assert engine.stage_groups(need, 60 * GiB) == [[0, 1, 2, 3]]  # the whole GPU: all four staged
    assert engine.stage_groups(need, budget) == [[0, 1], [2], [3]]  # within the cap: fewer at a time


def test_a_staged_trial_holds_every_validation_cache_until_its_last_finish():
    """The batched pass's caches are views of one tensor: the largest run's finish has the
    others' caches beside it, and so the staged peak is above one run's."""
    sizes, M, V, E = GRID
    cfg = run_config_from_dict({"model": {"num_layers": 9}})
    staged, kept = trial_memory(cfg, sizes, M, V, E, staged=True)
    alone, kept_alone = trial_memory(cfg, sizes, M, V, E, staged=False)
    big = estimate_run_memory(cfg, sizes[-1], M, V, E)
    val = 4 * 9 * (M - 1) * 768
    assert alone == big.peak and kept == kept_alone == big.kept
    assert staged >= max(big.contexts, big.phase2 - val) + 4 * val  # its own cache and the other three
    assert trial_memory(cfg, sizes[-1:], M, V, E, staged=True) == (big.peak, big.kept)  # one run: nothing staged
    # two seeds per size are twice the runs held beside the working one
    assert trial_memory(cfg, [n for n in sizes for _ in (1, 2)], M, V, E, staged=True)[0] > staged


def test_held_bytes_count_the_passes_weights_and_ids():
    cfg = run_config_from_dict({"model": {"num_layers": 12, "context_dim": 2048, "num_input_tokens": 4}})
    N, M, E = 587_970, 30_000, 384
    assert held_bytes(cfg, N, M, E, "pass") - held_bytes(cfg, N, M, E, "finish") == 4 * 12 * (M - 1) * 2048 + 4 * 2 * 12 * 2048**2
    assert held_bytes(cfg, N, M, E, "start") >= 4 * N * 2048 + 8 * 2 * N


def test_the_fused_phase1_buffers_are_counted():
    """bf16 runs take fast/phase1.FusedPhase1: prev, noise, out_all and its buffers (the (n, L C)
    pre-activations and the L-1 layer outputs in fp32 and bf16 above all)."""
    N, M, V, E = 587_970, 30_000, 30_522, 384
    cfg = run_config_from_dict({"model": {"num_layers": 12, "context_dim": 2048, "num_input_tokens": 4}, "engine": {"precision": "bf16"}})
    m = estimate_run_memory(cfg, N, M, V, E)
    n, L, C = 64_000, 12, 2048
    assert m.phase1 - m.resident >= 3 * 4 * N * C + n * L * C * 2 + (L - 1) * n * C * 6
    assert estimate_run_memory(cfg.replace(**{"engine.phase1_fused": False}), N, M, V, E).phase1 <= m.phase1


def _owned_bytes(step, not_owned=("cache", "windows", "targets")) -> int:
    """Bytes of the distinct storages of every tensor a step holds (its attributes, their lists
    and tuples, its per-layer views), but the run's data it reads."""
    storages: dict[int, int] = {}

    def visit(v) -> None:
        if isinstance(v, torch.Tensor):
            storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif type(v).__module__ == type(step).__module__:  # fast/phase2's own helpers (its _Layer views)
            for x in vars(v).values():
                visit(x)

    for name, v in vars(step).items():
        if name not in not_owned:
            visit(v)
    return sum(storages.values())


@pytest.mark.parametrize("k, C, N", [(2, 64, 400), (1, 40, 400), (2, 40, 30)])
def test_the_fused_phase2_steps_buffers_are_counted(monkeypatch, k, C, N):
    """bf16 runs step through fast/phase2.FusedPhase2Step: the estimate's step term is the bytes of
    every buffer its constructor allocates (built here on the CPU for a small config: the flat
    fp32 parameters, gradients and moments with their alignment, the bf16 shadow, the scratch,
    the batch and head buffers), its flat buffer holds the block's parameters in place of the
    block's own copy, and a kept fused session counts at least the shadow more than the
    autograd step's."""
    pytest.importorskip("triton")  # fast/phase2_kernels (its sizing helpers) imports it; no kernel runs here
    from types import SimpleNamespace

    from archsearch.cvfp.fast import head
    from archsearch.cvfp.fast.layers import FusedTokenBlock
    from archsearch.cvfp.fast.phase2 import FusedPhase2Step
    from archsearch.cvfp.memory import fused_phase2_numel, phase2_step_bytes
    from archsearch.cvfp.model import TokenBlock

    V, E, M = 1_000, 32, 200  # V not a multiple of the head's 64-row padding
    cfg = run_config_from_dict({"model": {"num_layers": 3, "context_dim": C, "num_input_tokens": k}, "phase2": {"batch_size": 40},
                                "engine": {"precision": "bf16"}})  # fmt: skip
    monkeypatch.setattr(head, "use_fused", lambda device: True)  # the head as a GPU run pads it
    weight = head.head_weight(torch.randn(V, E), "bf16")
    emb = SimpleNamespace(normed=torch.randn(V + 1, E))
    tb = FusedTokenBlock(TokenBlock(cfg.model, E))
    n = N - 1  # phase 2's training positions
    cache = torch.randn(3, n, C, dtype=torch.bfloat16)
    step = FusedPhase2Step(tb, emb, weight, cfg, cache, torch.randint(0, V, (n, k)), torch.randint(0, V, (n,)), graphed=False)
    assert step.S is not None and step.S.dtype == torch.bfloat16
    assert step.numel == fused_phase2_numel(C, [tb.layers[0].fc.in_features - C] + [la.fc.out_features for la in tb.layers])
    assert all(p.untyped_storage().data_ptr() == step.P.untyped_storage().data_ptr() for p in tb.parameters())
    assert phase2_step_bytes(cfg, N, V, E) == _owned_bytes(step)

    fused, plain = (estimate_run_memory(c, 4 * 4096 + 1, M, V, E) for c in (cfg, cfg.replace(**{"engine.phase2_fused": False})))
    assert fused.kept - plain.kept >= 2 * step.numel  # the bf16 shadow at least (the alignment and scratch besides)
    assert phase2_step_bytes(cfg, N, V, E, triton=False) == phase2_step_bytes(cfg.replace(**{"engine.phase2_fused": False}), N, V, E)


def test_an_allocation_beyond_the_cap_is_an_out_of_memory_error_the_fallbacks_take():
    """What PyTorch raises past set_per_process_memory_fraction (its message names what is
    allowed) is an out-of-memory error to the trial's fallbacks (trial.train_run_once, the
    staged trial's one-after-another, the trainable's out_of_memory kind)."""
    from archsearch.errors import is_out_of_memory

    e = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.80 GiB of which "
                               "96.12 GiB is free. 28.70 GiB allowed; 27.90 GiB allocated by PyTorch")  # fmt: skip
    assert is_out_of_memory(e)
    try:
        try:
            raise e
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("operation failed during CUDA graph capture") from inner
    except RuntimeError as outer:
        assert is_out_of_memory(outer)
