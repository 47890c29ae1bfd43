"""The CVFP memory estimate (archsearch/cvfp/memory.py) against what runs allocate and reserve on a GPU, as JSON.

    python scripts/check_memory_estimate.py --context-check --out benchmarks/h200_memory_estimate.json
    python scripts/check_memory_estimate.py --data gpt2 --configs baseline,tpe_corner --sizes 62891,587970
    python scripts/check_memory_estimate.py --alloc default --share 1   # PyTorch's allocator as it comes, no cap

The process is set up as a trial worker that shares its GPU (``--alloc worker``, the default:
archsearch.gpu_share, expandable segments unless PYTORCH_(CUDA_)ALLOC_CONF is set; and before
each trial its allocator cap, ``--share auto``: the 1/k of the GPU ``resources.gpus: auto``
gives a space of that one config, ``--share K``: 1/K, 1: no cap). Each config is one trial:

- ``unstaged``: its sizes one after another (``cvfp.run.train_run``, what a trial with a pruner
  runs; a size's run finds the previous size's phase-2 session kept), allocated and reserved
  per run against that run's estimate (its ``peak``) plus what the run before it kept;
- ``staged``: its sizes as auto stages them on CUDA (``cvfp.run.train_staged``: every phase 1,
  one batched validation pass, each finish), against ``memory.trial_memory(staged=True)``.

Before each trial the kept session is released, the allocator's cache emptied and its peaks
reset. Every run also reports its stages' peaks (phase1, contexts: the train cache, recurrence:
the batched pass, prepare: the phase-2 session, er, phase2, and ``between``: what lies between
them), from wrappers around cvfp.run's stage functions. Then, with ``--worker`` (default on),
every config once more in one sequence (staged, as auto runs them), nothing released between
trials but the allocator's cache (what trial.free_worker does), against the space-level figure
auto uses (``archsearch.resources.process_bytes``), and where ``nvidia-smi`` answers, the
process's device memory as the driver sees it. ``--context-check`` says whether reading the
devices' properties (what ``archsearch run`` does in the driver) makes a CUDA context.

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

from archsearch import gpu_share  # noqa: E402
from archsearch.gpu_share import set_alloc_conf  # noqa: E402
from archsearch.config import run_config_from_dict  # noqa: E402
from archsearch.cvfp import run as engine  # noqa: E402
from archsearch.cvfp.fast import recurrent  # noqa: E402
from archsearch.cvfp.fast.graphs import release_phase2_graphs  # noqa: E402
from archsearch.cvfp.memory import WORKSPACE_BYTES, estimate_run_memory, phase2_step_bytes, trial_memory  # noqa: E402
from archsearch.resources import GPU_MEMORY_FRACTION, allocator_cap, gpus_for, process_bytes, trials_per_gpu  # noqa: E402

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


class StageMeter:
    """Peaks of allocated and reserved memory per stage of the runs, from wrappers around
    cvfp.run's stage functions: each wrapper closes the span before it (``between``) and its
    own, resetting the allocator's peaks at both ends."""

    STAGES = {  # (module, function): (stage, the call's training tokens or runs)
        (engine, "train_phase1"): ("phase1", lambda a, k: int(a[2].shape[0])),
        (engine, "_train_cache"): ("contexts", lambda a, k: int(a[0].train_ids.shape[0])),
        (recurrent, "recurrent_passes"): ("recurrence", lambda a, k: f"{len(a[0])} runs"),
        (engine, "_prepare_phase2"): ("prepare", lambda a, k: int(a[0].train_ids.shape[0])),
        (engine, "effective_rank"): ("er", lambda a, k: int(a[0].shape[0])),
        (engine, "train_phase2"): ("phase2", lambda a, k: int(a[2]) + 1),
    }

    def __init__(self):
        self.rows: list[dict] = []
        for (module, name), (stage, what) in self.STAGES.items():
            setattr(module, name, self._wrap(getattr(module, name), stage, what))

    def _close(self, stage: str, what) -> None:
        torch.cuda.synchronize()
        self.rows.append({"stage": stage, "of": what, "allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()})
        torch.cuda.reset_peak_memory_stats()

    def _wrap(self, fn, stage, what):
        def wrapped(*a, **k):
            self._close("between", None)
            try:
                return fn(*a, **k)
            finally:
                self._close(stage, what(a, k))

        return wrapped

    def take(self) -> list[dict]:
        self._close("between", None)
        rows, self.rows = self.rows, []
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=sorted(SOURCES), default="minilm")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--sizes", default=",".join(map(str, REPORT_SIZES)), help="training tokens, comma-separated")
    ap.add_argument("--modes", default="staged,unstaged", help="staged, unstaged or both (comma-separated)")
    ap.add_argument("--alloc", choices=["worker", "default"], default="worker",
                    help="worker: a sharing worker's allocator settings (expandable segments unless set by the user); default: PyTorch's")
    ap.add_argument("--share", default="auto", help="auto (the 1/k auto gives the config), K (1/K of the GPU) or 1 (no cap)")
    ap.add_argument("--full", action="store_true", help="the configs' own iteration and epoch counts")
    ap.add_argument("--no-worker", dest="worker", action="store_false", help="skip the one-worker sequence")
    ap.add_argument("--context-check", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.alloc == "worker":
        conf, _ = set_alloc_conf()  # before CUDA starts in this process, as configure_worker does in a worker
    else:
        conf = gpu_share.user_alloc_conf()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    V, E, M = SOURCES[args.data]
    sizes = sorted(int(s) for s in args.sizes.split(","))
    names = args.configs.split(",")
    modes = args.modes.split(",")
    unknown = [n for n in names if n not in CONFIGS] + [m for m in modes if m not in ("staged", "unstaged")]
    if unknown:
        sys.exit(f"--configs/--modes: unknown {', '.join(unknown)} (configs: {', '.join(CONFIGS)}; modes: staged, unstaged)")
    total = torch.cuda.get_device_properties(0).total_memory
    out: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(),
                 "torch": torch.__version__, "alloc_conf": conf, "share": args.share, "total_memory": total,
                 "data": {"source": args.data, "V": V, "E": E, "val_tokens": M}, "sizes": sizes}  # fmt: skip
    if args.context_check:
        out["context_check"] = context_check()
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(V, E, generator=g)
    train = torch.randint(0, V, (max(sizes),), generator=g)
    val = torch.randint(0, V, (M,), generator=g)
    meter = StageMeter()

    def cap_for(process: int) -> tuple[float, int | None]:
        """(share, cap bytes) for a worker whose process estimate is ``process`` (--share)."""
        k = trials_per_gpu(process, total, 1, 4)[0] if args.share == "auto" else int(args.share)
        share = gpus_for(k)
        cap = allocator_cap(share, total) if k > 1 else None
        gpu_share.set_cap(cap, torch.cuda.current_device(), total)  # what configure_worker sets in a worker
        return share, cap

    def trial(name: str, mode: str, release: bool, space_process: int | None = None) -> dict:
        """One trial; ``space_process``: the worker sequence's space-level estimate (its cap for every trial)."""
        cfg = run_cfg(*CONFIGS[name], args.full)
        staged = mode == "staged"
        peak, kept_est = trial_memory(cfg, sizes, M, V, E, staged=staged)
        share, cap = cap_for(space_process or process_bytes(peak, kept_est))
        if release:
            fresh()
            kept.clear()
        else:  # what a worker does after each trial (trial.free_worker): the cache goes, kept sessions stay
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = kept[0] if kept else 0  # the previous trial's kept session (the worker sequence)
        meter.take()
        runs = []
        if staged:
            results = list(engine.train_staged(cfg, embedding, val, [(train[:n], 42, lambda *a, **k: None) for n in sizes], "cuda"))
            stages = meter.take()
            alloc, reserved = max(r["allocated"] for r in stages), max(r["reserved"] for r in stages)
            failed = [f"{type(r).__name__}: {str(r)[:300]}" for r in results if isinstance(r, BaseException)]
            bound = peak + max(before, kept_est)  # one phase-2 session at a time: the previous trial's, then this one's
            runs.append({"train_tokens": sizes, "measured_allocated": alloc, "measured_reserved": reserved, "estimate_bound": bound,
                         "ratio": round(alloc / bound, 3), "failed": failed, "stages": stages})  # fmt: skip
            print(f"{name:>18} staged {len(sizes)} runs: allocated {alloc / GB:6.2f} GB, reserved {reserved / GB:6.2f} GB, "
                  f"estimate {bound / GB:6.2f} GB (x{alloc / bound:.2f}){' cap ' + f'{cap / GB:.1f} GB' if cap else ''}{' FAILED ' + failed[0] if failed else ''}",
                  flush=True)  # fmt: skip
        else:
            for n in sizes:
                failed = None
                try:
                    result = engine.train_run(cfg, embedding, train[:n], val, seed=42, device="cuda")
                except Exception as e:  # an OOM beyond the cap, say: reported, the trial goes on
                    failed, result = f"{type(e).__name__}: {str(e)[:300]}", None
                stages = meter.take()
                est = estimate_run_memory(cfg, n, M, V, E)
                bound = est.peak + (kept[0] if kept else 0)  # the previous run's kept session is live beside this run
                kept[:] = [est.kept]
                alloc, reserved = max(r["allocated"] for r in stages), max(r["reserved"] for r in stages)
                runs.append({"train_tokens": n, "measured_allocated": alloc, "measured_reserved": reserved, "estimate_peak": est.peak,
                             "estimate_bound": bound, "ratio": round(alloc / bound, 3), "failed": failed,
                             "estimate": {**est.to_dict(), "phase2_step": phase2_step_bytes(cfg, n, V, E)},  # the step's term, in kept
                             "seconds": round(result.seconds, 2) if result else None, "stages": stages})  # fmt: skip
                print(f"{name:>18} {n:>8}: allocated {alloc / GB:6.2f} GB, reserved {reserved / GB:6.2f} GB, estimate {bound / GB:6.2f} GB "
                      f"(x{alloc / bound:.2f}; the run's own {est.peak / GB:.2f} GB, kept after it {est.kept / GB:.2f} GB){' FAILED ' + failed if failed else ''}",
                      flush=True)  # fmt: skip
        gc.collect()
        kept[:] = [kept_est]
        left = torch.cuda.memory_allocated()
        return {"config": name, "mode": mode, "L_C_k": CONFIGS[name], "share": share, "cap_bytes": cap, "runs": runs,
                "measured_allocated": max(r["measured_allocated"] for r in runs), "measured_reserved": max(r["measured_reserved"] for r in runs),
                "estimate_peak": peak, "estimate_kept": kept_est, "allocated_after": left,
                "within": all(r["measured_allocated"] <= r["estimate_bound"] for r in runs) and left <= kept_est + before + WORKSPACE_BYTES,
                "reserved_within_cap": cap is None or all(r["measured_reserved"] <= cap for r in runs)}  # fmt: skip

    kept: list[int] = []
    out["trials"] = [trial(name, mode, release=True) for mode in modes for name in names]
    if args.worker:
        fresh()
        kept.clear()
        ests = [trial_memory(run_cfg(*CONFIGS[n], args.full), sizes, M, V, E, staged=True) for n in names]
        expected = process_bytes(max(p for p, _ in ests), max(k for _, k in ests))
        seq = [trial(name, "staged", release=False, space_process=expected) for name in names]  # nothing released: what a reused worker holds
        cap = seq[0]["cap_bytes"]  # the cap of the space of all the configs
        torch.cuda.synchronize()
        used = nvidia_smi_used(os.getpid())
        max_reserved = max(t["measured_reserved"] for t in seq)
        measured = max(t["measured_allocated"] for t in seq)
        bound = max(p for p, _ in ests) + max(k for _, k in ests)
        out["worker"] = {
            "configs": names, "trials": seq, "measured_allocated": measured, "estimate_peak_plus_kept": bound, "within": measured <= bound,
            "measured_reserved_now": torch.cuda.memory_reserved(), "max_reserved": max_reserved,
            # the driver's view of this process now, and at its peak (the context and what else lies outside the allocator stay)
            "process_used_nvidia_smi": used, "process_peak_derived": None if used is None else used - torch.cuda.memory_reserved() + max_reserved,
            "estimate_process_bytes": expected, "space_cap_bytes": cap,
            "gpu_memory_fraction": GPU_MEMORY_FRACTION,
        }  # fmt: skip
        print(json.dumps({k: v for k, v in out["worker"].items() if k != "trials"}), flush=True)
    out["all_within"] = all(t["within"] for t in out["trials"]) and out.get("worker", {}).get("within", True)
    out["all_reserved_within_cap"] = all(t["reserved_within_cap"] for t in out["trials"])  # the cap in force (the allocator enforces it)
    every = out["trials"] + out.get("worker", {}).get("trials", [])
    out["all_completed"] = not any(r["failed"] for t in every for r in t["runs"])  # no run failed (an OOM under its cap, say)
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(json.dumps({k: out[k] for k in ("all_within", "all_reserved_within_cap", "all_completed")}))


if __name__ == "__main__":
    main()
