"""`archsearch run` on 1 GPU and on all GPUs of a host: speed-up of a search through Ray Tune.

    python scripts/bench_ray_gpus.py --out benchmarks/h200x2_ray_grid4.json
    python scripts/bench_ray_gpus.py --extra-configs 12 --out ...   # a 16-config grid

Each measured command is the framework's own path, a subprocess running
``archsearch run SPACE --json ...`` (its progress lines go to a log) with a fresh ``$ARCHSEARCH_HOME`` (new study, empty
run cache) and the prepared data shared (``data.cache_dir``); one GPU is
``CUDA_VISIBLE_DEVICES=<first>``. A warm-up command (the same configs on small sizes, not
timed) first fills Triton's kernel cache, as any earlier run on the machine would have. The
JSON holds, per command: the wall time (timed here, around the whole subprocess), the run's
own split (Ray start, data, study, trials, publish), every trial's start, end, worker process
and per-size seconds; and the speed-ups: whole command, and the trial part alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from archsearch.space import load_yaml, parse_space  # noqa: E402

# configs added to the space's own for a larger grid (--extra-configs N takes the first N)
EXTRA = {
    "layers_5": {"num_layers": 5, "context_dim": 768, "num_input_tokens": 1},
    "layers_7": {"num_layers": 7, "context_dim": 768, "num_input_tokens": 1},
    "context_dim_896": {"num_layers": 6, "context_dim": 896, "num_input_tokens": 1},
    "context_dim_640": {"num_layers": 6, "context_dim": 640, "num_input_tokens": 1},
    "layers_4": {"num_layers": 4, "context_dim": 768, "num_input_tokens": 1},
    "layers_8": {"num_layers": 8, "context_dim": 768, "num_input_tokens": 1},
    "context_dim_1024": {"num_layers": 6, "context_dim": 1024, "num_input_tokens": 1},
    "context_dim_512": {"num_layers": 6, "context_dim": 512, "num_input_tokens": 1},
    "input_tokens_3": {"num_layers": 6, "context_dim": 768, "num_input_tokens": 3},
    "layers_3": {"num_layers": 3, "context_dim": 768, "num_input_tokens": 1},
    "layers_9_ctx_640": {"num_layers": 9, "context_dim": 640, "num_input_tokens": 1},
    "input_tokens_2_ctx_640": {"num_layers": 6, "context_dim": 640, "num_input_tokens": 2},
}


def _query_gpus(field: str) -> list[str]:
    """One nvidia-smi field per GPU of the machine (empty where nvidia-smi is missing)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [g for g in env.split(",") if g.strip()]
    return _query_gpus("index")


def write_space(src: Path, extra: int, dest: Path) -> tuple[Path, list[str]]:
    """The space file ``src`` with the first ``extra`` configs of EXTRA added, checked by
    archsearch's parser before any command runs it."""
    space = load_yaml(src)
    configs = dict(space["sampler"]["configs"])
    for name in list(EXTRA)[:extra]:
        configs[name] = EXTRA[name]
    space["sampler"]["configs"] = configs
    if extra:
        space["study"] = dict(space.get("study") or {}, name=f"{space.get('study', {}).get('name', 'bench')}_plus_{extra}")
    parse_space(space, str(dest))
    dest.write_text(yaml.safe_dump(space, sort_keys=False))
    return dest, list(configs)


def run_command(space: Path, gpus: list[str], data_dir: Path, overrides: list[str], log: Path, keep: Path | None = None) -> dict:
    home = Path(tempfile.mkdtemp(prefix="bench-home-")) if keep is None else keep
    home.mkdir(parents=True, exist_ok=True)
    summary = home / "run_summary.json"
    env = dict(os.environ, ARCHSEARCH_HOME=str(home), CUDA_VISIBLE_DEVICES=",".join(gpus), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "archsearch.cli", "run", str(space), f"data.cache_dir={data_dir}", *overrides, "--json", str(summary)]
    t = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall = time.perf_counter() - t
    out: dict = {"gpus": gpus, "command": " ".join(cmd[2:]), "returncode": rc, "command_wall_s": wall}
    if rc != 0 or not summary.exists():
        out["log_tail"] = log.read_text()[-3000:]
        return out
    s = json.loads(summary.read_text())
    out["run_seconds"] = s["seconds"]
    out["timings"] = s.get("timings", {})
    out["trials"] = _trials(s, home)
    starts = [t["started"] for t in s["trials"] if t.get("started")]
    ends = [t["ended"] for t in s["trials"] if t.get("ended")]
    if starts and ends:
        out["first_start_to_last_end_s"] = max(ends) - min(starts)
    if keep is None:
        shutil.rmtree(home, ignore_errors=True)
    return out


