"""resources.gpus: auto on a real GPU through Ray (skipped without CUDA; the lead engineer runs
it on the GPU machine): on one GPU, four small trials at once get a quarter of it each and
train on it."""

from __future__ import annotations

import optuna
import pytest
import torch
from helpers import tiny_space

pytestmark = pytest.mark.skipif(torch.cuda.device_count() != 1, reason="needs exactly one CUDA GPU")


def test_four_trials_share_the_one_gpu(home, tiny_corpus):
    import ray

    from archsearch.search.runner import run_search
    from archsearch.space import parse_space

    configs = {f"c{i}": {"num_layers": 1 + i % 2, "context_dim": 16 * (1 + i)} for i in range(4)}
    space = tiny_space(tiny_corpus, study={"name": "gpu_share"}, sampler={"type": "grid", "configs": configs},
                       resources={"gpus": "auto", "cpus": 1}, max_concurrent=4)  # fmt: skip
    try:
        summary = run_search(parse_space(space), view_mode="quiet")
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert summary.counts == {"COMPLETE": 4}
    sharing = summary.gpu_sharing
    assert sharing["per_gpu"] == 4 and sharing["gpus"] == 0.25
    assert sharing["gpu_bytes"] == torch.cuda.get_device_properties(0).total_memory
    study = optuna.load_study(study_name="gpu_share", storage=f"sqlite:///{home / 'archsearch.db'}")
    for t in study.get_trials():
        assert t.user_attrs["worker"]["resources"]["GPU"] == 0.25
        assert t.user_attrs["device"] not in ("cpu", "cuda")  # the GPU's name: it trained there
