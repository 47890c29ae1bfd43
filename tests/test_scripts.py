"""Scripts run as a user runs them (subprocess, tiny budget), on the grid of a space file."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT, tiny_space, write_space

from archsearch.plan import prepare_space_data
from archsearch.space import parse_space


def test_accuracy_guard_runs_the_configs_of_its_space_file(tiny_corpus, tmp_path):
    space = tiny_space(tiny_corpus, sampler={"type": "grid", "configs": {"tiny": {"num_layers": 1, "context_dim": 4}}},
                       phase1={"batch_size": 200, "min_iterations": 2, "max_iterations": 3}, phase2={"batch_size": 64, "max_epochs": 1})  # fmt: skip
    data = prepare_space_data(parse_space(space))
    path = write_space(tmp_path / "grid.yaml", space)
    out = tmp_path / "guard.json"
    r = subprocess.run([sys.executable, "scripts/accuracy_guard.py", "--space", str(path), "--data", str(data.path),
                        "--fast", "fp32", "--device", "cpu", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [row["config"] for row in res["comparison"]] == ["tiny"]  # the space's grid, not the report's
    assert [s["train_tokens"] for s in res["fp32"]["tiny"]["sizes"]] == [400, 800, 1600]
    assert res["all_within_tolerance"] and all(row["d_alpha"] == 0 for row in res["comparison"])  # fp32 against itself
