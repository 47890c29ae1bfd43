"""prepare_data: tokenise a source once and keep it in the prepared-data cache.

A prepared folder is named ``<source>-<12 hex>`` after a hash of what decides its content
(source, tokenizer, source settings; not the sizes, not the cache location). It is built in
a temporary sibling folder and renamed into place, under an exclusive lock on
``<folder>.lock``, so processes or Ray workers that prepare the same data at once are safe:
one builds, the others wait and load. A folder that fails verification is reported, removed
and rebuilt, never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from archsearch.data.prepared import PreparedData, load_prepared, sha256_file
from archsearch.data.spec import DataSpec, check_data_spec, file_format
from archsearch.data.tokenizer import tokenizer_identity
from archsearch.errors import ConfigError, DataCorrupted, DataUnavailable

Progress = Callable[[str], None]

RECIPE_VERSION = 2
"""Bump when the text processing changes (wiki cleaning, joining rules): new folder names."""


def _silent(_: str) -> None:
    pass


def _dataset_identity(dataset: str) -> dict[str, Any]:
    """A local dataset folder: its path and its files' sizes and mtimes (hashing gigabytes of
    parquet on every call would be too slow); a Hub id: the id."""
    folder = Path(dataset)
    if not folder.is_dir():
        return {"hub": dataset}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return {
        "folder": str(folder.absolute()),
        "files": [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def content_fields(spec: DataSpec) -> dict[str, Any]:
    """Everything that decides a prepared folder's content, as plain data."""
    fields: dict[str, Any] = {
        "recipe": RECIPE_VERSION,
        "source": spec.source,
        "tokenizer": tokenizer_identity(spec.tokenizer_name),
        "embedding_key": spec.embedding_key,
    }
    if spec.source == "wiki":
        fields.update(val_tokens=spec.val_tokens, min_article_chars=spec.min_article_chars)
    elif spec.source == "ultrachat":
        fields.update(
            dataset=_dataset_identity(spec.dataset),
            split=spec.split,
            val_start=spec.val_start,
            val_count=spec.val_count,
        )
    elif spec.source == "files":
        # Local files are identified by their content, so an edited file gets a new folder
        # and a copied corpus is recognised.
        fields.update(
            files=[[file_format(p, spec.format), sha256_file(p)] for p in spec.paths],
            val_files=[[file_format(p, spec.format), sha256_file(p)] for p in spec.val_paths],
            text_field=spec.text_field,
            val_tokens=None if spec.val_paths else spec.val_tokens,
        )
    return fields


