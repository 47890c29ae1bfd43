"""A trial worker's warm-up thread on CUDA (search/trainable.Warmup): in a fresh process, once
joined, the device's primary context, cuBLAS's probe and the Triton kernels' modules are there,
with no error. Only where CUDA is available."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_the_warmup_makes_the_context_and_the_gemm_probe():
    from helpers import ROOT

    code = ("import json, sys, torch; from archsearch.search.trainable import Warmup, CUDA_MODULES; "
            "w = Warmup(cuda=True).start(); w.allow_cuda(); info = w.join(); from archsearch.cvfp.fast import device; "
            "print(json.dumps([info, bool(torch._C._cuda_hasPrimaryContext(0)), [str(d) for d in device._GEMM_CAPS], "
            "[m for m in CUDA_MODULES if m not in sys.modules], torch.cuda.memory_allocated(0)]))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    info, context, probed, missing, allocated = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["error"] is None and info["cuda"] is True and not info["cuda_skipped"], info
    assert context and probed == ["cuda:0"], (context, probed)
    assert allocated < 2**28, allocated  # cuBLAS's workspaces at most (the probe's own tensors are freed)
    assert not [m for m in missing if "triton" in m or "fast" in m], missing
