"""resources.gpus: auto on a real local Ray with one (fake) GPU: trials are handed 1/k of it.

Ray is started with ``num_gpus=1`` on this CPU machine, and the driver's view of the GPUs'
memory (runner.local_gpu_memory, torch.cuda on a GPU host) is replaced by an 80 GB GPU; the
trials still train on the CPU (the worker sees no CUDA device), but Ray schedules them by
the GPU share auto chose, and each worker records what Ray assigned to it."""

from __future__ import annotations

import optuna
import pytest
from helpers import tiny_space

from archsearch.search import runner
from archsearch.space import parse_space

GB = 10**9


@pytest.fixture(scope="module")
def ray_one_gpu():
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _run(space: dict):
    quick = {"sizes": {"tokens": [400, 800]}, "val_tokens": 200}  # the fewest runs a fit takes: the placement is what counts
    space = dict(space, data={**space["data"], **quick}, phase1={"batch_size": 200, "max_iterations": 3, "min_iterations": 2}, phase2={"batch_size": 64, "max_epochs": 1})
    return runner.run_search(parse_space(space), view_mode="quiet")


def _workers(home, name):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'archsearch.db'}")
    return {t.user_attrs["config_name"]: t.user_attrs["worker"] for t in study.get_trials()}


def _assigned(home, name):
    return {config: worker["resources"] for config, worker in _workers(home, name).items()}


def test_auto_puts_two_trials_on_the_one_gpu(home, tiny_corpus, ray_one_gpu, monkeypatch):
    monkeypatch.setattr(runner, "local_gpu_memory", lambda: [80 * GB])
    space = tiny_space(tiny_corpus, study={"name": "shared"}, resources={"gpus": "auto", "cpus": 1}, max_concurrent=4)
    summary = _run(space)
    assert not summary.failed and summary.counts == {"COMPLETE": 2}
    # two configs, one GPU: k = ceil(2 / 1) = 2 (the tiny runs' estimate is far below 85 % of 80 GB)
    assert summary.gpu_sharing["per_gpu"] == 2 and summary.gpu_sharing["gpus"] == 0.5
    assert summary.gpu_sharing["gpu_bytes"] == 80 * GB and 0 < summary.gpu_sharing["process_bytes"] < 2 * GB
    assert summary.to_dict()["gpu_sharing"] == summary.gpu_sharing  # what `run --json` writes
    assigned = _assigned(home, "shared")
    assert set(assigned) == {"a", "b"} and all(r.get("GPU") == 0.5 for r in assigned.values()), assigned
    # the share reached each worker's allocator cap (archsearch.gpu_share), which a worker
    # without a CUDA device (this machine) records without applying
    shares = [w["gpu_share"] for w in _workers(home, "shared").values()]
    assert all(s["gpus"] == 0.5 and s["cap_bytes"] is None and s["reason"] == "no CUDA device in this worker" for s in shares), shares


def test_an_explicit_gpu_count_keeps_its_meaning(home, tiny_corpus, ray_one_gpu, monkeypatch):
    monkeypatch.setattr(runner, "local_gpu_memory", lambda: [80 * GB])
    space = tiny_space(tiny_corpus, study={"name": "whole"}, resources={"gpus": 1, "cpus": 1}, max_concurrent=4,
                       sampler={"type": "grid", "configs": {"a": {"num_layers": 1, "context_dim": 8}}})  # fmt: skip
    summary = _run(space)
    assert summary.counts == {"COMPLETE": 1} and summary.gpu_sharing is None
    assert _assigned(home, "whole")["a"].get("GPU") == 1.0
    assert _workers(home, "whole")["a"]["gpu_share"]["cap_bytes"] is None  # a GPU of its own: no cap
