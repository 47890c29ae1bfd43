"""`archsearch run SPACE` N times, each with a fresh ARCHSEARCH_HOME: the command's wall time
and its own split (``--json`` timings), to measure its fixed costs (Ray's start, worker
start-up, first use) before and after a change; JSON out.

    python scripts/bench_command.py spaces/quickstart.yaml -n 3 --out benchmarks/cpu_quickstart_command.json
    python scripts/bench_command.py spaces/quickstart.yaml -n 3 --set "data.sizes={tokens: [1000, 2000]}"

Each command is a subprocess (``sys.executable -m archsearch.cli run SPACE --json ... --quiet``)
timed around the whole process; the prepared data is shared between the commands (the space's
``data.cache_dir``, or a shared folder of this script's), so a command prepares it once at most
and the rest load and verify it. Per command: wall, the run's ``timings`` (ray_init, data,
study, trials, publish), the sum of the trials' own seconds, and what is left outside the
trials (wall - trials); then the medians.
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


def one_command(space: Path, overrides: list[str], home: Path, env: dict) -> dict:
    out = home / "run.json"
    cmd = [sys.executable, "-m", "archsearch.cli", "run", str(space), *overrides, "--json", str(out), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, ARCHSEARCH_HOME=str(home)), cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    run = json.loads(out.read_text())
    return summarise(run, wall)


def summarise(run: dict, wall: float) -> dict:
    """A command's numbers from its ``--json`` record: per trial, the worker's start-up (from
    the trial's hand-out to its first line of trial code: Tune's actor, a worker process, its
    imports) and the trial's own time."""
    trials = [t for t in run.get("trials", []) if t.get("started") and t.get("ended")]
    timings = run.get("timings", {})
    starts = [t["started"] - t["handed_out"] for t in trials if t.get("handed_out")]
    return {"wall_s": wall, "timings": timings, "trials": len(run.get("trials", [])),
            "trial_seconds_sum": sum(t["ended"] - t["started"] for t in trials),
            "worker_start_s": starts, "first_worker_start_s": starts[-1] if starts else None,
            "outside_trials_s": wall - timings.get("trials", 0.0), "run_seconds": run.get("seconds")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("space", type=Path)
    ap.add_argument("-n", type=int, default=3, help="commands, each with a fresh ARCHSEARCH_HOME")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="an override for every command (repeatable)")
    ap.add_argument("--label", default="", help="what this measurement is of (goes into the JSON)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    with tempfile.TemporaryDirectory(prefix="bench_command_") as tmp:
        overrides = list(args.set)
        if not any(o.startswith("data.cache_dir") for o in overrides):
            overrides.append(f"data.cache_dir={Path(tmp) / 'data'}")  # shared: prepared by the first command
        rows = []
        for i in range(args.n):
            home = Path(tmp) / f"home{i}"
            home.mkdir()
            rows.append(one_command(args.space, overrides, home, env))
            r = rows[-1]
            print(f"command {i + 1}/{args.n}: wall {r['wall_s']:.1f} s | " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
                  + f" | outside trials {r['outside_trials_s']:.1f} s | worker start-ups " + " ".join(f"{x:.1f}" for x in r["worker_start_s"]), flush=True)  # fmt: skip
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    parts = sorted({k for r in rows for k in r["timings"]})
    out = {
        "benchmark": f"archsearch run {args.space} {' '.join(args.set)}".strip(),
        "label": args.label,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, load average before {os.getloadavg()[0]:.1f}",
        "commands": args.n,
        "median_wall_s": med("wall_s"),
        "median_outside_trials_s": med("outside_trials_s"),
        "median_worker_start_s": statistics.median(x for r in rows for x in r["worker_start_s"]) if any(r["worker_start_s"] for r in rows) else None,
        "median_timings": {k: statistics.median(r["timings"].get(k, 0.0) for r in rows) for k in parts},
        "runs": rows,
    }
    print(f"median wall {out['median_wall_s']:.1f} s, outside the trials {out['median_outside_trials_s']:.1f} s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in out["median_timings"].items()))  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
