"""The CVFP memory estimate (archsearch/cvfp/memory.py) against what runs allocate on a GPU, as JSON.

    python scripts/check_memory_estimate.py --out benchmarks/h200_memory_estimate.json
    python scripts/check_memory_estimate.py --data gpt2 --configs baseline,big --sizes 62891,587970

Each config is one trial as a worker trains it: its sizes smallest first in one thread
(``cvfp.run.train_run``; a size's run finds the previous size's phase-2 session kept). Before
each trial the kept session is released and the allocator's peak reset; after each run the
script reads ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` and prints them beside
the estimate of that run (``peak``) and of the trial (its largest size's ``peak``). Then, with
``--worker`` (default on), every config once more in one sequence without releasing anything
(a worker handed trial after trial), against the space-level figure auto uses
(``archsearch.resources.process_bytes``: the largest peak plus the largest kept session, with
the allocator margin and the CUDA context), and where ``nvidia-smi`` answers, the process's
device memory as the driver sees it. ``--context-check`` says whether reading the devices'
properties (what ``archsearch run`` does in the driver) makes a CUDA context.

Synthetic data (random ids and embedding) of the sources' shapes: ``minilm`` (V 30,522, E 384,
30,000 validation tokens: spaces/grid_4arch_offline.yaml) or ``gpt2`` (V 50,257, E 768, 31,024).
Memory does not depend on how long a phase runs, so the runs are short (phase 1: 3 iterations,
phase 2: 1 epoch; ``--full`` keeps the config's own counts). Needs PyTorch (and Triton for the
fused paths); no Ray, no Optuna.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from archsearch.config import run_config_from_dict  # noqa: E402
from archsearch.cvfp.fast.graphs import release_phase2_graphs  # noqa: E402
from archsearch.cvfp.memory import estimate_run_memory  # noqa: E402
from archsearch.cvfp.run import train_run  # noqa: E402
from archsearch.resources import process_bytes  # noqa: E402

CONFIGS = {  # (L, C, k): the report's four, and the corner of spaces/tpe_explore.yaml's search
    "baseline": (6, 768, 1),
    "input_tokens_2": (6, 768, 2),
    "context_dim_1152": (6, 1152, 1),
    "layers_9": (9, 768, 1),
    "tpe_corner": (12, 2048, 4),
}
SOURCES = {"minilm": (30_522, 384, 30_000), "gpt2": (50_257, 768, 31_024)}
REPORT_SIZES = [62_891, 122_795, 240_132, 587_970]
GB = 1e9


def nvidia_smi_used(pid: int) -> int | None:
    """This process's device memory as the driver reports it (bytes), or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    used = [int(line.split(",")[1]) * 2**20 for line in out.strip().splitlines() if line.split(",")[0].strip() == str(pid)]
    return sum(used) if used else None


def context_check() -> dict:
    """In a fresh process: does get_device_properties (archsearch.search.runner.local_gpu_memory) make a context?"""
    code = ("import torch, json; m=[torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]; "
            "print(json.dumps({'total_memory': m, 'primary_context_after': bool(torch._C._cuda_hasPrimaryContext(0))}))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": (r.stderr or r.stdout)[-2000:]}


def run_cfg(L: int, C: int, k: int, full: bool):
    short = {} if full else {"phase1": {"max_iterations": 3, "min_iterations": 2}, "phase2": {"max_epochs": 1}}
    return run_config_from_dict({"model": {"num_layers": L, "context_dim": C, "num_input_tokens": k}, **short})


def fresh() -> None:
    release_phase2_graphs()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=sorted(SOURCES), default="minilm")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--sizes", default=",".join(map(str, REPORT_SIZES)), help="training tokens, comma-separated")
    ap.add_argument("--full", action="store_true", help="the configs' own iteration and epoch counts")
    ap.add_argument("--no-worker", dest="worker", action="store_false", help="skip the one-worker sequence")
    ap.add_argument("--context-check", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    V, E, M = SOURCES[args.data]
    sizes = sorted(int(s) for s in args.sizes.split(","))
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    out: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(),
                 "torch": torch.__version__, "data": {"source": args.data, "V": V, "E": E, "val_tokens": M}, "sizes": sizes}  # fmt: skip
    if args.context_check:
        out["context_check"] = context_check()
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(V, E, generator=g)
    train = torch.randint(0, V, (max(sizes),), generator=g)
    val = torch.randint(0, V, (M,), generator=g)

    def trial(name: str, release: bool) -> dict:
        cfg = run_cfg(*CONFIGS[name], args.full)
        if release:
            fresh()
            kept.clear()
        else:  # what a worker does after each trial (trial.free_worker): the cache goes, kept sessions stay
            gc.collect()
            torch.cuda.empty_cache()
        runs = []
        for n in sizes:
            torch.cuda.reset_peak_memory_stats()
            result = train_run(cfg, embedding, train[:n], val, seed=42, device="cuda")
            est = estimate_run_memory(cfg, n, M, V, E)
            # the previous run's kept session (this trial's previous size, or in the worker sequence the previous trial's) is live
            bound = est.peak + (kept[0] if kept else 0)
            kept[:] = [est.kept]
            alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            runs.append({"train_tokens": n, "measured_allocated": alloc, "measured_reserved": reserved, "estimate_peak": est.peak,
                         "estimate_bound": bound, "ratio": round(alloc / bound, 3), "estimate": est.to_dict(),
                         "seconds": round(result.seconds, 2), "val_ppl": result.val_ppl})  # fmt: skip
            print(f"{name:>18} {n:>8}: allocated {alloc / GB:6.2f} GB, reserved {reserved / GB:6.2f} GB, estimate {bound / GB:6.2f} GB "
                  f"(x{alloc / bound:.2f}; the run's own {est.peak / GB:.2f} GB, kept after it {est.kept / GB:.2f} GB)", flush=True)  # fmt: skip
        top = max(runs, key=lambda r: r["measured_allocated"])
        return {"config": name, "L_C_k": CONFIGS[name], "runs": runs, "measured_allocated": top["measured_allocated"],
                "estimate_peak": runs[-1]["estimate_peak"], "within": all(r["measured_allocated"] <= r["estimate_bound"] for r in runs)}  # fmt: skip

    kept: list[int] = []

    out["trials"] = [trial(name, release=True) for name in names]
    if args.worker:
        fresh()
        kept.clear()
        seq = [trial(name, release=False) for name in names]  # nothing released: what a reused worker holds
        ests = [estimate_run_memory(run_cfg(*CONFIGS[n], args.full), max(sizes), M, V, E) for n in names]
        torch.cuda.synchronize()
        expected = process_bytes(max(e.peak for e in ests), max(e.kept for e in ests))
        used = nvidia_smi_used(os.getpid())
        max_reserved = max(r["measured_reserved"] for t in seq for r in t["runs"])
        measured = max(t["measured_allocated"] for t in seq)
        bound = max(e.peak for e in ests) + max(e.kept for e in ests)
        out["worker"] = {
            "configs": names, "measured_allocated": measured, "estimate_peak_plus_kept": bound, "within": measured <= bound,
            "measured_reserved_now": torch.cuda.memory_reserved(), "max_reserved": max_reserved,
            # the driver's view of this process now, and at its peak (the context and what else lies outside the allocator stay)
            "process_used_nvidia_smi": used, "process_peak_derived": None if used is None else used - torch.cuda.memory_reserved() + max_reserved,
            "estimate_process_bytes": expected,
        }  # fmt: skip
        print(json.dumps(out["worker"]), flush=True)
    out["all_within"] = all(t["within"] for t in out["trials"]) and out.get("worker", {}).get("within", True)
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
