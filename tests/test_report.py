"""Reports: the data function on the report's own numbers, and a report from a real study."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from helpers import cli, tiny_space, write_space

from archsearch.report import build_report
from archsearch.report.sources import from_reference

PUBLISHED = {  # the report's summary table
    "baseline": ("7.09M", -0.4860, 0.9895, 249.3, 0.213, 0.752),
    "input_tokens_2": ("10.63M", -0.4702, 0.9870, 198.1, 0.225, 0.824),
    "context_dim_1152": ("13.29M", -0.4988, 0.9963, 246.9, 0.214, 0.710),
    "layers_9": ("10.64M", -0.4818, 0.9915, 256.8, 0.211, 0.737),
}


@pytest.fixture(scope="module")
def published():
    configs, meta = from_reference()
    return build_report(configs, meta=meta)


def test_data_function_reproduces_the_published_summary(published):
    rows = {r.config: r for r in published.summary}
    assert set(rows) == set(PUBLISHED)
    for name, (params, alpha, r2, ppl, acc, er) in PUBLISHED.items():
        r = rows[name]
        assert f"{r.phase1_params / 1e6:.2f}M" == params
        assert r.alpha == pytest.approx(alpha, abs=2e-4)
        assert r.r2 == pytest.approx(r2, abs=2e-4)
        assert (r.best_ppl, r.best_acc, r.val_er) == (ppl, acc, er)


def test_data_function_reproduces_the_alpha_interpretation(published):
    laws = published.laws
    # "alpha = -0.49: 10x tokens -> PPL x 0.32"; "-0.47: x 0.34" (context_dim_1152 and input_tokens_2)
    assert round(laws["context_dim_1152"].factor_per_10x, 2) == 0.32
    assert round(laws["input_tokens_2"].factor_per_10x, 2) == 0.34
    # "-0.49 vs -0.47: about 6% PPL difference at 1M tokens, about 13% at 10M"
    gap = next(g for g in published.gaps if {g.a, g.b} == {"context_dim_1152", "input_tokens_2"})
    assert round(100 * gap.alpha_only[1_000_000]) == 6
    assert round(100 * gap.alpha_only[10_000_000]) == 13


def test_rankings_and_recommendation_match_the_report(published):
    r = published.rankings
    assert r["best_ppl"][0]["config"] == "input_tokens_2"
    assert r["best_alpha"][0]["config"] == "context_dim_1152"
    # the report's "cost performance": input_tokens_2 (the only config within 5% of the best PPL)
    assert next(x for x in r["cost_performance"] if x["pick"])["config"] == "input_tokens_2"
    assert [x["config"] for x in r["cost_performance"]] == ["baseline", "input_tokens_2"]  # the front, fewest parameters first
    # with four sizes the jackknife intervals of the alphas overlap: the report must say so
    assert ("context_dim_1152", "input_tokens_2") in published.overlaps
    assert any("not resolved" in line for line in published.recommendation)


@pytest.fixture(scope="module")
def small_study(tmp_path_factory, tiny_corpus):
    """A small real study (2 configs on the tiny corpus) run through the CLI."""
    root = tmp_path_factory.mktemp("report_study")
    space = write_space(root / "s.yaml", tiny_space(tiny_corpus, study={"name": "small"}))
    r = cli("run", str(space), "--quiet", env={"ARCHSEARCH_HOME": str(root / "home")})
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def test_report_of_a_real_study_has_every_section_and_plot(small_study):
    home = small_study / "home"
    storage = f"sqlite:///{home / 'archsearch.db'}"
    out = small_study / "report"
    r = cli("report", "--storage", storage, "--out", str(out), "--compare", "reference", env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert "`small` (sqlite:///$ARCHSEARCH_HOME/archsearch.db)" in md and str(small_study) not in md.split("## Settings")[0]
    for section in ("## Summary", "## Settings", "## Results per config", "**Scaling law**", "## What α means",
                    "## Rankings", "## Recommendation", "## Plots", "## Comparison with"):  # fmt: skip
        assert section in md, section
    for png in ("scaling.png", "alpha_vs_params.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    study = optuna.load_study(study_name="small", storage=storage)
    for t in study.trials:
        law = summary["laws"][t.user_attrs["config_name"]]
        assert law["alpha"] == pytest.approx(t.user_attrs["alpha"], abs=1e-12)
        assert law["r2"] == pytest.approx(t.user_attrs["r2"], abs=1e-12)
    rows = (out / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3  # header + trials x sizes
    # the dashboard views: the summary table is the study's note, the plot a study-level graph
    import optuna_dashboard

    assert "## Summary" in optuna_dashboard.get_note(study) and str(small_study) not in optuna_dashboard.get_note(study)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert any(k.startswith("dashboard:plot_data:archsearch-scaling") for k in attrs)


# --------------------------------------------------------------------------- crafted cases

from archsearch.report.data import ConfigResult, SizeRow  # noqa: E402
from archsearch.report.render import markdown  # noqa: E402

TOKENS = [1000, 2000, 4000, 8000]


def cfg(name, ppl, p1=1000, se=None, capped=(), er=(0.9, 0.9, 0.9, 0.9), **kw) -> ConfigResult:
    sizes = [SizeRow(tokens=t, ppl=p, acc=0.05, val_er=e, val_loss_se=se, capped=list(capped) if i == len(ppl) - 1 else [])
             for i, (t, p, e) in enumerate(zip(TOKENS, ppl, er))]  # fmt: skip
    return ConfigResult(name, {"num_layers": 2, "context_dim": 64, "num_input_tokens": 1}, p1, sizes, embed_dim=384, phase2_params=500, **kw)


def test_best_absolute_ppl_is_given_at_its_own_size():
    # the quickstart's case: input_tokens_2's lowest PPL was measured at 4,000 tokens, not at 8,000
    rep = build_report([cfg("a", [4000, 2000, 1600, 1604]), cfg("b", [3000, 1800, 1545.8, 1572])])
    assert rep.rankings["best_ppl"][0] == {"config": "b", "ppl": 1545.8, "tokens": 4000, "ppl_low": None, "ppl_high": None}
    assert rep.recommendation[0].startswith("Best absolute PPL: b (1545.8 at 4,000 tokens)")
    row = next(r for r in rep.summary if r.config == "b")
    assert (row.best_ppl, row.best_tokens) == (1545.8, 4000)
    assert "1545.8 at 4,000 tokens" in rep.conclusions[0]["reason"]


def test_no_paragraph_is_repeated_when_the_best_ppl_config_has_the_flattest_alpha():
    # best PPL = flattest alpha: the gap pair (steepest, best PPL) and (steepest, flattest) is one pair
    rep = build_report([cfg("steep", [5000, 2500, 1700, 1650]), cfg("flat", [1700, 1600, 1560, 1545]), cfg("mid", [3000, 2000, 1700, 1600])])
    assert len({(g.a, g.b) for g in rep.gaps}) == len(rep.gaps)
    md = markdown(rep)
    paragraphs = [p for p in md.split("\n\n") if p.strip()]
    assert len(paragraphs) == len(set(paragraphs))


def test_extrapolations_beyond_ten_times_the_data_carry_a_caveat():
    small = build_report([cfg("a", [4000, 2000, 1600, 1500]), cfg("b", [3000, 1800, 1550, 1450])])
    assert set(small.caveats) - {"below_1"} == {"1M", "10M", "target"} and "1,250×" in small.caveats["10M"]  # below_1: its own test
    md = markdown(small)
    assert md.count("⚠ Caveat: 1M tokens is 125×") == 1 and "⚠ PPL at target: 10M tokens is 1,250×" in md
    # sizes up to 587,970 tokens: 1M is 1.7x (no caveat), 10M is 17x (caveat)
    big = [ConfigResult(n, {}, 1000, [SizeRow(t, p) for t, p in zip([62891, 122795, 240132, 587970], ppl)])
           for n, ppl in (("a", [751.4, 489.8, 364.6, 249.3]), ("b", [587.0, 400.2, 329.3, 198.1]))]  # fmt: skip
    rep = build_report(big)
    assert set(rep.caveats) == {"10M", "target"}
    assert "1M tokens is" not in markdown(rep)


def test_alpha_intervals_containing_zero_and_capped_runs_are_flagged():
    rep = build_report([
        cfg("noisy", [1700, 1500, 1650, 1550]),                       # flat and noisy: alpha interval contains 0
        cfg("capped", [4000, 2000, 1000, 500], capped=["phase1_max_iterations", "max_epochs"]),
        cfg("clean", [4000, 2100, 1050, 520]),
    ])  # fmt: skip
    rows = {r.config: r for r in rep.summary}
    assert "α∋0" in rows["noisy"].flags and rep.laws["noisy"].alpha_contains_zero
    assert rows["capped"].flags == ["capped"] and rows["clean"].flags == []
    assert "phase1_max_iterations at 1/4 sizes" in rep.flags["capped"][0] and "under-trained" in rep.flags["capped"][0]
    # the steepest alpha and best PPL rest on capped runs: the recommendation says so
    assert rep.rankings["best_alpha"][0]["config"] == "capped"
    assert any(x.startswith("Caution on capped: its fit rests on runs that hit a training cap") for x in rep.recommendation)
    # when it has the best extrapolation only, it is not recommended for more data
    rep2 = build_report([cfg("capped", [4000, 2000, 1000, 600], capped=["max_epochs"]), cfg("flat", [800, 700, 600, 550])])
    assert any("capped's better extrapolation is not a recommendation: its fit rests on" in x for x in rep2.recommendation)
    md = markdown(rep)
    assert "> ⚠ capped: its fit rests on runs that hit a training cap" in md
    assert "| 8,000 | 500.0 | 5.0% | 90.0% | phase1_max_iterations, max_epochs |" in md


def test_a_steep_but_bad_config_is_not_recommended_for_more_data():
    # the case: the steepest alpha belongs to a config with many times the best PPL
    rep = build_report([cfg("good", [3000, 2000, 1700, 1500]), cfg("steep_bad", [90000, 40000, 15000, 6000]),
                        cfg("ok", [2600, 2100, 1800, 1600])], meta={"target_tokens": 16000})  # fmt: skip
    assert rep.rankings["best_alpha"][0]["config"] == "steep_bad"
    line = next(x for x in rep.recommendation if x.startswith("Recommendation:"))
    assert "steep_bad if much more data" not in line and "steep_bad's steeper alpha alone is no reason" in line


def test_infeasible_configs_are_ranked_last_in_a_search_and_flagged():
    bad = cfg("bad", [4000, 1500, 600, 250], infeasible="admissible.max_ppl_ratio: ...")
    rep = build_report([bad, cfg("good", [1000, 900, 820, 760])], meta={"objectives": ["alpha"]}, top=1)
    assert [r.config for r in rep.summary] == ["good"]
    rep = build_report([bad, cfg("good", [1000, 900, 820, 760])])
    assert "infeasible" in next(r for r in rep.summary if r.config == "bad").flags


def test_per_size_standard_errors_give_intervals_and_resolve_or_not():
    se_small, se_big = 0.001, 0.2
    resolved = build_report([cfg("a", [4000, 2000, 1600, 1000], se=se_small), cfg("b", [3000, 1800, 1550, 1500], se=se_small)])
    assert resolved.resolved["best_ppl"] == [{"leader": "a", "other": "b", "resolved": True}]
    unresolved = build_report([cfg("a", [4000, 2000, 1600, 1000], se=se_big), cfg("b", [3000, 1800, 1550, 1100], se=se_big)])
    assert unresolved.resolved["best_ppl"][0]["resolved"] is False
    assert "not resolved against b" in unresolved.recommendation[0]
    low, high = unresolved.configs[0].sizes[-1].ppl_interval()
    assert low == pytest.approx(1000 * math.exp(-1.959964 * se_big), rel=1e-6) and high == pytest.approx(1000 * math.exp(1.959964 * se_big), rel=1e-6)
    # the law's interval includes the measured errors: wider than the jackknife alone
    plain = build_report([cfg("a", [4000, 2000, 1600, 1000]), cfg("b", [3000, 1800, 1550, 1100])])
    assert unresolved.laws["a"].alpha_high - unresolved.laws["a"].alpha_low > plain.laws["a"].alpha_high - plain.laws["a"].alpha_low
    assert unresolved.laws["a"].measured_se and not plain.laws["a"].measured_se


def test_effective_rank_relation_conclusion_table_and_pareto_front():
    configs = [cfg("hi_er", [3000, 1800, 1500, 1400], p1=2000, er=(0.9, 0.9, 0.9, 0.95)),
               cfg("mid_er", [3100, 1900, 1600, 1500], p1=1000, er=(0.9, 0.9, 0.9, 0.85)),
               cfg("lo_er", [3200, 2000, 1700, 1600], p1=1500, er=(0.9, 0.9, 0.9, 0.75))]  # fmt: skip
    for c, v in zip(configs, ([5.0, 2500], [6.0, 1500], [7.0, 2000])):
        c.values = v
    rep = build_report(configs, meta={"objectives": ["ppl_at_10M", "total_params"], "directions": ["minimize", "minimize"]})
    assert rep.er_relation["spearman"] == pytest.approx(-1.0)
    assert [r["config"] for r in rep.er_relation["rows"]] == ["hi_er", "mid_er", "lo_er"]
    crit = {c["criterion"]: c for c in rep.conclusions}
    assert set(crit) == {"absolute PPL", "data efficiency", "PPL at 10M tokens", "cost-performance"}
    assert crit["absolute PPL"]["config"] == "hi_er" and "PPL 1400.0 at 8,000 tokens" in crit["absolute PPL"]["reason"]
    assert crit["cost-performance"]["config"] == "hi_er"  # the best PPL; mid_er, half the parameters, is 7.1% worse
    assert "lowest PPL at 8,000 tokens (1400.0" in crit["cost-performance"]["reason"]
    assert "no config with fewer parameters is within 5% of it (the closest, mid_er: 1500.0, +7.1% with 2.00× fewer)" in crit["cost-performance"]["reason"]
    assert [p["config"] for p in rep.pareto] == ["hi_er", "mid_er"]  # lo_er is dominated by mid_er
    assert rep.pareto[0]["ppl_target_low"] < rep.pareto[0]["ppl_target"] < rep.pareto[0]["ppl_target_high"]
    md = markdown(rep)
    for section in ("## Effective rank and PPL", "Spearman ρ = -1.00", "## Conclusion", "| cost-performance | hi_er |", "## Pareto front"):
        assert section in md, section


def test_cost_performance_is_the_fewest_parameters_within_5_percent_of_the_best_ppl():
    """A search-like study: many configs, the smallest of them bad. The pick does not depend
    on which config happens to be the smallest."""
    tiny_bad = cfg("tiny_bad", [9000, 8000, 7000, 6000], total_params=1_000)
    lean = cfg("lean", [3000, 1900, 1600, 1530], total_params=40_000, se=0.05)
    big = cfg("big", [2900, 1850, 1550, 1500], total_params=400_000, se=0.05)
    worse_big = cfg("worse_big", [3000, 2000, 1700, 1600], total_params=500_000)  # off the front
    pruned = cfg("pruned", [1000, 900], total_params=2_000)  # never reached the largest size: not compared
    bad = cfg("bad_but_infeasible", [1000, 900, 800, 700], total_params=5_000, infeasible="admissible.max_ppl_ratio: ...")
    rep = build_report([tiny_bad, lean, big, worse_big, pruned, bad])
    front = rep.rankings["cost_performance"]
    assert [(x["config"], x["pick"], x["best"]) for x in front] == [("tiny_bad", False, False), ("lean", True, False), ("big", False, True)]
    assert front[1]["ppl_vs_best"] == pytest.approx(0.02) and front[1]["tokens"] == 8000 and front[1]["count"] == "total"
    row = next(c for c in rep.conclusions if c["criterion"] == "cost-performance")
    assert row["config"] == "lean"
    assert row["reason"] == ("PPL 1530.0 at 8,000 tokens with 40.0k parameters: within 5% of the best, big (1500.0, +2.0%), "
                             "with 10.00× fewer parameters; the two are not resolved by the per-size standard errors")  # fmt: skip
    # the same study with its smallest config left out: the same pick (the old rule's reference moved)
    again = build_report([lean, big, worse_big])
    assert next(x for x in again.rankings["cost_performance"] if x["pick"])["config"] == "lean"
    # a lean config 6% worse is outside the tolerance: the best is the pick
    rep = build_report([cfg("lean6", [3000, 1900, 1600, 1590], total_params=40_000), big])
    assert next(x for x in rep.rankings["cost_performance"] if x["pick"])["config"] == "big"
    md = markdown(build_report([tiny_bad, lean, big]))
    assert "| cost-performance | lean |" in md and "lean ★ (0.04M, 1530.0, +2.0%)" in md


def test_header_names_date_versions_device_data_seeds_settings_and_times(tmp_path):
    """A crafted study (real SQLite) with a repeat: the header from the study's run record,
    the repeat counted and left out of the rows."""
    from archsearch.report import study_report
    from archsearch.report.render import markdown as md_of

    study = optuna.create_study(study_name="crafted", storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.set_user_attr("objectives", ["alpha"])
    study.set_user_attr("sampler", "tpe")
    study.set_user_attr("data_source", "wiki")
    study.set_user_attr("sizes", TOKENS)
    study.set_user_attr("size_unit", "tokens")
    study.set_user_attr("runs", [{"date": "2026-12-01 09:00 UTC", "archsearch_version": "0.1.0", "engine_version": 4,
                                  "data_fingerprint": "abc123", "seeds": [42, 43], "settings": {"phase2.max_epochs": 4},
                                  "seconds": 100.0, "trial_seconds": 80.0}])  # fmt: skip
    from archsearch.result import SizeRecord

    sizes = [SizeRecord(size=t, size_unit="tokens", train_tokens=t, val_tokens=2000, val_loss=math.log(p), val_loss_se=0.01,
                        val_ppl=p, val_acc=0.05, params={"phase1": 1000, "phase2": 500, "total": 1500}, seconds=1.0,
                        device="cpu", precision="fp32", seeds=[42], metrics={"val_er": 0.9}).to_dict()
             for t, p in zip(TOKENS, [4000, 2000, 1600, 1500])]  # fmt: skip
    for i, attrs in enumerate([{"config_name": "a"}, {"config_name": "a", "repeat_of": 0}]):
        t = study.ask({"num_layers": optuna.distributions.IntDistribution(1, 3)})
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        t.set_user_attr("sizes", sizes)
        t.set_user_attr("device", "cpu")
        t.set_user_attr("wall_seconds", 40.0)
        study.tell(t, -0.5)
    rep = study_report(study, "sqlite:///x")
    assert [c.name for c in rep.configs] == ["a"] and rep.meta["repeats"] == 1
    assert rep.configs[0].sizes[0].val_er == 0.9 and rep.configs[0].sizes[0].val_loss_se == 0.01  # the SizeRecord layout
    md = md_of(rep)
    for text in ("| Report written | 20", "2026-12-01 09:00 UTC (100 s for the command, 80 s of it in trials)", "0.1.0 / engine 4",
                 "| Device(s) | cpu |", "fingerprint abc123", "| Seeds | 42, 43 (each size's PPL is the geometric mean", "`phase2.max_epochs=4`", "1 of these trials are repeats",
                 "| Sizes | 1,000, 2,000, 4,000, 8,000 tokens |", "40 s in all"):  # fmt: skip
        assert text in md, text


def _one_trial_study(tmp_path, device: str, runs=None):
    """A study (real SQLite) with one complete trial on ``device`` and its run records: those
    given, or the one `archsearch run` writes (search.runner._record_run)."""
    from types import SimpleNamespace as NS

    from archsearch.result import SizeRecord
    from archsearch.search.runner import _record_run
    from archsearch.space import parse_space

    tmp_path.mkdir()
    study = optuna.create_study(study_name="one", storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    if runs is None:
        space = parse_space({"data": {"source": "wiki", "sizes": {"tokens": TOKENS}}})
        _record_run(study, space, NS(fingerprint="f" * 16), 0.0, 1.0, NS(outcomes=[], repeats=0, exhausted=None))
    else:
        study.set_user_attr("runs", runs)
    sizes = [SizeRecord(size=t, size_unit="tokens", train_tokens=t, val_tokens=2000, val_loss=math.log(p), val_loss_se=0.01,
                        val_ppl=p, val_acc=0.05, params={"phase1": 1000, "phase2": 500, "total": 1500}, seconds=1.0,
                        device=device, precision="fp32", seeds=[42]).to_dict()
             for t, p in zip(TOKENS, [4000, 2000, 1600, 1500])]  # fmt: skip
    t = study.ask({"num_layers": optuna.distributions.IntDistribution(1, 3)})
    t.set_user_attr("config_name", "a")
    t.set_user_attr("sizes", sizes)
    t.set_user_attr("device", device)
    study.tell(t, -0.5)
    return study


def test_the_header_names_the_engine_version_of_gpu_runs(tmp_path):
    """A run records CVFP's engine version and its GPU paths' (both in a GPU run's cache key);
    the header shows the GPU paths' version when the study has GPU trials, says when an older
    run record lacks it, and leaves it out for CPU trials."""
    from archsearch.report import study_report
    from archsearch.report.render import header
    from archsearch.runcache import ENGINE_VERSION, GPU_ENGINE_VERSION

    gpu = study_report(_one_trial_study(tmp_path / "gpu", "NVIDIA H200"))
    assert gpu.meta["runs"][-1]["gpu_engine_version"] == GPU_ENGINE_VERSION  # in the JSON report too
    assert f"/ engine {ENGINE_VERSION}, GPU paths {GPU_ENGINE_VERSION} |" in "\n".join(header(gpu))
    cpu = "\n".join(header(study_report(_one_trial_study(tmp_path / "cpu", "cpu"))))
    assert f"/ engine {ENGINE_VERSION} |" in cpu and "GPU paths" not in cpu
    old = [{"archsearch_version": "0.1.0", "engine_version": 4, "seconds": 1.0, "trial_seconds": 1.0}]
    older = "\n".join(header(study_report(_one_trial_study(tmp_path / "old", "NVIDIA H200", runs=old))))
    assert "0.1.0 / engine 4, GPU paths not recorded" in older


def test_the_report_rejudges_admissibility_against_the_final_best(tmp_path):
    """A crafted search (real SQLite) as the bridge records it with admissible: {max_ppl_ratio:
    1.5}: the first trial was admitted against itself, the third was not; against the final
    best the first is above the ratio too: flagged as admitted only because it came early and
    ranked with the infeasible ones."""
    from archsearch.report import study_report
    from archsearch.report.render import markdown as md_of
    from archsearch.result import SizeRecord

    study = optuna.create_study(study_name="adm", storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.set_user_attr("objectives", ["alpha"])
    study.set_user_attr("sampler", "tpe")
    best = None
    for name, final, a in (("early", 2000.0, 0.9), ("good", 1000.0, 0.4), ("late", 1800.0, 0.8), ("close", 1400.0, 0.5)):
        sizes = [SizeRecord(size=t, size_unit="tokens", train_tokens=t, val_tokens=2000, val_loss=math.log(p), val_loss_se=0.01,
                            val_ppl=p, val_acc=0.05, params={"phase1": 1000, "phase2": 500, "total": 1500}, seconds=1.0,
                            device="cpu", precision="fp32", seeds=[42], metrics={"val_er": 0.9}).to_dict()
                 for t, p in zip(TOKENS, [final * (TOKENS[-1] / t) ** a for t in TOKENS])]  # fmt: skip
        best = final if best is None else min(best, final)
        t = study.ask({"num_layers": optuna.distributions.IntDistribution(1, 9)})
        t.set_user_attr("config_name", name)
        t.set_user_attr("sizes", sizes)
        t.set_user_attr("final_ppl", final)
        t.set_user_attr("admissibility", {"final_ppl": final, "best_final_ppl": best, "ppl_ratio": final / best, "max_ppl_ratio": 1.5})
        if final / best > 1.5:
            t.set_user_attr("infeasible", f"admissible.max_ppl_ratio: its PPL at the largest size ({final:.1f}) is {final / best:.2f}x ...")
        study.tell(t, -a)  # the worse, the steeper: early has the best alpha
    rep = study_report(study, "sqlite:///x")
    by = {c.name: c for c in rep.configs}
    assert by["late"].infeasible and by["late"].admitted_early is None  # judged infeasible when it finished
    assert by["good"].admitted_early is None and by["close"].admitted_early is None  # 1.4x the final best: still within 1.5
    assert by["early"].admitted_early == ("admitted only because it came early: its PPL at the largest size (2000.0) was 1.00x the best "
                                          "when it finished (2000.0), but is 2.00x the study's final best (1000.0), above admissible.max_ppl_ratio 1.5")  # fmt: skip
    # the top 3 by alpha, feasible first: early's steepest alpha no longer puts it first
    assert [c.name for c in study_report(study, "sqlite:///x", top=3).configs] == ["close", "good", "early"]
    assert "admitted early" in next(r for r in rep.summary if r.config == "early").flags
    md = md_of(rep)
    assert "early: admitted only because it came early" in md and "`admitted early` the admissibility rule admitted it" in md


def test_pareto_plot_draws_the_front_with_intervals(tmp_path):
    from archsearch.report.render import plot_pareto

    study = optuna.create_study(directions=["minimize", "minimize"])
    for ppl, params in ((300.0, 2e6), (350.0, 1e6), (400.0, 3e6)):
        t = study.ask()
        t.set_user_attr("ppl_at_target_low", ppl * 0.8)
        t.set_user_attr("ppl_at_target_high", ppl * 1.25)
        study.tell(t, [ppl, params])
    rep = build_report([], meta={"objectives": ["ppl_at_10M", "total_params"]})
    path = plot_pareto(rep, study, tmp_path / "pareto.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_settings_table_is_per_family_with_the_familys_own_field_names():
    """A cross-family study: a gpt trial also records CVFP's searched fields (context_dim); its
    row shows its own fields (d_model, mlp_ratio, ...), never CVFP's columns."""
    from archsearch.report.render import markdown as md_of

    c = cfg("cvfp_a", [3000, 1800, 1500, 1400])
    c.params = {"num_layers": 2, "context_dim": 384, "num_input_tokens": 1, "family": "cvfp", "mlp_ratio": 3.6}
    g1 = cfg("gpt_a", [2000, 1500, 1300, 1200], family="gpt", model={"family": "gpt", "num_layers": 1, "d_model": 384, "n_heads": 6,
             "mlp_ratio": 1.67, "context_length": 256, "lr": 0.001, "dropout": 0.1})  # fmt: skip
    g1.params = {"num_layers": 1, "context_dim": 547, "num_input_tokens": 1, "family": "gpt", "mlp_ratio": 1.67}
    g2 = cfg("gpt_b", [2100, 1600, 1350, 1250], family="gpt", model={"family": "gpt", "num_layers": 2, "d_model": 384, "n_heads": 6,
             "mlp_ratio": 3.84, "context_length": 256, "lr": 0.001, "dropout": 0.1})  # fmt: skip
    g2.params = {"num_layers": 2, "context_dim": 547, "num_input_tokens": 1, "family": "gpt", "mlp_ratio": 3.84}
    rep = build_report([c, g1, g2])
    rows = {r["config"]: r for r in rep.settings}
    assert rows["cvfp_a"] == {"config": "cvfp_a", "family": "cvfp", "num_layers": 2, "context_dim": 384, "num_input_tokens": 1, "embed_dim": 384}
    # gpt: searched (num_layers, mlp_ratio) and away from its defaults (d_model, n_heads, context_length, dropout); lr is the default
    assert rows["gpt_a"] == {"config": "gpt_a", "family": "gpt", "num_layers": 1, "d_model": 384, "n_heads": 6, "mlp_ratio": 1.67,
                             "context_length": 256, "dropout": 0.1}  # fmt: skip
    md = md_of(rep)
    assert "**gpt**\n\n| Config | num_layers | d_model | n_heads | mlp_ratio | context_length | dropout |" in md
    assert "| gpt_a | 1 | 384 | 6 | 1.67 | 256 | 0.1 |" in md and "| cvfp_a | 2 | 384 | 1 | 384 |" in md
    # an older study (no model config recorded): the searched values, still only the family's fields
    g1.model = None
    assert {k for k in build_report([c, g1]).settings[1]} == {"config", "family", "num_layers", "mlp_ratio"}
    # a user family this machine cannot load: its recorded fields as they are
    u = cfg("mine", [2000, 1500, 1300, 1200], family="lstm_not_here", model={"family": "lstm_not_here", "hidden": 64})
    u.params = {"hidden": 64}
    assert build_report([u]).settings == [{"config": "mine", "family": "lstm_not_here", "hidden": 64}]


BAD_REFERENCES = {  # a --compare FILE's content -> what the message says
    "deep": ("[" * 100_000, "nested too deeply"),
    "binary": (b"\x00\xff\xfe" * 10, "not UTF-8"),
    "text": ("root:x:0:0:root:/root:/bin/bash\n", "not JSON (Expecting value at line 1, column 1)"),
    "no sizes": ('{"configs": 5}', "configs: expected an object by config name"),
    "bad rows": ('{"sizes": {"a": [{"tokens": -1, "ppl": "x"}, 3], "b": []}}', "sizes.a[0].tokens: expected a finite number > 0"),
    "nan": ('{"sizes": {"a": [{"tokens": 1000, "ppl": NaN}]}}', "sizes.a[0].ppl: expected a finite number > 0, got nan"),
}


@pytest.mark.parametrize("case", sorted(BAD_REFERENCES))
def test_a_bad_file_of_published_numbers_is_a_config_error_naming_it(case, tmp_path):
    from archsearch.errors import ConfigError
    from archsearch.report.sources import read_reference

    content, needle = BAD_REFERENCES[case]
    path = tmp_path / "ref.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as e:
        read_reference(path)
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)


