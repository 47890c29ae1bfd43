"""`archsearch run SPACE` N times, each with a fresh ARCHSEARCH_HOME: the command's wall time
and its own split (``--json`` timings), to measure its fixed costs (Ray's start, worker
start-up, first use) before and after a change; JSON out.

    python scripts/bench_command.py spaces/quickstart.yaml -n 3 --out benchmarks/cpu_quickstart_command.json
    python scripts/bench_command.py spaces/quickstart.yaml -n 3 --set "data.sizes={tokens: [1000, 2000]}"
    python scripts/bench_command.py spaces/quickstart.yaml -n 3 --before /tmp/old_checkout   # before and after, alternating
    python scripts/bench_command.py spaces/quickstart.yaml -n 3 --before . --before-env ARCHSEARCH_WORKER_WARMUP=0   # a switch

Each command is a subprocess (``sys.executable -m archsearch.cli run SPACE --json ... --quiet``,
in the tree of ``--repo``, or of ``--before`` and ``--repo`` in turn) timed around the whole process; the prepared data is
shared between the commands (the space's ``data.cache_dir``, or a shared folder of this
script's), so a command prepares it once at most and the rest load and verify it. Per command:
wall; the run's ``timings``, contiguous laps from the process's start to the writing of its
JSON (imports, space, checks, ray_init, data_wait, study, trials, record, publish, summary,
ray_shutdown; ``data``, ``warm_imports``, ``gpu_memory`` and ``late_imports`` run beside
them and are not laps), their sum and ``exit`` (wall
minus that sum: the interpreter's exit after the JSON, and the process's launch); per trial,
its worker's start-up (hand-out to its first line), the time from the trials lap's start to
the first hand-out (Tune's start) and from the last trial's end to the process's exit; and the per-size rows of every trial, read from the study the command
wrote (seconds, the validation PPL (to compare two trees' numbers), the phases' seconds, phase-1 iterations, phase-2 epochs, the recurrent
validation pass's step time), and per trial its worker's start (``workers``: imports at the
trainable's entry, the warm-up thread's seconds and the trial's wait for it); ``outside_run_s``, wall minus the runner's own seconds (what
the CLI, Ray's stop and the exit add), which code from before the laps gives too (it has no
``imports`` key, so no laps' sum or ``exit``). Then the medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the study's reader: this tree's archsearch


def one_command(space: Path, overrides: list[str], home: Path, env: dict, repo: Path = REPO) -> dict:
    out = home / "run.json"
    cmd = [sys.executable, "-m", "archsearch.cli", "run", str(space), *overrides, "--json", str(out), "--quiet"]
    t0 = time.perf_counter()
    # run in the tree's root: `python -m` puts the working folder first on the path, before PYTHONPATH
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, ARCHSEARCH_HOME=str(home)), cwd=repo)
    wall, exited = time.perf_counter() - t0, time.time()
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    run = json.loads(out.read_text())
    sizes, workers = study_rows(run)
    return summarise(run, wall, exited) | {"sizes": sizes, "workers": workers}


OVERLAPPED = ("data", "gpu_memory", "warm_imports", "late_imports")
"""Timings that run beside the laps (archsearch.timing.OVERLAPPED; repeated here so that
code from before the laps can be measured)."""


def summarise(run: dict, wall: float, exited: float | None = None) -> dict:
    """A command's numbers from its ``--json`` record: its laps and what they leave of the wall
    time, and per trial the worker's start-up (from the trial's hand-out to its first line of
    trial code: Tune's actor, a worker process, its imports) and the trial's own time, in the
    order the trials were handed out."""
    trials = sorted((t for t in run.get("trials", []) if t.get("started") and t.get("ended")), key=lambda t: t.get("handed_out") or t["started"])
    timings = run.get("timings", {})
    starts = [t["started"] - t["handed_out"] for t in trials if t.get("handed_out")]
    laps = sum(v for k, v in timings.items() if k not in OVERLAPPED)
    row = {"wall_s": wall, "timings": timings, "trials": len(run.get("trials", [])),
           "trial_seconds_sum": sum(t["ended"] - t["started"] for t in trials),
           "worker_start_s": starts, "first_worker_start_s": starts[0] if starts else None,
           "outside_trials_s": wall - timings.get("trials", 0.0), "run_seconds": run.get("seconds"),
           "outside_run_s": wall - (run.get("seconds") or 0.0)}  # fmt: skip
    if "imports" in timings:  # laps from the process's start (archsearch.timing)
        row |= {"laps_sum_s": laps, "exit_s": wall - laps}
    if exited is not None and trials:
        row["after_last_trial_s"] = exited - max(t["ended"] for t in trials)
        if "imports" in timings:  # the trials lap's start, counted back from the exit: Tune's start until its first hand-out
            keys = list(timings)
            after = sum(timings[k] for k in keys[keys.index("trials") :] if k not in OVERLAPPED)
            row["first_hand_out_s"] = min(t["handed_out"] for t in trials if t.get("handed_out")) - (exited - row["exit_s"] - after)
    return row


def study_rows(run: dict) -> tuple[list[dict], list[dict]]:
    """Every trial's per-size records, from the study the command wrote (archsearch's own
    reader of the per-size records, archsearch.result.SizeRecord), and per trial its worker's
    start: its imports at the trainable's entry and its warm-up thread's seconds, the seconds
    the trial waited for it and its error (search/trainable.Warmup; absent when it was off)."""
    import optuna

    from archsearch.result import SizeRecord
    from archsearch.search.storage import existing_storage

    _, storage = existing_storage(run["storage"])
    study = optuna.load_study(study_name=run["study"], storage=storage)
    rows = []
    for t in study.get_trials(deepcopy=False):
        for rec in map(SizeRecord.from_dict, t.user_attrs.get("sizes") or []):
            m = rec.metrics
            rows.append({"trial": t.number, "config": t.user_attrs.get("config_name"), "size": rec.size, "train_tokens": rec.train_tokens,
                         "seconds": rec.seconds, "val_ppl": rec.val_ppl, **{f"{k}_s": v for k, v in rec.phase_seconds.items()},
                         "phase1_iterations": m.get("phase1_iterations"), "phase2_epochs": m.get("phase2_stopped_epoch"),
                         "phase2_best_epoch": m.get("phase2_best_epoch"), "val_step_us": m.get("val_step_us"),
                         "cached": rec.cached, "device": rec.device})  # fmt: skip
    workers = []
    for t in study.get_trials(deepcopy=False):
        w = t.user_attrs.get("worker")
        if w:
            warm = w.get("warmup") or {}
            workers.append({"trial": t.number, "config": t.user_attrs.get("config_name"), "process_age_s": w.get("process_age_s"),
                            "imports_s": w.get("imports_s"), "warmup_s": warm.get("seconds"), "warmup_waited_s": warm.get("waited_s"),
                            "warmup_error": warm.get("error")})  # fmt: skip
    return rows, workers


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _env(repo: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(repo.resolve()), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def _print_row(label: str, r: dict) -> None:
    print(f"{label}: wall {r['wall_s']:.1f} s | " + ", ".join(f"{k} {v:.2f}" for k, v in r["timings"].items())
          + (f" | exit {r['exit_s']:.2f}" if "exit_s" in r else "") + f" | outside trials {r['outside_trials_s']:.1f} s"
          + f" | outside run_search {r['outside_run_s']:.1f} s"
          + (f" | after the last trial {r['after_last_trial_s']:.1f} s" if "after_last_trial_s" in r else "")
          + (f" | first hand-out {r['first_hand_out_s']:.1f} s into the trials" if "first_hand_out_s" in r else "")
          + " | worker start-ups " + " ".join(f"{x:.1f}" for x in r["worker_start_s"]), flush=True)  # fmt: skip
    for row in r["sizes"] + r["workers"]:
        print("    " + " ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


def medians(rows: list[dict]) -> dict:
    med = lambda key: _median(r.get(key) for r in rows)  # noqa: E731
    parts = list(dict.fromkeys(k for r in rows for k in r["timings"]))  # in the laps' order
    return {
        "commands": len(rows),
        "median_wall_s": med("wall_s"),
        "median_outside_trials_s": med("outside_trials_s"),
        "median_outside_run_s": med("outside_run_s"),
        "median_exit_s": med("exit_s"),
        "median_after_last_trial_s": med("after_last_trial_s"),
        "median_first_hand_out_s": med("first_hand_out_s"),
        "median_first_worker_start_s": med("first_worker_start_s"),
        "median_worker_start_s": _median(x for r in rows for x in r["worker_start_s"]),
        "median_timings": {k: _median(r["timings"].get(k) for r in rows) for k in parts},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("space", type=Path)
    ap.add_argument("-n", type=int, default=3, help="commands, each with a fresh ARCHSEARCH_HOME")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="an override for every command (repeatable)")
    ap.add_argument("--label", default="", help="what this measurement is of (goes into the JSON)")
    ap.add_argument("--repo", type=Path, default=REPO, help="the source tree whose archsearch the commands run (default: this one)")
    ap.add_argument("--before", type=Path, help="another source tree (the code before a change): each round runs one command "
                    "of it, then one of --repo, so that the machine's load falls on both alike")  # fmt: skip
    ap.add_argument("--before-env", action="append", default=[], metavar="K=V", help="an environment variable for the --before "
                    "commands only (repeatable): with --before the same tree, an A/B of a switch, e.g. ARCHSEARCH_WORKER_WARMUP=0")  # fmt: skip
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    trees = {"before": args.before, "after": args.repo} if args.before else {"after": args.repo}
    envs = {name: _env(repo) for name, repo in trees.items()}
    if args.before_env:
        if not args.before:
            raise SystemExit("--before-env needs --before")
        envs["before"] |= dict(kv.split("=", 1) for kv in args.before_env)
    load_before = os.getloadavg()[0]
    rows: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="bench_command_") as tmp:
        overrides = list(args.set)
        if not any(o.startswith("data.cache_dir") for o in overrides):
            overrides.append(f"data.cache_dir={Path(tmp) / 'data'}")  # shared: prepared by the first command
        for i in range(args.n):
            for name in trees:
                home = Path(tmp) / f"{name}{i}"
                home.mkdir()
                rows[name].append(one_command(args.space.resolve(), overrides, home, envs[name], trees[name].resolve()))
                _print_row(f"command {i + 1}/{args.n}" + (f" ({name})" if args.before else ""), rows[name][-1])
    out = {
        "benchmark": f"archsearch run {args.space} {' '.join(args.set)}".strip(),
        "label": args.label,
        "repo": str(args.repo),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f}",
    }
    if args.before:
        out["before"] = {"repo": str(args.before), "env": args.before_env, **medians(rows["before"]), "runs": rows["before"]}
    out |= medians(rows["after"]) | {"runs": rows["after"]}
    for name in trees:
        m = out[name] if name == "before" else out
        print(f"{name}: median wall {m['median_wall_s']:.1f} s, outside the trials {m['median_outside_trials_s']:.1f} s, "
              f"outside run_search {m['median_outside_run_s']:.1f} s: " + ", ".join(f"{k} {v:.2f}" for k, v in m["median_timings"].items())
              + (f", exit {m['median_exit_s']:.2f}" if m["median_exit_s"] is not None else ""))  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
