"""Helpers of the tests (importable: ``from helpers import ...``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def tiny_space(corpus: dict, **sections) -> dict:
    """A small grid space on the tiny corpus; ``sections`` replace top-level keys."""
    space = {
        "study": {"name": "tiny"},
        "objective": "alpha",
        "sampler": {"type": "grid", "configs": {
            "a": {"num_layers": 1, "context_dim": 8, "num_input_tokens": 1},
            "b": {"num_layers": 2, "context_dim": 8, "num_input_tokens": 2},
        }},
        "data": {"source": "files", "paths": corpus["paths"], "tokenizer": corpus["tokenizer"], "cache_dir": corpus["cache_dir"],
                 "sizes": {"tokens": [400, 800, 1600]}, "val_tokens": 300},
        "phase1": {"batch_size": 200, "max_iterations": 6},
        "phase2": {"batch_size": 64, "max_epochs": 2},
        "resources": {"gpus": 0, "cpus": 1},
        "max_concurrent": 2,
    }  # fmt: skip
    space.update(sections)
    return space


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``archsearch`` in a subprocess, as a user would."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run([sys.executable, "-m", "archsearch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)  # fmt: skip


def read_trials(db: Path, study: str):
    """The trials of a SQLite study that another process may be creating: read-only (no
    table creation that could race with the writer)."""
    import optuna

    from archsearch.search.storage import open_storage

    return optuna.load_study(study_name=study, storage=open_storage(f"sqlite:///{db}", create=False)).get_trials()
