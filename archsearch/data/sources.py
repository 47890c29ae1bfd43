"""The three data sources, each turned into token ids: training documents + a validation stream.

- ``wiki``: the English Wikipedia sample shipped inside the gensim wheel (offline).
- ``ultrachat``: UltraChat-200k exactly as the report used it (cvfp.md section 8).
- ``files``: local .txt / .jsonl / .json files (standard library) and .parquet files (HF ``datasets``).

Every document is tokenised on its own, without special tokens; a training stream is the
concatenation of its documents' ids. ``gensim`` and ``datasets`` are imported inside the
functions that need them.
"""

from __future__ import annotations

import bz2
import codecs
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from archsearch.data.spec import DataSpec, file_format
from archsearch.errors import ConfigError, DataUnavailable

if TYPE_CHECKING:
    import tokenizers

Progress = Callable[[str], None]

ENCODE_BATCH = 512  # documents per encode_batch call (the Rust side tokenises a batch in parallel)


@dataclass
class Corpus:
    train: list[np.ndarray]
    """Token ids of each training document, in order."""
    val: np.ndarray
    """The validation stream."""
    info: dict[str, Any] = field(default_factory=dict)
    """Source facts recorded in meta.json (counts of dropped pages, titles, row ranges...)."""


def encode(tokenizer: "tokenizers.Tokenizer", texts: list[str]) -> list[np.ndarray]:
    """Each text's ids, without special tokens ([CLS]/[SEP] of MiniLM would pollute the stream)."""
    out: list[np.ndarray] = []
    for i in range(0, len(texts), ENCODE_BATCH):
        for enc in tokenizer.encode_batch(texts[i : i + ENCODE_BATCH], add_special_tokens=False):
            out.append(np.asarray(enc.ids, dtype=np.int32))
    return out


