"""A prepared-data folder: tokenised streams plus the frozen embedding, checksummed.

Layout (every file's byte size and sha256 are recorded in meta.json)::

    meta.json               format version, the spec that produced it, counts, checksums, fingerprint
    train_tokens.npy        int32, every training document's ids, concatenated in order
    train_doc_ends.npy      int64, end offset of each training document in train_tokens
    val_tokens.npy          int32, the validation stream
    embedding.safetensors   "embedding": float32 (V, E), the frozen pretrained matrix
    tokenizer.json          the tokenizer that produced the ids (padding/truncation off)

Loading needs only numpy, safetensors and json, so a machine with PyTorch alone can run
trials from a folder copied to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from archsearch.errors import DataCorrupted, DataUnavailable

FORMAT_VERSION = 1
META = "meta.json"
TRAIN_TOKENS = "train_tokens.npy"
TRAIN_DOC_ENDS = "train_doc_ends.npy"
VAL_TOKENS = "val_tokens.npy"
EMBEDDING = "embedding.safetensors"
TOKENIZER = "tokenizer.json"
DATA_FILES = (TRAIN_TOKENS, TRAIN_DOC_ENDS, VAL_TOKENS, EMBEDDING, TOKENIZER)
UNITS = ("samples", "tokens")


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def array_digest(a: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and raw bytes (independent of the file it sits in)."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _combine(**parts: str) -> str:
    return hashlib.sha256("\n".join(f"{k}:{v}" for k, v in parts.items()).encode()).hexdigest()


def model_fingerprint(embedding_digest: str, tokenizer_digest: str) -> str:
    """What the token ids mean: the embedding matrix and the tokenizer that produced them."""
    return _combine(embedding=embedding_digest, tokenizer=tokenizer_digest)


def stream_digest(prefix_digest: str, val_digest: str, model_fp: str) -> str:
    """The run-cache key part of one training stream: its tokens, the validation tokens and
    the model fingerprint. Equal prefixes of two folders give equal values."""
    return _combine(train_prefix=prefix_digest, val_tokens=val_digest, model=model_fp)


# --------------------------------------------------------------------------- writing


def write_prepared(
    folder: Path,
    train_docs: list[np.ndarray],
    val_tokens: np.ndarray,
    embedding: np.ndarray,
    tokenizer_json: bytes,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write a complete folder (meta.json last) and return its meta.

    ``train_docs`` are the token ids of each training document; ``meta`` holds what the
    caller knows (spec, source facts) and is completed with counts, checksums, fingerprint."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=False)
    lengths = np.array([len(d) for d in train_docs], dtype=np.int64)
    train = np.concatenate(train_docs).astype(np.int32) if train_docs else np.zeros(0, np.int32)
    doc_ends = np.cumsum(lengths, dtype=np.int64)
    val = np.asarray(val_tokens, dtype=np.int32)
    emb = np.ascontiguousarray(embedding, dtype=np.float32)
    vocab = emb.shape[0]
    for name, ids in (("training", train), ("validation", val)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(
                f"{name} token ids span {ids.min()}..{ids.max()} but the embedding has only {vocab} rows: "
                "tokenizer and embedding do not belong together"
            )

    np.save(folder / TRAIN_TOKENS, train)
    np.save(folder / TRAIN_DOC_ENDS, doc_ends)
    np.save(folder / VAL_TOKENS, val)
    save_file({"embedding": emb}, str(folder / EMBEDDING))
    (folder / TOKENIZER).write_bytes(tokenizer_json)

    digests = {
        "train_tokens": array_digest(train),
        "train_doc_ends": array_digest(doc_ends),
        "val_tokens": array_digest(val),
        "embedding": array_digest(emb),
        "tokenizer": hashlib.sha256(tokenizer_json).hexdigest(),
    }
    meta = dict(meta)
    meta.update(
        format_version=FORMAT_VERSION,
        vocab_size=int(vocab),
        embed_dim=int(emb.shape[1]),
        counts={"train_docs": int(len(doc_ends)), "train_tokens": int(train.size), "val_tokens": int(val.size)},
        files={
            name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in DATA_FILES
        },
        digests=digests,
        model_fingerprint=model_fingerprint(digests["embedding"], digests["tokenizer"]),
        fingerprint=_combine(**digests),
    )
    # meta.json last: a folder without it is incomplete, whatever else is there.
    tmp = folder / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, folder / META)
    return meta


# --------------------------------------------------------------------------- reading


class PreparedData:
    """A loaded prepared folder. Token arrays are memory-mapped (read-only)."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        train_tokens: np.ndarray,
        train_doc_ends: np.ndarray,
        val_tokens: np.ndarray,
        stamps: dict[str, tuple[int, int, int] | None] | None = None,
    ):
        self.path = path
        self.meta = meta
        self.fingerprint: str = meta["fingerprint"]
        self.vocab_size: int = meta["vocab_size"]
        self.embed_dim: int = meta["embed_dim"]
        self.train_tokens = train_tokens  # (N,) int32
        self.train_doc_ends = train_doc_ends  # (D,) int64, cumulative
        self.val_tokens = val_tokens  # (M,) int32
        self._embedding: np.ndarray | None = None
        self._stream_fps: dict[int, str] = {}
        self._stamps = stamps or {name: _stamp(path / name) for name in DATA_FILES}
        """Each file as it was verified: the token arrays are memory-mapped, so a file written
        in place afterwards would change what a run reads (see :meth:`check_unchanged`)."""

    def __repr__(self) -> str:
        d = self.describe()
        return (
            f"PreparedData({self.path.name}: {d['train_docs']} docs / {d['train_tokens']} train tokens, "
            f"{d['val_tokens']} val tokens, V={self.vocab_size}, E={self.embed_dim})"
        )

    def embedding(self) -> np.ndarray:
        """The frozen pretrained embedding, float32 (V, E); read once, then cached."""
        if self._embedding is None:
            from safetensors.numpy import load_file

            embedding = load_file(str(self.path / EMBEDDING))["embedding"]
            self.check_unchanged(EMBEDDING)
            self._embedding = embedding
        return self._embedding

    def check_unchanged(self, *names: str) -> None:
        """DataCorrupted if a file was written in place since it was verified (same inode, other
        size or modification time). A file replaced by a new one (another inode) is not a
        change for this object: its mapping still reads the verified bytes."""
        for name in names or DATA_FILES:
            now = _stamp(self.path / name)
            then = self._stamps[name]
            if now is None or (now[0] == then[0] and now != then):
                raise DataCorrupted(
                    f"{self.path}: {name} was changed after its checksum was verified (it is memory-mapped, so the "
                    "run would read other data); the next run verifies the folder again and rebuilds it"
                )

    def _ids(self, name: str, ids: np.ndarray) -> np.ndarray:
        """An in-memory int64 copy of token ids, checked: read from the verified file and
        every id a row of the embedding (an id out of range would be an IndexError deep in a run)."""
        out = np.array(ids, dtype=np.int64)
        self.check_unchanged(name)
        if out.size and (int(out.min()) < 0 or int(out.max()) >= self.vocab_size):
            raise DataCorrupted(
                f"{self.path}: {name} holds token ids {int(out.min())}..{int(out.max())}, outside the embedding's "
                f"{self.vocab_size} rows (damaged or modified)"
            )
        return out

    def train_ids(self, size: int, unit: str) -> np.ndarray:
        """:meth:`train_stream` as a checked in-memory int64 copy (what a run trains on)."""
        return self._ids(TRAIN_TOKENS, self.train_stream(size, unit))

    def val_ids(self) -> np.ndarray:
        """The validation stream as a checked in-memory int64 copy."""
        return self._ids(VAL_TOKENS, self.val_tokens)

    def available(self, unit: str) -> int:
        """Training documents ("samples") or tokens ("tokens") this folder holds."""
        _check_unit(unit)
        return int(len(self.train_doc_ends)) if unit == "samples" else int(len(self.train_tokens))

    def _prefix_len(self, size: int, unit: str) -> int:
        _check_unit(unit)
        have = self.available(unit)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"training size must be an integer >= 1, got {size!r}")
        if size > have:
            raise ValueError(
                f"training size {size} {unit} is more than the {have} {unit} available in {self.path.name} "
                f"({self.meta.get('source')}, {len(self.train_tokens)} tokens in {len(self.train_doc_ends)} documents)"
            )
        return int(self.train_doc_ends[size - 1]) if unit == "samples" else int(size)

    def train_stream(self, size: int, unit: str) -> np.ndarray:
        """The first ``size`` documents ("samples") or tokens ("tokens") of the training stream."""
        return self.train_tokens[: self._prefix_len(size, unit)]

    def stream_fingerprint(self, size: int, unit: str) -> str:
        """sha256 of (this prefix's tokens, validation tokens, embedding + tokenizer): what a
        run on this stream computes depends on nothing else in the data."""
        n = self._prefix_len(size, unit)
        if n not in self._stream_fps:
            self._stream_fps[n] = stream_digest(
                array_digest(self.train_tokens[:n]), self.meta["digests"]["val_tokens"], self.meta["model_fingerprint"]
            )
        return self._stream_fps[n]

    def describe(self) -> dict[str, Any]:
        counts = self.meta["counts"]
        return {
            "source": self.meta.get("source"),
            "tokenizer": self.meta.get("tokenizer", {}).get("name"),
            "vocab_size": self.vocab_size,
            "embed_dim": self.embed_dim,
            "train_docs": counts["train_docs"],
            "train_tokens": counts["train_tokens"],
            "val_tokens": counts["val_tokens"],
            "fingerprint": self.fingerprint[:12],
        }


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"unknown size unit {unit!r} (one of {', '.join(UNITS)})")


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a prepared folder; DataCorrupted if missing, unreadable or of another format."""
    meta_path = path / META
    if not meta_path.is_file():
        raise DataCorrupted(f"{path}: {META} is missing (incomplete or damaged prepared folder)")
    try:
        if meta_path.stat().st_size > META_MAX_BYTES:
            raise ValueError(f"{meta_path.stat().st_size:,} bytes, more than the {META_MAX_BYTES:,} a {META} may have")
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deeply to parse
        raise DataCorrupted(f"{path}: {META} is unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DataCorrupted(f"{path}: {META} has format version {version!r}, expected {FORMAT_VERSION}")
    for key in ("files", "digests", "counts", "fingerprint", "model_fingerprint", "vocab_size", "embed_dim"):
        if key not in meta:
            raise DataCorrupted(f"{path}: {META} lacks {key!r}")
    problem = _meta_problem(meta)
    if problem:
        raise DataCorrupted(f"{path}: {META} is damaged ({problem})")
    return meta


META_MAX_BYTES = 1 << 20
"""A prepared folder's meta.json is a few KB; a larger one is damaged, not read."""


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What in a meta.json is not of the form this module writes (every value the loader and
    the run keys read), or None: a damaged one is then DataCorrupted, not a KeyError or a
    TypeError in a trial."""
    files, counts, digests = meta["files"], meta["counts"], meta["digests"]
    if not isinstance(files, dict):
        return "'files' is not an object"
    for name, record in files.items():
        if not (isinstance(record, dict) and _count(record.get("bytes")) and isinstance(record.get("sha256"), str)):
            return f"files.{name} is not {{bytes, sha256}}"
    if not (isinstance(counts, dict) and all(_count(counts.get(k)) for k in ("train_tokens", "train_docs", "val_tokens"))):
        return "'counts' lacks whole numbers train_tokens, train_docs, val_tokens"
    if not (isinstance(digests, dict) and isinstance(digests.get("val_tokens"), str)):
        return "'digests' lacks val_tokens"
    for key in ("fingerprint", "model_fingerprint"):
        if not isinstance(meta[key], str):
            return f"{key!r} is not text"
    for key in ("vocab_size", "embed_dim"):
        if not (_count(meta[key]) and meta[key] > 0):
            return f"{key!r} is not a whole number > 0"
    if meta.get("tokenizer") is not None and not isinstance(meta["tokenizer"], dict):
        return "'tokenizer' is not an object"
    return None


def load_prepared(path: str | Path, verify: bool = True) -> PreparedData:
    """Open a prepared folder. ``verify=True`` checks every file's size and sha256 against
    meta.json, ``verify=False`` sizes only; a mismatch raises DataCorrupted naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise DataUnavailable(f"no prepared data folder at {path}")
    meta = read_meta(path)
    stamps = {}
    for name in DATA_FILES:
        record = meta["files"].get(name)
        file = path / name
        stamps[name] = _stamp(file)  # before the check: a write during it shows as a change
        if record is None:
            raise DataCorrupted(f"{path}: {META} has no checksum for {name}")
        if not file.is_file():
            raise DataCorrupted(f"{path}: {name} is missing")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise DataCorrupted(
                f"{path}: {name} has {size} bytes, {META} says {record['bytes']} (truncated or replaced)"
            )
        if verify and sha256_file(file) != record["sha256"]:
            raise DataCorrupted(f"{path}: {name} does not match its sha256 in {META} (damaged or modified)")

    try:
        train = np.load(path / TRAIN_TOKENS, mmap_mode="r", allow_pickle=False)
        ends = np.load(path / TRAIN_DOC_ENDS, mmap_mode="r", allow_pickle=False)
        val = np.load(path / VAL_TOKENS, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # only reachable with verify=False: same size, garbled header
        raise DataCorrupted(f"{path}: a token file cannot be read ({e})") from e
    counts = meta["counts"]
    consistent = (
        train.dtype == np.int32
        and val.dtype == np.int32
        and ends.dtype == np.int64
        and len(train) == counts["train_tokens"]
        and len(ends) == counts["train_docs"]
        and len(val) == counts["val_tokens"]
        and (len(ends) == 0 or int(ends[-1]) == len(train))
    )
    if not consistent:
        raise DataCorrupted(f"{path}: token arrays do not agree with the counts in {META}")
    return PreparedData(path, meta, train, ends, val, stamps)
