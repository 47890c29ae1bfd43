"""Study storage URLs: SQLite (default), PostgreSQL/MySQL, Optuna's JournalStorage file.

    sqlite:///studies/archsearch.db       default; one writer process at a time (see lock)
    postgresql://user:pass@host/db        many writers
    journal:///abs/path/study.log         Optuna JournalStorage on a file; many writers

Passwords never leave this module unmasked: :func:`mask_url` shows a URL, :func:`redact`
cleans a message (a driver's error) of every form of the URL's credentials.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from archsearch import paths
from archsearch.errors import ConfigError, UserError

RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")
MASK = "***"
# query parameters whose value is a credential (psycopg and the MySQL drivers take a password
# as ?password=...); a key containing any of these is masked
_SECRET_KEYS = ("pass", "pwd", "secret", "token", "auth", "credential", "key")


def _is_secret_key(key: str) -> bool:
    return any(s in key.lower() for s in _SECRET_KEYS)


def parse_url(url: str):
    """A database URL as SQLAlchemy's URL object, or None for SQLite/journal files and text
    that is no URL.

    The user info is everything before the *last* ``@`` of the part before ``?`` and the
    query is parsed on its own, so a password with a raw ``@``, ``/``, ``?`` or space in it
    (in the user info or in ``?password=``) is read whole; SQLAlchemy's ``make_url`` parses
    the rest (scheme, driver, host, port, database)."""
    from urllib.parse import parse_qsl, unquote

    from sqlalchemy.engine import make_url

    head, sep, rest = str(url).partition("://")
    if not sep or head.split("+", 1)[0].lower() not in RDB_SCHEMES or head.lower().startswith("sqlite"):
        return None
    base, _, query = rest.partition("?")
    userinfo, at, hostpart = base.rpartition("@")
    user, colon, password = userinfo.partition(":")
    parsed = make_url(f"{head}://{hostpart}")
    params: dict[str, list[str]] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        params.setdefault(k, []).append(v)
    return parsed.set(
        username=unquote(user) if at and user else None,
        password=unquote(password) if at and colon else None,
        query={k: v[0] if len(v) == 1 else v for k, v in params.items()},
    )


def secrets_of(url: str) -> list[str]:
    """The credentials a URL carries: its password and the values of password-like query
    parameters, each as written and as SQLAlchemy would percent-encode it."""
    from urllib.parse import quote, quote_plus

    try:
        u = parse_url(url)
    except Exception:
        u = None
    found: list[str] = []
    if u is not None:
        found.append(u.password or "")
        for k, v in u.query.items():
            if _is_secret_key(k):
                found += [v] if isinstance(v, str) else list(v)
    out = set()
    for s in filter(None, found):
        out |= {s, quote(s, safe=""), quote_plus(s), quote(s)}
    return sorted(out, key=len, reverse=True)  # longest first: no partial replacement


def mask_url(url: str) -> str:
    """A storage URL fit to show: ``postgresql://u:***@h/db``, password-like query parameters
    (``?password=...``) as ``***``. SQLite and journal paths are shown as they are; a URL
    that cannot be parsed shows only its scheme."""
    text = str(url)
    head, sep, _ = text.partition("://")
    try:
        u = parse_url(text)
    except Exception:
        return f"{head}://{MASK}" if sep else MASK
    if u is None:
        return text
    u = u.set(query={k: (MASK if _is_secret_key(k) else v) for k, v in u.query.items()})
    return u.render_as_string(hide_password=True).replace("%2A%2A%2A", MASK)


def shown_url(url: str, given: str | None = None) -> str:
    """A storage as a report or a study's note shows it: a SQLite/journal file inside
    ``$ARCHSEARCH_HOME`` relative to it (``sqlite:///$ARCHSEARCH_HOME/archsearch.db``, so no
    absolute path of the machine that wrote it), else what the user ``given`` (before
    :func:`resolve_url` made it absolute), else ``url``; masked by :func:`mask_url` either way."""
    path = sqlite_path(url) or journal_path(url)
    if path is not None:
        try:
            return f"{kind(url)}:///$ARCHSEARCH_HOME/{path.relative_to(paths.home()).as_posix()}"
        except ValueError:
            pass
    return mask_url(given or url)


def redact(text: str, url: str | None) -> str:
    """``text`` (a message, an error from a driver) with every credential of ``url`` masked."""
    text = str(text)
    if not url:
        return text
    if url in text:
        text = text.replace(url, mask_url(url))
    for s in secrets_of(url):
        text = text.replace(s, MASK)
    return text


_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@]*)(?P<tail>@)")


def mask_args(args: list[str]) -> list[str]:
    """A command line fit to hand to others (Ray's job table records its driver's): in each
    argument, from the first ``scheme://`` on (``--storage=postgresql://…``, an override
    ``tracking.mlflow.tracking_uri=http://…`` or a URL of its own), a database URL as
    :func:`mask_url` shows it and any other URL's ``user:password@`` as ``user:***@``."""
    out = []
    for arg in args:
        m = _URL_START.search(arg)
        if m is not None:
            head, url = arg[: m.start()], arg[m.start() :]
            shown = mask_url(url)
            if shown == url:  # no database URL: any user:password@ in it hidden
                shown = _USERINFO.sub(lambda u: f"{u['head']}{MASK}{u['tail']}", url)
            arg = head + shown
        out.append(arg)
    return out


