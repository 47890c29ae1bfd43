"""Reports that cannot mislead: what the report ranks first against what the study optimised,
fits without intervals, configs whose numbers were not made alike, and every number of
runs.csv / summary.json traceable to the runs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import optuna
import pytest

from archsearch.report import build_report, study_report
from archsearch.report.data import ConfigResult, SizeRow
from archsearch.report.render import markdown, summary_note, write_report
from archsearch.result import SizeRecord

TOKENS = [1000, 2000, 4000, 8000]


def cfg(name, ppl, tokens=TOKENS, values=None, precision=None, retried=None, **kw) -> ConfigResult:
    sizes = [SizeRow(tokens=t, ppl=p, acc=0.05, val_er=0.9, val_loss_se=0.01, precision=precision,
                     retried=dict(retried or {}) if i == len(ppl) - 1 else {})
             for i, (t, p) in enumerate(zip(tokens, ppl))]  # fmt: skip
    return ConfigResult(name, {"num_layers": 2, "context_dim": 64, "num_input_tokens": 1}, 1000, sizes, values=values, **kw)


def test_a_searchs_top_configs_follow_its_first_objective_and_direction():
    """A search maximising final accuracy keeps its top configs by the accuracy each trial told
    the study, highest first, not by alpha (the best-accuracy config has the flattest alpha)."""
    acc = {"flat_best_acc": 0.30, "steep": 0.10, "mid": 0.20}
    configs = [cfg("steep", [9000, 5000, 2500, 1200], values=[acc["steep"]]),
               cfg("flat_best_acc", [1100, 1050, 1000, 980], values=[acc["flat_best_acc"]]),
               cfg("mid", [3000, 2000, 1500, 1100], values=[acc["mid"]])]  # fmt: skip
    meta = {"objectives": ["final_acc"], "directions": ["maximize"]}
    rep = build_report(configs, meta=meta, top=2)
    assert [c.name for c in rep.configs] == ["flat_best_acc", "mid"]
    # minimising the same values keeps the lowest
    rep = build_report(configs, meta={"objectives": ["final_acc"], "directions": ["minimize"]}, top=1)
    assert [c.name for c in rep.configs] == ["steep"]


def test_the_pareto_front_is_taken_over_every_config_not_only_the_top():
    """A front member with a poor first objective is on the front even where the tables keep
    only the top configs by that objective."""
    configs = [cfg("a", [3000, 2000, 1500, 1000], values=[1.0, 9e6]),
               cfg("b", [3000, 2000, 1500, 1100], values=[2.0, 8e6]),
               cfg("cheap", [3000, 2500, 2200, 2000], values=[5.0, 1e5])]  # fmt: skip
    meta = {"objectives": ["ppl_at_10M", "total_params"], "directions": ["minimize", "minimize"]}
    rep = build_report(configs, meta=meta, top=2)
    assert [c.name for c in rep.configs] == ["a", "b"]
    assert [p["config"] for p in rep.pareto] == ["a", "b", "cheap"]


def test_every_ranking_puts_feasible_configs_first():
    """An infeasible config (the study's rule, or admitted early) with the steepest alpha, the
    lowest PPL and the best extrapolation leads no criterion while a feasible config exists;
    the Markdown marks it where it is listed."""
    bad = cfg("bad", [4000, 1500, 600, 250], infeasible="capped: its runs hit a training cap")
    good = cfg("good", [1000, 900, 820, 760])
    rep = build_report([bad, good])
    for key in ("best_ppl", "best_alpha", "ppl_at_target"):
        assert [x["config"] for x in rep.rankings[key]] == ["good", "bad"], key
    crit = {c["criterion"]: c["config"] for c in rep.conclusions}
    assert crit["absolute PPL"] == crit["data efficiency"] == "good"
    assert rep.recommendation[0].startswith("Best absolute PPL: good")
    md = markdown(rep)
    assert "- Best α (95% interval): good (" in md and "bad † (" in md
    # with no feasible config the infeasible one still leads (nothing else to rank)
    assert build_report([bad]).rankings["best_alpha"][0]["config"] == "bad"


def test_two_sizes_give_no_interval_and_the_report_says_so():
    """With two sizes the jackknife has no interval and R^2 of a line through two points is 1
    by construction: the report shows neither as a number ("nan", "R² = 1.0000") nor calls the
    missing intervals overlapping."""
    rep = build_report([cfg("a", [100, 80], tokens=[1000, 2000]), cfg("b", [90, 85], tokens=[1000, 2000])])
    md = markdown(rep)
    assert "nan" not in md.lower()
    assert all(r.r2 is None or not math.isfinite(r.r2) for r in rep.summary)
    assert json.loads(json.dumps(rep.to_dict()))["summary"][0]["r2"] is None
    assert "Overlapping α intervals" not in md and "- α without an interval" in md
    line = next(x for x in rep.recommendation if x.startswith("Best data efficiency"))
    assert "no interval: the jackknife needs 3 sizes" in line and "overlaps" not in line
    crit = next(c for c in rep.conclusions if c["criterion"] == "data efficiency")
    assert "nan" not in crit["reason"] and "not resolved against 1 of 1 others" in crit["reason"]
    target = next(x for x in rep.recommendation if x.startswith("Best PPL at"))
    assert "(no interval: the jackknife needs 3 sizes)" in target and "intervals overlap" not in target
    # three sizes: an interval, R^2 a number, nothing of the above
    three = build_report([cfg("a", [100, 80, 70], tokens=TOKENS[:3]), cfg("b", [90, 85, 79], tokens=TOKENS[:3])])
    assert all(math.isfinite(r.r2) for r in three.summary) and "- α without an interval" not in markdown(three)


def test_configs_trained_in_different_arithmetic_or_with_raised_caps_are_flagged():
    """A study run on a CPU (fp32) and continued on a GPU (bf16) has one signature
    (engine.precision: auto) but two arithmetics; a size trained again with raised caps ran
    longer than the others'. The report, its summary table and the dashboard note say so;
    one protocol says nothing."""
    same = build_report([cfg("a", [3000, 2000, 1500, 1000], precision="fp32"), cfg("b", [3000, 2100, 1600, 1100], precision="fp32")])
    assert same.protocol == [] and "Mixed protocols" not in markdown(same)
    assert all("fp32" not in r.flags for r in same.summary)
    mixed = build_report([cfg("cpu_run", [3000, 2000, 1500, 1000], precision="fp32"),
                          cfg("gpu_run", [3000, 2100, 1600, 1100], precision="bf16", retried={"phase2.max_epochs": 20})])  # fmt: skip
    text = " ".join(mixed.protocol)
    assert "different arithmetic (fp32: cpu_run; bf16: gpu_run)" in text
    assert "raised caps (capped: retry) for gpu_run" in text
    flags = {r.config: r.flags for r in mixed.summary}
    assert flags["cpu_run"] == ["fp32"] and flags["gpu_run"] == ["retried", "bf16"]
    md = markdown(mixed)
    assert "> ⚠ **Mixed protocols**" in md and "> ⚠ **Mixed protocols**" in summary_note(mixed)
    assert "| 8,000 | 1100.0 |" in md and "(retried with phase2.max_epochs=20) |" in md
    # the study's runs: engine versions and data fingerprints that changed between runs
    runs = [{"engine_version": 4, "gpu_engine_version": 1, "data_fingerprint": "aaa"},
            {"engine_version": 5, "gpu_engine_version": 2, "data_fingerprint": "bbb"}]  # fmt: skip
    rep = build_report([cfg("a", [3000, 2000, 1500, 1000])], meta={"runs": runs})
    text = " ".join(rep.protocol)
    assert "engine 4 (GPU paths 1), engine 5 (GPU paths 2)" in text and "fingerprints (aaa, bbb)" in text
    assert build_report([cfg("a", [3000, 2000, 1500, 1000])], meta={"runs": runs[:1] * 2}).protocol == []
    # rules changed between runs: one capped config made infeasible, another capped one not; one
    # config judged by the admissibility rule, another not
    capped_bad = cfg("capped_bad", [3000, 2000, 1500, 1000], infeasible="capped: infeasible: 1 of 4 sizes hit a training cap (...)")
    capped_bad.sizes[-1].capped = ["max_epochs"]
    capped_kept = cfg("capped_kept", [3000, 2100, 1600, 1100])
    capped_kept.sizes[-1].capped = ["max_epochs"]
    capped_kept.extra["admissibility"] = {"final_ppl": 1100, "best_final_ppl": 1100, "ppl_ratio": 1.0, "max_ppl_ratio": 1.5}
    text = " ".join(build_report([capped_bad, capped_kept]).protocol)
    assert "infeasible (capped: infeasible) but not capped_kept" in text
    assert "different admissibility rules (not judged: capped_bad; max_ppl_ratio 1.5: capped_kept)" in text


def _record(t: int, seed_ppls: list[float], precision: str = "fp32") -> dict:
    losses = [math.log(p) for p in seed_ppls]
    mean = sum(losses) / len(losses)
    return SizeRecord(size=t, size_unit="tokens", train_tokens=t, val_tokens=2000, val_loss=mean, val_loss_se=0.02,
                      val_ppl=math.exp(mean), val_acc=0.05, params={"phase1": 1000, "phase2": 500, "total": 1500},
                      seconds=1.0, device="cpu", precision=precision, seeds=[42, 43], metrics={"val_er": 0.9},
                      val_ppl_seeds=list(seed_ppls)).to_dict()  # fmt: skip


def test_runs_csv_and_summary_json_trace_to_the_runs(tmp_path):
    """A study (real SQLite) with two seeds per size: runs.csv gives each size's loss, seeds and
    per-seed PPLs; its PPL is the geometric mean of the seeds', and alpha, A, R^2 and the
    interval recomputed with numpy from runs.csv alone equal summary.json's. The header says
    how the seeds were combined."""
    study = optuna.create_study(study_name="traced", storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.set_user_attr("objectives", ["alpha"])
    study.set_user_attr("runs", [{"seeds": [42, 43], "engine_version": 4}])
    for name, (c, a) in {"x": (5e4, -0.4), "y": (2e4, -0.3)}.items():
        t = study.ask({"num_layers": optuna.distributions.IntDistribution(1, 3)})
        t.set_user_attr("config_name", name)
        t.set_user_attr("sizes", [_record(n, [c * n**a * 1.05, c * n**a / 1.04 * (1 + 0.01 * i)]) for i, n in enumerate(TOKENS)])
        study.tell(t, a)
    rep = study_report(study, "sqlite:///x")
    write_report(rep, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "runs.csv").open()))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    from scipy import stats

    for name in ("x", "y"):
        rs = [r for r in rows if r["config"] == name]
        t = np.array([float(r["tokens"]) for r in rs])
        p = np.array([float(r["val_ppl"]) for r in rs])
        seeds = [[float(v) for v in r["val_ppl_seeds"].split(";")] for r in rs]
        assert all(r["seeds"] == "42;43" and r["precision"] == "fp32" for r in rs)
        assert p == pytest.approx([math.exp(np.mean(np.log(s))) for s in seeds], rel=1e-12)  # geometric mean
        assert p == pytest.approx(np.exp([float(r["val_loss"]) for r in rs]), rel=1e-12)
        x, y = np.log(t), np.log(p)
        slope, intercept = np.polyfit(x, y, 1)
        law = summary["laws"][name]
        assert law["alpha"] == pytest.approx(slope, rel=1e-9) and law["A"] == pytest.approx(math.exp(intercept), rel=1e-9)
        assert law["r2"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, rel=1e-9)
        n = len(x)
        loo = np.array([np.polyfit(np.delete(x, i), np.delete(y, i), 1)[0] for i in range(n)])
        se_jack = math.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum())
        w = (x - x.mean()) / ((x - x.mean()) ** 2).sum()
        se_meas = math.sqrt(((w * np.array([float(r["val_loss_se"]) for r in rs])) ** 2).sum())
        half = stats.t.ppf(0.975, n - 1) * math.hypot(se_jack, se_meas)
        assert (law["alpha_low"], law["alpha_high"]) == (pytest.approx(slope - half, rel=1e-9), pytest.approx(slope + half, rel=1e-9))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| Seeds | 42, 43 (each size's PPL is the geometric mean over the seeds" in md



def test_an_extrapolated_ppl_below_1_is_called_impossible():
    """The quickstart's steep laws put the PPL at 10M tokens near 3 with a lower end near 0.4:
    below 1, where no model can be. The summary says so; a law that stays above 1 says nothing."""
    steep = cfg("steep", [13032.2, 7134.3, 3417.7, 2130.8])
    rep = build_report([steep, cfg("flat", [1100, 1050, 1000, 980])])
    assert rep.laws["steep"].ppl_target_low < 1
    assert "below 1 for steep:" in rep.caveats["below_1"] and "flat" not in rep.caveats["below_1"]
    assert "⚠ PPL at target: the PPL at 10M tokens or its interval's lower end is below 1 for steep" in markdown(rep)
    assert "below_1" not in build_report([cfg("flat", [1100, 1050, 1000, 980])]).caveats


def test_the_pareto_plot_draws_the_reports_front(tmp_path):
    """A two-objective study (real SQLite): "early" is on Optuna's front (feasible to Optuna) but
    was admitted only because it came early; a repeat of "a" tells its value again. The plot's
    points and front are the report's: no repeat point, no admitted-early member."""
    from archsearch.report.render import pareto_points

    study = optuna.create_study(study_name="mo", storage=f"sqlite:///{tmp_path / 'db.sqlite'}", directions=["minimize", "minimize"])
    study.set_user_attr("objectives", ["final_ppl", "total_params"])
    study.set_user_attr("sampler", "nsga2")
    dist = {"num_layers": optuna.distributions.IntDistribution(1, 9)}
    def judged(final: float, best: float) -> dict:
        return {"admissibility": {"final_ppl": final, "best_final_ppl": best, "ppl_ratio": final / best, "max_ppl_ratio": 1.5}}

    for name, final, params, extra in (("early", 3000.0, 1e3, judged(3000.0, 3000.0)), ("a", 1000.0, 1e6, judged(1000.0, 1000.0)),
                                       ("b", 1200.0, 1e5, judged(1200.0, 1000.0)), ("a", 1000.0, 1e6, {"repeat_of": 1})):  # fmt: skip
        t = study.ask(dist)
        t.set_user_attr("config_name", name)
        if "repeat_of" not in extra:
            t.set_user_attr("sizes", [_record(n, [final * (8000 / n) ** 0.3] * 2) for n in TOKENS])
            t.set_user_attr("total_params", int(params))
        for k, v in extra.items():
            t.set_user_attr(k, v)
        study.tell(t, [final, params])
    assert {t.number for t in study.best_trials} == {0, 1, 2, 3}  # Optuna: early and the repeat too
    rep = study_report(study, "sqlite:///x")
    assert [p["config"] for p in rep.pareto] == ["a", "b"] and rep.configs[0].admitted_early
    trials, front = pareto_points(rep, study)
    assert [t.number for t in trials] == [0, 1, 2] and [t.number for t in front] == [1, 2]


def test_a_law_whose_ppl_rises_with_data_is_flagged():
    """A config whose PPL grows with the data (a broken run, over-fitting) has alpha above 0:
    not flagged by α∋0 when its interval lies above 0, nor when two sizes give no interval."""
    rising = cfg("rising", [1000, 1150, 1330, 1530])
    rep = build_report([rising, cfg("ok", [3000, 2000, 1500, 1000])])
    rows = {r.config: r for r in rep.summary}
    assert rep.laws["rising"].alpha_low > 0 and rows["rising"].flags == ["α>0"] and "α>0" not in rows["ok"].flags
    assert "its PPL rises with more data" in rep.flags["rising"][0] and "`α>0` PPL rises with data" in markdown(rep)
    two = build_report([cfg("rising", [1000, 1150], tokens=TOKENS[:2])])
    assert two.summary[0].flags == ["α>0"] and "+0.2016 (no interval" in two.flags["rising"][0]
