"""Where archsearch keeps things: ``$ARCHSEARCH_HOME`` (default ``./studies``).

    <home>/archsearch.db   default study storage (SQLite)
    <home>/data/           prepared data, one folder per source and tokenizer
    <home>/runs/           the run cache
    <home>/artifacts/      trial artifacts (plots, tables) shown by optuna-dashboard

Paths are made absolute before they reach Ray workers, whose working directory differs.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("ARCHSEARCH_HOME", "studies")).expanduser().resolve()


def default_storage() -> str:
    return f"sqlite:///{home() / 'archsearch.db'}"


def run_cache_dir() -> Path:
    return home() / "runs"


def artifact_dir() -> Path:
    return home() / "artifacts"
