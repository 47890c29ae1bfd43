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


@pytest.mark.parametrize("form", ["path", "mapping", "space"])
def test_load_gives_overrides_the_meaning_the_commands_give(form):
    """README: an override means the same in run, validate, trial and the Python API. A run
    field's override replaces each named config's value (and notes it) whether the space is
    a path, a mapping (the YAML as a dict: once left to shadow the override) or a Space."""
    import yaml

    path = ROOT / "spaces" / "quickstart.yaml"
    space = {"path": str(path), "mapping": yaml.safe_load(path.read_text()), "space": archsearch.load(path)}[form]
    for overrides in (["model.num_layers=3"], {"model.num_layers": 3}):
        sp = archsearch.load(space, overrides)
        assert sorted(sp.configs) == ["baseline", "context_dim_96", "input_tokens_2"]  # layers_3 = baseline now
        assert {p["num_layers"] for p in sp.configs.values()} == {3}
        assert sp.notes[0].startswith("model.num_layers=3: replaces the value of sampler.configs baseline (2)")
        assert sp.merged == {"layers_3": "baseline"}


def test_run_with_bad_overrides_raises_and_writes_nothing(tmp_path, home, tiny_corpus):
    with pytest.raises(ConfigError) as e:
        archsearch.run(tiny_space(tiny_corpus), overrides={"phase1.lr": -1, "max_concurrent": 0})
    assert "phase1.lr" in str(e.value) and "max_concurrent" in str(e.value)
    assert list(home.iterdir()) == []


def test_results_of_an_unknown_study_names_it(home):
    with pytest.raises(ConfigError, match="no such study storage"):
        archsearch.results("nope")


def test_run_quietly_then_read_results_as_a_dataframe(home, tiny_corpus, capfd, ray_in_process):
    space = tiny_space(tiny_corpus, study={"name": "api"}, model={"gpt": {"d_model": 16, "n_heads": 2, "context_length": 16, "batch_size": 16}})
    space["sampler"]["configs"]["g"] = {"family": "gpt", "num_layers": 1}  # a grid of both families
    capfd.readouterr()
    summary = archsearch.run(space, overrides=["phase2.max_epochs=1"])
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # quiet: nothing printed, not even by Ray or Optuna

    # the summary `archsearch run --json` writes
    assert set(summary) == {"study", "storage", "seconds", "interrupted", "counts", "queued", "failed_stale", "timings", "trials", "repeats", "exhausted", "gpu_sharing"}
    assert summary["study"] == "api" and summary["counts"] == {"COMPLETE": 3} and not summary["interrupted"]
    assert summary["repeats"] == 0 and summary["exhausted"] is None  # a queue of three distinct configs
    assert summary["gpu_sharing"] is None  # resources.gpus 0: nothing for auto to decide
    assert sorted(t["name"] for t in summary["trials"]) == ["a", "b", "g"]
    json.dumps(summary)  # plain data

    df = archsearch.results("api")
    assert len(df) == 3 * 3  # 3 trials x 3 sizes
    dtypes = {c: str(t) for c, t in df.dtypes.items()}
    assert {k: dtypes[k] for k in ("trial", "config", "family", "num_layers", "context_dim", "state", "size", "tokens", "ppl", "acc",
                                   "er", "alpha", "alpha_low", "alpha_high", "value_alpha", "phase1_params", "total_params", "cached",
                                   "capped", "capped_by")} == {
        "trial": "int64", "config": "string", "family": "string", "num_layers": "Int64", "context_dim": "Int64", "state": "category",
        "size": "Int64", "tokens": "Int64", "ppl": "float64", "acc": "float64", "er": "float64", "alpha": "float64",
        "alpha_low": "float64", "alpha_high": "float64", "value_alpha": "float64", "phase1_params": "Int64", "total_params": "Int64",
        "cached": "boolean", "capped": "boolean", "capped_by": "string"}  # fmt: skip
    assert list(df.columns[:4]) == ["trial", "config", "family", "num_layers"] and "family" not in df.columns[3:]
    assert set(df["state"]) == {"COMPLETE"} and set(df["size_unit"]) == {"tokens"}
    assert {c: set(rows["family"]) for c, rows in df.groupby("config")} == {"a": {"cvfp"}, "b": {"cvfp"}, "g": {"gpt"}}
    assert df.groupby("config")["tokens"].apply(list).to_dict() == {c: [400, 800, 1600] for c in "abg"}
    for name, rows in df.groupby("config"):
        law = archsearch.fit(list(rows["tokens"]), list(rows["ppl"]))  # the trial's alpha is the fit of its rows
        assert rows["alpha"].iloc[0] == pytest.approx(law.alpha) and rows["value_alpha"].iloc[0] == pytest.approx(law.alpha)
        assert rows["alpha_low"].iloc[0] < law.alpha < rows["alpha_high"].iloc[0]
        assert rows["num_layers"].iloc[0] == {"a": 1, "b": 2, "g": 1}[name]
    cvfp, gpt = df[df["family"] == "cvfp"], df[df["family"] == "gpt"]
    assert (df["acc"].between(0, 1)).all() and (df["total_params"] > 0).all() and not math.isnan(df["ppl"].min())
    # CVFP's own numbers are there for its rows; a GPT has no phases and no effective rank
    assert (cvfp["er"] > 0).all() and (cvfp["phase1_params"] > 0).all()
    assert gpt["er"].isna().all() and gpt["phase1_params"].isna().all()
    import optuna

    # capped follows each size's flags (tiny runs stop at max_epochs=1 while improving)
    for t in optuna.load_study(study_name="api", storage=summary["storage"]).trials:
        rows = df[df["trial"] == t.number]
        assert list(rows["capped_by"]) == [",".join(s["capped"]) for s in t.user_attrs["sizes"]]
        assert list(rows["capped"]) == [bool(s["capped"]) for s in t.user_attrs["sizes"]]
    # the same study through an optuna.Study object
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


