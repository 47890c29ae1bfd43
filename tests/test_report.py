"""Reports: the data function on the report's own numbers, and a report from a real study."""

from __future__ import annotations

import json

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
    assert r["ppl_per_parameter"][0]["config"] == "input_tokens_2"  # the report's "cost performance"
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

    assert "## Summary" in optuna_dashboard.get_note(study)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert any(k.startswith("dashboard:plot_data:archsearch-scaling") for k in attrs)
