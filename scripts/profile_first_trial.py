"""Where a worker's first trial spends the time its runs do not: one process, no Ray, no Optuna.

    python scripts/profile_first_trial.py spaces/grid_4arch_offline.yaml --config context_dim_1152 \
        --set data.cache_dir=/path/to/prepared --out benchmarks/h200_first_trial.json

What `archsearch run` does in a fresh worker, step by step: the worker's warm-up (CUDA context
and a GEMM, as search/trainable.Warmup does), then ``run_trial`` of the config ``--repeats``
times in the same process (no run cache). The first trial is run under cProfile; for each
trial the JSON has the trial's wall time, the sum of its runs' own seconds (the per-size
``seconds``) and the difference: what a first trial pays once per process (kernel loading,
first calls, data loading) against what every trial pays. Needs PyTorch (and the prepared
data of the space); the space's data must already be prepared under ``data.cache_dir``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _trial_row(result: dict, wall: float) -> dict:
    runs = sum(r.get("seconds") or 0.0 for r in result["sizes"])
    return {"wall_s": wall, "runs_s": runs, "outside_runs_s": wall - runs,
            "sizes": [{k: r.get(k) for k in ("train_tokens", "seconds", "phase1_s", "contexts_s", "phase2_s", "phase1_iterations", "phase2_epochs")}
                      for r in result["sizes"]]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("space", type=Path)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--top", type=int, default=40, help="functions of the profile kept (by cumulative time)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    t_start = time.perf_counter()
    import torch

    from archsearch.plan import chosen_config, prepare_space_data, trial_plan
    from archsearch.space import load_space
    from archsearch.trial import run_trial

    imports = time.perf_counter() - t_start
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    if device == "cuda":  # the worker's warm-up: the context and one GEMM
        a = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16)
        (a @ a).sum().item()
    warmup = time.perf_counter() - t
    space = load_space(args.space, args.overrides)
    name, params = chosen_config(space, args.config)
    t = time.perf_counter()
    data = prepare_space_data(space)
    data_s = time.perf_counter() - t
    plan = trial_plan(space, params, name=name, data_path=str(data.path), use_cache=False, device=device)
    report = {"script": "profile_first_trial", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "space": str(args.space), "config": name, "imports_s": imports, "warmup_s": warmup, "data_s": data_s, "trials": []}  # fmt: skip
    for i in range(args.repeats):
        prof = cProfile.Profile() if i == 0 else None
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        result = run_trial(plan)
        if device == "cuda":
            torch.cuda.synchronize()
        if prof is not None:
            prof.disable()
        row = _trial_row(result, time.perf_counter() - t)
        if prof is not None:
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(args.top)
            row["profile_top_cumulative"] = text.getvalue().splitlines()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
            row["profile_top_own"] = text.getvalue().splitlines()
        report["trials"].append(row)
        print(f"trial {i + 1}: wall {row['wall_s']:.2f} s, runs {row['runs_s']:.2f} s, outside the runs {row['outside_runs_s']:.2f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
