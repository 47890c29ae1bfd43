"""The live view of a run: each trial's config, current size and results so far.

On a terminal it is a rich table redrawn in place; in a log (not a TTY) or with --quiet it
prints one line per event; ``--json`` consumers get the final summary instead. A trial handed
to Ray is PENDING until its worker starts it; the title gives the run's done/total (total:
what the run will do as far as known now: queued configs plus the rest of its budget).
Sizes whose runs hit a training cap are marked ``capped``; repeats are one line each.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.live import Live
from rich.table import Table

from archsearch.console import err_console
from archsearch.result import SizeRecord


def _params_text(params: dict[str, Any]) -> str:
    short = {"num_layers": "L", "context_dim": "C", "num_input_tokens": "k"}
    return " ".join(f"{short.get(k, k)}={v:g}" if isinstance(v, float) else f"{short.get(k, k)}={v}" for k, v in params.items())


class LiveView:
    def __init__(self, n_sizes: int, unit: str, objective_labels: list[str], mode: str = "auto"):
        self.n_sizes, self.unit, self.labels = n_sizes, unit, objective_labels
        self.rows: dict[int, dict[str, Any]] = {}
        interactive = err_console.is_terminal if mode == "auto" else mode == "live"
        self.mode = "quiet" if mode == "quiet" else ("live" if interactive else "lines")
        self._live: Live | None = None
        self.t0 = time.time()
        self.progress: tuple[int, int] | None = None
        """(done, total) of this run, set by the bridge before each update."""
        self.repeats = 0

    def __enter__(self) -> "LiveView":
        if self.mode == "live":
            self._live = Live(self._table(), console=err_console, refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(*exc)

    def update(self, event: str, lt, state: str | None = None, values=None, reason: str | None = None) -> None:
        row = self.rows.setdefault(lt.number, {"name": lt.name, "params": lt.params, "state": "PENDING", "ppl": [], "value": None, "started": time.time()})
        if event == "pending":
            line = f"trial {lt.number} {lt.name}: pending, waiting for a worker ({_params_text(lt.params)})" + self._done_text()
        elif event == "start":
            row["state"] = "RUNNING"
            line = f"trial {lt.number} {lt.name}: started ({_params_text(lt.params)})"
        elif event == "size":
            rec: SizeRecord = lt.records[-1]
            row["ppl"].append(rec.val_ppl)
            if rec.capped:
                row["capped"] = row.get("capped", 0) + 1
            vals = list((lt.partial or {}).get("objectives", {}).values())
            row["value"] = vals[0] if vals else None
            row["cached"] = rec.cached
            line = (f"trial {lt.number} {lt.name}: size {len(lt.records)}/{self.n_sizes} ({rec.size:,} {self.unit}) "
                    f"PPL {rec.val_ppl:.1f}" + (" (cached)" if rec.cached else f" in {rec.seconds:.1f} s")
                    + (f" [capped: {', '.join(rec.capped)}]" if rec.capped else ""))  # fmt: skip
        elif event == "progress":
            row["phase"] = reason
            line = f"trial {lt.number} {lt.name}: {reason}"
        elif event == "end":
            row["state"] = state
            if values:
                row["value"] = values[0]
            row["reason"] = reason
            row.pop("phase", None)
            line = (f"trial {lt.number} {lt.name}: {state}" + (f" {', '.join(f'{v:.4g}' for v in values)}" if values else "")
                    + (f" ({reason})" if reason else "") + self._done_text())  # fmt: skip
        else:
            return
        self._emit(line)

    def repeat(self, number: int, name: str, params: dict[str, Any], reason: str) -> None:
        """A proposal answered from the study: a line, no row (it is not a trial that runs)."""
        self.repeats += 1
        self._emit(f"trial {number}: {reason} ({_params_text(params)})")

    def _done_text(self) -> str:
        return f" [{self.progress[0]}/{self.progress[1]} done]" if self.progress else ""

    def _emit(self, line: str) -> None:
        if self.mode == "lines":
            print(line, file=sys.stderr, flush=True)
        elif self._live is not None:
            self._live.update(self._table())

    def _table(self) -> Table:
        states = [r["state"] for r in self.rows.values()]
        title = (f"archsearch: {self.progress[0]}/{self.progress[1]} done" if self.progress else f"archsearch: {len(self.rows)} trials")
        title += f", {states.count('RUNNING')} running, {states.count('PENDING')} pending"
        title += (f", {self.repeats} repeats answered from the study" if self.repeats else "") + f", {time.time() - self.t0:.0f} s"
        t = Table(title=title, title_justify="left")
        for col in ("#", "config", "params", "state", "sizes", "now", "PPL by size", self.labels[0] if self.labels else "objective"):
            t.add_column(col)
        for number, r in sorted(self.rows.items()):
            t.add_row(
                str(number), r["name"], _params_text(r["params"]), r["state"] if not r.get("reason") or r["state"] == "COMPLETE" else f"{r['state']}: {r['reason'][:40]}",
                f"{len(r['ppl'])}/{self.n_sizes}" + (f" ({r['capped']} capped)" if r.get("capped") else ""), r.get("phase", ""), " ".join(f"{p:.0f}" for p in r["ppl"]),
                "-" if r["value"] is None else f"{r['value']:.4g}",
            )  # fmt: skip
        return t
