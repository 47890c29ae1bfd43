"""The prepared-data cache: sizes, fingerprints, corruption, concurrent preparation."""

import json
import multiprocessing
import os
import re
import shutil

import numpy as np
import pytest
from standins import prepare_in_worker, reference_tokenizer

from archsearch.data import DataSpec, load_prepared, prepare_data
from archsearch.errors import DataCorrupted

TEXTS = [f"Document number {i} talks about {'green rivers ' * (i % 4 + 1)}and blue mountains." for i in range(12)]


def write_corpus(folder, texts=TEXTS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (folder / "val.txt").write_text("A validation document.\nWith two lines.")
    return folder


def files_spec(folder, tokenizer, cache, **kw) -> DataSpec:
    return DataSpec(
        source="files",
        paths=[str(folder / "train.jsonl")],
        val_paths=[str(folder / "val.txt")],
        tokenizer=str(tokenizer),
        cache_dir=str(cache),
        **kw,
    )


@pytest.fixture
def small(tmp_path, tiny_tokenizer):
    return prepare_data(files_spec(write_corpus(tmp_path / "corpus"), tiny_tokenizer, tmp_path / "cache"))


def test_sizes_in_samples_and_tokens(small, tiny_tokenizer):
    tok = reference_tokenizer(tiny_tokenizer)
    docs = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
    stream = sum(docs, [])
    assert small.available("samples") == 12 and small.available("tokens") == len(stream)
    for n in (1, 5, 12):
        assert small.train_stream(n, "samples").tolist() == sum(docs[:n], [])
    for n in (1, 7, len(stream)):
        assert small.train_stream(n, "tokens").tolist() == stream[:n]
    assert small.train_stream(3, "tokens").dtype == np.int32
    with pytest.raises(ValueError, match=r"training size 13 samples is more than the 12 samples available"):
        small.train_stream(13, "samples")
    n = len(stream)
    with pytest.raises(ValueError, match=rf"training size {n + 1} tokens is more than the {n} tokens available"):
        small.train_stream(n + 1, "tokens")
    with pytest.raises(ValueError, match="unknown size unit 'docs'"):
        small.available("docs")
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        small.train_stream(0, "tokens")
    d = small.describe()
    assert d["train_docs"] == 12 and d["train_tokens"] == len(stream) and d["fingerprint"] == small.fingerprint[:12]


def test_fingerprints(tmp_path, tiny_tokenizer, other_tokenizer, small):
    # the tokenizer changes: new folder, new fingerprint
    other = prepare_data(files_spec(tmp_path / "corpus", other_tokenizer, tmp_path / "cache"))
    assert other.path != small.path and other.fingerprint != small.fingerprint
    assert other.stream_fingerprint(3, "samples") != small.stream_fingerprint(3, "samples")

    # the data changes (same path, edited file): new folder, new fingerprint
    changed = TEXTS[:11] + ["A different last document."]
    write_corpus(tmp_path / "corpus", changed)
    edited = prepare_data(files_spec(tmp_path / "corpus", tiny_tokenizer, tmp_path / "cache"))
    assert edited.path != small.path and edited.fingerprint != small.fingerprint
    # ... but its first 11 documents, hence their stream, are the same
    assert edited.stream_fingerprint(11, "samples") == small.stream_fingerprint(11, "samples")
    assert edited.stream_fingerprint(12, "samples") != small.stream_fingerprint(12, "samples")
    # equal token prefixes are equal streams, whatever the unit they were asked in
    n = int(small.train_doc_ends[4])
    assert small.stream_fingerprint(n, "tokens") == small.stream_fingerprint(5, "samples")
    assert small.stream_fingerprint(n - 1, "tokens") != small.stream_fingerprint(5, "samples")

    # a corpus that only extends another shares its prefixes' fingerprints
    longer_corpus = write_corpus(tmp_path / "longer", TEXTS + ["One more."])
    longer = prepare_data(files_spec(longer_corpus, tiny_tokenizer, tmp_path / "cache"))
    assert longer.stream_fingerprint(12, "samples") == small.stream_fingerprint(12, "samples")
    # a copy of the corpus elsewhere is recognised as the same content
    copy = prepare_data(files_spec(write_corpus(tmp_path / "copy"), tiny_tokenizer, tmp_path / "cache"))
    assert copy.path == small.path


def _flip_tokens(path):
    f = path / "train_tokens.npy"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF  # in the data, not the header: same size, other content
    f.write_bytes(bytes(raw))


def _truncate_embedding(path):
    f = path / "embedding.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _delete_meta(path):
    (path / "meta.json").unlink()


def _edit_meta(edit):
    def damage(path):
        f = path / "meta.json"
        meta = json.loads(f.read_text())
        edit(meta)
        f.write_text(json.dumps(meta))

    return damage


def _nest_meta(path):
    (path / "meta.json").write_text("[" * 100_000)


@pytest.mark.parametrize(
    "damage, names, sizes_only_catch",
    [
        (_flip_tokens, "train_tokens.npy does not match its sha256", False),
        (_truncate_embedding, "embedding.safetensors has", True),
        (_delete_meta, "meta.json is missing", True),
        # a damaged meta.json: DataCorrupted (rebuilt), never a KeyError, TypeError or RecursionError
        (_nest_meta, "meta.json is unreadable (RecursionError", True),
        (_edit_meta(lambda m: m.update(files=[1, 2])), "meta.json is damaged ('files' is not an object)", True),
        (_edit_meta(lambda m: m["files"]["val_tokens.npy"].pop("bytes")), "files.val_tokens.npy is not {bytes, sha256}", True),
        (_edit_meta(lambda m: m["counts"].update(train_tokens="12")), "'counts' lacks whole numbers", True),
        (_edit_meta(lambda m: m.update(embed_dim=None)), "'embed_dim' is not a whole number > 0", True),
    ],
)
def test_damaged_folder_is_detected_and_rebuilt(tmp_path, tiny_tokenizer, small, damage, names, sizes_only_catch):
    fingerprint = small.fingerprint
    damage(small.path)
    with pytest.raises(DataCorrupted, match=re.escape(names)):
        load_prepared(small.path, verify=True)
    if sizes_only_catch:
        with pytest.raises(DataCorrupted):
            load_prepared(small.path, verify=False)
    else:
        load_prepared(small.path, verify=False)  # sizes only: a flipped byte goes unnoticed

    messages = []
    with pytest.warns(UserWarning, match="damaged and will be rebuilt"):
        spec = files_spec(tmp_path / "corpus", tiny_tokenizer, tmp_path / "cache")
        rebuilt = prepare_data(spec, progress=messages.append)
    assert any(names in m for m in messages)
    assert rebuilt.path == small.path and rebuilt.fingerprint == fingerprint
    assert load_prepared(rebuilt.path, verify=True).fingerprint == fingerprint


def test_concurrent_preparation(tmp_path, tiny_tokenizer):
    """Several processes prepare the same data in a fresh cache at once: one builds, the
    others wait for it and load the same folder."""
    corpus = write_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    spec = {
        "source": "files",
        "paths": [str(corpus / "train.jsonl")],
        "val_paths": [str(corpus / "val.txt")],
        "tokenizer": str(tiny_tokenizer),
        "cache_dir": str(cache),
    }
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=prepare_in_worker, args=(spec, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(r[0] != "error" for r in out), out
    assert len(set(out)) == 1  # same folder, fingerprint, build time and builder
    folders = [p.name for p in cache.iterdir() if p.is_dir()]
    assert folders == [os.path.basename(out[0][0])]  # no temporary folder left
    assert load_prepared(out[0][0], verify=True).fingerprint == out[0][1]
    assert out[0][3] in {p.pid for p in procs}


def test_a_removed_folder_is_rebuilt_identically(tmp_path, tiny_tokenizer, small):
    fingerprint, files = small.fingerprint, small.meta["files"]
    shutil.rmtree(small.path)
    again = prepare_data(files_spec(tmp_path / "corpus", tiny_tokenizer, tmp_path / "cache"))
    assert again.fingerprint == fingerprint and again.meta["files"] == files  # byte-identical files
