"""The run cache: one computed (architecture + hyperparameters, data, size, seed) run, reused.

A run's key hashes everything that decides its numbers: the RunConfig's computing fields
(for a family other than CVFP: its name, version and config), the fingerprint of the exact
training prefix + validation stream + embedding, the seed, CVFP's engine version (CVFP runs
only) and the record version. An entry holds one ``RunResult.to_dict()``. Entries are small JSON files under ``<root>/<key[:2]>/<key>.json``
written atomically (temp file + rename), each carrying a sha256 of its record: a corrupted
or truncated entry is reported, removed and recomputed, never used. Works for any number
of processes on one (shared) filesystem; the last writer of identical content wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from archsearch.config import RunConfig
from archsearch.result import RunResult

log = logging.getLogger(__name__)

ENGINE_VERSION = 4  # 2: GPU bias added inside the fused norm (rounding), er_seconds in records;
# 3: GPU layer gradients from fp32-output GEMMs, epochs' last batches through the phase-2 graph,
# the embedding's LayerNorm on the device (rounding); 4 (GPU only, rounding): the cross-entropy's
# sums per column group, the gradient clip applied inside the fused Adam, every phase-2 step
# replayed from the graph, the first included
"""Bump when the engine's computation changes, so older cached runs are not reused (every
device's keys change; a change of the GPU paths only bumps GPU_ENGINE_VERSION instead)."""

GPU_ENGINE_VERSION = 2  # 1 (rounding): phase 1's fused iteration the default (engine.phase1_fused);
# 2 (rounding): phase 2's fused step the default (engine.phase2_fused)
"""Bump when only the GPU paths' computation changes (CVFP runs on a CUDA device): their keys
change, a CPU run's key stays what it was."""

RECORD_VERSION = 2  # 2: a RunResult (was a flat dict of ~30 keys)
"""Bump when the stored record's form changes (the numbers may be the same)."""


def engine_version(device: str | None = None) -> int | list[int]:
    """CVFP's engine version as a run key holds it: ENGINE_VERSION for a CPU run (or where the
    caller names no device), [ENGINE_VERSION, GPU_ENGINE_VERSION] for a run on a GPU."""
    kind = str(device or "cpu").split(":")[0]
    return ENGINE_VERSION if kind == "cpu" else [ENGINE_VERSION, GPU_ENGINE_VERSION]


def run_key(cfg: RunConfig, stream_fingerprint: str, seed: int, device: str | None = None) -> str:
    """Config, data, seed, record version, and for CVFP its engine version on ``device`` (a CPU
    run's key is the one it always was; a GPU run's changes with GPU_ENGINE_VERSION too); another
    family's version is in its ``cfg.key()`` (with its name and config), so CVFP's engine version
    does not touch it."""
    blob = json.dumps(
        {"config": cfg.key(), "data": stream_fingerprint, "seed": int(seed),
         "engine": engine_version(device) if cfg.family == "cvfp" else None, "record": RECORD_VERSION},
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()


ENTRY_MAX_BYTES = 4 * 2**20
"""A run-cache entry holds one RunResult (a few KB); a larger file there is corrupted, not read."""


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, allow_nan=True).encode()).hexdigest()


class RunCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> RunResult | None:
        """The run of ``key``, or None. An entry that is not a plain file of at most
        :data:`ENTRY_MAX_BYTES`, not JSON (nested too deeply included), not for ``key`` or not
        matching its checksum is logged as corrupted, removed and recomputed (never read as a
        run, never an error of the trial; a FIFO or a device there is not opened)."""
        path = self._path(key)
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("not a plain file")
            if st.st_size > ENTRY_MAX_BYTES:
                raise ValueError(f"{st.st_size:,} bytes, more than an entry's {ENTRY_MAX_BYTES:,}")
            entry = json.loads(path.read_text())
            record = entry["record"]
            if entry.get("key") != key or entry.get("sha256") != _digest(record):
                raise ValueError("checksum mismatch")
            return RunResult.from_dict(record)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError) as e:
            log.warning("run cache entry %s is corrupted (%s: %s); removing it and recomputing", path, type(e).__name__, str(e)[:200])
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, run: RunResult) -> None:
        record = run.to_dict()
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "sha256": _digest(record), "record": record}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f, allow_nan=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def count(self) -> int:
        """Entries on disk."""
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0
