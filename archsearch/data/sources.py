"""The three data sources, each turned into token ids: training documents + a validation stream.

- ``wiki``: the English Wikipedia sample shipped inside the gensim wheel (offline).
- ``ultrachat``: UltraChat-200k exactly as the report used it (cvfp.md section 8).
- ``files``: local .txt / .jsonl / .json / .parquet files read through HF ``datasets``.

Every document is tokenised on its own, without special tokens; a training stream is the
concatenation of its documents' ids. ``gensim`` and ``datasets`` are imported inside the
functions that need them.
"""

from __future__ import annotations

import bz2
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
"""The archsearch extra that brings HF ``datasets`` for each source that reads through it."""


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


def file_documents(path: str, fmt: str, text_field: str) -> Iterator[str]:
    """Documents of one file, in order, through an HF ``datasets`` builder (streamed).

    text: a whole file is one document (prose: a line is not a document); json/parquet: the
    ``text_field`` of each row. Empty documents are skipped."""
    require_datasets("files")
    import datasets

    builder = file_format(path, fmt)
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    column = "text" if builder == "text" else text_field
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
