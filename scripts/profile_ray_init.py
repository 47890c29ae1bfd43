"""Where the embedded Ray's start (``archsearch run``'s ``ray_init`` lap) spends its time:
each variant in a fresh process, the variants alternating round by round; JSON out.

    python scripts/profile_ray_init.py -n 4 --out benchmarks/cpu_ray_init.json
    python scripts/profile_ray_init.py -n 4 --variants prompt,ray_wait,prompt+imports,ray_wait+imports

A variant is ``prompt`` (archsearch's init_ray as it is: the raylet's registration noticed
within runner.NODE_POLL_S) or ``ray_wait`` (Ray's own one-second wait loop for it), with
``+imports`` the command's imports beside it in a thread (runner.WARM_IMPORTS, as
``archsearch run`` does; ``+late`` adds runner.LATE_IMPORTS to them, the split before this
change; ``+torch`` adds torch, which the driver imported for ``resources.gpus: auto`` before
this change). Per start: the seconds of ``init_ray``, of the first actor's first call after it,
and of Ray's steps (Node's start methods and the wait for the raylet's registration,
``services.get_node``), each as (start, seconds) from the process's start; ``node_wait_s``,
from the raylet's start to the end of the wait for its registration; the beside-imports'
own seconds and when they ended. Then the medians and ranges per variant.
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
STEPS = ("start_gcs_server", "start_monitor", "start_api_server", "start_log_monitor", "start_raylet")


def one_start(variant: str, home: str) -> dict:
    """In this (fresh) process: one embedded Ray start as ``variant``, then its stop."""
    t0 = time.perf_counter()
    sys.path.insert(0, str(REPO))
    os.environ["ARCHSEARCH_HOME"] = home
    import contextlib
    import functools
    import threading

    from archsearch.search import runner

    import ray
    from ray._private import node as ray_node
    from ray._private import services

    steps: list[tuple[str, float, float]] = []

    def timed(owner, name):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                steps.append((name, round(t - t0, 3), round(time.perf_counter() - t, 3)))

        setattr(owner, name, wrapper)

    for name in STEPS:
        timed(ray_node.Node, name)
    parts = variant.split("+")
    if parts[0] == "ray_wait":
        runner._prompt_node_wait = contextlib.nullcontext
    timed(services, "get_node")  # inside the prompt wait's wrapper: the node's registration is waited for around it
    beside: dict = {}
    if "imports" in parts:
        names = runner.WARM_IMPORTS + (runner.LATE_IMPORTS if "late" in parts else ()) + (("torch",) if "torch" in parts else ())

        def imports() -> None:
            beside["seconds"] = runner._import_all(names)
            beside["ended"] = round(time.perf_counter() - t0, 3)

        threading.Thread(target=imports, daemon=True).start()
    t1 = time.perf_counter()
    runner.init_ray(None, temp_dir=runner.ray_temp_dir(note=False))
    t2 = time.perf_counter()

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    ray.get(Probe.remote().pid.remote())
    t3 = time.perf_counter()
    runner.stop_embedded_ray()
    ends = {name: start + seconds for name, start, seconds in steps}
    node_wait = round(ends["get_node"] - ends["start_raylet"], 3) if {"get_node", "start_raylet"} <= ends.keys() else None
    return {"variant": variant, "node_wait_s": node_wait, "before_s": round(t1 - t0, 3), "init_ray_s": round(t2 - t1, 3), "init_ray_ended": round(t2 - t0, 3),
            "first_actor_s": round(t3 - t2, 3), "steps": steps, "beside_imports": beside}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=4, help="rounds (each runs every variant once, in a fresh process)")
    ap.add_argument("--variants", default="prompt,ray_wait,prompt+imports,ray_wait+imports")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_start(args.one, args.home)))
        return
    variants = args.variants.split(",")
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="profile_ray_init_") as tmp:
        for i in range(args.n):
            for v in variants:
                home = Path(tmp) / f"{v}-{i}".replace("+", "_")
                out = subprocess.run([sys.executable, __file__, "--one", v, "--home", str(home)], capture_output=True, text=True, cwd=REPO)
                if out.returncode != 0:
                    raise SystemExit(f"{v}: {out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows[v].append(row)
                print(f"round {i + 1} {v}: init_ray {row['init_ray_s']:.2f} s, node wait {row['node_wait_s']} s, first actor {row['first_actor_s']:.2f} s, "
                      + ", ".join(f"{n} {d:.2f}" for n, _, d in row["steps"]), flush=True)  # fmt: skip
    summary = {}
    for v, rs in rows.items():
        init = [r["init_ray_s"] for r in rs]
        summary[v] = {"median_init_ray_s": statistics.median(init), "min_init_ray_s": min(init), "max_init_ray_s": max(init),
                      "median_first_actor_s": statistics.median(r["first_actor_s"] for r in rs),
                      "median_node_wait_s": statistics.median(r["node_wait_s"] for r in rs if r["node_wait_s"] is not None),
                      "node_wait_s": [r["node_wait_s"] for r in rs],
                      "median_steps_s": {n: statistics.median(d for r in rs for m, _, d in r["steps"] if m == n)
                                         for n in dict.fromkeys(m for r in rs for m, _, _ in r["steps"])}}  # fmt: skip
        print(f"{v}: init_ray median {summary[v]['median_init_ray_s']:.2f} s (range {min(init):.2f}-{max(init):.2f}), "
              f"node wait median {summary[v]['median_node_wait_s']:.2f} s, steps "
              + ", ".join(f"{n} {d:.2f}" for n, d in summary[v]["median_steps_s"].items()))  # fmt: skip
    out = {"script": "scripts/profile_ray_init.py", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": f"{platform.node()}: {os.cpu_count()} CPUs, load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f}",
           "rounds": args.n, "summary": summary, "runs": rows}  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