def hold_out_tail(docs: list[np.ndarray], val_tokens: int, what: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split off whole documents from the END until they hold >= ``val_tokens`` tokens.

    The validation stream is then cut to exactly ``val_tokens`` (see :func:`val_stream`):
    a fixed evaluation cost whatever the length of the last articles."""
    total, k = 0, len(docs)
    while k > 0 and total < val_tokens:
        k -= 1
        total += len(docs[k])
    if total < val_tokens or k == 0:
        have = sum(len(d) for d in docs)
        raise ConfigError(
            f"data.val_tokens: {what} has {len(docs)} documents and {have} tokens, too few to hold out "
            f"{val_tokens} validation tokens and keep training documents; lower data.val_tokens"
        )
    return docs[:k], docs[k:]


def val_stream(held_out: list[np.ndarray], val_tokens: int) -> np.ndarray:
    """The first ``val_tokens`` tokens of the held-out documents, in order."""
    return _concat(held_out)[:val_tokens]


def _concat(docs: Iterable[np.ndarray]) -> np.ndarray:
    docs = list(docs)
    return np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, np.int32)


# --------------------------------------------------------------------------- wiki

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wiki_dump_path() -> Path:
    """The bz2 XML dump inside the installed gensim package (206 pages)."""
    try:
        import gensim
    except ImportError as e:
        raise DataUnavailable("data.source=wiki needs the package gensim (pip install gensim)") from e
    path = Path(gensim.__file__).parent / "test" / "test_data" / WIKI_DUMP
    if not path.is_file():
        raise DataUnavailable(f"the Wikipedia sample {WIKI_DUMP} is not in this gensim installation ({path.parent})")
    return path


_QUOTES = re.compile(r"'{2,}")  # ''italic'' and '''bold''' marks that filter_wiki leaves
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)  # == Heading == -> Heading
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.M)  # bullets, numbering, indentation
_GALLERY = re.compile(r"^\s*(?:File|Image):.*$", re.M | re.I)  # gallery lines: File:x.jpg|caption
_IMAGE_ALT = re.compile(r"\|\s*alt=.*$", re.M)  # leftover image captions: caption|alt=...
_SPACES = re.compile(r"[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_wiki(markup: str) -> str:
    """Plain text of an article: gensim's filter_wiki (links, templates, refs, tables), then
    the marks it leaves (quotes, headings, list marks, gallery lines). Whitespace is collapsed
    within lines; paragraph breaks (one blank line) are kept."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    text = _GALLERY.sub("", text)
    text = _IMAGE_ALT.sub("", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _LIST_MARK.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def wiki_articles(min_chars: int = 500) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(title, plain text) of every main-namespace article of the dump, in dump order, and counts
    of what was dropped: redirects (#REDIRECT ...) and stubs (< ``min_chars`` characters)."""
    from gensim.corpora.wikicorpus import extract_pages

    articles, redirects, stubs, pages = [], 0, 0, 0
    with bz2.open(wiki_dump_path()) as f:
        for title, markup, _pageid in extract_pages(f, filter_namespaces=("0",)):
            pages += 1
            if markup.lstrip().lower().startswith("#redirect"):
                redirects += 1
                continue
            text = clean_wiki(markup)
            if len(text) < min_chars:
                stubs += 1
                continue
            articles.append((title, text))
    return articles, {"pages": pages, "redirects": redirects, "stubs": stubs, "articles": len(articles)}


def wiki_corpus(spec: DataSpec, tokenizer: "tokenizers.Tokenizer", progress: Progress) -> Corpus:
    """A document is one article: its title, a newline, its text. Validation = the first
    val_tokens tokens of whole articles held out from the end of the dump; training = the
    rest, in dump order."""
    progress(f"wiki: reading {WIKI_DUMP}")
    articles, counts = wiki_articles(spec.min_article_chars)
    docs = encode(tokenizer, [f"{title}\n{text}" for title, text in articles])
    train, val = hold_out_tail(docs, spec.val_tokens, "the wiki sample")
    titles = [title for title, _ in articles]
    info = dict(counts, train_titles=titles[: len(train)], val_titles=titles[len(train) :])
    return Corpus(train, val_stream(val, spec.val_tokens), info)


# --------------------------------------------------------------------------- ultrachat


def _dataset_unavailable(dataset: str, split: str, e: BaseException) -> DataUnavailable:
    reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return DataUnavailable(
        f"could not load the dataset {dataset!r} (split {split}) ({reason}). "
        "Run once with network access (it is then cached in the Hugging Face cache, HF_HOME), "
        f"or download it beforehand with `hf download {dataset} --repo-type dataset` "
        f"(older huggingface_hub: `huggingface-cli download {dataset} --repo-type dataset`), "
        f"or set data.dataset to a local folder in the Hub layout (data/{split}-*.parquet). "
        "Offline, `data.source=wiki` needs no download."
    )


def resolve_dataset(dataset: str, split: str) -> Path:
    """A local folder holding ``dataset``: the folder itself, or its Hub snapshot.

    Going through snapshot_download (rather than load_dataset on the repo id) makes a Hub
    cache filled by `hf download` usable offline, and downloads only the one split's files.
    README.md is left out on purpose: its config lists every split, and `datasets` refuses a
    folder where some of them are missing; without it, the split is read from the file names
    (data/<split>-00000-of-00003-....parquet)."""
    local = Path(dataset).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(dataset, repo_type="dataset", allow_patterns=[f"*{split}*"]))
    except Exception as e:  # offline without cache, no such repo, invalid id
        raise _dataset_unavailable(dataset, split, e) from e


EXTRAS = {"ultrachat": "hub", "files": "files"}
"""The archsearch extra that brings HF ``datasets`` for each source that reads through it
(``files``: only parquet, JSON arrays and compressed files, see :func:`needs_datasets`)."""


def require_datasets(source: str) -> None:
    """DataUnavailable naming the extra to install when HF ``datasets`` is missing."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        extra = EXTRAS.get(source, "files")
        raise DataUnavailable(
            f"data.source={source} reads its data through HF datasets, which is not installed: "
            f"pip install 'archsearch[{extra}]' (or pip install datasets). data.source=wiki needs nothing more."
        ) from None


def _rows(folder: Path, dataset: str, split: str) -> Iterator[dict[str, Any]]:
    """Rows of a split in order, streamed: only the rows read are decoded, no Arrow cache."""
    require_datasets("ultrachat")
    try:
        import datasets

        rows = datasets.load_dataset(str(folder), split=split, streaming=True)
        iterator = iter(rows)
        first = next(iterator, None)
    except Exception as e:  # unknown split, unreadable files
        raise _dataset_unavailable(dataset, split, e) from e
    if first is not None:
        yield first
        yield from iterator


def conversation_text(row: dict[str, Any]) -> str:
    """A conversation's text: its messages' contents joined by a newline (cvfp.md 8)."""
    return "\n".join(message["content"] for message in row["messages"])


def ultrachat_corpus(
    spec: DataSpec,
    tokenizer: "tokenizers.Tokenizer",
    progress: Progress,
    folder: Path,
    need_docs: int = 0,
    need_tokens: int = 0,
) -> Corpus:
    """The first conversations, enough for ``need_docs`` documents and ``need_tokens`` tokens
    (each tokenised on its own, then concatenated), and the validation stream: conversations
    val_start .. val_start+val_count-1 joined by a blank line, tokenised as one text.

    Training may only use conversations before val_start, so the two never overlap."""
    val_end = spec.val_start + spec.val_count
    if need_docs > spec.val_start:
        raise ConfigError(
            f"data.sizes: {need_docs} training conversations would overlap the validation conversations "
            f"{spec.val_start}..{val_end - 1}; raise data.val_start"
        )
    progress(f"ultrachat: reading {spec.dataset} ({spec.split})")
    train: list[np.ndarray] = []
    n_tokens = 0
    pending: list[str] = []  # training texts not tokenised yet
    val_texts: list[str] = []

    def enough() -> bool:
        return len(train) >= need_docs and n_tokens >= need_tokens

    def flush() -> None:
        nonlocal n_tokens
        for ids in encode(tokenizer, pending):
            if enough():
                break  # a batch may overshoot the token target: keep just enough conversations
            train.append(ids)
            n_tokens += len(ids)
        pending.clear()

    rows_read = 0
    for index, row in enumerate(_rows(folder, spec.dataset, spec.split)):
        if index >= val_end:
            break
        rows_read = index + 1
        if index >= spec.val_start:
            val_texts.append(conversation_text(row))
        elif not enough():
            pending.append(conversation_text(row))
            if (
                len(pending) >= ENCODE_BATCH
                or index == spec.val_start - 1
                or (need_tokens == 0 and len(train) + len(pending) >= need_docs)
            ):
                flush()
        # else: training is complete; rows until val_start are only read past
    if pending:  # the split ended before val_start
        flush()

    if not enough():
        if rows_read >= spec.val_start:
            raise ConfigError(
                f"data.sizes: the {spec.val_start} conversations before the validation range hold "
                f"{n_tokens} tokens, fewer than the {need_tokens} needed; raise data.val_start"
            )
        raise DataUnavailable(f"{spec.dataset} ({spec.split}) has only {rows_read} conversations, fewer than needed")
    if len(val_texts) < spec.val_count:
        raise DataUnavailable(
            f"{spec.dataset} ({spec.split}) has {rows_read} conversations: no room for the validation "
            f"conversations {spec.val_start}..{val_end - 1} (data.val_start, data.val_count)"
        )
    (val,) = encode(tokenizer, ["\n\n".join(val_texts)])
    info = {"train_conversations": len(train), "val_conversations": [spec.val_start, val_end - 1]}
    return Corpus(train, val, info)


# --------------------------------------------------------------------------- files


# .txt files and JSON lines are read with the standard library, row for row as HF datasets'
# text builder (sample_by=document) and json builder read them, so that a prepared folder does
# not depend on whether datasets is installed. What only datasets reads goes through it:
# parquet, a JSON array, and compressed files (which its builders decompress on the fly).

JSON_CHUNK = 1 << 20
"""Bytes of a JSON-lines file read at a time (a value spanning more is read on in larger steps)."""

_PLAIN_EXTENSIONS = frozenset(
    "txt csv json jsonl tsv conll conllu orig parquet pkl pickle rel xml arrow".split()
)  # datasets never decompresses these (its BASE_KNOWN_EXTENSIONS)
_COMPRESSED_EXTENSIONS = frozenset("bz2 gz gzip lz4 xz zst zstd zip eval".split())
_COMPRESSION_MAGIC = (
    b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08", b"BZh", b"\x1f\x8b",
    b"\xfd7zXZ\x00", b"\x04\x22\x4d\x18", b"\x28\xb5\x2f\xfd", b"Rar!",
)  # fmt: skip
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _compressed(path: str) -> bool:
    """Whether datasets would decompress ``path``: by its extension (read as datasets reads it,
    train.txt-00000-of-00002 -> txt), else by its first bytes."""
    extension = path.rsplit(".", 1)[-1]
    for mark in "?-_":
        extension = extension.split(mark)[0]
    if extension in _PLAIN_EXTENSIONS:
        return False
    if extension in _COMPRESSED_EXTENSIONS:
        return True
    with open(path, "rb") as f:
        return f.read(8).startswith(_COMPRESSION_MAGIC)


def _starts_with_array(path: str) -> bool:
    """Whether the first JSON character of ``path`` (after a UTF-8 BOM and whitespace) opens an array."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8)
        while head:
            rest = head.lstrip(b" \t\n\r")
            if rest:
                return rest.startswith(b"[")
            head = f.read(4096)
    return False


def needs_datasets(path: str, fmt: str = "auto") -> str | None:
    """Why ``path`` is read through HF ``datasets`` ("parquet", "a JSON array", "compressed"),
    or None: the standard library reads it (text; JSON lines, one or more objects per line or
    objects spanning lines)."""
    builder = file_format(path, fmt)
    if builder == "parquet":
        return "parquet"
    if _compressed(path):
        return "compressed"
    if builder == "json" and _starts_with_array(path):
        return "a JSON array"
    return None


def require_datasets_for_files(spec: DataSpec) -> None:
    """DataUnavailable naming every file of ``spec`` that needs HF ``datasets`` when it is missing."""
    try:
        import datasets  # noqa: F401

        return
    except ImportError:
        pass
    needing = []
    for key in ("paths", "val_paths"):
        for i, path in enumerate(getattr(spec, key)):
            try:
                why = needs_datasets(path, spec.format)
            except OSError as e:
                raise DataUnavailable(f"data.{key}[{i}]: could not read {path} ({type(e).__name__}: {e})") from e
            if why:
                needing.append(f"data.{key}[{i}] ({os.path.basename(path)}: {why})")
    if needing:
        raise DataUnavailable(
            f"{', '.join(needing)}: read through HF datasets, which is not installed: "
            "pip install 'archsearch[files]' (or pip install datasets). "
            ".txt and JSON-lines files need nothing more."
        )


def _json_values(path: str) -> Iterator[tuple[int, Any]]:
    """(line, value) of each JSON value of ``path``, a stream of values separated by
    whitespace (or none), as pyarrow's JSON reader takes it: one per line, several on a line,
    or one spanning lines. A leading UTF-8 BOM is skipped. Only complete lines are parsed, so
    a value cut at the end of what was read is one continuing on the next lines."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    data, at_start, eof, size = "", True, False, JSON_CHUNK
    line, counted = 1, 0  # the line number of data[counted]
    with open(path, "rb") as f:
        while not eof:
            chunk = f.read(size)
            eof = not chunk
            text = utf8.decode(chunk, final=eof)
            if at_start and text:
                text, at_start = text.removeprefix("\ufeff"), False
            data += text
            block = data if eof else data[: data.rfind("\n") + 1]
            pos = 0
            while True:
                pos = _JSON_SPACE.match(block, pos).end()
                if pos >= len(block):
                    break
                line, counted = line + block.count("\n", counted, pos), pos
                try:
                    value, end = decoder.raw_decode(block, pos)
                except json.JSONDecodeError as e:
                    cut = e.pos >= len(block)
                    if cut and not eof:
                        break  # the value goes on past the lines read so far
                    where = line if cut else line + block.count("\n", pos, e.pos)
                    what = f"the file ends inside the value starting there ({e.msg})" if cut else e.msg
                    raise DataUnavailable(f"could not read {path} as json (line {where}: {what})") from None
                yield line, value
                pos = end
            line, counted = line + data.count("\n", counted, pos), 0
            data = data[pos:]
            size = max(JSON_CHUNK, 2 * len(data))  # a long value: read on in larger steps


def _json_documents(path: str, column: str) -> Iterator[str]:
    """The ``column`` of each row of a JSON-lines file, with the checks and messages of the
    datasets path: datasets makes a column of every field of the rows, so a field missing from
    some rows is null there, and missing from every row is no field of the file."""
    rows = _json_values(path)
    seen = False  # some row held the column
    for line, row in rows:
        if not isinstance(row, dict):
            raise DataUnavailable(
                f"could not read {path} as json (line {line}: a JSON {type(row).__name__}, not an object)"
            )
        if column in row:
            seen, text = True, row[column]
        else:
            if not seen:
                fields = dict.fromkeys(row)
                for _, other in rows:
                    if isinstance(other, dict):
                        fields.update(dict.fromkeys(other))
                        seen = seen or column in other
                if not seen:
                    raise ConfigError(f"data.text_field: {path} has no field {column!r} (fields: {', '.join(fields)})")
            text = None
        if not isinstance(text, str):
            raise ConfigError(f"data.text_field: field {column!r} of {path} holds {type(text).__name__}, not text")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise DataUnavailable(
                    f"could not read {path} as json (line {line}: {column!r} holds an unpaired surrogate \\u escape)"
                ) from None
        if text.strip():
            yield text


def _text_document(path: str) -> str:
    """A text file as one document: UTF-8, universal newlines (\\r\\n and \\r become \\n), a BOM
    kept as U+FEFF, exactly as datasets' text builder opens it."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def _datasets_documents(path: str, builder: str, column: str) -> Iterator[str]:
    """Documents of one file through an HF ``datasets`` builder (streamed)."""
    import datasets

    kwargs = {"sample_by": "document"} if builder == "text" else {}
    column = "text" if builder == "text" else column
    try:
        rows = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True, **kwargs)
        for row in rows:
            if column not in row:
                raise ConfigError(f"data.text_field: {path} has no field {column!r} (fields: {', '.join(row)})")
            text = row[column]
            if not isinstance(text, str):
                raise ConfigError(f"data.text_field: field {column!r} of {path} holds {type(text).__name__}, not text")
            if text.strip():
                yield text
    except ConfigError:
        raise
    except Exception as e:
        raise DataUnavailable(f"could not read {path} as {builder} ({type(e).__name__}: {e})") from e


def file_documents(path: str, fmt: str, text_field: str) -> Iterator[str]:
    """Documents of one file, in order. text: a whole file is one document (prose: a line is
    not a document); json/parquet: the ``text_field`` of each row. Empty documents are skipped.

    Text and JSON lines are read with the standard library; parquet, a JSON array and
    compressed files through HF ``datasets`` (see :func:`needs_datasets`)."""
    builder = file_format(path, fmt)
    try:
        if needs_datasets(path, fmt):
            require_datasets("files")
            yield from _datasets_documents(path, builder, text_field)
        elif builder == "text":
            text = _text_document(path)
            if text.strip():
                yield text
        else:
            yield from _json_documents(path, text_field)
    except (OSError, UnicodeDecodeError) as e:
        raise DataUnavailable(f"could not read {path} as {builder} ({type(e).__name__}: {e})") from e


def _encode_files(paths: list[str], spec: DataSpec, tokenizer: "tokenizers.Tokenizer") -> list[np.ndarray]:
    docs: list[np.ndarray] = []
    for path in paths:
        batch: list[str] = []
        for text in file_documents(path, spec.format, spec.text_field):
            batch.append(text)
            if len(batch) >= ENCODE_BATCH:
                docs.extend(encode(tokenizer, batch))
                batch.clear()
        docs.extend(encode(tokenizer, batch))
    return docs


def files_corpus(spec: DataSpec, tokenizer: "tokenizers.Tokenizer", progress: Progress) -> Corpus:
    """Training = the documents of ``paths`` in order. Validation = the documents of
    ``val_paths`` (each tokenised on its own, concatenated), or the first val_tokens tokens of
    whole documents held out from the end."""
    progress(f"files: reading {len(spec.paths)} file(s)")
    docs = _encode_files(spec.paths, spec, tokenizer)
    if spec.val_paths:
        train, val = docs, _concat(_encode_files(spec.val_paths, spec, tokenizer))
        if not train:
            raise ConfigError("data.paths: no training documents (every file is empty)")
        if not len(val):
            raise ConfigError("data.val_paths: no validation text (every file is empty)")
    else:
        train, held = hold_out_tail(docs, spec.val_tokens, "the corpus of data.paths")
        val = val_stream(held, spec.val_tokens)
    info = {
        "files": [os.path.basename(p) for p in spec.paths],
        "val_files": [os.path.basename(p) for p in spec.val_paths],
    }
    return Corpus(train, val, info)
