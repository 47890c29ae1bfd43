"""Families through ``archsearch run`` (real Ray, real SQLite): a user's family named by
module:attr, a multi-objective search over cvfp and gpt in one study and its report, and the
usage errors (exit 2, nothing written)."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from helpers import ROOT, cli, read_trials, write_space
from optuna.trial import TrialState

from archsearch.config import run_param_counts
from archsearch.space import known_embed_dim, known_vocab_size, load_space, parse_space


def _tiny_data(corpus: dict) -> dict:
    return {"source": "files", "paths": corpus["paths"], "tokenizer": corpus["tokenizer"], "cache_dir": corpus["cache_dir"],
            "sizes": {"tokens": [400, 800, 1600]}, "val_tokens": 300}  # fmt: skip


def _shipped(path: str, corpus: dict, **sections) -> dict:
    """A shipped space file on the tiny corpus (the rest as shipped)."""
    raw = yaml.safe_load((ROOT / path).read_text())
    raw.update(data=_tiny_data(corpus), **sections)
    return raw


def test_user_family_by_module_attr_runs_through_archsearch_run(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "lstm.yaml", _shipped("examples/lstm_space.yaml", tiny_corpus))
    r = cli("run", str(space), "--quiet", "--json", str(tmp_path / "run.json"), env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    trials = read_trials(home / "archsearch.db", "lstm_example")
    assert sorted(t.user_attrs["config_name"] for t in trials) == ["lstm_32", "lstm_64"]
    from examples.lstm_family import LSTMConfig, param_counts

    for t in trials:
        assert t.state == TrialState.COMPLETE and t.user_attrs["family"] == "lstm"
        sizes = t.user_attrs["sizes"]
        assert [s["train_tokens"] for s in sizes] == [400, 800, 1600]
        assert all(math.isfinite(s["val_ppl"]) and s["val_loss_se"] > 0 for s in sizes)
        hidden = t.params["hidden"]
        assert t.user_attrs["total_params"] == param_counts(LSTMConfig(hidden=hidden, context_length=64, max_epochs=3), int(sizes[0]["metrics"]["embed_dim"]), 0)["total"]
        assert t.values == [pytest.approx(t.user_attrs["alpha"])]
    # the second run computes nothing: the run cache holds the family's runs
    r = cli("run", str(space), "--quiet", env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 0 and len(read_trials(home / "archsearch.db", "lstm_example")) == 2


def test_multi_objective_search_over_both_families_and_its_report(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "x.yaml", _shipped("spaces/cvfp_vs_gpt_tiny.yaml", tiny_corpus, n_trials=2))
    r = cli("run", str(space), "--quiet", env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    trials = read_trials(home / "archsearch.db", "cvfp_vs_gpt_tiny")
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    families = {t.user_attrs["config_name"]: t.user_attrs["family"] for t in trials}
    assert families["cvfp_small"] == "cvfp" and families["gpt_small"] == "gpt"
    sp = parse_space(yaml.safe_load(space.read_text()))
    for t in trials:
        assert t.user_attrs["family"] == t.params["family"]
        assert t.values == [pytest.approx(t.user_attrs["ppl_at_target"]), t.user_attrs["total_params"]]
        E = int(t.user_attrs["sizes"][0]["metrics"]["embed_dim"])
        assert t.user_attrs["total_params"] == run_param_counts(sp.run_config(t.params), E)["total_params"]

    out = tmp_path / "rep"
    r = cli("report", "--study", "cvfp_vs_gpt_tiny", "--out", str(out), "--quiet", env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    md = (out / "report.md").read_text()
    section = md.split("## By family")[1].split("## Settings")[0]
    rows = [line for line in section.splitlines() if line.startswith("| cvfp") or line.startswith("| gpt")]
    assert {line.split("|")[1].strip() for line in rows} == {"cvfp", "gpt"} and len(rows) == 4
    # Settings: one table per family, by its own field names (a gpt trial's recorded context_dim is CVFP's)
    settings = md.split("## Settings")[1].split("## Results per config")[0]
    gpt_table = settings.split("**gpt**")[1]
    head = next(line for line in gpt_table.splitlines() if line.startswith("| Config"))
    assert "d_model" in head and "mlp_ratio" in head and "context_length" in head and "context_dim" not in head, head
    assert "| gpt_small | 1 | 64 | 2.0 | 64 | 0.003 | 16 | 3 |" in gpt_table, gpt_table  # searched or away from gpt's defaults
    summary = json.loads((out / "summary.json").read_text())
    assert {r["family"] for r in summary["families"]} == {"cvfp", "gpt"}
    assert all(r["alpha_low"] <= r["alpha"] <= r["alpha_high"] for r in summary["families"])


def test_unknown_family_is_a_usage_error_naming_the_known_ones(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", {"model": {"family": "rwkv"}, "data": _tiny_data(tiny_corpus)})
    for cmd in ("validate", "run"):
        r = cli(cmd, str(space), env={"ARCHSEARCH_HOME": str(home)})
        assert r.returncode == 2 and "unknown family 'rwkv' (known: cvfp, gpt" in " ".join(r.stderr.split()), r.stderr
        assert "Traceback" not in r.stderr
    assert not home.exists()


def test_family_config_errors_list_every_key(tmp_path, tiny_corpus):
    space = write_space(tmp_path / "s.yaml", {
        "model": {"family": "gpt", "n_heads": 0, "dropout": 1.5},
        "sampler": {"type": "grid", "configs": {"a": {"d_model": 16, "context_dim": 8}, "b": {"family": "cvfp", "d_model": 4}}},
        "data": _tiny_data(tiny_corpus)})  # fmt: skip
    r = cli("validate", str(space), env={"ARCHSEARCH_HOME": str(tmp_path / "home")})
    assert r.returncode == 2, r.stderr
    for part in ("model.n_heads: must be >= 1", "model.dropout: must be <= 0.9", "sampler.configs.a.context_dim",
                 "sampler.configs.b.d_model"):  # fmt: skip
        assert part in " ".join(r.stderr.split()), r.stderr


def test_user_family_that_raises_on_import_writes_nothing(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    (tmp_path / "badfam.py").write_text("import torch\nraise ImportError('needs a package you do not have')\n")
    space = write_space(tmp_path / "s.yaml", {"model": {"family": f"{tmp_path / 'badfam.py'}:family"}, "data": _tiny_data(tiny_corpus)})
    r = cli("run", str(space), env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 2 and "badfam.py:family' raised on import: ImportError: needs a package" in " ".join(r.stderr.split()), r.stderr
    assert "Traceback" not in r.stderr and not home.exists()


def test_shipped_family_spaces_validate_with_matched_parameter_counts():
    sp = load_space(ROOT / "spaces/cvfp_vs_gpt_offline.yaml")
    E, V = known_embed_dim(sp.data), known_vocab_size(sp.data)
    counts = {n: run_param_counts(sp.run_config(c), E, V)["total_params"] for n, c in sp.configs.items()}
    for budget in ("1.2M", "3.6M", "8.0M"):
        a, b = counts[f"cvfp_{budget}"], counts[f"gpt_{budget}"]
        assert abs(a - b) / a < 0.001, (budget, a, b)
    assert {sp.run_config(c).family for c in sp.configs.values()} == {"cvfp", "gpt"}
    assert sp.data.sizes == [62891, 122795, 240132, 587970] and sp.data.source == "wiki"
    tiny = load_space(ROOT / "spaces/cvfp_vs_gpt_tiny.yaml")
    assert [o.label for o in tiny.objectives] == ["ppl_at_1M", "total_params"] and tiny.families == ["cvfp", "gpt"]
    assert load_space(ROOT / "examples/lstm_space.yaml").base.family == "examples.lstm_family:family"


def test_user_family_breaking_param_counts_fails_before_the_study_is_written(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    (tmp_path / "countless.py").write_text(
        "from examples.lstm_family import LSTMConfig, train\n"
        "from archsearch.families import Family\n"
        "family = Family(name='countless', config=LSTMConfig, param_counts=lambda cfg, E, V: {'lstm': 3}, train=train)\n"
    )
    space = write_space(tmp_path / "s.yaml", {"model": {"family": f"{tmp_path / 'countless.py'}:family"}, "data": _tiny_data(tiny_corpus),
                                               "resources": {"gpus": 0, "cpus": 1}})  # fmt: skip
    r = cli("run", str(space), "--quiet", env={"ARCHSEARCH_HOME": str(home)})
    err = " ".join(r.stderr.split())  # the console wraps long lines
    assert r.returncode == 2 and "param_counts must return a dict of integer counts with 'total'" in err, r.stdout + r.stderr
    assert "countless.py:family" in err and "Traceback" not in err
    assert not (home / "archsearch.db").exists()
