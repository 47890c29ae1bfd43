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


FILE_PART_CHARS = 100
"""Longest config name a file name holds as it is (a trial's plot and table, its TensorBoard folder)."""


def file_part(name: str, limit: int = FILE_PART_CHARS) -> str:
    """A config's name as part of a file name: itself where it is short and of safe characters
    (letters, digits, ``_-.=,+``: a named config, a label ``L=3,C=768,k=1``); else every other
    character as ``_``, cut to ``limit``, with 8 hex digits of its sha256 so that names stay
    distinct. A search's label grows with its parameters (past the 255 bytes of a file name)
    and a user family's categorical may hold ``/``: neither leaves the folder or fails the write."""
    import hashlib

    safe = "".join(c if c.isascii() and (c.isalnum() or c in "_-.=,+") else "_" for c in name)
    if safe == name and len(name) <= limit:
        return name
    return f"{safe[: limit - 9]}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


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
