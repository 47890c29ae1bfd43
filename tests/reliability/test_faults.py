"""Faults of the machine around a run (the cluster, memory, the disk, files changed or damaged
under it, a killed driver): each is noticed, named, and leaves the study consistent, with no
trial lost or recorded twice after a rerun."""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_runs import check_exactly_once, launch, rerun_completes, slow_space, wait_mid_trial
from helpers import ROOT, cli, read_trials, tiny_space, write_space
from optuna.trial import TrialState

from archsearch.search import storage as stg


# --------------------------------------------------------------------------- the one-writer lock


HOLD = """
import sys, time
from archsearch.search.storage import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_the_sqlite_writer_lock_follows_the_file_not_its_path(tmp_path, link):
    db = tmp_path / "a" / "study.db"
    db.parent.mkdir()
    stg.open_storage(f"sqlite:///{db}")  # a real, empty study storage
    other = tmp_path / "b" / "other-name.db"
    other.parent.mkdir()
    (os.link if link == "hard" else os.symlink)(db, other)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, f"sqlite:///{db}"], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(stg.StorageBusy, match="SQLite cannot take two writer processes"):
            with stg.writer_lock(stg.resolve_url(f"sqlite:///{other}")):
                pass
    finally:
        holder.kill()
        holder.wait()
    with stg.writer_lock(stg.resolve_url(f"sqlite:///{other}")):  # free again once the holder is gone
        pass


@pytest.mark.slow
def test_a_second_run_through_a_hard_link_is_refused(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", slow_space(tiny_corpus))
    db = home / "archsearch.db"
    first = launch(space, home)
    wait_mid_trial(db, first)
    os.link(db, tmp_path / "linked.db")
    second = launch(space, home, "--storage", f"sqlite:///{tmp_path / 'linked.db'}")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 2, out + err
    assert "SQLite cannot take two writer processes" in " ".join(err.split())
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, out + err
    check_exactly_once(f"sqlite:///{db}")


# --------------------------------------------------------------------------- a damaged SQLite file


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def damage(db) -> None:
    """Bytes written over the second page (a b-tree page of Optuna's tables)."""
    with open(db, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(64))


def test_a_damaged_sqlite_file_is_detected_when_opened_and_a_rerun_into_a_new_file_trains_nothing(home, tiny_corpus, ray_local):
    from archsearch.search import runner
    from archsearch.space import parse_space

    space = parse_space(tiny_space(tiny_corpus))
    first = runner.run_search(space, view_mode="quiet")
    assert [o.state for o in first.outcomes] == ["COMPLETE", "COMPLETE"] and not any(o.cached for o in first.outcomes)
    db = home / "archsearch.db"
    damage(db)
    for args in (["studies"], ["dashboard"]):  # the commands that open it say so, no traceback (report and run share the check)
        r = cli(*args, env={"ARCHSEARCH_HOME": str(home)}, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert "is damaged" in " ".join(r.stderr.split())
    with pytest.raises(stg.StorageDamaged) as e:
        runner.run_search(space, view_mode="quiet")
    text = str(e.value)
    assert "malformed" in text or "not a database" in text  # SQLite's own diagnosis
    recovered = home / "archsearch-recovered.db"
    assert f"--storage sqlite:///{recovered}" in text and "run cache" in text

    again = runner.run_search(space, storage=f"sqlite:///{recovered}", view_mode="quiet")
    assert [o.state for o in again.outcomes] == ["COMPLETE", "COMPLETE"]
    assert all(o.cached for o in again.outcomes)  # every size of every trial came from the run cache
    by_name = {o.name: o.values for o in again.outcomes}
    assert by_name == {o.name: o.values for o in first.outcomes}
    check_exactly_once(f"sqlite:///{recovered}", configs={"a": {}, "b": {}})


def test_a_usage_error_after_set_up_leaves_the_callers_own_ray_running(home, tiny_corpus, ray_local):
    """The clean-up of a usage error stops only an embedded Ray that the run started itself."""
    from archsearch.errors import ConfigError
    from archsearch.search import runner
    from archsearch.space import parse_space

    space = parse_space(tiny_space(tiny_corpus, resources={"gpus": 0, "cpus": 999}))
    with pytest.raises(ConfigError, match="resources.cpus: 999 CPU per trial"):
        runner.run_search(space, view_mode="quiet")
    assert ray_local.is_initialized() and ray_local.cluster_resources().get("CPU") == 2


REAL_STUDY = ROOT / "docs" / "tpe_explore" / "study.db"  # a real search's study: 98 trials, 0.9 MB


@pytest.mark.parametrize("deep", [True, False], ids=["checked-on-open", "found-when-read"])
def test_random_overwrites_of_a_real_study_file_end_in_the_damaged_message_never_a_traceback(tmp_path, capsys, monkeypatch, deep):
    """40 seeded 16-byte overwrites anywhere in the file. Each case: `studies` reads every
    study, trial and attribute; it either sees nothing wrong (the bytes hit unused space or left
    valid values) or ends with the damaged-storage message and its recovery hint (exit 2).
    found-when-read: the file is over the full check's size, so the damage inside values
    surfaces only when Optuna reads them, and must end the same way."""
    import random

    from archsearch import cli

    if not deep:
        monkeypatch.setattr(stg, "DEEP_CHECK_BYTES", 0)
    monkeypatch.setenv("ARCHSEARCH_HOME", str(tmp_path / "home"))
    rng = random.Random(16)
    size = REAL_STUDY.stat().st_size
    damaged = 0
    for case in range(40):
        db = tmp_path / f"case{case}.db"
        shutil.copy(REAL_STUDY, db)
        offset = rng.randrange(0, size - 16)
        with open(db, "r+b") as f:
            f.seek(offset)
            f.write(rng.randbytes(16))
        try:  # any other exception would be a traceback: the test fails with it
            cli.main(["studies", "--storage", f"sqlite:///{db}"])
            code = 0
        except SystemExit as e:
            code = e.code
        err = " ".join(capsys.readouterr().err.split())
        if code == 0:
            continue
        assert code == 2 and f"the SQLite study storage {db} is damaged" in err, (case, offset, err)
        assert f"--storage sqlite:///{tmp_path / f'case{case}-recovered.db'}" in err and "run cache" in err
        damaged += 1
    print(f"{damaged} of 40 damaged")
    assert damaged >= 25, damaged  # most overwrites damage something (31 of 40 with this seed)


# --------------------------------------------------------------------------- prepared data changed under a run


@pytest.fixture
def data_copy(tiny_corpus, tmp_path):
    """A private copy of the tiny corpus's prepared folder (the shared one stays intact)."""
    import shutil

    from archsearch.space import parse_space
    from archsearch.plan import prepare_space_data

    data = prepare_space_data(parse_space(tiny_space(tiny_corpus)))
    copy = tmp_path / "prepared"
    shutil.copytree(data.path, copy)
    return copy


def write_in_place(file, index: int, value: int) -> None:
    """Overwrite one int32 of a .npy file without changing its size (as an editor or a
    second writer would, through the same inode the run has mapped)."""
    import numpy as np

    arr = np.load(file, mmap_mode="r+")
    arr[index] = value
    arr.flush()
    del arr


@pytest.mark.parametrize("value", [10**6, 3])  # an id beyond the vocabulary / a valid id
def test_prepared_data_changed_after_verification_is_data_corrupted(data_copy, tmp_path, value, monkeypatch):
    import archsearch.data
    from archsearch.errors import DataCorrupted
    from archsearch.trial import TrialPlan, run_trial
    from archsearch.space import parse_space

    real = archsearch.data.load_prepared

    def load_then_change(path, verify=True):
        data = real(path, verify)  # verified: every sha256 matches
        write_in_place(data.path / "train_tokens.npy", 5, value)
        st = os.stat(data.path / "train_tokens.npy")
        os.utime(data.path / "train_tokens.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write
        return data

    monkeypatch.setattr(archsearch.data, "load_prepared", load_then_change)
    space = parse_space({"data": {"source": "wiki", "sizes": {"tokens": [400, 800]}}})
    cfg = space.run_config({"num_layers": 1, "context_dim": 8, "phase1.max_iterations": 2, "phase1.min_iterations": 1, "phase2.max_epochs": 1})
    plan = TrialPlan(params={}, config=cfg.to_dict(), sizes=[400, 800], size_unit="tokens", seeds=[1],
                     objectives=[o.__dict__ for o in space.objectives], data_path=str(data_copy), cache_dir=None, device="cpu", name="x")  # fmt: skip
    with pytest.raises(DataCorrupted, match="train_tokens.npy was changed after its checksum was verified"):
        run_trial(plan)


def test_token_ids_outside_the_embedding_are_data_corrupted_not_index_error(data_copy):
    from archsearch.data import load_prepared
    from archsearch.errors import DataCorrupted

    data = load_prepared(data_copy)
    file = data_copy / "val_tokens.npy"
    before = os.stat(file)
    write_in_place(file, 0, 10**6)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))  # a write within the same clock tick: no visible change
    with pytest.raises(DataCorrupted, match=r"val_tokens.npy holds token ids \d+\.\.1000000, outside the embedding's \d+ rows"):
        data.val_ids()


# --------------------------------------------------------------------------- Ray's memory monitor


def test_a_worker_killed_by_rays_memory_monitor_is_out_of_memory_with_rays_reason():
    from ray.exceptions import OutOfMemoryError

    from archsearch.search.bridge import ray_failure

    reason = ("1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 127.0.0.1, ID: ab12) "
              "was 6.58GB used / 23.54GB limit (0.279587)\nOOM kill reason: Memory usage 6692663296B exceeded threshold of "
              "252760592B (1.0% of 25276059648B limit)\nObject store memory usage: [...]")  # fmt: skip
    saved = f"Failure # 1 (occurred at 2026-12-01_09-26-27)\n{OutOfMemoryError(reason)}\n"  # as Ray Tune writes it
    got = ray_failure(saved)
    assert got["kind"] == "out_of_memory"
    assert "running low on memory" in got["error"] and "6.58GB used / 23.54GB" in got["error"] and "exceeded threshold" in got["error"]
    assert ray_failure("Failure # 1\nray.exceptions.ActorDiedError: The actor died unexpectedly")["kind"] == "worker_died"


@pytest.mark.slow
def test_rays_memory_monitor_fails_the_trials_as_out_of_memory_and_a_rerun_completes(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    # a real trigger: a threshold below what the machine already uses makes Ray's monitor
    # kill every worker that runs a trial, as it would on a node that runs out of memory
    r = cli("run", str(space), "--quiet", env={"ARCHSEARCH_HOME": str(home), "RAY_memory_usage_threshold": "0.01",
                                                "RAY_memory_monitor_refresh_ms": "100"}, timeout=600)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "OutOfMemoryError" not in r.stderr  # no Ray traceback
    assert "study tiny now holds 2 FAIL" in r.stdout  # the summary printed
    trials = read_trials(home / "archsearch.db", "tiny")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    for t in trials:
        assert t.user_attrs["error_kind"] == "out_of_memory"
        assert "memory monitor" in t.user_attrs["error"] and "exceeded threshold" in t.user_attrs["error"]
    rerun_completes(space, home)
    check_exactly_once(f"sqlite:///{home / 'archsearch.db'}", configs={"a": {}, "b": {}})


# --------------------------------------------------------------------------- a lost raylet or GCS


def ray_child(driver_pid: int, name: str) -> int:
    from helpers import descendants

    for pid in descendants(driver_pid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                return pid
        except OSError:
            continue
    raise AssertionError(f"no {name} process under the driver")


@pytest.mark.slow
@pytest.mark.parametrize("process", ["raylet", "gcs_server"])
def test_a_lost_raylet_or_gcs_fails_the_running_trials_and_the_run_ends(tmp_path, tiny_corpus, process):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", slow_space(tiny_corpus))
    proc = launch(space, home)
    mid = wait_mid_trial(home / "archsearch.db", proc)
    os.kill(ray_child(proc.pid, process), 9)
    killed = time.time()
    try:
        out, err = proc.communicate(timeout=60)  # never a hang
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the driver still runs 60 s after its {process} was killed")
    noticed = time.time() - killed
    assert proc.returncode == 1, out + err
    assert noticed < 30, noticed
    err = " ".join(err.split())
    assert "the Ray cluster was lost" in err and process in err and "Traceback" not in err
    assert "now holds" in out  # the summary printed
    trials = read_trials(home / "archsearch.db", "tiny")
    lost = trials[mid.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["error_kind"] == "cluster_lost"
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    rerun_completes(space, home)
    check_exactly_once(f"sqlite:///{home / 'archsearch.db'}")


# --------------------------------------------------------------------------- a killed driver's Ray processes


def ray_processes_of(driver_pid: int) -> dict[int, str]:
    """Processes carrying the owner mark of ``driver_pid`` (the embedded Ray's): pid -> start time."""
    from archsearch.search.runner import OWNER_VAR, _start_time

    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(f"{OWNER_VAR}={driver_pid}:".encode()) for v in env):
            found[int(entry.name)] = _start_time(int(entry.name))
    return found


def alive(pid: int, started: str) -> bool:
    """The process that had ``pid`` and start time ``started`` still runs. The start time
    matters: pids wrap around (32,768 here) and, on a busy machine, a pid freed by the reaper
    is soon another process's, which a pid alone would count as a survivor."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == started


def survivors(procs: dict[int, str]) -> list[str]:
    def comm(pid):
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return "?"

    return [f"{pid} {comm(pid)}" for pid, started in procs.items() if alive(pid, started)]


@pytest.mark.slow
def test_no_ray_process_of_a_killed_driver_outlives_the_next_run(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", slow_space(tiny_corpus))
    proc = launch(space, home)
    wait_mid_trial(home / "archsearch.db", proc)
    left = ray_processes_of(proc.pid)
    assert len(left) >= 4  # GCS, raylet, agents, the trial's worker
    # Often they outlive a SIGKILLed driver for minutes, sometimes they notice within a second
    # (a flaky premise): stopped, they cannot go by themselves, so what ends them is the next run
    for pid in left:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    os.kill(proc.pid, 9)
    proc.wait()
    try:
        assert survivors(left), "nothing outlived the driver: the test would prove nothing"
        rerun_completes(space, home)
        assert not survivors(left)
    finally:
        for pid, started in left.items():
            if alive(pid, started):
                os.kill(pid, signal.SIGKILL)
    check_exactly_once(f"sqlite:///{home / 'archsearch.db'}")


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB filesystem (tmpfs; needs root, as in CI's container)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk) -> Path:
    """Take every free byte of ``disk``."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_full_disk_fails_the_trial_as_disk_full_and_a_rerun_completes(tmp_path, tiny_corpus, small_disk):
    home = small_disk / "home"  # run cache and artifacts on the small disk, the study beside it
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    space = write_space(tmp_path / "s.yaml", slow_space(tiny_corpus))
    proc = launch(space, home, "--storage", storage)
    mid = wait_mid_trial(tmp_path / "study.db", proc)
    filler = fill(small_disk)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    err = " ".join(err.split())
    assert "the disk is full" in err and "No space left on device" in err and "Traceback" not in err, err
    assert "now holds" in out  # the summary printed
    trials = read_trials(tmp_path / "study.db", "tiny")
    full = trials[mid.number]
    assert full.state == TrialState.FAIL and full.user_attrs["error_kind"] == "disk_full"
    assert not [t for t in trials if t.state == TrialState.RUNNING]  # consistent
    filler.unlink()
    rerun_completes(space, home, "--storage", storage)
    check_exactly_once(storage)
