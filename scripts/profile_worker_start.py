"""Where a new worker process's first run loses time on a GPU (the start-up every Ray trial
worker pays once): imports, CUDA initialisation, then the same run twice, the first one
under cProfile.

    python scripts/profile_worker_start.py --out benchmarks/h200_worker_start.json

Run it in a fresh process (it measures first uses). The run is the offline grid's baseline
shape at its smallest size: V = 30,522, E = 384, 62,891 training and 30,000 validation tokens,
random data, phase 1 fixed at 7 iterations, phase 2 at 5 epochs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    steps: dict[str, float] = {}
    t = time.perf_counter()
    import torch

    steps["import_torch_s"] = time.perf_counter() - t
    t = time.perf_counter()
    torch.cuda.init()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    steps["cuda_init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    from archsearch.config import run_config_from_dict
    from archsearch.cvfp.run import train_run

    steps["import_engine_s"] = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    V, E, N, M = 30_522, 384, 62_891, 30_000
    W = torch.randn(V, E, generator=g) * 0.1
    train, val = torch.randint(0, V, (N,), generator=g), torch.randint(0, V, (M,), generator=g)
    cfg = run_config_from_dict({
        "model": {"num_layers": 6, "context_dim": 768, "num_input_tokens": 1},
        "phase1": {"min_iterations": 7, "max_iterations": 7},
        "phase2": {"max_epochs": 5, "patience": 5},
    })  # fmt: skip
    runs = []
    prof = cProfile.Profile()
    for i in range(3):
        t = time.perf_counter()
        if i == 0:
            prof.enable()
        m = train_run(cfg, W, train, val, seed=42, device="cuda")
        if i == 0:
            prof.disable()
        wall = time.perf_counter() - t
        parts = {f"{k}_seconds": v for k, v in m.phase_seconds.items()} | {"seconds": m.seconds}
        runs.append({"wall_s": wall, **parts, "outside_phases_s": m.seconds - sum(m.phase_seconds.values())})
        print(f"run {i + 1}: {wall:.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in runs[-1].items()), flush=True)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.top)
    out = {
        "script": "scripts/profile_worker_start.py", "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "script_seconds": time.perf_counter() - T0, **steps, "runs": runs,
        "first_run_profile_cumulative": s.getvalue().splitlines()[: args.top + 12],
    }  # fmt: skip
    print(json.dumps(steps), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
