"""The trial worker's warm-up thread (search/trainable.Warmup): the first uses of a trial's run
(the engine's imports; on CUDA the context, cuBLAS, Triton's driver) made while the worker
starts its trial, joined before the run. It may fail in anything without failing or changing
the trial. ARCHSEARCH_WORKER_WARMUP: auto (GPU trials), 1 (every trial), 0 (none)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, cli, tiny_space, write_space

from archsearch.search import trainable
from archsearch.search.trainable import WARMUP_VAR, Warmup


def test_a_failing_warmup_is_recorded_and_raises_nothing(monkeypatch):
    def broken(self):
        raise RuntimeError("no device here")

    monkeypatch.setattr(Warmup, "_warm", broken)
    info = Warmup(cuda=True).start().join()
    assert info["error"] == "RuntimeError: no device here"
    assert info["seconds"] >= 0 and info["waited_s"] >= 0 and info["cuda"] is True


def test_the_cuda_part_waits_for_the_allocator_and_a_join_before_it_skips_it(monkeypatch):
    """Its CUDA part begins only once the worker's allocator is configured (allow_cuda, after
    gpu_share.configure_worker); a trial that joins it before that goes on without it."""
    import threading

    monkeypatch.setattr(trainable, "WARM_MODULES", ())
    monkeypatch.setattr(trainable, "CUDA_MODULES", ())
    warm = Warmup(cuda=True).start()
    warm._thread.join(timeout=0.5)
    assert warm._thread.is_alive()  # waiting for allow_cuda, nothing of CUDA touched yet
    assert warm.join()["cuda_skipped"] is True and warm.info["error"] is None

    calls = []
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.append(threading.current_thread().name) or False)
    warm = Warmup(cuda=True).start()
    warm.allow_cuda()
    info = warm.join()
    assert calls == ["archsearch-warmup"] and info["cuda_skipped"] is False and info["error"] is None


def test_a_warmup_on_the_cpu_imports_the_engine_and_no_cuda_part():
    """In a fresh process (what a new trial worker is): once joined, the engine is imported,
    the Triton kernels' modules are not (they are for CUDA), and no error."""
    code = ("import json, sys; from archsearch.search.trainable import Warmup; info = Warmup(cuda=False).start().join(); "
            "print(json.dumps([info, 'archsearch.cvfp.run' in sys.modules, 'archsearch.cvfp.fast.recurrent_kernels' in sys.modules]))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    info, engine, kernels = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["error"] is None and info["seconds"] > 0 and engine and not kernels


def test_the_warmup_is_for_gpu_trials_unless_switched(monkeypatch):
    monkeypatch.delenv(WARMUP_VAR, raising=False)
    assert trainable._warmup({"gpus": 0}) is None  # auto: a CPU trial gains nothing from it
    monkeypatch.setenv(WARMUP_VAR, "1")
    warm = trainable._warmup({"gpus": 0})
    assert isinstance(warm, Warmup) and warm.join()["error"] is None and not warm.info["cuda"]
    monkeypatch.setenv(WARMUP_VAR, "0")
    assert trainable._warmup({"gpus": 0.25}) is None


@pytest.mark.slow  # two whole `archsearch run`s (~30-60 s on 2 cores)
def test_a_run_gives_the_same_numbers_with_and_without_the_warmup(tmp_path, tiny_corpus):
    """Through the trainable in real Ray workers (the warm-up switched on for CPU trials): the
    same per-size numbers to the bit, and each trial's record of its warm-up."""
    import sqlite3

    values = {}
    for switch in ("1", "0"):
        home = tmp_path / f"home{switch}"
        space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus, max_concurrent=1))
        r = cli("run", str(space), "--json", str(tmp_path / f"r{switch}.json"), "--quiet", env={"ARCHSEARCH_HOME": str(home), WARMUP_VAR: switch})
        assert r.returncode == 0, r.stderr
        with sqlite3.connect(home / "archsearch.db") as con:
            sizes = {n: json.loads(v) for n, v in con.execute(
                "select t.number, a.value_json from trial_user_attributes a join trials t using (trial_id) where a.key = 'sizes'")}  # fmt: skip
            workers = [json.loads(v) for (v,) in con.execute("select value_json from trial_user_attributes where key = 'worker'")]
        values[switch] = {n: [(s["train_tokens"], s["val_ppl"], s["val_loss"]) for s in rows] for n, rows in sizes.items()}
        assert workers and all(("warmup" in w) == (switch == "1") for w in workers)
        assert all(w["warmup"]["error"] is None and w["warmup"]["seconds"] > 0 for w in workers if switch == "1")
    assert values["1"] == values["0"]  # to the bit: the warm-up is scheduling only
