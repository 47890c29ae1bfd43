"""The files source: .txt and .jsonl inputs (standard library), .parquet (HF datasets)."""

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from standins import reference_tokenizer

from archsearch.data import DataSpec, data_spec_from_dict, prepare_data, prepared_path, sources
from archsearch.errors import ConfigError, DataUnavailable

PROSE = [
    "The first file.\nIts second line belongs to the same document.\n\nA new paragraph, too.",
    "The second file, one line.",
]
ROWS = ["A small cat sat.", "", "Green river, blue mountain.", "Why? Please explain."]


def ids(tok, texts):
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


@pytest.fixture
def corpus(tmp_path):
    files = {}
    for i, text in enumerate(PROSE):
        files[f"prose{i}"] = tmp_path / f"prose{i}.txt"
        files[f"prose{i}"].write_text(text)
    files["jsonl"] = tmp_path / "rows.jsonl"
    files["jsonl"].write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(ROWS)) + "\n")
    files["parquet"] = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": list(range(len(ROWS))), "body": ROWS}), files["parquet"])
    files["val"] = tmp_path / "val.txt"
    files["val"].write_text("Held out text for validation.\nTwo lines.")
    return files


def test_text_files_are_one_document_each(tmp_path, corpus, tiny_tokenizer):
    spec = data_spec_from_dict(
        {
            "source": "files",
            "paths": [str(corpus["prose0"]), str(corpus["prose1"])],
            "val_paths": [str(corpus["val"])],
            "tokenizer": str(tiny_tokenizer),
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    data = prepare_data(spec)
    tok = reference_tokenizer(tiny_tokenizer)
    expected = ids(tok, PROSE)
    assert data.available("samples") == 2
    assert data.train_stream(1, "samples").tolist() == expected[0]
    assert data.train_stream(2, "samples").tolist() == expected[0] + expected[1]
    assert data.val_tokens.tolist() == ids(tok, [corpus["val"].read_text()])[0]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_rows_with_a_text_field(tmp_path, corpus, tiny_tokenizer, kind):
    spec = DataSpec(
        source="files",
        paths=[str(corpus[kind])],
        text_field="body",
        val_paths=[str(corpus["val"])],
        tokenizer=str(tiny_tokenizer),
        cache_dir=str(tmp_path / "cache"),
    )
    data = prepare_data(spec)
    expected = ids(reference_tokenizer(tiny_tokenizer), [t for t in ROWS if t])  # the empty row is skipped
    assert data.available("samples") == 3
    assert data.train_stream(3, "samples").tolist() == sum(expected, [])


def test_mixed_formats_in_order_with_a_held_out_tail(tmp_path, corpus, tiny_tokenizer):
    paths = [corpus["parquet"], corpus["prose0"], corpus["jsonl"], corpus["prose1"]]
    spec = DataSpec(
        source="files",
        paths=[str(p) for p in paths],
        text_field="body",
        val_tokens=5,
        tokenizer=str(tiny_tokenizer),
        cache_dir=str(tmp_path / "cache"),
    )
    data = prepare_data(spec)
    rows = [t for t in ROWS if t]
    texts = rows + [PROSE[0]] + rows + [PROSE[1]]
    docs = ids(reference_tokenizer(tiny_tokenizer), texts)
    assert len(docs[-1]) >= 5  # so exactly the last document is held out
    assert data.available("samples") == len(texts) - 1
    assert data.train_tokens.tolist() == sum(docs[:-1], [])
    assert data.val_tokens.tolist() == docs[-1][:5]  # cut to exactly val_tokens


def test_missing_text_field(tmp_path, corpus, tiny_tokenizer):
    spec = DataSpec(
        source="files", paths=[str(corpus["jsonl"])], tokenizer=str(tiny_tokenizer), cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(ConfigError, match=r"data.text_field: .*rows.jsonl has no field 'text' \(fields: id, body\)"):
        prepare_data(spec)


def test_too_little_text_for_validation(tmp_path, corpus, tiny_tokenizer):
    spec = DataSpec(
        source="files", paths=[str(corpus["prose1"])], tokenizer=str(tiny_tokenizer), cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(ConfigError, match="data.val_tokens: .* too few to hold out 30000 validation tokens"):
        prepare_data(spec)


# --------------------------------------------------------------------------- without HF datasets
# .txt and JSON lines are read with the standard library; each case is checked against the
# datasets builders (sources._datasets_documents, the path every file took before) on the
# same bytes: the same documents, or the same ConfigError.

BOM = b"\xef\xbb\xbf"
TEXT_CASES = {
    "crlf": b"First line.\r\nSecond line.\r\n\r\nA paragraph.\rOld Mac line.\n",
    "bom_crlf": BOM + b"Hello\r\nworld",
    "unicode_breaks": "x\u2028y\u0085z\x0cw caf\u00e9 \U0001f600".encode(),
    "empty": b"",
    "whitespace": b"  \r\n\t\n",
}
JSON_CASES = {
    "rows": b'{"text": "a"}\n{"text": "b", "x": 1}\n',
    "blank_lines": b'\n{"text": "a"}\n\n   \n{"text": "b"}',
    "crlf": b'{"text": "a\\r\\nb"}\r\n{"text": "c"}\r\n',
    "bom": BOM + b'{"text": "first"}\n{"text": "second"}',
    "pretty": b'{\n  "text": "a",\n  "n": 1\n}\n{\n  "text": "b"\n}\n',
    "one_object": b'{\n "text": "the whole file"\n}\n',
    "several_on_a_line": b'{"text": "a"} {"text": "b"}{"text": "c"}\n',
    "escapes": b'{"text": "caf\\u00e9 \\ud83d\\ude00 x\\u2028y \xc3\xa9 \\n"}\n',
    "empty_rows": b'{"text": ""}\n{"text": "  "}\n{"text": "x"}\n',
    "other_fields": b'{"text": "a", "meta": {"k": [1, 2]}, "v": NaN}\n{"text": "b", "meta": null}\n',
}
BAD_JSON_CASES = {
    "missing_everywhere": b'{"a": 1, "b": "x"}\n{"c": 2}\n',
    "missing_in_one_row": b'{"text": "a"}\n{"b": 2}\n',
    "null": b'{"text": null}\n{"text": "b"}\n',
    "number": b'{"text": "a"}\n{"text": 5}\n',
    "object": b'{"text": {"a": 1}}\n',
    "list": b'{"text": "a"}\n{"text": ["b"]}\n',
    "bool": b'{"text": true}\n',
    "nested": b'{"meta": {"text": "a"}}\n',
}


def _via_datasets(path: str, fmt: str, text_field: str = "text"):
    from archsearch.data.spec import file_format

    try:
        return list(sources._datasets_documents(path, file_format(path, fmt), text_field))
    except ConfigError as e:
        return f"ConfigError: {e}"


def _native(path: str, fmt: str, text_field: str = "text"):
    assert sources.needs_datasets(path, fmt) is None
    try:
        return list(sources.file_documents(path, fmt, text_field))
    except ConfigError as e:
        return f"ConfigError: {e}"


@pytest.mark.parametrize("chunk", [sources.JSON_CHUNK, 5])
@pytest.mark.parametrize(
    "name, ext, content",
    [(n, "txt", c) for n, c in TEXT_CASES.items()]
    + [(n, "jsonl", c) for n, c in JSON_CASES.items()]
    + [(n, "jsonl", c) for n, c in BAD_JSON_CASES.items()],
)
def test_text_and_json_lines_read_as_the_datasets_builders_read_them(tmp_path, monkeypatch, name, ext, content, chunk):
    """chunk 5: every value and multi-byte character is cut across reads."""
    monkeypatch.setattr(sources, "JSON_CHUNK", chunk)
    path = tmp_path / f"{name}.{ext}"
    path.write_bytes(content)
    expected = _via_datasets(str(path), "auto")
    assert _native(str(path), "auto") == expected
    if name in BAD_JSON_CASES:
        assert expected.startswith("ConfigError: data.text_field: ")
    if name == "bom_crlf":  # what the text builder does, kept: the BOM stays, \r\n becomes \n
        assert expected == ["\ufeffHello\nworld"]
    if ext == "jsonl" and name == "bom":
        assert expected == ["first", "second"]


def test_a_json_file_of_rows_and_text_as_format(tmp_path):
    """A .json holding JSON lines or one object, and any extension read with format: text."""
    rows = tmp_path / "rows.json"
    rows.write_bytes(JSON_CASES["pretty"])
    assert _native(str(rows), "auto") == _via_datasets(str(rows), "auto") == ["a", "b"]
    notes = tmp_path / "notes.log"
    notes.write_bytes(TEXT_CASES["crlf"])
    assert _native(str(notes), "text") == _via_datasets(str(notes), "text")


def _block_datasets(monkeypatch):
    """`import datasets` fails, as on a machine without it."""
    for name in [m for m in sys.modules if m == "datasets" or m.startswith("datasets.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "datasets", None)


def _prepared(spec):
    data = prepare_data(spec)
    folder = prepared_path(spec)
    meta = json.loads((folder / "meta.json").read_text())
    for volatile in ("created", "builder", "tokenize_seconds"):
        meta.pop(volatile)
    meta["spec"].pop("cache_dir", None)
    return folder.name, meta, data.train_tokens.tolist(), data.train_doc_ends.tolist(), data.val_tokens.tolist()


def test_a_corpus_prepares_the_same_without_datasets(tmp_path, monkeypatch, tiny_tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, content in TEXT_CASES.items():
        (docs / f"{name}.txt").write_bytes(content)
    for name, content in JSON_CASES.items():
        (docs / f"{name}.jsonl").write_bytes(content)
    paths = sorted(str(p) for p in docs.iterdir())

    def spec(cache):
        return DataSpec(
            source="files", paths=paths, val_tokens=8, tokenizer=str(tiny_tokenizer), cache_dir=str(tmp_path / cache)
        )

    with_datasets = _prepared(spec("with"))
    builders_read = [t for p in paths for t in _via_datasets(p, "auto")]
    _block_datasets(monkeypatch)
    with pytest.raises(ImportError):
        import datasets  # noqa: F401
    without = _prepared(spec("without"))
    assert without == with_datasets  # folder name (the key), meta.json, ids, document ends
    # and the documents are the ones the datasets builders read, in order
    _name, _meta, train, _ends, val = without
    assert train + val == sum(ids(reference_tokenizer(tiny_tokenizer), builders_read), [])[: len(train) + len(val)]


@pytest.mark.parametrize("name", ["rows.parquet", "array.json", "rows.jsonl.gz"])
def test_what_needs_datasets_names_the_file_and_the_extra(tmp_path, monkeypatch, corpus, tiny_tokenizer, name):
    import gzip

    path = tmp_path / name
    if name.endswith(".parquet"):
        path = corpus["parquet"]
    elif name.endswith(".json"):
        path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    else:
        path.write_bytes(gzip.compress(b'{"text": "a"}\n'))
    cache = tmp_path / "cache"
    spec = DataSpec(
        source="files",
        paths=[str(corpus["prose0"]), str(path)],
        format="json" if name.endswith(".gz") else "auto",
        val_paths=[str(corpus["val"])] if not name.endswith(".gz") else [],
        tokenizer=str(tiny_tokenizer),
        cache_dir=str(cache),
    )
    _block_datasets(monkeypatch)
    with pytest.raises(DataUnavailable) as info:
        prepare_data(spec)
    message = str(info.value)
    assert f"data.paths[1] ({path.name}: " in message and "pip install 'archsearch[files]'" in message
    assert "prose0" not in message  # the .txt file needs nothing
    assert not prepared_path(spec).exists() and not list(cache.glob(".*tmp*"))  # nothing written


def test_a_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": \n')
    with pytest.raises(DataUnavailable, match=r"could not read .*rows.jsonl as json \(line 3: the file ends inside"):
        list(sources.file_documents(str(path), "auto", "text"))
    path.write_bytes(b'{"text": "a"}\n{"text": "b",, "c": 1}\n')
    with pytest.raises(DataUnavailable, match=r"as json \(line 2: Expecting property name"):
        list(sources.file_documents(str(path), "auto", "text"))
    path.write_bytes(b'{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataUnavailable, match=r"line 2: a JSON list, not an object"):
        list(sources.file_documents(str(path), "auto", "text"))
    path.write_bytes(b'{"text": "a\\ud800b"}\n')  # the tokenizer would refuse it with a TypeError
    with pytest.raises(DataUnavailable, match=r"line 1: 'text' holds an unpaired surrogate"):
        list(sources.file_documents(str(path), "auto", "text"))
    path.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataUnavailable, match=r"as json \(UnicodeDecodeError"):
        list(sources.file_documents(str(path), "auto", "text"))


BLOCK_DATASETS = '''import sys

class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError(f"{name} is blocked: a machine without HF datasets")

sys.meta_path.insert(0, _Block())
'''


def test_a_trial_on_text_files_runs_where_datasets_is_not_installed(tmp_path):
    """The GPU machine has no HF datasets: `archsearch trial` on .txt files (the tests' tiny
    corpus) prepares them and trains, in a process where `import datasets` fails."""
    import os
    import random
    import subprocess

    from helpers import cli, tiny_space, write_space
    from standins import make_tokenizer_folder, sentences

    rng = random.Random(0)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"doc{i:03d}.txt").write_text(" ".join(sentences(rng, 12)))
    corpus = {
        "tokenizer": str(make_tokenizer_folder(tmp_path / "tok", vocab_size=300, dim=8)),
        "paths": sorted(str(p) for p in docs.glob("*.txt")),
        "cache_dir": str(tmp_path / "cache"),
    }
    space = write_space(tmp_path / "space.yaml", tiny_space(corpus))
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_DATASETS)
    env = {
        "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]),
        "ARCHSEARCH_HOME": str(tmp_path / "home"),
    }
    probe = subprocess.run([sys.executable, "-c", "import datasets"], env=dict(os.environ, **env), capture_output=True)
    assert probe.returncode != 0 and b"blocked" in probe.stderr  # the blocker is in effect
    out = cli("trial", str(space), "--device", "cpu", "-q", "phase2.max_epochs=1", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "objective: alpha" in out.stdout
    assert list((tmp_path / "cache").glob("files-*/meta.json"))
