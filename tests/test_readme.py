"""The README's two commands are the ones CI and users run, and the quickstart works."""

from __future__ import annotations

import re

import optuna
import pytest
from helpers import ROOT, cli
from optuna.trial import TrialState

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(b.strip() for b in BLOCKS if "pytest" in b)
    # .ci/run adds only -q (quiet output) to the README's command
    assert test_cmd.replace("pytest --runslow", "pytest --runslow -q").replace("pip install -e", "pip install -q -e") in ci


def test_readme_main_command_is_the_quickstart():
    assert "archsearch run spaces/quickstart.yaml" in BLOCKS[0]


@pytest.mark.slow
def test_quickstart_runs_the_grid(tmp_path):
    r = cli("run", "spaces/quickstart.yaml", "--quiet", env={"ARCHSEARCH_HOME": str(tmp_path)}, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path / 'archsearch.db'}")
    trials = study.get_trials()
    assert sorted(t.user_attrs["config_name"] for t in trials) == ["baseline", "context_dim_96", "input_tokens_2", "layers_3"]
    assert all(t.state == TrialState.COMPLETE and len(t.user_attrs["sizes"]) == 4 for t in trials)
    assert "archsearch dashboard --storage" in r.stdout


def test_readme_quickstart_table_is_the_committed_report():
    """The README's quickstart numbers are docs/quickstart's (regenerated together)."""
    import json
    import re

    summary = json.loads((ROOT / "docs" / "quickstart" / "summary.json").read_text())
    readme = (ROOT / "README.md").read_text()
    report = (ROOT / "docs" / "quickstart" / "report.md").read_text()
    laws = summary["laws"]
    assert len(laws) == 4
    for name, law in laws.items():
        row = re.search(rf"^\| {name} \| [^|]+ \| \**(-?\d+\.\d{{4}})\** \| \[(-?\d+\.\d{{4}}), (-?\d+\.\d{{4}})\] \| (\d\.\d{{4}}) \|", readme, re.M)
        assert row, f"README has no quickstart row for {name}"
        assert [float(x) for x in row.groups()] == [round(law[k], 4) for k in ("alpha", "alpha_low", "alpha_high", "r2")], name
        assert f"| {name} | " in report and f"{law['alpha']:.4f}" in report
