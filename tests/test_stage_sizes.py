"""A trial's runs staged (engine.stage_sizes): phase 1 of every run, one batched validation
call, then each run's phase 2 in size order. On the CPU (where ``true`` makes it happen) the
numbers are those of one run after another, to the bit; records, on_size (pruning), the run
cache and failures behave as they do without staging."""

from __future__ import annotations

import pytest
import torch
from helpers import cli, tiny_space, write_space

import archsearch.cvfp.run as engine
from archsearch.config import run_config_from_dict
from archsearch.cvfp.fast import recurrent
from archsearch.errors import ConfigError, NonFiniteLoss
from archsearch.families import cvfp as cvfp_family
from archsearch.space import parse_space
from archsearch.trial import STAGED_OOM_NOTICE, TrialPlan, run_trial

SIZES = [400, 800, 1200]
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@pytest.fixture(scope="module")
def prepared(tiny_corpus):
    from archsearch.plan import prepare_space_data

    space = parse_space(tiny_space(tiny_corpus, data=dict(tiny_space(tiny_corpus)["data"], sizes={"tokens": SIZES})))
    return space, prepare_space_data(space)


def plan_for(prepared, stage, cache_dir=None, seeds=(42, 7), extra=None) -> TrialPlan:
    space, data = prepared
    params = {"num_layers": 2, "context_dim": 8, "num_input_tokens": 2, "engine.stage_sizes": stage}
    return TrialPlan(params=params, config=space.run_config(params).to_dict(), sizes=SIZES, size_unit="tokens", seeds=list(seeds),
                     objectives=[o.__dict__ for o in space.objectives], data_path=str(data.path),
                     cache_dir=str(cache_dir) if cache_dir else None, extra=dict(extra or {}))  # fmt: skip


def numbers(result):
    """A trial's result without its timings (and the setting under test)."""
    sizes = [{k: v for k, v in rec.items() if k not in ("seconds", "phase_seconds", "metrics", "cached")}
             | {"metrics": {k: v for k, v in rec["metrics"].items() if not k.endswith(("_per_s", "_us", "_seconds"))}}
             for rec in result["sizes"]]  # fmt: skip
    return sizes, result["fit"], result["objectives"]


@pytest.fixture(scope="module")
def one_after_another(prepared):
    """The unstaged trial (seeds 42 and 7) and its progress events per (size, seed)."""
    events = []
    result = run_trial(plan_for(prepared, False), progress=lambda e, **i: events.append((e, i["size"], i["seed"])))
    return result, events


@pytest.fixture
def counted(monkeypatch):
    """Counts of the stages: blocks per recurrent_passes call, starts and finishes by N."""
    calls = {"passes": [], "start": [], "finish": []}
    real_passes, real_start, real_finish = recurrent.recurrent_passes, engine.start, engine.finish

    def passes(blocks, *a, **k):
        calls["passes"].append(len(blocks))
        return real_passes(blocks, *a, **k)

    def start(cfg, emb, train_ids, *a, **k):
        calls["start"].append(len(train_ids))
        return real_start(cfg, emb, train_ids, *a, **k)

    def finish(run):
        calls["finish"].append(int(run.train_ids.shape[0]))
        return real_finish(run)

    monkeypatch.setattr(recurrent, "recurrent_passes", passes)
    monkeypatch.setattr(engine, "start", start)
    monkeypatch.setattr(engine, "finish", finish)
    return calls


def test_staged_equals_one_after_another_to_the_bit(prepared, one_after_another, counted):
    seq, seq_events = one_after_another
    events = []
    staged = run_trial(plan_for(prepared, True), progress=lambda e, **i: events.append((e, i["size"], i["seed"])))
    assert numbers(staged) == numbers(seq)
    assert [r["size"] for r in staged["sizes"]] == SIZES and staged["complete"]
    assert counted["passes"] == [6]  # 3 sizes x 2 seeds: one validation call
    assert counted["start"] == [400, 400, 800, 800, 1200, 1200] and counted["finish"] == counted["start"]
    for size in SIZES:  # every run reports the same events, in the same order
        for seed in (42, 7):
            assert [e for e, s, d in events if (s, d) == (size, seed)] == [e for e, s, d in seq_events if (s, d) == (size, seed)]
    assert [e for e, _, _ in events].index("phase2") > max(i for i, (e, _, _) in enumerate(events) if e == "phase1")  # staged: every phase 1 first


