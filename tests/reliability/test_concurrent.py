"""Two `archsearch run` processes on one study: PostgreSQL and a journal file take both,
every planned trial recorded exactly once; a second writer on SQLite is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
from helpers import ROOT, tiny_space, write_space
from optuna.trial import TrialState

from archsearch.search.storage import open_storage

CONFIGS = {f"c{i}": {"num_layers": 1 + i % 3, "context_dim": 4 * (1 + i // 3)} for i in range(6)}


def launch(space, storage, home) -> subprocess.Popen:
    env = dict(os.environ, ARCHSEARCH_HOME=str(home), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "archsearch.cli", "run", str(space), "--storage", storage, "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def two_writers(tmp_path, corpus, storage) -> tuple[list, list]:
    space = write_space(tmp_path / "s.yaml", tiny_space(corpus, sampler={"type": "grid", "configs": CONFIGS}, max_concurrent=1))
    procs = [launch(space, storage, tmp_path / "home") for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    trials = optuna.load_study(study_name="tiny", storage=open_storage(storage, create=False)).get_trials()
    return trials, outs


def check_exactly_once(trials) -> None:
    complete = Counter(t.user_attrs["config_name"] for t in trials if t.state == TrialState.COMPLETE)
    assert complete == Counter(list(CONFIGS)), complete  # every planned trial once: none lost, none twice
    assert len(trials) == len(CONFIGS)  # and nothing else was created
    for t in trials:  # no lost update: every trial carries all its attributes
        assert len(t.user_attrs["sizes"]) == 3 and "alpha" in t.user_attrs and t.values is not None


@pytest.mark.slow
def test_two_writers_on_postgresql(tmp_path, tiny_corpus, postgres):
    url = postgres()
    trials, outs = two_writers(tmp_path, tiny_corpus, url)
    check_exactly_once(trials)
    assert postgres.password not in "".join(o + e for o, e in outs)


@pytest.mark.slow
def test_two_writers_on_a_journal_file(tmp_path, tiny_corpus):
    trials, _ = two_writers(tmp_path, tiny_corpus, f"journal:///{tmp_path / 'study.log'}")
    check_exactly_once(trials)


@pytest.mark.slow
def test_a_second_writer_on_sqlite_is_refused(tmp_path, tiny_corpus):
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus, sampler={"type": "grid", "configs": CONFIGS}, max_concurrent=1))
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    first = launch(space, storage, tmp_path / "home")
    for _ in range(600):  # until the first run holds the study
        time.sleep(0.2)
        if (tmp_path / "db.sqlite").exists() and first.poll() is None:
            break
    second = launch(space, storage, tmp_path / "home")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 2, out + err
    err = " ".join(err.split())  # the message is wrapped for the terminal
    assert "SQLite cannot take two writer processes" in err and "PostgreSQL" in err
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, out + err
    check_exactly_once(optuna.load_study(study_name="tiny", storage=storage).get_trials())
