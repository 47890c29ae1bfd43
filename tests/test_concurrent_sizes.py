"""A trial's sizes trained at once in threads (engine.concurrent_sizes) give the numbers of one
size after another, to the bit; records, on_size calls, progress and failures stay per size."""

from __future__ import annotations

import threading

import pytest
from helpers import tiny_space

from archsearch.space import parse_space
from archsearch.trial import TrialPlan, concurrent_sizes, in_order, run_trial

SIZES = [400, 800, 1200, 1600]


@pytest.fixture(scope="module")
def prepared(tiny_corpus):
    from archsearch.plan import prepare_space_data

    space = parse_space(tiny_space(tiny_corpus, data=dict(tiny_space(tiny_corpus)["data"], sizes={"tokens": SIZES})))
    return space, prepare_space_data(space)


def plan_for(prepared, n: int, cache_dir=None, seeds=(42, 7)) -> TrialPlan:
    space, data = prepared
    params = {"num_layers": 2, "context_dim": 8, "num_input_tokens": 2, "engine.concurrent_sizes": n}
    return TrialPlan(params=params, config=space.run_config(params).to_dict(), sizes=SIZES, size_unit="tokens", seeds=list(seeds),
                     objectives=[o.__dict__ for o in space.objectives], data_path=str(data.path),
                     cache_dir=str(cache_dir) if cache_dir else None)  # fmt: skip


def numbers(result):
    """A trial's result without its timings (and the setting under test)."""
    return [{k: v for k, v in rec.items() if k not in ("seconds", "phase_seconds", "metrics", "cached")}
            | {"metrics": {k: v for k, v in rec["metrics"].items() if not k.endswith(("_per_s", "_us", "_seconds"))}}
            for rec in result["sizes"]], result["fit"], result["objectives"]  # fmt: skip


def test_auto_is_one_size_at_a_time_and_more_is_opt_in(prepared):
    cfg = plan_for(prepared, 0).run_config
    assert concurrent_sizes(cfg) == 1  # auto, on any device: opt-in only
    assert concurrent_sizes(plan_for(prepared, 4).run_config) == 4


def test_two_sizes_at_once_equal_one_after_another_to_the_bit(prepared):
    seq_events, par_events = [], []
    seq = run_trial(plan_for(prepared, 1, seeds=(42,)), progress=lambda e, **i: seq_events.append((e, i.get("size"), i.get("seed"))))
    ran_in = set()

    def progress(e, **i):
        par_events.append((e, i.get("size"), i.get("seed")))
        called_in.add(threading.current_thread().name)

    import archsearch.cvfp.run as engine

    real, called_in, ran_in = engine.train_run, set(), set()

    def train_run(*a, **k):
        ran_in.add(threading.current_thread().name)
        return real(*a, **k)

    engine.train_run = train_run
    try:
        par = run_trial(plan_for(prepared, 2, seeds=(42,)), progress=progress)
    finally:
        engine.train_run = real
    assert numbers(par) == numbers(seq)
    assert [r["size"] for r in par["sizes"]] == SIZES and par["complete"]
    assert len(ran_in) == 2 and all(name.startswith("archsearch-size2") for name in ran_in)  # the runs went to two threads
    assert called_in == {threading.current_thread().name}  # every progress event came in the caller's thread
    # the same events per (size, seed), in the order each run emitted them
    for size in SIZES:
        for seed in (42,):
            assert [e for e, s, d in par_events if (s, d) == (size, seed)] == [e for e, s, d in seq_events if (s, d) == (size, seed)]


def test_a_pruned_trial_stops_in_size_order_and_leaves_no_run_behind(prepared, tmp_path):
    seen = []

    def on_size(rec, partial):
        seen.append(rec.size)
        return rec.size < 800  # stop after the second size

    result = run_trial(plan_for(prepared, 2, tmp_path / "cache", seeds=(42,)), on_size=on_size)
    assert seen == [400, 800] and [r["size"] for r in result["sizes"]] == [400, 800] and not result["complete"]
    # at most one size ahead (1200) was started, and it finished (was cached) before run_trial
    # returned; 1600 never was
    trained = {r["size"] for r in run_trial(plan_for(prepared, 1, tmp_path / "cache", seeds=(42,)), on_size=lambda rec, p: False)["sizes"]}
    assert trained == {400}
    assert len(list((tmp_path / "cache").rglob("*.json"))) in (2, 3)
    again = run_trial(plan_for(prepared, 1, tmp_path / "cache", seeds=(42,)), on_size=lambda rec, p: rec.size < 800)
    assert numbers(again)[0] == numbers(result)[0] and all(r["cached"] for r in again["sizes"])


def test_a_failing_size_raises_as_one_after_another_would(prepared, monkeypatch):
    """The size that fails raises out of the trial after the earlier sizes' on_size calls;
    a later size that fails too does not mask it."""
    import archsearch.cvfp.run as engine

    real = engine.train_run

    def train_run(cfg, emb, train_ids, *a, **k):
        if len(train_ids) >= 1200:
            raise RuntimeError(f"boom at {len(train_ids)}")
        return real(cfg, emb, train_ids, *a, **k)

    monkeypatch.setattr(engine, "train_run", train_run)
    seen = []
    with pytest.raises(RuntimeError, match="boom at 1200"):
        run_trial(plan_for(prepared, 2, seeds=(42,)), on_size=lambda rec, p: seen.append(rec.size))
    assert seen == [400, 800]


def test_in_order_yields_in_order_and_runs_at_most_n_at_once():
    running, peak, lock = [0], [0], threading.Lock()
    gate = threading.Event()

    def work(x):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(0.05)
        with lock:
            running[0] -= 1
        return x * x

    assert list(in_order(list(range(9)), work, 3)) == [x * x for x in range(9)]
    assert peak[0] <= 3
    assert list(in_order([1, 2], work, 1)) == [1, 4]
