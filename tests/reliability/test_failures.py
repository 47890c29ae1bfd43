"""Trials that fail end as FAIL with their cause; the study goes on; caches are verified."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import optuna
import pytest
from helpers import tiny_space
from optuna.trial import TrialState

from archsearch.search import runner
from archsearch.space import parse_space


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def trials_of(home, name="tiny"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'archsearch.db'}").get_trials()


def test_a_config_no_gpu_can_hold_is_refused_before_anything_is_allocated(home, tiny_corpus):
    """The 36 TB config that used to be this test's out-of-memory trial is now a usage error
    (README, bounds of the run settings): nothing is trained, nothing is written."""
    from archsearch.errors import ConfigError

    configs = {"fits": {"num_layers": 1, "context_dim": 8}, "huge": {"num_layers": 1, "context_dim": 3_000_000}}  # 36 TB of weights
    with pytest.raises(ConfigError, match=r"sampler\.configs\.huge: model\.context_dim: must be <= 32,768"):
        parse_space(tiny_space(tiny_corpus, sampler={"type": "grid", "configs": configs}))
    assert not any(home.iterdir())


def test_a_failed_allocation_is_classified_out_of_memory():
    """What a trial that cannot allocate raises (the CPU allocator's RuntimeError, Python's
    MemoryError, CUDA's OutOfMemoryError) is recorded as out_of_memory. A real allocation
    failure: 4 EiB, refused at once by the kernel."""
    import torch

    from archsearch.search.trainable import is_out_of_memory

    with pytest.raises((RuntimeError, MemoryError)) as e:
        torch.empty(2**62, dtype=torch.uint8)
    assert is_out_of_memory(e.value)
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(ValueError("shape mismatch"))


def test_unreadable_data_is_a_failed_trial_naming_the_file(home, tiny_corpus, ray_local, monkeypatch, tmp_path):
    real = runner.prepare_space_data

    def corrupted(space, quiet=False):
        data = real(space, quiet)
        copy = tmp_path / "corrupted"
        shutil.copytree(data.path, copy)
        raw = bytearray((copy / "val_tokens.npy").read_bytes())
        raw[-1] ^= 0xFF
        (copy / "val_tokens.npy").write_bytes(raw)
        return SimpleNamespace(path=copy, embed_dim=data.embed_dim, vocab_size=data.vocab_size)

    monkeypatch.setattr(runner, "prepare_space_data", corrupted)
    runner.run_search(parse_space(tiny_space(tiny_corpus)), view_mode="quiet")
    trials = trials_of(home)
    assert trials and all(t.state == TrialState.FAIL for t in trials)
    assert all("DataCorrupted" in t.user_attrs["error"] and "val_tokens.npy" in t.user_attrs["error"] for t in trials)


def test_corrupted_run_cache_entry_is_detected_and_recomputed(home, tiny_corpus, ray_local):
    space = tiny_space(tiny_corpus, sampler={"type": "grid", "configs": {"a": {"num_layers": 1, "context_dim": 8}}})
    runner.run_search(parse_space(dict(space, study={"name": "first"})), view_mode="quiet")
    entries = sorted((home / "runs").glob("*/*.json"))
    assert len(entries) == 3  # one per size
    entries[1].write_text(entries[1].read_text()[:-40])  # truncated
    runner.run_search(parse_space(dict(space, study={"name": "second"})), view_mode="quiet")
    first, second = trials_of(home, "first")[0], trials_of(home, "second")[0]
    assert sorted(s["cached"] for s in second.user_attrs["sizes"]) == [False, True, True]
    assert second.values == pytest.approx(first.values)  # recomputed, same numbers
    assert len(list((home / "runs").glob("*/*.json"))) == 3  # the bad entry was replaced


def test_nan_loss_is_never_recorded_as_a_ppl(home, tiny_corpus, ray_local):
    configs = {"nan": {"num_layers": 1, "context_dim": 8, "model.init_std": 1e30}}
    runner.run_search(parse_space(tiny_space(tiny_corpus, sampler={"type": "grid", "configs": configs})), view_mode="quiet")
    (t,) = trials_of(home)
    assert t.state == TrialState.FAIL and t.user_attrs["error_kind"] == "NonFiniteLoss"
    assert "final_ppl" not in t.user_attrs and not t.user_attrs.get("sizes")


@pytest.mark.slow
def test_a_trial_over_its_memory_limit_fails_as_out_of_memory_and_the_next_trials_run(tmp_path, tiny_corpus):
    """A real out-of-memory trial through `archsearch run` and Ray: `resources.memory_gb` caps what
    a trial's worker may allocate; a config that needs more (here a 4 x 4096-wide model, ~1 GB of
    weights and Adam state) fails FAIL out_of_memory with the limit named, and the trials after
    it (in the same reused worker) complete."""
    from helpers import cli, read_trials, tiny_space, write_space
    from optuna.trial import TrialState

    configs = {"huge": {"num_layers": 4, "context_dim": 4096}, "fits": {"num_layers": 1, "context_dim": 8},
               "fits2": {"num_layers": 2, "context_dim": 8}}  # fmt: skip
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus, sampler={"type": "grid", "configs": configs}, max_concurrent=1,
                                                         resources={"gpus": 0, "cpus": 1, "memory_gb": 0.4}))  # fmt: skip
    r = cli("run", str(space), "--quiet", env={"ARCHSEARCH_HOME": str(home)}, timeout=900)
    assert r.returncode == 1, r.stdout + r.stderr  # one trial failed
    assert "Traceback" not in r.stdout + r.stderr
    trials = {t.user_attrs["config_name"]: t for t in read_trials(home / "archsearch.db", "tiny")}
    huge = trials["huge"]
    assert huge.state == TrialState.FAIL and huge.user_attrs["error_kind"] == "out_of_memory", huge.user_attrs
    assert "needs more memory than resources.memory_gb=0.4 GB allows" in huge.user_attrs["error"]
    assert trials["fits"].state == TrialState.COMPLETE and trials["fits2"].state == TrialState.COMPLETE
    assert trials["fits"].user_attrs["worker_pid"] == huge.user_attrs["worker_pid"]  # the same worker went on