def test_a_cached_size_in_the_middle_is_not_trained_again(prepared, one_after_another, counted, tmp_path):
    space, _ = prepared
    middle = plan_for(prepared, False, tmp_path / "cache")
    middle.sizes = [800]
    run_trial(middle)  # puts size 800 (both seeds) in the run cache
    counted["passes"].clear(), counted["start"].clear(), counted["finish"].clear()
    staged = run_trial(plan_for(prepared, True, tmp_path / "cache"))
    assert numbers(staged) == numbers(one_after_another[0])
    assert [r["cached"] for r in staged["sizes"]] == [False, True, False]
    assert counted["passes"] == [4] and counted["start"] == [400, 400, 1200, 1200] == counted["finish"]


def test_a_pruned_trial_finishes_no_later_size(prepared, one_after_another, counted, tmp_path):
    seen = []

    def on_size(rec, partial):
        seen.append(rec.size)
        return False  # the pruner stops it after the first size

    result = run_trial(plan_for(prepared, True, tmp_path / "cache"), on_size=on_size)
    assert seen == [400] and [r["size"] for r in result["sizes"]] == [400] and not result["complete"]
    assert numbers(result)[0] == numbers(one_after_another[0])[0][:1]
    assert counted["start"] == [400, 400, 800, 800, 1200, 1200]  # every phase 1 was spent...
    assert counted["finish"] == [400, 400]  # ...but only the first size was finished
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 2  # and cached


def test_a_failure_in_phase_1_is_raised_at_its_size_after_the_earlier_ones(prepared, counted, monkeypatch):
    real = engine.train_phase1

    def train_phase1(block, emb, windows, *a, **k):
        if windows.shape[0] == 800:
            raise NonFiniteLoss("phase 1: contexts became NaN/Inf by iteration 3")
        return real(block, emb, windows, *a, **k)

    monkeypatch.setattr(engine, "train_phase1", train_phase1)
    messages = {}
    for stage in (False, True):
        seen = []
        with pytest.raises(NonFiniteLoss) as e:
            run_trial(plan_for(prepared, stage, seeds=(42,)), on_size=lambda rec, p: seen.append(rec.size))
        messages[stage] = str(e.value)
        assert seen == [400]
    assert messages[True] == messages[False] == "phase 1: contexts became NaN/Inf by iteration 3"
    # one after another, then staged: 1200 was never started
    assert counted["start"] == [400, 800, 400, 800] and counted["finish"] == [400, 400]


