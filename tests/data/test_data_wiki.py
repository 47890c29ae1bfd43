import os
import subprocess
import sys
import textwrap

import numpy as np

from archsearch.data import DataSpec, load_prepared, prepare_data
from archsearch.data.sources import clean_wiki, wiki_articles


def test_wiki_loads_offline(wiki):
    data, info = wiki.data, wiki.data.meta["source_info"]
    assert data.meta["source"] == "wiki" and data.meta["tokenizer"]["name"] == "minilm"
    assert (data.vocab_size, data.embed_dim) == (30522, 384)
    assert info["pages"] == 206 and info["redirects"] > 50
    n_train, n_val = len(info["train_titles"]), len(info["val_titles"])
    assert n_train + n_val == info["articles"] >= 100
    assert data.available("samples") == n_train
    assert 300_000 < data.available("tokens") < 1_000_000
    assert len(data.val_tokens) == 30_000  # the held-out articles' first val_tokens tokens
    # validation = whole articles from the end, none of them in training
    assert not set(info["train_titles"]) & set(info["val_titles"])
    assert n_val >= 1
    assert data.train_doc_ends[-1] == len(data.train_tokens)
    assert np.all(np.diff(data.train_doc_ends) > 0)
    # no [CLS]/[SEP] (101/102) and no padding (0): documents were encoded without special tokens
    assert not np.isin(data.train_tokens, [0, 101, 102]).any()


def test_articles_are_plain_text():
    articles, counts = wiki_articles(500)
    assert counts["articles"] == len(articles) >= 100
    for title, text in articles:
        assert len(text) >= 500
        assert not text.lower().startswith("#redirect")
        for mark in ("[[", "]]", "{{", "}}", "<ref", "'''", "''", "\n\n\n", "|alt="):
            assert mark not in text, (title, mark)
    # paragraph breaks survive
    assert sum("\n\n" in text for _, text in articles) > 90


def test_clean_wiki():
    markup = "'''Bold''' and ''it'' [[Link|shown]].\n\n\n== Section ==\n* item  one\nFile:x.jpg|caption\n{{cite|x}}End"
    assert clean_wiki(markup) == "Bold and it shown.\n\nSection\nitem one\n\nEnd"


def test_round_trip_and_reuse(wiki):
    loaded = load_prepared(wiki.data.path, verify=True)
    assert loaded.fingerprint == wiki.data.fingerprint
    assert np.array_equal(loaded.train_tokens, wiki.data.train_tokens)
    assert np.array_equal(loaded.val_tokens, wiki.data.val_tokens)
    assert loaded.embedding().shape == (30522, 384) and loaded.embedding().dtype == np.float32
    assert loaded.describe()["fingerprint"] == wiki.data.fingerprint[:12]

    inode = os.stat(wiki.data.path).st_ino
    messages = []
    again = prepare_data(DataSpec(source="wiki", cache_dir=str(wiki.cache_dir)), progress=messages.append)
    assert again.path == wiki.data.path and os.stat(again.path).st_ino == inode
    assert again.meta["created"] == wiki.data.meta["created"]
    assert messages == [f"using prepared data {again.path}"]
    assert any(m.startswith("prepared wiki-") for m in wiki.messages)
    # a different held-out size is different content: a folder of its own
    other = prepare_data(DataSpec(source="wiki", cache_dir=str(wiki.cache_dir), val_tokens=10_000, sizes=[5]))
    assert other.path != wiki.data.path and len(other.val_tokens) == 10_000


def test_loading_needs_no_heavy_library(wiki):
    """A machine with numpy + safetensors only can load a prepared folder and find it again
    through prepare_data (the warm path)."""
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("datasets", "gensim", "huggingface_hub", "tokenizers", "torch", "optuna", "ray", "pyarrow"):
            sys.modules[name] = None  # any import of them now fails
        from archsearch.data import DataSpec, load_prepared, prepare_data
        data = load_prepared({str(wiki.data.path)!r})
        again = prepare_data(DataSpec(source="wiki", cache_dir={str(wiki.cache_dir)!r}))
        assert again.fingerprint == data.fingerprint
        print(data.train_stream(3, "samples").sum(), data.embedding().shape)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "(30522, 384)" in out.stdout
