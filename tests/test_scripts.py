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


def test_bench_phase2_smoke_times_both_steps_and_checks_they_agree(tmp_path):
    """scripts/bench_phase2.py's CPU form (tiny shapes, Triton's interpreter): both steps timed,
    the fused step's parameters after the same steps those of the autograd step (fp32)."""
    import importlib.util
    import os

    import pytest

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    out = tmp_path / "p2.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "scripts/bench_phase2.py", "--smoke", "--steps", "2", "--repeats", "1", "--warmup", "1",
                        "--batches", "3", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["smoke"] and res["variants"] == ["eager", "new"]
    assert [c["case"] for c in res["cases"]] == ["L2_C16_k2", "L2_C16_k1"]
    for c in res["cases"]:
        assert "error" not in c, c.get("error")
        assert c["eager"]["step_ms"] > 0 and c["new"]["step_ms"] > 0 and c["flops_per_step"] > 0
        a = c["agreement"]
        assert a["steps"] == 8 and a["max_param_rel"] < 1e-5 and a["loss_rel"] < 1e-5 and a["min_param_moved_rel"] > 1e-3
    bad = subprocess.run([sys.executable, "scripts/bench_phase2.py", "--smoke", "--cases", "L7"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "--cases" in bad.stderr and "Traceback" not in bad.stderr
