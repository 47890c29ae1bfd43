"""Time and peak memory of `archsearch validate` on the worst inputs the limits allow.

Each case runs in a fresh subprocess (peak RSS is per process) and is timed inside it
(parse + validate, not the interpreter's start). Writes benchmarks/validate_limits.json.

    python scripts/bench_validate.py [--out benchmarks/validate_limits.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOOD = "data: {source: wiki, sizes: {tokens: [1000, 2000, 4000]}}\n"
CASES = {
    "good_space": GOOD,
    "alias_bomb_12_levels": "model:\n  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 12)) + GOOD,
    "largest_document_of_mappings": "sampler: {type: grid, configs: {"
    + ", ".join(f"c{i}: {{num_layers: {i % 8 + 1}}}" for i in range(4_000)) + "}}\n" + GOOD,
    "largest_document_of_sizes": "data: {source: wiki, sizes: {tokens: [" + ", ".join(str(i + 1) for i in range(20_000)) + "]}}\n",
    "grid_of_10000_points": "parameters: {num_layers: {type: int, low: 1, high: 100}, context_dim: {type: int, low: 8, high: 800, step: 8}}\n" + GOOD,
    "grid_of_1e10_points": "parameters: {phase1.lr: {type: float, low: 0.001, high: 1, step: 0.00001}, phase2.lr: {type: float, low: 0.001, high: 1, step: 0.00001}}\n" + GOOD,
    "num_layers_1e9": "model: {num_layers: 1.0e9}\n" + GOOD,
    "deep_nesting": "model: " + "[" * 900 + "]" * 900 + "\n" + GOOD,
}

CHILD = r"""
import resource, sys, time
t = time.perf_counter()
from archsearch.cli import main
try:
    main(["validate", sys.argv[1]])
    code = 0
except SystemExit as e:
    code = e.code
print("RESULT", code, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/validate_limits.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = subprocess.run([sys.executable, "-c", "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
        for name, text in CASES.items():
            p = Path(tmp) / f"{name}.yaml"
            p.write_text(text)
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", CHILD, str(p)], capture_output=True, text=True, timeout=120,
                               env={"ARCHSEARCH_HOME": str(Path(tmp) / "home"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
            line = [x for x in r.stderr.splitlines() if x.startswith("RESULT")][-1].split()
            rows.append({"case": name, "bytes": len(text.encode()), "exit": int(line[1]), "seconds_in_process": round(float(line[2]), 3),
                         "peak_rss_mb": round(int(line[3]) / 1024, 1), "seconds_with_start": round(time.perf_counter() - t, 3)})  # fmt: skip
            print(rows[-1])
    out = {"machine": platform.node(), "cpus": __import__("os").cpu_count(), "python": platform.python_version(),
           "bare_interpreter_rss_mb": round(int(base) / 1024, 1), "cases": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
