"""Typed results: seeds combined into a size record, the run cache's records, and studies
written before these types (their flat per-size dicts) still read by the report."""

from __future__ import annotations

import math
import os
import shutil

import pytest
from helpers import ROOT, cli

from archsearch.result import RunResult, SizeRecord
from archsearch.trial import combine_seeds


def run(seed: int, loss: float, se: float, capped=()) -> RunResult:
    return RunResult(family="cvfp", seed=seed, train_tokens=1000, val_tokens=500, val_loss=loss, val_loss_se=se,
                     val_ppl=math.exp(loss), val_acc=0.1 * seed, params={"phase1": 10, "phase2": 20, "total": 30},
                     seconds=float(seed), device="cpu", precision="fp32", phase_seconds={"phase1": 1.0 * seed, "phase2": 2.0},
                     capped=list(capped), metrics={"val_er": 0.5 * seed, "phase1_iterations": 6 + seed})  # fmt: skip


def test_combine_seeds_geometric_ppl_and_both_noise_sources_in_the_standard_error():
    runs = [run(1, 5.0, 0.02), run(2, 5.2, 0.04, ["max_epochs"]), run(3, 5.1, 0.03)]
    rec = combine_seeds(runs, size=1000, size_unit="tokens", cached=[True, False, True])
    assert rec.val_ppl == pytest.approx(math.exp(5.1))  # geometric mean of exp(5.0), exp(5.2), exp(5.1)
    assert rec.val_loss == pytest.approx(5.1) and rec.val_acc == pytest.approx(0.2)
    between = ((5.0 - 5.1) ** 2 + (5.2 - 5.1) ** 2 + 0.0) / 2
    within = (0.02**2 + 0.04**2 + 0.03**2) / 3
    assert rec.val_loss_se == pytest.approx(math.sqrt(within + between / 3))
    assert rec.metrics == {"val_er": pytest.approx(1.0), "phase1_iterations": pytest.approx(8.0)}
    assert rec.phase_seconds == {"phase1": pytest.approx(2.0), "phase2": pytest.approx(2.0)}
    assert rec.capped == ["max_epochs"] and rec.seeds == [1, 2, 3] and not rec.cached
    assert rec.val_ppl_seeds == [r.val_ppl for r in runs]
    lo, hi = rec.ppl_interval()
    assert lo < rec.val_ppl < hi
    # seeds that agree on the same validation tokens leave that stream's noise as it is: more
    # seeds do not make a finite validation set more precise
    same = combine_seeds([run(1, 5.0, 0.02), run(2, 5.0, 0.02), run(3, 5.0, 0.02)], 1000, "tokens", [False] * 3)
    assert same.val_loss_se == pytest.approx(0.02)
    one = combine_seeds(runs[:1], 1000, "tokens", [True])
    assert one.val_loss_se == pytest.approx(0.02) and one.cached  # one seed: its own standard error


def test_records_round_trip_through_json_with_nan_as_null():
    rec = combine_seeds([run(1, 5.0, math.nan)], 1000, "tokens", [False])
    d = rec.to_dict()
    d["val_loss_se"] = None  # what the trial worker's JSON makes of NaN
    back = SizeRecord.from_dict(d)
    assert math.isnan(back.val_loss_se) and back.metrics == rec.metrics
    r = run(2, 4.0, 0.1)
    assert RunResult.from_dict(r.to_dict()) == r


def test_old_flat_size_dict_reads_by_field():
    old = {"size": 1000, "size_unit": "tokens", "device": "cpu", "precision": "fp32", "phase1_params": 57728, "phase2_params": 346368,
           "total_params": 404096, "embed_dim": 384, "vocab_size": 30522, "train_tokens": 1000, "val_tokens": 2000, "val_ppl": 7027.2,
           "val_loss": 8.8575, "val_acc": 0.0165, "train_er": 0.893, "val_er": 0.897, "phase1_iterations": 8.0,
           "phase1_convergence_rate": 0.995, "phase2_best_epoch": 4.0, "phase2_stopped_epoch": 4.0, "phase1_seconds": 2.03,
           "contexts_seconds": 0.14, "phase2_seconds": 5.95, "seconds": 8.22, "seeds": [42], "cached": False}  # fmt: skip
    rec = SizeRecord.from_dict(old)
    assert rec.params == {"phase1": 57728, "phase2": 346368, "total": 404096} and rec.total_params == 404096
    assert rec.metrics["val_er"] == 0.897 and rec.metrics["embed_dim"] == 384
    assert rec.phase_seconds == {"phase1": 2.03, "contexts": 0.14, "phase2": 5.95}
    assert rec.val_ppl == 7027.2 and math.isnan(rec.val_loss_se) and rec.capped == []


def test_report_reads_a_study_written_before_the_typed_records(tmp_path):
    """tests/fixtures/study_flat_records.db (the quickstart study committed in docs/quickstart until
    it was run again) holds the old flat per-size dicts."""
    db = tmp_path / "study.db"
    shutil.copy(ROOT / "tests" / "fixtures" / "study_flat_records.db", db)
    out = tmp_path / "report"
    r = cli("report", "--storage", f"sqlite:///{db}", "--study", "quickstart", "--out", str(out), env={"ARCHSEARCH_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert "-0.7102" in md and "## Results per config" in md
    rows = (out / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 4 and "0.89" in rows[1]  # every size, with its effective ranks


def test_objectives_read_the_size_record_by_field():
    from archsearch.objectives import Objective, objective_values

    recs = [combine_seeds([run(1, 5.0, 0.1)], 1000, "tokens", [False])]
    names = ("final_ppl", "final_acc", "val_er", "phase1_params", "phase2_params", "total_params", "alpha")
    values = objective_values([Objective(name=n, direction="minimize") for n in names], recs, None)
    assert values == [pytest.approx(math.exp(5.0)), pytest.approx(0.1), 0.5, 10.0, 20.0, 30.0, None]  # alpha: needs two sizes


def _entry_cases(path, good: str):
    """Ways a run-cache entry may be damaged or replaced (name -> write it at ``path``)."""
    import json

    entry = json.loads(good)

    def write(text):
        return lambda: path.write_text(text)

    def fifo():
        path.unlink()
        os.mkfifo(path)

    def link():
        path.unlink()
        path.symlink_to("/dev/zero")

    return {
        "nested": write("[" * 100_000),
        "list": write(json.dumps([entry])),
        "record_list": write(json.dumps(dict(entry, record=[1]))),
        "other_key": write(json.dumps(dict(entry, key="0" * 64))),
        "changed_number": write(good.replace('"val_loss": 4.0', '"val_loss": 3.0')),
        "huge": write(good[:-1] + ', "pad": "' + "x" * (5 * 2**20) + '"}'),
        "fifo": fifo,
        "link_to_dev_zero": link,
    }


@pytest.mark.parametrize("case", ["nested", "list", "record_list", "other_key", "changed_number", "huge", "fifo", "link_to_dev_zero"])
def test_a_damaged_run_cache_entry_is_removed_and_recomputed_never_read(case, tmp_path, caplog):
    from archsearch.runcache import RunCache

    cache = RunCache(tmp_path / "runs")
    r = run(2, 4.0, 0.1)
    key = "ab" + "0" * 62
    cache.put(key, r)
    assert cache.get(key) == r
    path = cache._path(key)
    _entry_cases(path, path.read_text())[case]()
    with caplog.at_level("WARNING"):
        assert cache.get(key) is None  # recomputed by the caller; no exception, no hang
    assert "is corrupted" in caplog.text and not os.path.lexists(path)
    cache.put(key, r)
    assert cache.get(key) == r