def test_an_oom_while_staged_trains_the_rest_one_after_another(prepared, one_after_another, monkeypatch):
    real, calls = engine.EagerStepper, [0]

    class Stepper(real):
        def __call__(self, s, e):
            calls[0] += 1
            if calls[0] == 3:  # the first finish's phase 2, mid-epoch
                raise OOM("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
            return super().__call__(s, e)

    monkeypatch.setattr(engine, "EagerStepper", Stepper)
    events = []
    result = run_trial(plan_for(prepared, True), progress=lambda e, **i: events.append((e, i)))
    assert [i["message"] for e, i in events if e == "notice"] == [STAGED_OOM_NOTICE.format(error="OutOfMemoryError")]
    assert numbers(result) == numbers(one_after_another[0])


def test_staged_runs_in_groups_that_fit_the_budget_give_the_same_numbers():
    cfg = run_config_from_dict({"model": {"num_layers": 2, "context_dim": 6, "num_input_tokens": 2},
                                "phase1": {"batch_size": 16, "max_iterations": 5, "min_iterations": 3},
                                "phase2": {"batch_size": 8, "max_epochs": 2}, "engine": {"eval_batch_size": 7, "er_max_rows": 30}})  # fmt: skip
    g = torch.Generator().manual_seed(0)
    W, train, val = torch.randn(50, 8, generator=g), torch.randint(0, 50, (90,), generator=g), torch.randint(0, 50, (21,), generator=g)
    runs = [(train[:n], seed, engine.noop) for n, seed in ((30, 1), (60, 1), (90, 2))]
    alone = [engine.train_run(cfg, W, ids, val, seed) for ids, seed, _ in runs]
    need = [engine.held_bytes(cfg, len(ids), len(val), 8) for ids, _, _ in runs]
    assert need[0] < need[1] < need[2]  # more tokens, more held
    budget = need[0] + need[1]
    assert engine.stage_groups(need, budget) == [[0, 1], [2]]
    assert engine.stage_groups(need, None) == [[0, 1, 2]] and engine.stage_groups(need, 1) == [[0], [1], [2]]
    for b in (budget, None):
        staged = list(engine.train_staged(cfg, W, val, runs, budget=b))
        assert [r.to_dict() | {"seconds": 0, "phase_seconds": {}, "metrics": {}} for r in staged] == \
               [r.to_dict() | {"seconds": 0, "phase_seconds": {}, "metrics": {}} for r in alone]  # fmt: skip
        assert [r.metrics["val_er"] for r in staged] == [r.metrics["val_er"] for r in alone]


def test_auto_is_off_on_a_cpu_and_with_a_pruner(prepared, monkeypatch):
    cfg = plan_for(prepared, "auto").run_config
    assert not cvfp_family.stage_sizes(cfg, "cpu", 3, may_stop=False)
    assert cvfp_family.stage_sizes(cfg.replace(**{"engine.stage_sizes": True}), "cpu", 3, may_stop=True)
    assert not cvfp_family.stage_sizes(cfg.replace(**{"engine.stage_sizes": True}), "cpu", 1, may_stop=False)
    monkeypatch.setattr(engine, "staging_helps", lambda cfg, device: True)  # as on a GPU with Triton
    assert cvfp_family.stage_sizes(cfg, "cuda", 3, may_stop=False)
    assert not cvfp_family.stage_sizes(cfg, "cuda", 3, may_stop=True)
    assert not cvfp_family.stage_sizes(cfg, "cuda", 1, may_stop=False)
    assert not cvfp_family.stage_sizes(cfg.replace(**{"engine.stage_sizes": False}), "cuda", 3, may_stop=False)


def test_the_plan_tells_the_worker_about_the_pruner(tiny_corpus):
    from archsearch.plan import trial_plan

    space = parse_space(tiny_space(tiny_corpus, sampler={"type": "random"}, parameters={"num_layers": {"type": "int", "low": 1, "high": 2}},
                                   early_stopping={"pruner": "median"}))  # fmt: skip
    assert trial_plan(space, {"num_layers": 1}, name="x", data_path="-").extra == {"pruner": "median"}


def test_stage_sizes_takes_auto_true_false_only():
    for value in ("auto", True, False):
        assert run_config_from_dict({"engine": {"stage_sizes": value}}).engine.stage_sizes == value
    with pytest.raises(ConfigError, match=r"engine.stage_sizes: must be auto, true or false, got 'yes'"):
        run_config_from_dict({"engine": {"stage_sizes": "yes"}})


def test_concurrent_sizes_is_a_config_error_naming_its_replacement(tmp_path, tiny_corpus):
    removed = "engine.concurrent_sizes was removed"
    with pytest.raises(ConfigError, match=r"engine.concurrent_sizes: was removed .*engine.stage_sizes"):
        run_config_from_dict({"engine": {"concurrent_sizes": 2}})
    path = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus, engine={"concurrent_sizes": 2}))
    for args in (["validate", str(path)],
                 ["validate", str(write_space(tmp_path / "t.yaml", tiny_space(tiny_corpus))), "engine.concurrent_sizes=2"]):  # fmt: skip
        r = cli(*args)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "engine.concurrent_sizes" in r.stderr and "engine.stage_sizes" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ConfigError, match=removed):
        parse_space(tiny_space(tiny_corpus, sampler={"type": "random"}, parameters={"engine.concurrent_sizes": [1, 2]}))
