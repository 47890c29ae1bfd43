"""The Python API as a notebook user calls it: ``import archsearch`` is cheap, ``run`` prints
nothing and returns the summary ``run --json`` writes, ``results`` is a typed DataFrame with
one row per trial x size, ``fit`` is the CLI's fit."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from helpers import ROOT, tiny_space

import archsearch
from archsearch.errors import ConfigError, FitError


@pytest.fixture(scope="module")
def ray_in_process():
    """archsearch.run starts Ray in the calling process (as in a notebook); stop it after."""
    yield
    import ray

    ray.shutdown()


def test_import_is_cheap_and_has_a_version():
    code = ("import sys, archsearch; print(archsearch.__version__); "
            "print(sorted(m for m in ('torch', 'ray', 'optuna', 'pandas', 'mlflow') if m in sys.modules)); "
            "print(sorted(a for a in ('run', 'results', 'fit', '__version__') if a in dir(archsearch)))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout.splitlines()
    import tomllib

    assert out[0] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert out[1] == "[]"  # nothing heavy on import
    assert out[2] == "['__version__', 'fit', 'results', 'run']"


def test_space_parsing_tracking_and_notes_import_no_tracker_ray_or_optuna():
    code = ("import sys, archsearch.space, archsearch.tracking, archsearch.search.notes; "
            "print(sorted(m for m in ('torch', 'ray', 'optuna', 'mlflow', 'wandb', 'tensorboard') if m in sys.modules))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip() == "[]"


def test_fit_is_the_power_law_fit():
    tokens = [1000, 2000, 4000, 8000]
    law = archsearch.fit(tokens, [500 * t**-0.3 for t in tokens])
    assert law.alpha == pytest.approx(-0.3) and law.A == pytest.approx(500) and law.r2 == pytest.approx(1.0)
    assert law.extrapolate(1e6).ppl == pytest.approx(500 * 1e6**-0.3)
    with pytest.raises(FitError, match="at least two sizes"):
        archsearch.fit([1000], [10.0])


def test_run_with_bad_overrides_raises_and_writes_nothing(tmp_path, home, tiny_corpus):
    with pytest.raises(ConfigError) as e:
        archsearch.run(tiny_space(tiny_corpus), overrides={"phase1.lr": -1, "max_concurrent": 0})
    assert "phase1.lr" in str(e.value) and "max_concurrent" in str(e.value)
    assert list(home.iterdir()) == []


def test_results_of_an_unknown_study_names_it(home):
    with pytest.raises(ConfigError, match="no such study storage"):
        archsearch.results("nope")


def test_run_quietly_then_read_results_as_a_dataframe(home, tiny_corpus, capfd, ray_in_process):
    space = tiny_space(tiny_corpus, study={"name": "api"})
    capfd.readouterr()
    summary = archsearch.run(space, overrides=["phase2.max_epochs=1"])
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # quiet: nothing printed, not even by Ray or Optuna

    # the summary `archsearch run --json` writes
    assert set(summary) == {"study", "storage", "seconds", "interrupted", "counts", "queued", "failed_stale", "timings", "trials", "repeats", "exhausted"}
    assert summary["study"] == "api" and summary["counts"] == {"COMPLETE": 2} and not summary["interrupted"]
    assert summary["repeats"] == 0 and summary["exhausted"] is None  # a queue of two distinct configs
    assert sorted(t["name"] for t in summary["trials"]) == ["a", "b"]
    json.dumps(summary)  # plain data

    df = archsearch.results("api")
    assert len(df) == 2 * 3  # 2 trials x 3 sizes
    dtypes = {c: str(t) for c, t in df.dtypes.items()}
    assert {k: dtypes[k] for k in ("trial", "config", "num_layers", "context_dim", "state", "size", "tokens", "ppl", "acc", "er",
                                   "alpha", "alpha_low", "alpha_high", "value_alpha", "phase1_params", "cached")} == {
        "trial": "int64", "config": "string", "num_layers": "Int64", "context_dim": "Int64", "state": "category", "size": "Int64",
        "tokens": "Int64", "ppl": "float64", "acc": "float64", "er": "float64", "alpha": "float64", "alpha_low": "float64",
        "alpha_high": "float64", "value_alpha": "float64", "phase1_params": "Int64", "cached": "boolean"}  # fmt: skip
    assert list(df.columns[:6]) == ["trial", "config", "num_layers", "context_dim", "num_input_tokens", "state"]
    assert set(df["state"]) == {"COMPLETE"} and set(df["size_unit"]) == {"tokens"}
    assert df.groupby("config")["tokens"].apply(list).to_dict() == {"a": [400, 800, 1600], "b": [400, 800, 1600]}
    for name, rows in df.groupby("config"):
        law = archsearch.fit(list(rows["tokens"]), list(rows["ppl"]))  # the trial's alpha is the fit of its rows
        assert rows["alpha"].iloc[0] == pytest.approx(law.alpha) and rows["value_alpha"].iloc[0] == pytest.approx(law.alpha)
        assert rows["alpha_low"].iloc[0] < law.alpha < rows["alpha_high"].iloc[0]
        assert rows["num_layers"].iloc[0] == {"a": 1, "b": 2}[name]
    assert (df["acc"].between(0, 1)).all() and (df["er"] > 0).all() and (df["phase1_params"] > 0).all()
    assert not math.isnan(df["ppl"].min())
    # the same study through an optuna.Study object
    import optuna

    assert archsearch.results(optuna.load_study(study_name="api", storage=summary["storage"])).shape == df.shape


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path):
    import re

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API\n.*?```python\n(.*?)```", readme, re.S).group(1)
    env = dict(__import__("os").environ, ARCHSEARCH_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "{'COMPLETE': 4}" and lines[-1] == archsearch.__version__
    assert any(line.startswith("alpha = -") for line in lines)
