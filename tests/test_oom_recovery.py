"""A run that fails (out of memory above all) leaves nothing behind in its process: the next
trial of the same worker runs as in a fresh one (CPU; tests/test_gpu_oom.py does it on a GPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_space

import archsearch.cvfp.run as engine
from archsearch.cvfp.fast import graphs
from archsearch.errors import is_out_of_memory
from archsearch.space import parse_space
from archsearch.trial import TrialPlan, run_trial

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
real_stepper = engine.EagerStepper


@pytest.fixture(autouse=True)
def no_kept_session():
    yield
    graphs.release_phase2_graphs()


@pytest.fixture
def plan(tiny_corpus, tmp_path):
    from archsearch.plan import prepare_space_data

    space = parse_space(tiny_space(tiny_corpus, data=dict(tiny_space(tiny_corpus)["data"], sizes={"tokens": [400, 800]})))
    data = prepare_space_data(space)
    params = {"num_layers": 1, "context_dim": 8, "num_input_tokens": 1}
    return TrialPlan(params=params, config=space.run_config(params).to_dict(), sizes=[400, 800], size_unit="tokens", seeds=[42],
                     objectives=[o.__dict__ for o in space.objectives], data_path=str(data.path), cache_dir=None)  # fmt: skip


def numbers(result):
    return [{k: v for k, v in r.items() if k not in ("seconds", "phase_seconds", "metrics")} for r in result["sizes"]]


class KeptSession:
    """Stands for a kept phase-2 session (only GPU runs keep real ones)."""

    key = ("kept",)


def failing_stepper(monkeypatch, fail_calls: set[int]):
    """Phase 2's step raises CUDA's OutOfMemoryError on the given calls (counted over the
    process), in the middle of an epoch; every other call is the real step."""
    real, calls = engine.EagerStepper, [0]

    class Stepper(real):
        def __call__(self, s, e):
            calls[0] += 1
            if calls[0] in fail_calls:
                raise OOM("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
            return super().__call__(s, e)

    monkeypatch.setattr(engine, "EagerStepper", Stepper)
    return calls


def frames_of(tb):
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def test_after_an_oom_the_next_trial_of_the_process_equals_a_clean_one(plan, monkeypatch):
    clean = run_trial(plan)
    graphs._SESSIONS.session = KeptSession()  # an earlier trial's session, left kept...
    failing_stepper(monkeypatch, fail_calls=set(range(3, 10**6)))  # ...and this trial's runs fail from phase 2's 3rd step on
    with pytest.raises(OOM) as e:
        run_trial(plan)
    assert is_out_of_memory(e.value)
    assert getattr(graphs._SESSIONS, "session", None) is None  # the kept session was dropped
    run_frames = [f for f in frames_of(e.value.__traceback__) if f.f_code.co_name in ("_start", "_finish", "train_phase2")]
    assert run_frames and all(f.f_locals == {} for f in run_frames)  # no frame keeps the run's tensors

    monkeypatch.setattr(engine, "EagerStepper", real_stepper)  # the real step again
    assert numbers(run_trial(plan)) == numbers(clean)


def test_an_oom_with_a_kept_session_is_trained_again_once_after_freeing_it(plan, monkeypatch):
    clean = run_trial(plan)
    graphs._SESSIONS.session = KeptSession()
    calls = failing_stepper(monkeypatch, fail_calls={3})  # only the first run's 3rd step fails
    events = []
    result = run_trial(plan, progress=lambda event, **info: events.append((event, info)))
    assert getattr(graphs._SESSIONS, "session", None) is None
    assert [i["message"] for ev, i in events if ev == "notice"] == [
        "OutOfMemoryError with a kept phase-2 session: freed it, training the run again once"]
    assert numbers(result) == numbers(clean) and calls[0] > 3


def test_an_oom_without_a_kept_session_is_not_retried(plan, monkeypatch):
    graphs.release_phase2_graphs()
    calls = failing_stepper(monkeypatch, fail_calls={3})
    with pytest.raises(OOM):
        run_trial(plan)
    assert calls[0] == 3


def test_a_second_oom_after_the_retry_is_raised(plan, monkeypatch):
    graphs._SESSIONS.session = KeptSession()
    failing_stepper(monkeypatch, fail_calls=set(range(1, 10**6)))
    with pytest.raises(OOM):
        run_trial(plan)
    assert getattr(graphs._SESSIONS, "session", None) is None


def test_an_oom_in_a_graph_capture_is_still_out_of_memory():
    """A failed capture raises its own error with the OOM as its context."""
    try:
        try:
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        except OOM:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as e:
        assert is_out_of_memory(e)
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_a_family_returning_something_else_fails_naming_the_family_and_the_type(plan, monkeypatch):
    import archsearch.families.cvfp as fam

    import dataclasses

    broken = dataclasses.replace(fam.family, train=lambda *a, **k: {"val_ppl": 3.0})
    monkeypatch.setattr("archsearch.config.RunConfig.family_object", lambda self: broken)
    with pytest.raises(TypeError, match=r"^family 'cvfp': train returned dict, not an archsearch.result.RunResult$"):
        run_trial(plan)


OOM_FAMILY = '''
import dataclasses, os
import torch
from examples.lstm_family import family as lstm


def train(cfg, data, seed, device="cpu", progress=None):
    if cfg.hidden == 32:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
    return lstm.train(cfg, data, seed, device, progress)


def release():
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()}\\n")
    return False


family = dataclasses.replace(lstm, name="oom_lstm", train=train, release=release)
'''


def test_a_worker_whose_trial_ran_out_of_memory_runs_the_next_trial(tmp_path, tiny_corpus):
    """Through archsearch run (real Ray, one worker, real SQLite): the first config's run
    raises CUDA's OutOfMemoryError, the trial fails as out_of_memory, the same worker process
    frees (the family's release, then after the trial) and completes the next config."""
    from helpers import cli, read_trials, tiny_space, write_space
    from optuna.trial import TrialState

    log = tmp_path / "release.log"
    (tmp_path / "oom_family.py").write_text(f"LOG = {str(log)!r}\n" + OOM_FAMILY)
    space = tiny_space(tiny_corpus, study={"name": "oom"}, model={"family": f"{tmp_path / 'oom_family.py'}:family", "context_length": 16, "max_epochs": 1},
                       sampler={"type": "grid", "configs": {"big": {"hidden": 32}, "small": {"hidden": 8}}},
                       resources={"gpus": 0, "cpus": 1}, max_concurrent=1)  # fmt: skip
    space.pop("phase1"), space.pop("phase2")  # CVFP sections
    home = tmp_path / "home"
    r = cli("run", str(write_space(tmp_path / "s.yaml", space)), "--quiet", env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 1, r.stdout + r.stderr  # a trial failed
    trials = {t.user_attrs["config_name"]: t for t in read_trials(home / "archsearch.db", "oom")}
    assert trials["big"].state == TrialState.FAIL and trials["big"].user_attrs["error_kind"] == "out_of_memory"
    assert "OutOfMemoryError: CUDA out of memory" in trials["big"].user_attrs["error"]
    assert trials["small"].state == TrialState.COMPLETE
    pids = log.read_text().split()
    # released after the failed run and after the failed trial (not after the completed one),
    # in the one worker that ran both
    assert len(pids) == 2 and len(set(pids)) == 1 and int(pids[0]) == trials["small"].user_attrs["worker_pid"]


# -- a CUDA error that is not out of memory: the worker's context may be unusable -------------

ILLEGAL_ACCESS = ("CUDA error: an illegal memory access was encountered\n"
                  "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.\n"
                  "For debugging consider passing CUDA_LAUNCH_BLOCKING=1")  # fmt: skip


def test_cuda_failures_are_told_from_out_of_memory_and_other_errors():
    from archsearch.errors import is_cuda_failure

    for text in (ILLEGAL_ACCESS, "CUDA error: device-side assert triggered", "CUDA error: unspecified launch failure",
                 "Triton Error [CUDA]: an illegal memory access was encountered",
                 "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, m, n, k, ...)`"):  # fmt: skip
        assert is_cuda_failure(RuntimeError(text)), text
    assert is_cuda_failure(torch.AcceleratorError("an illegal memory access was encountered"))
    try:  # in the chain: a later error raised while handling it
        try:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        except RuntimeError:
            raise ValueError("the run's clean-up failed")
    except ValueError as e:
        assert is_cuda_failure(e)
    for e in (OOM("CUDA out of memory. Tried to allocate 2.00 GiB"), RuntimeError("CUDA error: out of memory"),
              RuntimeError("Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"),
              ValueError("loss is NaN")):  # fmt: skip
        assert not is_cuda_failure(e), e


@pytest.mark.parametrize("staged", [False, True])
def test_a_cuda_failure_is_raised_with_no_clean_up_and_no_retry(plan, monkeypatch, staged):
    """Even with a kept session (an OOM would be trained again after freeing it) the run is not
    retried, and nothing that would call CUDA runs: not the family's release, not the
    allocator's clean-up; the same with the trial's runs staged (engine.stage_sizes, whose
    iterator hands the error over; an OOM there would train the rest one after another)."""
    import archsearch.trial as trial_mod

    plan.config["engine"]["stage_sizes"] = staged

    graphs._SESSIONS.session = KeptSession()
    calls = [0]

    class Stepper(real_stepper):
        def __call__(self, s, e):
            calls[0] += 1
            raise RuntimeError(ILLEGAL_ACCESS)

    monkeypatch.setattr(engine, "EagerStepper", Stepper)
    freed = []
    monkeypatch.setattr(trial_mod, "free_memory", lambda: freed.append("free_memory"))
    monkeypatch.setattr(trial_mod, "release_family", lambda family: freed.append("release") or False)
    with pytest.raises(RuntimeError, match="^CUDA error: an illegal memory access was encountered"):
        run_trial(plan)
    assert calls[0] == 1 and freed == []
    assert isinstance(graphs._SESSIONS.session, KeptSession)  # left as it was (the process is to end)


CUDA_FAMILY = '''
import dataclasses, os
from examples.lstm_family import family as lstm


def train(cfg, data, seed, device="cpu", progress=None):
    if cfg.hidden == 32:
        raise RuntimeError(ILLEGAL_ACCESS)
    return lstm.train(cfg, data, seed, device, progress)


def release():
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()}\\n")
    return False


family = dataclasses.replace(lstm, name="cuda_error_lstm", train=train, release=release)
'''


def test_a_worker_whose_trial_hit_a_cuda_error_runs_no_other_trial(tmp_path, tiny_corpus):
    """Through archsearch run (real Ray, one trial at a time, real SQLite): the first config's
    run raises CUDA's illegal-memory-access error; the trial fails as cuda_error with the
    error's first line, nothing is freed in its worker (no family release), and the next
    trial runs in another process."""
    from helpers import cli, read_trials, tiny_space, write_space
    from optuna.trial import TrialState

    log = tmp_path / "release.log"
    (tmp_path / "cuda_family.py").write_text(f"LOG = {str(log)!r}\nILLEGAL_ACCESS = {ILLEGAL_ACCESS!r}\n" + CUDA_FAMILY)
    space = tiny_space(tiny_corpus, study={"name": "cuda"}, model={"family": f"{tmp_path / 'cuda_family.py'}:family", "context_length": 16, "max_epochs": 1},
                       sampler={"type": "grid", "configs": {"broken": {"hidden": 32}, "next": {"hidden": 8}}},
                       resources={"gpus": 0, "cpus": 1}, max_concurrent=1)  # fmt: skip
    space.pop("phase1"), space.pop("phase2")  # CVFP sections
    home = tmp_path / "home"
    r = cli("run", str(write_space(tmp_path / "s.yaml", space)), "--quiet", env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 1, r.stdout + r.stderr  # a trial failed
    trials = sorted(read_trials(home / "archsearch.db", "cuda"), key=lambda t: t.datetime_start)
    assert [t.user_attrs["config_name"] for t in trials] == ["broken", "next"]  # largest first
    broken, after = trials
    assert broken.state == TrialState.FAIL and broken.user_attrs["error_kind"] == "cuda_error"
    assert broken.user_attrs["error"] == ("RuntimeError: CUDA error: an illegal memory access was encountered (a CUDA error: this "
                                          "worker's CUDA context may be unusable, so the worker process runs no other trial)")  # fmt: skip
    assert broken.params == {"hidden": 32}  # the trial's config (and config_name above)
    assert after.state == TrialState.COMPLETE
    assert after.user_attrs["worker_pid"] != broken.user_attrs["worker_pid"]  # a new process (an OOM keeps it: the test above)
    assert not log.exists()  # the failed trial's worker freed nothing (no CUDA call after the error)
    assert "Traceback" not in r.stderr
