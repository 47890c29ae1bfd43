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


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian's postgresql) on 127.0.0.1 with password auth,
    started for the session; yields a factory of fresh databases' URLs."""
    import glob
    import os
    import shutil
    import socket
    import subprocess
    import tempfile
    import uuid

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        pytest.skip("needs Debian's postgresql (.ci/run installs it)")
    bindir = bins[-1]
    root = Path(tempfile.mkdtemp(prefix="archsearch-pg-"))
    as_pg = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    password = "s3cret-Pw-" + uuid.uuid4().hex[:8]
    (root / "pw").write_text(password + "\n")
    if as_pg:
        shutil.chown(root / "pw", "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run([*as_pg, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(f"{bindir}/initdb", "-D", str(root / "data"), "-U", "archsearch", f"--pwfile={root / 'pw'}", "--auth=scram-sha-256")
    run(f"{bindir}/pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "start",
        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200")  # fmt: skip
    env = dict(os.environ, PGPASSWORD=password)

    def new_db() -> str:
        name = "s" + uuid.uuid4().hex[:10]
        subprocess.run([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "archsearch", name], check=True, env=env)
        return f"postgresql://archsearch:{password}@127.0.0.1:{port}/{name}"

    new_db.password = password
    yield new_db
    subprocess.run([*as_pg, f"{bindir}/pg_ctl", "-D", str(root / "data"), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
