"""Whether the GPU engine gives the same bits when it repeats the same work, as JSON.

    python scripts/check_determinism.py --out benchmarks/h200_determinism.json

Three checks, each repeated ``--repeats`` times on identical inputs in one process:

- ``recurrent``: the validation pass's persistent kernel (recurrent_kernels.recurrent_batched,
  the PLAN tile of each shape, 1 and 2 runs per launch, with PLAN's wait and with the 'flag'
  wait that raced) and the graphed per-step kernels
  (recurrent.triton_pass) on fixed random inputs: the number of distinct outputs and the
  largest difference from the first repeat;
- ``phase2``: the kept-session test's model (tests/test_gpu.py) trained by ``train_run`` from the
  same data and seed: distinct per-epoch histories (train loss, validation loss, accuracy);
- ``val_contexts``: the validation contexts of those runs (``recurrent.recurrent_pass`` of the
  trained ContextBlock), distinct outputs.

A search compares trials by numbers the engine computes: a difference between repeats is
noise that a study cannot tell from a real effect. Needs PyTorch and Triton only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def distinct(outs: list[torch.Tensor]) -> dict:
    first = outs[0]
    same = [bool(torch.equal(o, first)) for o in outs]
    diffs = [float((o.double() - first.double()).abs().max()) for o in outs]
    return {"repeats": len(outs), "equal_to_first": sum(same), "max_abs_diff": max(diffs)}


def check_recurrent(repeats: int, device: torch.device) -> dict:
    from archsearch.cvfp.fast import recurrent as REC
    from archsearch.cvfp.fast.device import sm_count
    from archsearch.cvfp.fast.recurrent_kernels import recurrent_batched

    syncs = sorted({v.sync for v in REC.PLAN}) + ["flag"]  # the product's wait, then the one that raced
    out = {}
    for L, C, T in ((2, 64, 1500), (6, 768, 2000), (9, 768, 1000)):
        g = torch.Generator(device="cpu").manual_seed(L * 1000 + C)
        P = (torch.randn(2, L, T, C, generator=g) * 0.5).to(device)
        W = (torch.randn(2, L, C, C, generator=g) * 0.1 / C**0.5 * 8).to(device)
        G = (1 + 0.1 * torch.randn(2, L, C, generator=g)).to(device)
        B = (0.1 * torch.randn(2, L, C, generator=g)).to(device)
        rows = REC.tile_rows(C, sm_count(device))
        res = {}
        for sync in syncs:
            for R in (1, 2):
                outs = []
                for _ in range(repeats):
                    o = recurrent_batched(P[:R].contiguous(), W[:R].contiguous(), G[:R].contiguous(), B[:R].contiguous(), 1e-5, rows=rows, sync=sync)
                    if o is None:
                        break
                    outs.append(o.clone())
                res[f"persistent_{sync}_R{R}"] = distinct(outs) if outs else {"skipped": "does not fit"}
        outs = [REC.triton_pass(P[0], list(W[0]), list(zip(G[0], B[0])), 1e-5).clone() for _ in range(min(repeats, 3))]
        res["graphed"] = distinct(outs)
        out[f"L{L}_C{C}_T{T}"] = res
    return out


def check_runs(repeats: int, device: torch.device) -> dict:
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.fast import graphs as EN
    from archsearch.cvfp.run import train_run

    g = torch.Generator().manual_seed(0)
    W = torch.randn(3000, 64, generator=g) * 0.5
    train, val = torch.randint(0, 3000, (9000,), generator=g), torch.randint(0, 3000, (1500,), generator=g)
    cfg = run_config_from_dict({"model": {"num_layers": 2, "context_dim": 64, "num_input_tokens": 2},
                                "phase1": {"batch_size": 2000}, "phase2": {"batch_size": 1000, "max_epochs": 3, "patience": 3},
                                "engine": {"precision": "bf16"}})  # fmt: skip
    histories, ppls = [], []
    for i in range(repeats):
        if i % 2:
            EN.release_phase2_graphs()  # every other repeat from a new phase-2 session
        r = train_run(cfg, W, train, val, seed=1, device=str(device))
        histories.append([(h["train_loss"], h["val_loss"], h["val_acc"]) for h in r.history["phase2"]])
        ppls.append(r.val_ppl)
    first = histories[0]
    return {"repeats": repeats, "histories_equal_to_first": sum(h == first for h in histories),
            "val_ppl": ppls, "first_differing": next((h for h in histories if h != first), None), "first": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("check_determinism: needs a CUDA GPU")
    device = torch.device("cuda")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__}  # fmt: skip
    report["recurrent"] = check_recurrent(args.repeats, device)
    print(json.dumps(report["recurrent"], indent=1), flush=True)
    report["runs"] = check_runs(args.repeats, device)
    print(json.dumps(report["runs"], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
