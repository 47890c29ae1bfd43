"""The files source: .txt, .jsonl and .parquet inputs through HF datasets."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from standins import reference_tokenizer

from archsearch.data import DataSpec, data_spec_from_dict, prepare_data
from archsearch.errors import ConfigError

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
