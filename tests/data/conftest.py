"""Fixtures of the data tests: an offline Hub cache per test, tiny stand-ins, and the wiki
source prepared once per session. Nothing here touches the network."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from standins import FakeHub, make_tokenizer_folder, ultrachat_rows, write_ultrachat


@pytest.fixture(autouse=True)
def hf_hub(tmp_path_factory, monkeypatch) -> FakeHub:
    """Every data test runs offline against an empty Hub cache of its own (the libraries read
    their environment at import, so their constants are patched as well)."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    cache.mkdir(parents=True)
    for var, value in (("HF_HOME", home), ("HF_HUB_CACHE", cache), ("HF_DATASETS_CACHE", home / "datasets")):
        monkeypatch.setenv(var, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    return FakeHub(cache)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    return make_tokenizer_folder(tmp_path_factory.mktemp("tok") / "tiny-gpt2")


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> Path:
    return make_tokenizer_folder(tmp_path_factory.mktemp("tok2") / "tiny-other", vocab_size=280, seed=1)


@pytest.fixture(scope="session")
def ultrachat_folder(tmp_path_factory) -> Path:
    """1100 conversations, so the report's validation range 1000..1019 exists."""
    return write_ultrachat(tmp_path_factory.mktemp("ultrachat") / "ultrachat_200k", ultrachat_rows(1100))


@dataclass
class WikiRun:
    data: object
    cache_dir: Path
    seconds: float
    messages: list[str]


@pytest.fixture(scope="session")
def wiki(tmp_path_factory) -> WikiRun:
    """The wiki source prepared once (about 4 s) into a session cache."""
    from archsearch.data import DataSpec, prepare_data

    cache = tmp_path_factory.mktemp("wiki_cache")
    messages: list[str] = []
    start = time.perf_counter()
    data = prepare_data(DataSpec(source="wiki", cache_dir=str(cache)), progress=messages.append)
    return WikiRun(data, cache, time.perf_counter() - start, messages)
