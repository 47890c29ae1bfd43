"""The ultrachat source and Hub resolution, against local stand-ins (no network)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
from standins import reference_tokenizer, ultrachat_rows, write_ultrachat

from archsearch.data import DataSpec, data_spec_from_dict, prepare_data
from archsearch.errors import ConfigError, DataUnavailable


def expected_streams(folder, tokenizer_folder, n_train, val_start=1000, val_count=20):
    """The report's rules, recomputed with the tokenizer directly."""
    rows = pq.read_table(next((folder / "data").glob("train_sft-*.parquet"))).to_pylist()
    tok = reference_tokenizer(tokenizer_folder)
    text = lambda row: "\n".join(m["content"] for m in row["messages"])  # noqa: E731
    docs = [tok.encode(text(r), add_special_tokens=False).ids for r in rows[:n_train]]
    val_text = "\n\n".join(text(r) for r in rows[val_start : val_start + val_count])
    return docs, tok.encode(val_text, add_special_tokens=False).ids


def test_report_protocol_local_folders(tmp_path, ultrachat_folder, tiny_tokenizer):
    spec = data_spec_from_dict(
        {
            "source": "ultrachat",
            "sizes": {"samples": [5, 20]},
            "dataset": str(ultrachat_folder),
            "tokenizer": str(tiny_tokenizer),
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    data = prepare_data(spec)
    docs, val = expected_streams(ultrachat_folder, tiny_tokenizer, 20)

    assert data.available("samples") == 20  # only the conversations needed were tokenised
    assert np.array_equal(data.train_doc_ends, np.cumsum([len(d) for d in docs]))
    assert data.train_stream(20, "samples").tolist() == sum(docs, [])
    assert data.train_stream(5, "samples").tolist() == sum(docs[:5], [])
    assert data.val_tokens.tolist() == val
    # the joining rules matter: newlines are tokens of their own for a byte-level BPE
    tok = reference_tokenizer(tiny_tokenizer)
    assert tok.token_to_id("Ċ") in data.val_tokens and tok.token_to_id("Ċ") in data.train_tokens
    # truncation (max 8) and padding (16) of the stand-in's tokenizer.json were turned off
    assert max(np.diff(data.train_doc_ends)) > 16
    assert (data.vocab_size, data.embed_dim) == (tok.get_vocab_size(), 8)
    assert data.meta["tokenizer"]["embedding_key"] == "wte.weight"
    assert data.meta["source_info"]["val_conversations"] == [1000, 1019]


def test_token_sizes_take_enough_conversations(tmp_path, ultrachat_folder, tiny_tokenizer):
    spec = DataSpec(
        source="ultrachat",
        sizes=[100, 1500],
        size_unit="tokens",
        dataset=str(ultrachat_folder),
        tokenizer=str(tiny_tokenizer),
        cache_dir=str(tmp_path),
    )
    data = prepare_data(spec)
    docs, _ = expected_streams(ultrachat_folder, tiny_tokenizer, 1000)
    ends = np.cumsum([len(d) for d in docs])
    k = int(np.searchsorted(ends, 1500)) + 1  # first conversation count reaching 1500 tokens
    assert data.available("samples") == k and data.available("tokens") == ends[k - 1] >= 1500
    assert data.train_stream(1500, "tokens").tolist() == sum(docs, [])[:1500]


def local_stand_ins(folder, tokenizer, cache) -> dict:
    return dict(source="ultrachat", dataset=str(folder), tokenizer=str(tokenizer), cache_dir=str(cache))


def test_a_request_for_more_rebuilds(tmp_path, ultrachat_folder, tiny_tokenizer):
    common = local_stand_ins(ultrachat_folder, tiny_tokenizer, tmp_path)
    small = prepare_data(DataSpec(sizes=[5], size_unit="samples", **common))
    messages = []
    large = prepare_data(DataSpec(sizes=[5, 50], size_unit="samples", **common), progress=messages.append)
    assert large.path == small.path and large.available("samples") == 50
    assert any("more are needed: rebuilding" in m for m in messages)
    assert large.stream_fingerprint(5, "samples") == small.stream_fingerprint(5, "samples")
    assert large.val_tokens.tolist() == small.val_tokens.tolist()
    # a smaller request afterwards uses the larger folder as it is
    again = prepare_data(DataSpec(sizes=[10], size_unit="samples", **common))
    assert again.meta["created"] == large.meta["created"] and again.available("samples") == 50
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [large.path.name]


def test_training_never_reaches_validation(tmp_path, ultrachat_folder, tiny_tokenizer):
    common = local_stand_ins(ultrachat_folder, tiny_tokenizer, tmp_path)
    with pytest.raises(ConfigError, match="overlap the validation conversations 1000..1019"):
        prepare_data(DataSpec(sizes=[1001], size_unit="samples", **common))
    with pytest.raises(ConfigError, match="the 10 conversations before the validation range hold"):
        prepare_data(DataSpec(sizes=[10**6], size_unit="tokens", val_start=10, **common))


def test_hub_code_path_with_a_fake_cache(tmp_path, hf_hub, ultrachat_folder, tiny_tokenizer):
    from huggingface_hub import hf_hub_download

    snapshot = hf_hub.add("org/tiny-gpt2", tiny_tokenizer)
    hf_hub.add("org/tiny-ultrachat", ultrachat_folder, repo_type="dataset", commit="b" * 40)
    # huggingface_hub itself resolves the stand-in offline
    assert hf_hub_download("org/tiny-gpt2", "tokenizer.json") == str(snapshot / "tokenizer.json")

    common = dict(source="ultrachat", sizes=[30], size_unit="samples", cache_dir=str(tmp_path / "cache"))
    from_hub = prepare_data(DataSpec(dataset="org/tiny-ultrachat", tokenizer="org/tiny-gpt2", **common))
    assert from_hub.meta["tokenizer"]["origin"] == f"hub org/tiny-gpt2@{'a' * 40}"
    local = prepare_data(DataSpec(dataset=str(ultrachat_folder), tokenizer=str(tiny_tokenizer), **common))
    assert local.path != from_hub.path  # other spec, other folder; same files, same content:
    assert local.fingerprint == from_hub.fingerprint
    assert local.stream_fingerprint(30, "samples") == from_hub.stream_fingerprint(30, "samples")

    # a snapshot holding just the split's files (what an online run downloads) reads the same
    partial = tmp_path / "partial"
    (partial / "data").mkdir(parents=True)
    for f in (ultrachat_folder / "data").glob("train_sft-*"):
        (partial / "data" / f.name).write_bytes(f.read_bytes())
    hf_hub.add("org/partial-ultrachat", partial, repo_type="dataset")
    only_split = prepare_data(DataSpec(dataset="org/partial-ultrachat", tokenizer="org/tiny-gpt2", **common))
    assert only_split.fingerprint == local.fingerprint


def test_hub_resolution_from_the_environment_alone(tmp_path, hf_hub, ultrachat_folder, tiny_tokenizer):
    """A fresh process, configured only by HF_HUB_CACHE / HF_HUB_OFFLINE (no patching)."""
    hf_hub.add("org/tiny-gpt2", tiny_tokenizer)
    hf_hub.add("org/tiny-ultrachat", ultrachat_folder, repo_type="dataset")
    code = textwrap.dedent(
        f"""
        from archsearch.data import DataSpec, prepare_data
        spec = DataSpec(source="ultrachat", sizes=[12], size_unit="samples", dataset="org/tiny-ultrachat",
                        tokenizer="org/tiny-gpt2", cache_dir={str(tmp_path / "cache")!r})
        print(prepare_data(spec).stream_fingerprint(12, "samples"))
        """
    )
    env = dict(os.environ, HF_HUB_CACHE=str(hf_hub.cache), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    local = prepare_data(
        DataSpec(
            source="ultrachat", sizes=[12], size_unit="samples", dataset=str(ultrachat_folder),
            tokenizer=str(tiny_tokenizer), cache_dir=str(tmp_path / "local"),
        )
    )
    assert out.stdout.strip() == local.stream_fingerprint(12, "samples")


def test_offline_without_cache_is_a_clear_error(tmp_path):
    spec = data_spec_from_dict({"source": "ultrachat", "sizes": {"samples": [50]}, "cache_dir": str(tmp_path)})
    with pytest.raises(DataUnavailable) as info:
        prepare_data(spec)
    message = str(info.value)
    for part in (
        "HuggingFaceH4/ultrachat_200k",
        "openai-community/gpt2",
        "hf download HuggingFaceH4/ultrachat_200k --repo-type dataset",
        "huggingface-cli download",
        "data.dataset",
        "data.tokenizer",
        "data.source=wiki",
    ):
        assert part in message, part
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # nothing half-built is left


def test_dataset_too_short(tmp_path, tiny_tokenizer):
    folder = write_ultrachat(tmp_path / "short", ultrachat_rows(30))
    spec = DataSpec(
        source="ultrachat", sizes=[5], size_unit="samples", dataset=str(folder), tokenizer=str(tiny_tokenizer),
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(DataUnavailable, match="no room for the validation conversations 1000..1019"):
        prepare_data(spec)
    spec.val_start = 10  # validation 10..29 fits in 30 conversations
    assert len(prepare_data(spec).val_tokens) > 0
