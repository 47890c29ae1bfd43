"""The tied head's loss and gradient, the engine's fused path against what libraries ship.

Phase 2's largest cost is the frozen tied head: logits = h W^T (n x V, V = 50,257), the
cross-entropy, and d loss / d h = (softmax - onehot) W / n. This times, forward plus
backward at the bench's shapes, with CUDA events:

- ``engine``: archsearch's fused path (cuBLAS GEMMs in row chunks, the Triton
  cross-entropy kernel that writes the gradient in place of the logits);
- ``torch``: the plain expression (bf16 logits, fp32 cross-entropy);
- ``liger``: Liger-Kernel's fused linear cross-entropy;
- ``cce`` / ``cce_exact``: Apple's cut-cross-entropy, with its default gradient filter
  (drops small softmax entries: not the same gradient) and without it.

and checks each against the fp32 loss and gradient. A library that is not installed is
skipped. JSON out.

    python scripts/bench_ce.py --out benchmarks/h200_ce_libraries.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from archsearch.cvfp.fast import head  # noqa: E402


def cuda_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def candidates(W: torch.Tensor):
    """name -> fn(h, targets) returning the mean loss, differentiable w.r.t. h."""
    hw = head.head_weight(W, "bf16")
    out = {"engine": lambda h, t: head.train_loss(h, hw, t)}
    Wb = W.to(torch.bfloat16)
    out["torch"] = lambda h, t: F.cross_entropy((h.to(torch.bfloat16) @ Wb.T).float(), t)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        out["liger"] = lambda h, t: liger_fused_linear_cross_entropy(h.to(torch.bfloat16), Wb, t)
    except ImportError as e:
        print(f"liger: skipped ({e})")
    try:
        from cut_cross_entropy import linear_cross_entropy

        out["cce"] = lambda h, t: linear_cross_entropy(h.to(torch.bfloat16), Wb, t)
        out["cce_exact"] = lambda h, t: linear_cross_entropy(h.to(torch.bfloat16), Wb, t, filter_eps=None)
    except ImportError as e:
        print(f"cut-cross-entropy: skipped ({e})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50_257)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    n, E, V = args.rows, args.dim, args.vocab
    g = torch.Generator(device="cuda").manual_seed(0)
    W = F.layer_norm(torch.randn(V, E, device="cuda", generator=g), (E,))  # like the frozen, LayerNorm'd embedding
    h = torch.randn(n, E, device="cuda", generator=g).requires_grad_(True)
    t = torch.randint(0, V, (n,), device="cuda", generator=g)
    ref_loss = F.cross_entropy(h @ W.T, t)
    (ref_grad,) = torch.autograd.grad(ref_loss, h)
    flop = 2 * (2 * n * E * V)  # the logits GEMM and the gradient GEMM
    res = {"rows": n, "dim": E, "vocab": V, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": {}}
    for name, fn in candidates(W).items():
        try:
            loss = fn(h, t)
            (grad,) = torch.autograd.grad(loss, h)

            def step(fn=fn):
                (gh,) = torch.autograd.grad(fn(h, t), h)
                return gh

            ms = cuda_ms(step, args.reps)
            rel = float((grad.float() - ref_grad).norm() / ref_grad.norm())
            res["results"][name] = {"ms": ms, "tflops": flop / ms / 1e9, "loss_abs_err": abs(float(loss) - float(ref_loss)), "grad_rel_err": rel,
                                    "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20}  # fmt: skip
            print(f"{name:10s} {ms:7.3f} ms  {flop / ms / 1e9:6.1f} TFLOP/s  |dloss| {res['results'][name]['loss_abs_err']:.2e}  grad rel err {rel:.2e}")
        except Exception as e:  # a library that fails here is reported, not fatal
            res["results"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"{name}: {type(e).__name__}: {e}"[:300])
        torch.cuda.reset_peak_memory_stats()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
