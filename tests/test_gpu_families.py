"""The gpt family on a GPU: bf16 autocast (the GPU default) against fp32 (skipped without
CUDA; pure torch + archsearch, no Ray or Optuna, so it runs on a GPU host that has only
PyTorch: ``pytest tests/test_gpu_families.py``)."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _markov_streams(V=512, E=64, n_train=40_000, n_val=4_000, k=2, seed=0):
    """An embedding of random vectors and streams from a random Markov chain in which every
    token has ``k`` equally likely successors (the best PPL is k). A small GPT learns it: on a
    CPU, fp32, 20k training tokens, 3 epochs reach PPL 4.5 with the config below."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, E, generator=g)
    succ = torch.randint(0, V, (V, k), generator=g)

    def stream(n):
        choice, out, t = torch.randint(0, k, (n,), generator=g).tolist(), [], 0
        for i in range(n):
            t = int(succ[t, choice[i]])
            out.append(t)
        return torch.tensor(out)

    return W, stream(n_train), stream(n_val)


SMALL = {"family": "gpt", "num_layers": 2, "d_model": 128, "n_heads": 4, "context_length": 32, "lr": 3e-3, "batch_size": 16, "max_epochs": 3}


def test_gpt_bf16_matches_fp32_within_one_percent_ppl():
    from archsearch.config import run_config_from_dict
    from archsearch.families import RunData

    W, train, val = _markov_streams()
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = run_config_from_dict({"model": dict(SMALL, precision=precision)})
        out[precision] = cfg.family_object().train(cfg.custom, RunData(W, train, val), 1, "cuda", None)
    a, b = out["fp32"], out["bf16"]
    assert a.precision == "fp32" and b.precision == "bf16"
    assert math.isfinite(a.val_ppl) and a.val_ppl < 10  # it learned the chain (V = 512, best PPL 2)
    assert abs(b.val_ppl / a.val_ppl - 1) < 0.01, (a.val_ppl, b.val_ppl)
    assert abs(b.val_acc - a.val_acc) < 0.01


def test_gpt_auto_precision_is_bf16_on_gpu_and_deterministic():
    from archsearch.config import run_config_from_dict
    from archsearch.families import RunData

    W, train, val = _markov_streams(n_train=8_000, n_val=1_000)
    cfg = run_config_from_dict({"model": dict(SMALL, max_epochs=1)})
    runs = [cfg.family_object().train(cfg.custom, RunData(W, train, val), 5, "cuda", None) for _ in range(2)]
    assert runs[0].precision == "bf16" and runs[0].device not in ("cpu", "cuda")  # the GPU's name
    assert runs[0].val_ppl == pytest.approx(runs[1].val_ppl, rel=1e-3)