def content_key(spec: DataSpec) -> str:
    blob = json.dumps(content_fields(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def prepared_path(spec: DataSpec) -> Path:
    """Where prepare_data keeps (or will keep) the folder of ``spec``."""
    return spec.resolved_cache_dir() / f"{spec.source}-{content_key(spec)[:12]}"


def _need(spec: DataSpec) -> tuple[int, int]:
    """(documents, tokens) an ultrachat folder must hold; only what is needed is tokenised."""
    if spec.source != "ultrachat":
        return 0, 0
    if not spec.sizes:
        raise ConfigError("data.sizes: source 'ultrachat' tokenises only the conversations needed; give the sizes")
    return (max(spec.sizes), 0) if spec.size_unit == "samples" else (0, max(spec.sizes))


def _holds(data: PreparedData, need: tuple[int, int]) -> bool:
    docs, tokens = need
    return data.available("samples") >= docs and data.available("tokens") >= tokens


@contextmanager
def _exclusive(lock_path: Path, progress: Progress) -> Iterator[None]:
    """An exclusive flock, held until the block ends (or the process dies)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process preparing {lock_path.stem}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def prepare_data(spec: DataSpec, progress: Progress | None = None) -> PreparedData:
    """The prepared folder of ``spec``: loaded (and verified) if it exists, else built.

    An ultrachat folder holds just the conversations ``spec.sizes`` need; wiki and files
    folders hold the whole corpus (whether the sizes fit is the caller's check, against
    ``available``). Raises ConfigError for a bad spec, DataUnavailable when a source,
    tokenizer or embedding cannot be read."""
    say = progress or _silent
    check_data_spec(spec)
    need = _need(spec)
    root = spec.resolved_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = prepared_path(spec)

    with _exclusive(root / f"{final.name}.lock", say):
        data = _load_existing(final, say)
        if data is not None and not _holds(data, need):
            say(f"{final.name} holds {data.available('samples')} documents, more are needed: rebuilding")
            data = None
        if data is None:
            data = _build(spec, final, need, say)
    return data


def _load_existing(final: Path, say: Progress) -> PreparedData | None:
    if not final.exists():
        return None
    try:
        data = load_prepared(final, verify=True)
    except DataCorrupted as e:
        message = f"prepared data is damaged and will be rebuilt: {e}"
        warnings.warn(message, stacklevel=3)
        say(message)
        shutil.rmtree(final)
        return None
    say(f"using prepared data {final}")
    return data


def _build(spec: DataSpec, final: Path, need: tuple[int, int], say: Progress) -> PreparedData:
    # Leftovers of builds or swaps killed midway (we hold the lock: nobody else uses them).
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    try:
        meta = _write(spec, tmp, final.name, need, say)
        if final.exists():  # an existing folder too small for this request: swap it out
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)  # atomic: readers see no folder or a complete one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = meta["counts"]
    say(
        f"prepared {final.name}: {counts['train_docs']} documents, {counts['train_tokens']} training and "
        f"{counts['val_tokens']} validation tokens in {time.perf_counter() - start:.1f} s"
    )
    return load_prepared(final, verify=False)


def _write(spec: DataSpec, folder: Path, name: str, need: tuple[int, int], say: Progress) -> dict[str, Any]:
    """Tokenise the source of ``spec`` into ``folder``; heavy libraries are imported here."""
    from archsearch.data import sources
    from archsearch.data.prepared import write_prepared
    from archsearch.data.tokenizer import load_tokenizer, read_embedding, resolve_tokenizer_files

    start = time.perf_counter()
    # Resolve tokenizer and dataset first and report both if both are missing (offline).
    problems: list[DataUnavailable] = []
    # Before any download: nothing could be read without datasets.
    if spec.source == "ultrachat":
        sources.require_datasets(spec.source)
    elif spec.source == "files":
        sources.require_datasets_for_files(spec)  # only parquet, JSON arrays and compressed files need it
    try:
        files = resolve_tokenizer_files(spec.tokenizer_name, say)
    except DataUnavailable as e:
        problems.append(e)
    if spec.source == "ultrachat":
        try:
            dataset_folder = sources.resolve_dataset(spec.dataset, spec.split)
        except DataUnavailable as e:
            problems.append(e)
    if problems:
        raise DataUnavailable("\n".join(str(p) for p in problems)) from problems[0]

    say(f"tokenizer {spec.tokenizer_name}: {files.origin}")
    tokenizer = load_tokenizer(files.tokenizer_json)
    embedding, key = read_embedding(files.weights, spec.embedding_key)
    if spec.source == "wiki":
        corpus = sources.wiki_corpus(spec, tokenizer, say)
    elif spec.source == "ultrachat":
        corpus = sources.ultrachat_corpus(spec, tokenizer, say, dataset_folder, need_docs=need[0], need_tokens=need[1])
    else:
        corpus = sources.files_corpus(spec, tokenizer, say)

    meta = {
        "name": name,
        "source": spec.source,
        "spec": {k: v for k, v in spec.to_dict().items() if k not in ("sizes", "size_unit", "cache_dir")},
        "content_key": content_key(spec),
        "tokenizer": {"name": spec.tokenizer_name, "origin": files.origin, "embedding_key": key},
        "source_info": corpus.info,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "builder": {"host": socket.gethostname(), "pid": os.getpid()},
        "tokenize_seconds": round(time.perf_counter() - start, 2),
    }
    # The tokenizer is saved after padding/truncation were turned off: the copy encodes as
    # the stream was encoded.
    tokenizer_json = tokenizer.to_str(pretty=True).encode()
    return write_prepared(folder, corpus.train, corpus.val, embedding, tokenizer_json, meta)

