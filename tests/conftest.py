"""Shared fixtures: an isolated archsearch home, a tiny corpus with a tiny tokenizer, space files.

Slow tests (marked ``slow``) run only with ``--runslow`` (CI passes it)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh ARCHSEARCH_HOME (study storage, run cache, artifacts) for one test."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("ARCHSEARCH_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    """A stand-in tokenizer (byte-level BPE, V ~ 300, E = 8) and ~12k tokens of text files,
    prepared once into a shared data cache: trials on it take a fraction of a second."""
    from standins import make_tokenizer_folder, sentences

    root = tmp_path_factory.mktemp("tiny_corpus")
    tok = make_tokenizer_folder(root / "tok", vocab_size=300, dim=8)
    rng = random.Random(0)
    docs = root / "docs"
    docs.mkdir()
    for i in range(120):
        (docs / f"doc{i:03d}.txt").write_text(" ".join(sentences(rng, 12)))
    return {"tokenizer": str(tok), "paths": sorted(str(p) for p in docs.glob("*.txt")), "cache_dir": str(root / "cache")}
