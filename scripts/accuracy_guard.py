"""Accuracy guard: the fast path against an fp32 run of the same engine, on real data.

    python scripts/accuracy_guard.py --data studies/data/wiki-<hash> --fast bf16 --out benchmarks/h200_accuracy_guard.json

Runs the configs of a grid space (default ``spaces/grid_4arch_offline.yaml``: the report's four
configs at the report's token counts) on a prepared wiki folder, once with ``--fast``
precision and once in fp32 (TF32 off), with the full protocol (convergence and early
stopping), and checks that every run's PPL agrees within 1% and every config's alpha within
+-0.01. Needs only PyTorch and PyYAML (a GPU machine can run it from a copied folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from archsearch.plan import trial_plan  # noqa: E402
from archsearch.result import SizeRecord  # noqa: E402
from archsearch.space import load_space  # noqa: E402
from archsearch.trial import run_trial  # noqa: E402

SPACE = Path(__file__).resolve().parent.parent / "spaces" / "grid_4arch_offline.yaml"


def run(space: Path, data: str, precision: str, device: str) -> dict:
    out = {}
    sp = load_space(space, [f"engine.precision={precision}"])
    for name, params in sp.configs.items():
        plan = trial_plan(sp, params, name=name, data_path=data, use_cache=False, device=device)
        t0 = time.perf_counter()
        res = run_trial(plan)
        sizes = [SizeRecord.from_dict(s) for s in res["sizes"]]
        out[name] = {"alpha": res["fit"]["alpha"], "r2": res["fit"]["r2"], "seconds": time.perf_counter() - t0,
                     "sizes": [{"train_tokens": s.train_tokens, "val_ppl": s.val_ppl, "val_acc": s.val_acc, "seconds": s.seconds,
                                **{k: s.metrics[k] for k in ("val_er", "train_er", "phase1_iterations", "phase2_best_epoch", "phase2_stopped_epoch")}}
                               for s in sizes]}  # fmt: skip
        print(f"{precision} {name}: alpha {res['fit']['alpha']:.4f}, PPL " + " ".join(f"{s['val_ppl']:.1f}" for s in res["sizes"])
              + f" ({out[name]['seconds']:.1f} s)", flush=True)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a prepared wiki folder")
    ap.add_argument("--space", type=Path, default=SPACE, help="a grid space file: its configs, sizes and seeds")
    ap.add_argument("--fast", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    fast = run(args.space, args.data, args.fast, args.device)
    ref = run(args.space, args.data, "fp32", args.device)
    rows, ok = [], True
    for name in fast:
        d_alpha = fast[name]["alpha"] - ref[name]["alpha"]
        ppl_rel = [f["val_ppl"] / r["val_ppl"] - 1 for f, r in zip(fast[name]["sizes"], ref[name]["sizes"])]
        good = abs(d_alpha) <= 0.01 and all(abs(x) <= 0.01 for x in ppl_rel)
        ok &= good
        rows.append({"config": name, "alpha_fast": fast[name]["alpha"], "alpha_fp32": ref[name]["alpha"], "d_alpha": d_alpha,
                     "ppl_rel_diff": ppl_rel, "max_abs_ppl_rel_diff": max(abs(x) for x in ppl_rel), "within_tolerance": good})  # fmt: skip
        print(f"{name:>17}: d_alpha {d_alpha:+.4f}, PPL rel. diff " + " ".join(f"{100 * x:+.2f}%" for x in ppl_rel) + ("  ok" if good else "  OUT OF TOLERANCE"))
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "fast_precision": args.fast, "tolerance": {"ppl_rel": 0.01, "alpha_abs": 0.01}, "all_within_tolerance": ok,
              "comparison": rows, "fast": fast, "fp32": ref, "fast_seconds": sum(v["seconds"] for v in fast.values()),
              "fp32_seconds": sum(v["seconds"] for v in ref.values())}  # fmt: skip
    print(f"all within tolerance: {ok}; fast {result['fast_seconds']:.0f} s, fp32 {result['fp32_seconds']:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