def _trials(summary: dict, home: Path) -> list[dict]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{home / 'archsearch.db'}")
    attrs = {t.number: t.user_attrs for t in study.get_trials(deepcopy=False)}
    t0 = min(t["started"] for t in summary["trials"] if t.get("started"))
    rows = []
    for t in sorted(summary["trials"], key=lambda t: t.get("started") or 0):
        ua = attrs.get(t["number"], {})
        sizes = ua.get("sizes") or []
        rows.append({
            "config": t["name"], "state": t["state"], "values": t["values"], "pid": t.get("pid"),
            "start_s": (t["started"] or t0) - t0, "end_s": (t["ended"] or t0) - t0,
            "trial_seconds": ua.get("wall_seconds"), "device": ua.get("device"), "worker": ua.get("worker"),
            "sizes": [{k: r.get(k) for k in ("train_tokens", "seconds", "phase1_seconds", "phase1_iterations", "contexts_seconds",
                                               "er_seconds", "phase2_seconds", "phase2_stopped_epoch", "val_ppl")} for r in sizes],
        })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", type=Path, default=REPO / "spaces" / "grid_4arch_offline.yaml")
    ap.add_argument("--extra-configs", type=int, default=0, help=f"add this many configs to the space's (at most {len(EXTRA)})")
    ap.add_argument("--data-dir", type=Path, default=REPO / "studies" / "data", help="prepared data (shared by every command)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up command")
    ap.add_argument("--keep-one-gpu", type=Path, help="keep the one-GPU command's ARCHSEARCH_HOME (study, artifacts) here")
    ap.add_argument("--logs", type=Path, help="folder for the commands' output (default: a temporary one)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every measured command")
    args = ap.parse_args()

    gpus = visible_gpus()
    if len(gpus) < 2:
        sys.exit(f"bench_ray_gpus: needs 2 or more visible GPUs, found {len(gpus)}")
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    logs = args.logs or work
    logs.mkdir(parents=True, exist_ok=True)
    space, configs = write_space(args.space, args.extra_configs, work / "space.yaml")
    data_dir = args.data_dir.resolve()
    result: dict = {
        "benchmark": "archsearch run through Ray Tune, one GPU against all GPUs of one host",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "devices": _query_gpus("name"), "space": str(args.space.relative_to(REPO) if args.space.is_relative_to(REPO) else args.space),
        "configs": configs, "overrides": args.overrides,
        "how": __doc__.split("\n\n", 2)[2].strip(),
    }  # fmt: skip
    try:
        import optuna
        import ray
        import torch

        from archsearch.runcache import ENGINE_VERSION

        result.update(torch=torch.__version__, ray=ray.__version__, optuna=optuna.__version__, engine_version=ENGINE_VERSION)
    except ImportError as e:
        sys.exit(f"bench_ray_gpus: {e}")
    if not args.no_warmup:
        warm = ["data.sizes={tokens: [4000, 8000]}", "phase1.min_iterations=1", "phase1.max_iterations=2", "phase2.max_epochs=1"]
        r = run_command(space, gpus, data_dir, [*args.overrides, *warm], logs / "warmup.log")
        result["warmup"] = {"command_wall_s": r["command_wall_s"], "returncode": r["returncode"]}
        print(f"warm-up: {r['command_wall_s']:.1f} s (rc {r['returncode']})", flush=True)
    runs = {}
    for label, use in (("one_gpu", gpus[:1]), ("all_gpus", gpus)):
        keep = args.keep_one_gpu if label == "one_gpu" else None
        runs[label] = r = run_command(space, use, data_dir, args.overrides, logs / f"{label}.log", keep)
        print(f"{label} ({len(use)} GPU): {r['command_wall_s']:.1f} s, rc {r['returncode']}, timings "
              + ", ".join(f"{k} {v:.1f}" for k, v in r.get("timings", {}).items()), flush=True)  # fmt: skip
        if r["returncode"] != 0:
            print(r.get("log_tail", ""), file=sys.stderr)
    result.update(runs)
    one, every = runs["one_gpu"], runs["all_gpus"]
    if one["returncode"] == 0 and every["returncode"] == 0:
        result["speedup_command"] = one["command_wall_s"] / every["command_wall_s"]
        result["speedup_trials"] = one["timings"]["trials"] / every["timings"]["trials"]
        print(f"speed-up on {len(gpus)} GPUs: whole command {result['speedup_command']:.2f}x, trials part {result['speedup_trials']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.logs:  # else the logs are in `work`: keep them
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
