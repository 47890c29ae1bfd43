"""Study storage URLs: SQLite (default), PostgreSQL/MySQL, Optuna's JournalStorage file.

    sqlite:///studies/archsearch.db       default; one writer process at a time (see lock)
    postgresql://user:pass@host/db        many writers
    journal:///abs/path/study.log         Optuna JournalStorage on a file; many writers

Passwords never leave this module unmasked in a message: use :func:`mask_url`.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from archsearch import paths
from archsearch.errors import ConfigError, UserError

_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<tail>@)")
RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")


def mask_url(text: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db`` (anywhere in ``text``)."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", str(text))


def resolve_url(url: str | None) -> str:
    """Default and normalise a storage URL; relative SQLite/journal paths become absolute."""
    if not url:
        url = paths.default_storage()
    if "://" not in url:
        raise ConfigError(
            f"storage {mask_url(url)!r}: not a storage URL (expected sqlite:///path.db, "
            "postgresql://user@host/db or journal:///path.log)"
        )
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path or path == ":memory:":
            raise ConfigError(f"storage {url!r}: an in-memory SQLite study would be lost; give a file, sqlite:///path.db")
        return "sqlite:///" + str(Path(path).expanduser().resolve())
    if scheme == "journal":
        path = url.split("://", 1)[1]
        if not path:
            raise ConfigError(f"storage {url!r}: expected journal:///path/to/study.log")
        return "journal://" + str(Path(path).expanduser().resolve())
    if scheme in RDB_SCHEMES:
        parts = urlsplit(url)
        if not parts.hostname and scheme != "sqlite":
            raise ConfigError(f"storage {mask_url(url)!r}: no host in the URL")
        return url
    raise ConfigError(
        f"storage {mask_url(url)!r}: unknown scheme {scheme!r} (sqlite, postgresql, mysql or journal)"
    )


def kind(url: str) -> str:
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    return {"postgres": "postgresql"}.get(scheme, scheme)


def sqlite_path(url: str) -> Path | None:
    return Path(url.split(":///", 1)[1]) if kind(url) == "sqlite" else None


def journal_path(url: str) -> Path | None:
    return Path(url.split("://", 1)[1]) if kind(url) == "journal" else None


def open_storage(url: str, create: bool = True):
    """An Optuna storage for ``url`` (already resolved). ``create=False`` never writes: a
    missing SQLite/journal file raises FileNotFoundError instead of being created."""
    import optuna

    k = kind(url)
    try:
        if k == "journal":
            path = journal_path(url)
            if not create and not path.exists():
                raise FileNotFoundError(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        engine_kwargs: dict[str, Any] = {}
        if k == "sqlite":
            path = sqlite_path(url)
            if not create and not path.exists():
                raise FileNotFoundError(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            engine_kwargs = {"connect_args": {"timeout": 60}}
        else:
            engine_kwargs = {"pool_pre_ping": True}
            url = _with_driver(url)
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=not create)
            except Exception as e:
                # two processes creating Optuna's tables in a fresh database at once (a run and a
                # dashboard, two runs on PostgreSQL): one wins, the other sees a duplicate; the
                # tables exist on the next try
                if attempt < 4 and any(x in str(e) for x in ("duplicate key", "already exists", "UNIQUE constraint failed")):
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise
    except FileNotFoundError:
        raise
    except ImportError as e:
        raise UserError(f"storage {mask_url(url)}: a database driver is missing ({e}); for PostgreSQL: pip install 'psycopg[binary]'") from None
    except Exception as e:  # connection refused, bad credentials, unknown database, ...
        raise UserError(f"cannot open storage {mask_url(url)}: {mask_url(str(e)).splitlines()[0]}") from None


def _with_driver(url: str) -> str:
    """A plain postgresql:// URL means SQLAlchemy's default driver, psycopg (3) since
    SQLAlchemy 2.1; use psycopg2 where only that one is installed."""
    import importlib.util

    head, sep, rest = url.partition("://")
    if head.lower() in ("postgresql", "postgres") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2{sep}{rest}"
    return url


def artifact_dir_for(url: str) -> Path:
    """Artifacts live beside a SQLite/journal file, else under $ARCHSEARCH_HOME/artifacts."""
    p = sqlite_path(url) or journal_path(url)
    if p is not None:
        return p.parent / f"{p.stem}-artifacts"
    return paths.artifact_dir()


class StorageBusy(UserError):
    pass


@contextmanager
def writer_lock(url: str):
    """Hold for the whole of a run. SQLite cannot take two writer processes safely (its
    locking gives 'database is locked' under load and Optuna's queue pop is not atomic
    across processes there), so a second run on the same SQLite file is refused. Other
    storages allow concurrent runs; they only serialise their bookkeeping (study_lock)."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise StorageBusy(
                f"another archsearch run ({holder}) is writing to {path}. SQLite cannot take two "
                "writer processes safely: wait for it, or put the study on PostgreSQL "
                "(--storage postgresql://...) or a journal file (--storage journal:///path/study.log)."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield
    finally:
        os.close(fd)


@contextmanager
def study_lock(storage, url: str, study_name: str):
    """Serialise a run's bookkeeping (failing stale trials, queueing missing configs) among
    processes that share the study, so that no config is queued twice."""
    k = kind(url)
    if k == "postgresql":
        import zlib

        from sqlalchemy import text

        key = zlib.crc32(f"archsearch:{study_name}".encode())
        with storage.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    if k == "journal":
        lock_path = journal_path(url).with_suffix(".archsearch-lock")
    elif k == "sqlite":
        yield  # writer_lock already excludes other writers
        return
    else:
        lock_path = paths.home() / f".{study_name}.archsearch-lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
