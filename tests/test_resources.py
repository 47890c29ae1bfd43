"""resources.gpus: auto: the CVFP memory estimate and the trials-per-GPU rule (pure: no Ray, no GPU)."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import tiny_space

from archsearch.config import run_config_from_dict
from archsearch.cvfp.memory import estimate_run_memory
from archsearch.resources import (
    CUDA_CONTEXT_BYTES,
    GPU_MEMORY_FRACTION,
    MAX_TRIALS_PER_GPU,
    gpus_for,
    process_bytes,
    resolve_auto,
    space_run_memory,
    trials_per_gpu,
)
from archsearch.space import parse_space

GB = 10**9
REPORT = {"train": 587_970, "val": 30_000, "V": 30_522, "E": 384}  # the offline grid's largest size, MiniLM


def est(model=None, train=REPORT["train"], val=REPORT["val"], V=REPORT["V"], E=REPORT["E"], **sections):
    cfg = run_config_from_dict({"model": model or {}, **sections})
    return estimate_run_memory(cfg, train, val, V, E)


def test_estimate_is_bytes_and_holds_at_least_the_tensors_every_run_keeps():
    m = est()
    N, M, C, L = REPORT["train"], REPORT["val"], 768, 6
    # phase 1 holds prev, noise, inputs and out_all (N, C) fp32 at once; the contexts stage the
    # (L, N-1, C) bf16 training cache; the recurrence the (L, M-1, C) fp32 validation cache
    assert m.phase1 >= 4 * 4 * N * C
    assert m.contexts >= 2 * L * (N - 1) * C
    assert m.recurrence >= 4 * L * (M - 1) * C + 2 * L * (N - 1) * C
    assert m.peak == max(m.phase1, m.contexts, m.recurrence, m.phase2)
    assert 5 * GB < m.peak < 40 * GB  # bytes, not kB or GB: the report's baseline at 588k tokens
    assert 0 < m.kept < m.phase2  # the phase-2 session stays for the worker's next run
    assert m.to_dict()["peak"] == m.peak


@pytest.mark.parametrize("change", [
    {"train": 2 * REPORT["train"]}, {"val": 2 * REPORT["val"]}, {"V": 50_257}, {"E": 768},
    {"model": {"num_layers": 9}}, {"model": {"context_dim": 1152}}, {"model": {"num_input_tokens": 2}},
    {"phase1": {"batch_size": 16_000}}, {"engine": {"phase1_chunk_batches": 16}}, {"phase2": {"batch_size": 8192}},
    {"engine": {"precision": "fp32"}}, {"engine": {"fused_layers": False}},
])  # fmt: skip
def test_estimate_grows_with_every_size_it_depends_on(change):
    base = est()
    bigger = est(**change)
    assert bigger.peak >= base.peak and bigger.to_dict() != base.to_dict()
    if set(change) & {"train", "model"}:
        assert bigger.peak > base.peak


def test_estimate_ignores_what_memory_does_not_depend_on():
    assert est(phase1={"lr": 0.01, "max_iterations": 80}, phase2={"max_epochs": 3}) == est()


def test_no_kept_session_below_four_phase2_batches():
    """Phase 2 runs uncaptured (and keeps no session) when the epoch has fewer than 4 batches."""
    assert est(train=4 * 4096).kept == 0
    assert est(train=4 * 4096 + 1).kept > 0


def test_staged_runs_add_what_they_hold_to_the_cvfp_family_estimate():
    from archsearch.cvfp.memory import held_bytes
    from archsearch.families.cvfp import gpu_memory

    sizes = [62_891, REPORT["train"]]
    args = (sizes, REPORT["val"], REPORT["V"], REPORT["E"])
    unstaged = run_config_from_dict({"engine": {"stage_sizes": False}})
    assert gpu_memory(unstaged, *args) == (est().peak, est().kept)
    staged = run_config_from_dict({})  # auto: staged on a GPU
    held = [held_bytes(staged, n, REPORT["val"], REPORT["E"], stage) for n in sizes for stage in ("start", "finish", "pass")]
    assert held == sorted(held) and held[0] > 4 * sizes[0] * staged.model.context_dim  # at least the final contexts
    peak, kept = gpu_memory(staged, *args)
    # the smaller run's contexts beside the larger one's phase 1, at most all it holds beside the peak
    assert est().phase1 + held[0] <= peak <= est().peak + held[2] + held[5] and kept == est().kept
    assert gpu_memory(staged, [REPORT["train"]], *args[1:]) == (est().peak, est().kept)  # one size: nothing staged


@pytest.mark.parametrize("process, gpu, n_gpus, at_once, k", [
    (18 * GB, 139 * GB, 1, 4, 4),        # the report's grid on one H200: four at once
    (18 * GB, 139 * GB, 1, 8, MAX_TRIALS_PER_GPU),  # never more than the limit
    (50 * GB, 139 * GB, 1, 4, 2),        # two fit in 85 %
    (100 * GB, 139 * GB, 1, 4, 1),       # one only
    (200 * GB, 139 * GB, 1, 4, 1),       # not even one: still one (as before)
    (1 * GB, 80 * GB, 2, 3, 2),          # no more than the trials can use: ceil(3 / 2)
    (1 * GB, 80 * GB, 4, 4, 1),          # a GPU for every trial at once
    (1 * GB, 80 * GB, 8, 4, 1),
    (None, 80 * GB, 1, 4, 1),            # no estimate
    (1 * GB, None, 1, 4, 1),             # GPU memory unknown
])  # fmt: skip
def test_trials_per_gpu(process, gpu, n_gpus, at_once, k):
    got, why = trials_per_gpu(process, gpu, n_gpus, at_once)
    assert got == k and why
    if process and gpu and k > 1:
        assert k * process <= GPU_MEMORY_FRACTION * gpu


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_gpu_shares_fit_k_trials_on_one_gpu_in_rays_resolution(k):
    share = gpus_for(k)
    assert k * share <= 1.0 and share == round(share, 4) and share > 1 / k - 1e-4


def _space(corpus, **sections):
    return parse_space(tiny_space(corpus, resources={"gpus": "auto", "cpus": 1}, max_concurrent=4, **sections))


SIZES = ([62_891, 240_132, REPORT["train"]], REPORT["val"], REPORT["V"], REPORT["E"])


def test_grid_is_bounded_by_its_largest_config_plus_the_largest_kept_session(tiny_corpus):
    configs = {"small": {"num_layers": 1, "context_dim": 256}, "big": {"num_layers": 6, "context_dim": 1152},
               "wide_head": {"num_layers": 2, "context_dim": 256, "num_input_tokens": 4}}  # fmt: skip
    space = _space(tiny_corpus, sampler={"type": "grid", "configs": configs}, engine={"stage_sizes": False})  # one run after another
    process, _ = space_run_memory(space, *SIZES)
    runs = [est(dict(c), phase1=space.base.to_dict()["phase1"], phase2=space.base.to_dict()["phase2"]) for c in configs.values()]
    assert process == process_bytes(max(r.peak for r in runs), max(r.kept for r in runs))
    assert process > max(r.peak for r in runs) + CUDA_CONTEXT_BYTES
    staged, _ = space_run_memory(_space(tiny_corpus, sampler={"type": "grid", "configs": configs}), *SIZES)  # auto: staged on a GPU
    assert staged > process
    pruned = _space(tiny_corpus, sampler={"type": "grid", "configs": configs}, early_stopping={"pruner": "median"})
    assert space_run_memory(pruned, *SIZES)[0] == process  # auto with a pruner: one run after another


def test_search_is_bounded_by_the_corner_of_its_largest_values(tiny_corpus):
    space = _space(tiny_corpus, sampler={"type": "tpe"}, n_trials=8,
                   parameters={"num_layers": {"type": "int", "low": 1, "high": 4}, "context_dim": [64, 512, 256],
                               "phase1.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})  # fmt: skip
    process, why = space_run_memory(space, *SIZES)
    corner = est({"num_layers": 4, "context_dim": 512}, phase1={**space.base.to_dict()["phase1"], "lr": 1e-2},
                 phase2=space.base.to_dict()["phase2"])  # fmt: skip
    assert process >= process_bytes(corner.peak, corner.kept) and "tokens" in why


def test_a_family_without_an_estimate_gets_a_gpu_per_trial(tiny_corpus):
    space = _space(tiny_corpus, sampler={"type": "grid", "configs": {"c": {"num_layers": 1}, "g": {"family": "gpt", "num_layers": 1}}})
    assert space_run_memory(space, *SIZES) == (None, "family 'gpt' gives no memory estimate")
    sharing = resolve_auto(space, 1, 139 * GB, 4, SIZES)
    assert (sharing.per_gpu, sharing.gpus) == (1, 1.0) and "gpt" in sharing.message()


def test_resolution_names_its_numbers(tiny_corpus):
    space = _space(tiny_corpus)
    sharing = resolve_auto(space, 1, 139 * 2**30, 4, SIZES)
    assert sharing.per_gpu == 4 and sharing.gpus == 0.25
    text = sharing.message()
    assert text.startswith("resources.gpus auto: 4 trials per GPU: estimated peak ") and "GiB each of 139 GiB" in text and "resources.gpus=1" in text
    assert resolve_auto(space, 2, 139 * GB, 2, SIZES).per_gpu == 1  # as many GPUs as trials at once
    assert resolve_auto(space, 1, None, 4, SIZES).per_gpu == 1  # the driver sees no CUDA device


class _Cluster:
    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


@dataclasses.dataclass
class _Data:
    vocab_size: int = REPORT["V"]
    embed_dim: int = REPORT["E"]
    val_tokens: tuple = (0,) * REPORT["val"]

    def train_stream(self, size, unit):
        return range(size)


def test_only_auto_on_a_local_cluster_with_gpus_shares(tiny_corpus):
    from archsearch.search.runner import auto_sharing

    ray = _Cluster(GPU=1, CPU=16)
    auto = _space(tiny_corpus)
    assert auto_sharing(auto, ray, 1.0, _Data(), [139 * GB], n_new=0).gpus == 0.5  # 2 configs: ceil(2 / 1)
    for gpus in (1, 0.5, 0):  # an explicit number keeps its meaning
        explicit = parse_space(tiny_space(tiny_corpus, resources={"gpus": gpus}, max_concurrent=4))
        assert auto_sharing(explicit, ray, float(gpus), _Data(), [139 * GB], n_new=0) is None
    assert auto_sharing(auto, _Cluster(CPU=16), 0.0, _Data(), None, n_new=0) is None  # no GPU: CPU trials
    remote = auto_sharing(auto, ray, 1.0, _Data(), [139 * GB], n_new=0, local=False)
    assert remote.gpus == 1.0 and "--address" in remote.reason
    assert auto_sharing(auto, ray, 1.0, _Data(), None, n_new=0).gpus == 1.0  # the driver sees no GPU
    four = parse_space(tiny_space(tiny_corpus, resources={"gpus": "auto", "cpus": 1}, max_concurrent=4,
                                  sampler={"type": "grid", "configs": {f"c{i}": {"context_dim": 8 + i} for i in range(4)}}))  # fmt: skip
    assert auto_sharing(four, ray, 1.0, _Data(), [139 * GB], n_new=0).gpus == 0.25
    assert auto_sharing(four, _Cluster(GPU=1, CPU=2), 1.0, _Data(), [139 * GB], n_new=0).gpus == 0.5  # 2 CPUs: 2 at once


def test_a_grid_is_bounded_by_its_own_configs_not_the_base(tiny_corpus):
    """A grid runs its configs only: a big base (the default model) does not count."""
    space = _space(tiny_corpus, model={"num_layers": 12, "context_dim": 2048}, engine={"stage_sizes": False},
                   sampler={"type": "grid", "configs": {"a": {"num_layers": 1, "context_dim": 64}}})  # fmt: skip
    small = est({"num_layers": 1, "context_dim": 64}, phase1=space.base.to_dict()["phase1"], phase2=space.base.to_dict()["phase2"])
    assert space_run_memory(space, *SIZES)[0] == process_bytes(small.peak, small.kept)


def test_the_estimate_and_the_gpu_check_script_load_neither_ray_nor_optuna():
    """The estimate and the rule are pure, and scripts/check_memory_estimate.py runs on a GPU
    host that has only PyTorch."""
    import subprocess
    import sys

    from helpers import ROOT

    code = ("import runpy, sys; runpy.run_path('scripts/check_memory_estimate.py', run_name='check'); "
            "from archsearch.space import load_space; from archsearch.resources import space_run_memory; "
            "assert space_run_memory(load_space('spaces/tpe_explore.yaml'), [62891, 587970], 30000, 30522, 384)[0] > 0; "
            "print(sorted(m for m in ('ray', 'optuna') if m in sys.modules))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_a_machine_without_an_nvidia_driver_reads_no_gpu_memory_and_imports_no_torch():
    """A CPU run (the quickstart) pays nothing for auto's GPU query."""
    import os
    import shutil
    import subprocess
    import sys

    from helpers import ROOT

    if os.path.isdir("/proc/driver/nvidia/gpus") or shutil.which("nvidia-smi"):
        pytest.skip("an NVIDIA driver is here")
    code = "import sys; from archsearch.search.runner import local_gpu_memory; print(local_gpu_memory(), 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "False"]


def test_a_family_whose_estimate_fails_gets_a_gpu_per_trial(tiny_corpus, monkeypatch):
    from archsearch.families import cvfp

    def broken(*_):
        raise ValueError("no idea")

    monkeypatch.setattr(cvfp, "family", dataclasses.replace(cvfp.family, gpu_memory=broken))
    monkeypatch.setattr("archsearch.families._loaded", {})
    sharing = resolve_auto(_space(tiny_corpus), 1, 139 * GB, 4, SIZES)
    assert sharing.gpus == 1.0 and "gpu_memory raised ValueError: no idea" in sharing.reason
