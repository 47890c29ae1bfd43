"""The Triton kernels in the default CPU test run, under Triton's interpreter, against their
plain twins (tests/triton_interpret_checks.py says what each check compares and which kernel
the interpreter cannot run). Skipped where Triton is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from triton_interpret_checks import CHECKS  # noqa: E402  (imports no triton: the kernels load inside each check)


@pytest.fixture(scope="module")
def outcomes() -> dict:
    # a process of its own: TRITON_INTERPRET must be set before triton is first imported
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(HERE / "triton_interpret_checks.py")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_kernel_under_interpreter(outcomes, name):
    assert name in outcomes
    assert outcomes[name] is None, outcomes[name]
