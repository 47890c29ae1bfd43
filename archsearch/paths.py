"""Where archsearch keeps things: ``$ARCHSEARCH_HOME`` (default ``./studies``).

    <home>/archsearch.db   default study storage (SQLite)
    <home>/data/           prepared data, one folder per source and tokenizer
    <home>/runs/           the run cache
    <home>/artifacts/      trial artifacts (plots, tables) shown by optuna-dashboard

Paths are made absolute before they reach Ray workers, whose working directory differs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("ARCHSEARCH_HOME", "studies")).expanduser().resolve()


def default_storage() -> str:
    return f"sqlite:///{home() / 'archsearch.db'}"


def run_cache_dir() -> Path:
    return home() / "runs"


def artifact_dir() -> Path:
    return home() / "artifacts"


# A name that becomes one path component (a study's folder, a report, an artifact): letters,
# digits, '_', '-', '.', not starting with '.' or '-', at most 200 characters. No '/', no '..'.
NAME_CHARS = "letters, digits, '_', '-', '.' (not starting with '.' or '-'), at most 200 characters"
MAX_NAME = 200


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a file or folder, or None."""
    if not isinstance(name, str) or not name:
        return f"expected a name ({NAME_CHARS})"
    if len(name) > MAX_NAME:
        return f"a name has at most {MAX_NAME} characters, got {len(name):,}"
    if not (name[0].isascii() and name[0].isalnum()) or any(not (c.isascii() and (c.isalnum() or c in "_-.")) for c in name):
        return f"must be {NAME_CHARS}"
    return None


def write_problem(path: Path) -> str | None:
    """Why a file cannot be created at ``path`` (its folder may not exist yet), or None:
    a regular file where a folder is needed, a read-only filesystem, no permission."""
    path = Path(path)
    if path.is_dir():
        return "is a folder, not a file"
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            return f"{parent} is a broken link"
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    # try it: os.access says yes to root on a read-only mount's parent, or in /sys
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".archsearch-probe-", dir=parent))
    except OSError as e:
        return f"cannot write in {parent}: {e.strerror or e} (a read-only filesystem or no permission)"
    return None


def folder_problem(path: Path) -> str | None:
    """Why an output folder cannot be made at ``path``, or None."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    probe = path / "x"
    why = write_problem(probe)
    return why