def _uninstalled_copy(tmp_path):
    """A copy of the source tree and a view of this environment's packages without
    archsearch's own metadata or editable finder: what a GPU host running a copied
    checkout sees. Python runs with -S (no site: no .pth, no editable install)."""
    import shutil
    import site
    import sysconfig

    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "archsearch", tree / "archsearch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    deps = tmp_path / "deps"
    deps.mkdir()
    for sp in dict.fromkeys([sysconfig.get_paths()["purelib"], *site.getsitepackages()]):
        for entry in __import__("pathlib").Path(sp).iterdir():
            name = entry.name.lower()
            if name.startswith(("archsearch", "__editable__")) or (deps / entry.name).exists():
                continue
            (deps / entry.name).symlink_to(entry)
    env = {"PYTHONPATH": f"{tree}:{deps}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return tree, env


def test_version_of_a_source_tree_without_installed_metadata(tmp_path):
    import tomllib

    tree, env = _uninstalled_copy(tmp_path)
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] + "+src"

    def py(code: str) -> str:
        r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout.strip()

    check = ("import importlib.metadata as m, archsearch\n"
             "try:\n    m.version('archsearch'); print('installed')\nexcept m.PackageNotFoundError:\n    print('none')\n"
             "print(archsearch.__file__); print(archsearch.__version__)")  # fmt: skip
    found, where, ver = py(check).splitlines()
    assert found == "none" and where.startswith(str(tree))  # the copy, with no metadata anywhere on the path
    assert ver == expected
    assert py("from archsearch.cli import app; app(['--version'])") == f"archsearch {expected}"
    # the run record of the report's header (it raised "No package metadata" before)
    record = ("from types import SimpleNamespace as NS\n"
              "from archsearch.search.runner import _record_run\nfrom archsearch.space import parse_space\n"
              "class Study:\n    user_attrs = {}\n    def set_user_attr(self, k, v): self.user_attrs[k] = v\n"
              "st = Study()\n"
              "_record_run(st, parse_space({'data': {'source': 'wiki', 'sizes': {'tokens': [1000, 2000]}}}), NS(fingerprint='f' * 16), 0.0, 1.0, NS(outcomes=[], repeats=0, exhausted=None))\n"
              "print(st.user_attrs['runs'][-1]['archsearch_version'])")  # fmt: skip
    assert py(record) == expected


def test_results_of_a_study_written_before_families(tmp_path):
    """Studies from before families and cap flags read as cvfp, not capped."""
    import shutil

    db = tmp_path / "old.db"
    shutil.copy(ROOT / "tests" / "fixtures" / "study_flat_records.db", db)
    df = archsearch.results("quickstart", storage=f"sqlite:///{db}")
    assert len(df) == 4 * 4 and set(df["family"]) == {"cvfp"} and not df["capped"].any() and set(df["capped_by"]) == {""}
    assert df.loc[df["config"] == "baseline", "alpha"].iloc[0] == pytest.approx(-0.7102, abs=1e-4)


def test_results_mark_repeats_so_one_trial_per_config_can_be_kept(tmp_path):
    """A study (real SQLite) where config "a" was interrupted after two sizes, then completed,
    then proposed again (a repeat, told the original's value, no sizes of its own): the rows of
    its COMPLETE, non-repeat trial are one set of sizes, and fit to the trial's alpha; all of
    "a"'s rows together hold the failed attempt's sizes twice."""
    import optuna

    from archsearch.result import SizeRecord

    study = optuna.create_study(study_name="r", storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.set_user_attr("objectives", ["alpha"])
    tokens, ppl = [1000, 2000, 4000], [900.0, 700.0, 560.0]
    sizes = [SizeRecord(size=t, size_unit="tokens", train_tokens=t, val_tokens=500, val_loss=math.log(p), val_loss_se=0.01, val_ppl=p,
                        val_acc=0.05, params={"phase1": 10, "phase2": 5, "total": 15}, seconds=1.0, device="cpu", precision="fp32",
                        seeds=[42]).to_dict() for t, p in zip(tokens, ppl)]  # fmt: skip
    dist = {"num_layers": optuna.distributions.IntDistribution(1, 3)}
    alpha = archsearch.fit(tokens, ppl).alpha
    for attrs, state in (({"sizes": sizes[:2]}, "FAIL"), ({"sizes": sizes, "alpha": alpha}, "COMPLETE"), ({"repeat_of": 1}, "COMPLETE")):
        t = study.ask(dist)
        t.set_user_attr("config_name", "a")
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        study.tell(t, alpha if state == "COMPLETE" else None, state=optuna.trial.TrialState[state])
    df = archsearch.results(study)
    assert str(df["repeat_of"].dtype) == "Int64" and list(df["repeat_of"].dropna()) == [1]
    assert sorted(df[df.config == "a"]["tokens"].dropna()) == [1000, 1000, 2000, 2000, 4000]
    done = df[(df.state == "COMPLETE") & df.repeat_of.isna()]
    assert list(done["tokens"]) == tokens and list(done["trial"].unique()) == [1]
    assert archsearch.fit(done.tokens, done.ppl).alpha == pytest.approx(done["alpha"].iloc[0])