def redact_command_line(text: str, args: list[str]) -> str:
    """``text`` (a traceback) with the credentials of every URL on the command line ``args``
    masked (each form :func:`redact` knows), and any other ``user:password@`` or password-like
    query parameter in it (archsearch.tracking's masking)."""
    from archsearch.tracking import _mask

    for arg in args:
        m = _URL_START.search(arg)
        if m is not None:
            text = redact(text, arg[m.start() :])
    return _mask(text)


def connect_url(url: str) -> str:
    """The URL handed to SQLAlchemy: the parse above, rendered with proper percent-encoding
    (so the server gets the password :func:`mask_url` hides, whole)."""
    u = parse_url(url)
    return url if u is None else u.render_as_string(hide_password=False)


def resolve_url(url: str | None) -> str:
    """Default and normalise a storage URL; relative SQLite/journal paths become absolute."""
    if not url:
        url = paths.default_storage()
    if "://" not in url:
        shown = f" {url[:80]!r}" if "@" not in url else ""  # user:password@host without a scheme: not shown
        raise ConfigError(
            f"storage{shown}: not a storage URL (expected sqlite:///path.db, "
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
        try:
            parsed = parse_url(url)
        except Exception as e:
            raise ConfigError(f"storage {mask_url(url)}: not a valid database URL ({redact(e, url)})") from None
        if not parsed.host:
            raise ConfigError(f"storage {mask_url(url)!r}: no host in the URL")
        return url
    raise ConfigError(
        f"storage {mask_url(url)!r}: unknown scheme {scheme!r} (sqlite, postgresql, mysql or journal)"
    )


def check_writable(url: str) -> None:
    """A SQLite/journal file (and ``$ARCHSEARCH_HOME``) can be created where they are named:
    checked before anything is started or written."""
    problems = []
    p = sqlite_path(url) or journal_path(url)
    if p is not None:
        why = paths.write_problem(p)
        if why:
            problems.append(f"storage {url}: {why}")
    why = paths.write_problem(paths.home() / "archsearch.db")
    if why:
        problems.append(f"ARCHSEARCH_HOME {paths.home()}: {why}")
    if problems:
        raise ConfigError(problems)


def kind(url: str) -> str:
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    return {"postgres": "postgresql"}.get(scheme, scheme)


def sqlite_path(url: str) -> Path | None:
    return Path(url.split(":///", 1)[1]) if kind(url) == "sqlite" else None


def journal_path(url: str) -> Path | None:
    return Path(url.split("://", 1)[1]) if kind(url) == "journal" else None


def existing_storage(storage: str | None, label: str = "--storage"):
    """(resolved URL, Optuna storage) of a storage that must exist already (nothing is created);
    ConfigError naming ``label`` where it does not."""
    import optuna

    url = resolve_url(storage)
    try:
        opt_storage = open_storage(url, create=False)
    except FileNotFoundError:
        where = f"{label} {mask_url(url)}" if storage else f"the default storage {mask_url(url)} ($ARCHSEARCH_HOME/archsearch.db; {label} names another)"
        raise ConfigError(f"{where}: no such study storage (run a study first)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return url, opt_storage


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
            check_sqlite_file(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            _OPENED_SQLITE[:] = [*_OPENED_SQLITE[-7:], path]
            engine_kwargs = {"connect_args": {"timeout": 60}}
        else:
            engine_kwargs = {"pool_pre_ping": True}
            url = _with_driver(connect_url(url))
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
    except (FileNotFoundError, StorageDamaged):
        raise
    except ImportError as e:
        raise UserError(f"storage {mask_url(url)}: a database driver is missing ({redact(e, url)}); for PostgreSQL: pip install 'psycopg[binary]'") from None
    except OSError as e:  # a SQLite/journal folder that cannot be made (read-only, under a file)
        raise UserError(f"cannot open storage {mask_url(url)}: {e.strerror or e}") from None
    except Exception as e:  # connection refused, bad credentials, unknown database, ...
        damaged = damage_in(e) if k == "sqlite" else None
        if damaged is not None:
            raise damaged from None
        first = (redact(_root_cause(e), url).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot open storage {mask_url(url)}: {first}") from None


def _root_cause(e: BaseException) -> BaseException:
    """The driver's error under Optuna's wrappers ("An exception is raised during the commit")."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        orig = getattr(e, "orig", None)  # SQLAlchemy's DBAPIError holds the driver's error
        if isinstance(orig, BaseException):
            return orig
        nxt = e.__cause__ or e.__context__
        if nxt is None:
            return e
        e = nxt
    return e


class StorageDamaged(UserError):
    pass


_OPENED_SQLITE: list[Path] = []
"""The last SQLite files this process opened (for damage_in: an error carries no path)."""

_DAMAGE_SIGNS = ("malformed", "not a database", "could not decode to utf-8", "database corrupt", "file is encrypted")


def damage_in(e: BaseException) -> StorageDamaged | None:
    """The StorageDamaged that explains ``e``, an error raised while Optuna read a SQLite
    study file this process opened (damage the check on open could not see: a file larger
    than DEEP_CHECK_BYTES, or one changed since), or None."""
    import json
    import sqlite3
    import traceback

    if not _OPENED_SQLITE:
        return None
    frames = [f.filename for f in traceback.extract_tb(e.__traceback__)]
    if not any("/optuna/storages/" in f or "/sqlalchemy/" in f for f in frames):
        return None  # not raised while reading the storage
    seen, cause = set(), e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, sqlite3.DatabaseError) and any(sign in str(cause).lower() for sign in _DAMAGE_SIGNS):
            break
        if isinstance(cause, (json.JSONDecodeError, UnicodeDecodeError)):
            break
        cause = getattr(cause, "orig", None) or cause.__cause__ or cause.__context__
    else:
        return None
    if cause is None:
        return None
    return StorageDamaged(damaged_message(_OPENED_SQLITE[-1], str(cause).splitlines()[0][:200]))


def check_sqlite_file(path: Path) -> None:
    """``PRAGMA quick_check`` of an existing SQLite file, read-only: a damaged page structure
    (bytes written over it, a torn copy, a file that is not a database) is found when the
    storage is opened, not in the middle of a run's first write. It reads every page once
    (milliseconds for a study file of a few MB); a missing or empty file passes."""
    import sqlite3

    try:
        if path.stat().st_size == 0:
            return
    except FileNotFoundError:
        return
    try:
        deep = path.stat().st_size <= DEEP_CHECK_BYTES
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            conn.text_factory = bytes  # the check's report may quote damaged text
            rows = conn.execute("PRAGMA integrity_check(5)" if deep else "PRAGMA quick_check(5)").fetchall()
            problems = [r[0].decode(errors="replace") if isinstance(r[0], bytes) else str(r[0]) for r in rows]
            if deep and problems == ["ok"]:
                problems = _bad_values(conn) or problems
        finally:
            conn.close()
    except sqlite3.OperationalError as e:
        if "locked" in str(e):  # a writer holds it; it is checked on the writer's side
            return
        problems = [str(e)]
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        problems = [str(e)]
    if problems == ["ok"]:
        return
    raise StorageDamaged(damaged_message(path, "; ".join(problems)[:300]))


DEEP_CHECK_BYTES = 64 * 1024 * 1024
"""A SQLite study file up to this size gets the full check when opened (integrity_check and
every stored text read back as UTF-8, every ``*_json`` value parsed: about 10 ms for a
100-trial study of 0.9 MB); a larger one only quick_check (its page structure)."""

_STATES = {b"RUNNING", b"COMPLETE", b"PRUNED", b"FAIL", b"WAITING"}
_DIRECTIONS = {b"NOT_SET", b"MINIMIZE", b"MAXIMIZE"}


def _bad_values(conn) -> list[str]:
    """Damage inside stored values, which the page checks cannot see: text that is not UTF-8,
    a ``*_json`` column that is not JSON, a trial state or direction Optuna does not know.
    (Bytes overwritten inside a number, or inside text that stays valid, are not found.)"""
    import json

    tables = [r[0].decode() for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    for table in tables:
        cols = [r[1].decode() for r in conn.execute(f'PRAGMA table_info("{table}")')]
        if not cols:
            continue
        select = ", ".join(f'"{c}"' for c in cols)
        for row in conn.execute(f'SELECT rowid, {select} FROM "{table}"'):
            for col, value in zip(cols, row[1:]):
                if not isinstance(value, bytes):
                    continue
                where = f"{table}.{col} of row {row[0]}"
                try:
                    text = value.decode("utf-8")
                except UnicodeDecodeError:
                    return [f"{where} is not UTF-8 text"]
                if col.endswith("_json"):
                    try:
                        json.loads(text)
                    except ValueError:
                        return [f"{where} is not JSON"]
                if (table, col) == ("trials", "state") and value not in _STATES:
                    return [f"{where} is not a trial state"]
                if col == "direction" and value not in _DIRECTIONS:
                    return [f"{where} is not a direction"]
    return []


def damaged_message(path: Path, detail: str) -> str:
    recovered = path.with_name(f"{path.stem}-recovered{path.suffix or '.db'}")
    return (
        f"the SQLite study storage {path} is damaged ({detail}). Keep it for inspection and run the same "
        f"command into a new file, e.g. --storage sqlite:///{recovered}: every computed run is in the run cache "
        f"({paths.run_cache_dir()}), so the rerun rebuilds the study without training."
    )


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
    storages allow concurrent runs; they only serialise their bookkeeping (study_lock).

    The lock is a flock on the database file itself, so it follows the file whatever path
    reaches it (a hard link, a symlink, another mount of it). flock and SQLite's own POSIX
    locks do not interact on Linux; but closing any descriptor of the file drops the
    process's POSIX locks, so the descriptor is kept open for the life of the process and
    only unlocked here. Who holds it is written beside the path (``<db>.lock``)."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _db_descriptor(path)
    holder_path = path.with_name(path.name + ".lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = holder_path.read_text(errors="replace").strip()[:200]
        except OSError:
            holder = ""
        raise StorageBusy(
            f"another archsearch run ({holder or 'another process, through another path to the same file'}) is writing "
            f"to {path}. SQLite cannot take two writer processes safely: wait for it, or put the study on PostgreSQL "
            "(--storage postgresql://...) or a journal file (--storage journal:///path/study.log)."
        ) from None
    try:
        try:
            holder_path.write_text(f"pid {os.getpid()} on {os.uname().nodename}")
        except OSError:  # only the message would lack it
            pass
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


_DB_FDS: dict[tuple[int, int], int] = {}


def _db_descriptor(path: Path) -> int:
    """One open descriptor per database file (by device and inode) for this process."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # an empty file is an empty SQLite database
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    if key in _DB_FDS:
        os.close(fd)  # the file is idle here: no run of this process is using it
        return _DB_FDS[key]
    _DB_FDS[key] = fd
    return fd


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