def test_a_file_of_published_numbers_too_large_is_refused_unread(tmp_path, monkeypatch):
    from archsearch.errors import ConfigError
    from archsearch.report import sources

    path = tmp_path / "ref.json"
    path.write_text(json.dumps(json.loads(sources.REFERENCE.read_text())))  # a good file ...
    monkeypatch.setattr(sources, "REFERENCE_MAX_BYTES", path.stat().st_size - 1)  # ... one byte over the limit
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("read"))
    with pytest.raises(ConfigError, match="bytes; a file of published numbers may have at most"):
        sources.read_reference(path)


def test_report_compare_with_a_bad_file_is_a_usage_error_that_writes_nothing(tmp_path):
    """A tampered or wrong --compare file: exit 2 naming it, no traceback, no report folder."""
    import shutil

    from helpers import ROOT

    db = tmp_path / "s.db"
    shutil.copy(ROOT / "tests" / "fixtures" / "study_flat_records.db", db)
    bad = tmp_path / "ref.json"
    bad.write_text("[" * 100_000)
    out = tmp_path / "report"
    r = cli("report", "--storage", f"sqlite:///{db}", "--out", str(out), "--compare", str(bad), env={"ARCHSEARCH_HOME": str(tmp_path / "home")})
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"--compare {bad}: not usable JSON (nested too deeply)" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
