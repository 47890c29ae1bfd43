"""Objectives: the table (direction, needs a fit), their values on crafted per-size records,
and the space-file syntax that names them."""

from __future__ import annotations

import math

import pytest

from archsearch.errors import ConfigError
from archsearch.objectives import OBJECTIVES, Objective, ObjectiveDef, objective_values
from archsearch.result import SizeRecord
from archsearch.scaling import fit_power_law
from archsearch.space import parse_space

TOKENS = [1000, 2000, 4000, 8000]
PPL = [900.0, 700.0, 520.0, 430.0]


def record(tokens: int, ppl: float, acc: float, val_er: float, se: float = 0.01) -> SizeRecord:
    return SizeRecord(size=tokens, size_unit="tokens", train_tokens=tokens, val_tokens=300, val_loss=math.log(ppl),
                      val_loss_se=se, val_ppl=ppl, val_acc=acc, params={"phase1": 1200, "phase2": 3400, "total": 4600},
                      seconds=1.0, device="cpu", precision="fp32", seeds=[42], metrics={"val_er": val_er, "train_er": 0.5})  # fmt: skip


RECORDS = [record(t, p, acc=0.05 + 0.01 * i, val_er=0.8 + 0.02 * i) for i, (t, p) in enumerate(zip(TOKENS, PPL))]
FIT = fit_power_law(TOKENS, PPL)


def test_the_table_of_objectives():
    assert {n: (d.direction, d.needs_fit, d.takes_target) for n, d in OBJECTIVES.items()} == {
        "alpha": ("minimize", True, False),
        "ppl_at": ("minimize", True, True),
        "final_ppl": ("minimize", False, False),
        "final_acc": ("maximize", False, False),
        "val_er": ("maximize", False, False),
        "phase1_params": ("minimize", False, False),
        "phase2_params": ("minimize", False, False),
        "total_params": ("minimize", False, False),
    }


def test_values_and_intervals_on_crafted_records():
    ex = FIT.extrapolate(1e6)
    expected = {
        "alpha": (FIT.alpha, FIT.alpha_low, FIT.alpha_high),
        "ppl_at": (ex.ppl, ex.low, ex.high),
        "final_ppl": (430.0, *RECORDS[-1].ppl_interval()),  # the largest size (records come smallest first)
        "final_acc": (0.08, math.nan, math.nan),
        "val_er": (0.86, math.nan, math.nan),
        "phase1_params": (1200, math.nan, math.nan),
        "phase2_params": (3400, math.nan, math.nan),
        "total_params": (4600, math.nan, math.nan),
    }
    for name, want in expected.items():
        o = Objective(name, OBJECTIVES[name].direction, 1e6 if name == "ppl_at" else None)
        got = o.estimate(RECORDS, FIT)
        assert got.value == pytest.approx(want[0]) and o.value(RECORDS, FIT) == got.value, name
        assert [got.low, got.high] == pytest.approx(list(want[1:]), nan_ok=True), name
    assert FIT.alpha_low < FIT.alpha < FIT.alpha_high and ex.low < ex.ppl < ex.high  # real intervals, not NaN
    assert 380 < RECORDS[-1].ppl_interval()[0] < 430 < RECORDS[-1].ppl_interval()[1] < 480


def test_a_fitted_objective_has_no_value_before_the_fit_and_none_has_one_before_a_size():
    objectives = [Objective("alpha", "minimize"), Objective("ppl_at", "minimize", 1e7), Objective("final_ppl", "minimize")]
    assert objective_values(objectives, RECORDS[:1], None) == [None, None, 900.0]
    assert objective_values(objectives, [], None) == [None, None, None]


def test_labels_and_the_plain_form_a_study_signature_keeps():
    assert Objective("ppl_at", "minimize", 1e7).label == "ppl_at_10M"
    assert Objective("ppl_at", "minimize", 2.5e3).label == "ppl_at_2.5k"
    assert Objective("alpha", "minimize").label == "alpha"
    o = Objective("ppl_at", "maximize", 1e6)
    # the same dict as before objectives had their own module: studies made then still match
    assert o.to_dict() == o.__dict__ == {"name": "ppl_at", "direction": "maximize", "target_tokens": 1e6}
    assert Objective.from_dict(o.to_dict()) == o


def space(objective=None, sizes=(1000, 2000), **extra) -> dict:
    raw = {"data": {"source": "wiki", "sizes": {"tokens": list(sizes)}}, **extra}
    if objective is not None:
        raw["objective"] = objective
    return raw


def test_space_parsing_reads_objectives_from_the_table():
    assert parse_space(space()).objectives == [Objective("alpha", "minimize")]  # the default
    sp = parse_space(space([{"name": "ppl_at"}, "final_acc"], study={"directions": ["minimize", "minimize"]}))
    assert sp.objectives == [Objective("ppl_at", "minimize", 1e7), Objective("final_acc", "minimize")]
    assert parse_space(space({"name": "val_er", "direction": "minimize"})).directions == ["minimize"]
    assert parse_space(space("final_ppl", sizes=[1000])).objectives[0].name == "final_ppl"  # no fit: one size is enough
    with pytest.raises(ConfigError) as e:
        parse_space(space(["final_ppl", "alpha"], sizes=[1000]))
    assert "objective 'alpha' fits a law across sizes and needs at least two" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_space(space({"name": "alpha", "target_tokens": 1e6}))
    assert "objective.target_tokens: only the ppl_at objective takes a target" in str(e.value)


def test_a_new_objective_is_one_entry_of_the_table(monkeypatch):
    best = ObjectiveDef("best_ppl", "minimize", False, lambda records, fit, target: min(r.val_ppl for r in records), "lowest PPL of any size")
    monkeypatch.setitem(OBJECTIVES, "best_ppl", best)
    (o,) = parse_space(space("best_ppl")).objectives
    assert o == Objective("best_ppl", "minimize") and o.value(list(reversed(RECORDS)), None) == 430.0


def test_the_default_objective_is_chosen_per_sampler_in_one_place(monkeypatch):
    """Searches default to ppl_at (10M tokens), a grid to alpha; both come from
    objectives.default_objective, so changing it is one line."""
    import archsearch.objectives as objectives

    search = {"sampler": "tpe", "parameters": {"num_layers": {"type": "int", "low": 1, "high": 3}}}
    assert parse_space(space(**search)).objectives == [Objective("ppl_at", "minimize", 1e7)]
    assert parse_space(space()).objectives == [Objective("alpha", "minimize")]
    monkeypatch.setattr(objectives, "default_objective", lambda sampler: "final_ppl")
    assert parse_space(space(**search)).objectives == [Objective("final_ppl", "minimize")]
    assert parse_space(space()).objectives == [Objective("final_ppl", "minimize")]
