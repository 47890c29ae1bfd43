"""The embedded Ray's folders (sessions, logs, sockets) and Ray Tune's results stay under
ARCHSEARCH_HOME; a home too deep for Ray's unix socket paths is reached through a short link."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from helpers import ROOT, cli, tiny_space, write_space
from optuna.trial import TrialState

from archsearch.search import runner

SYSTEM_RAY = Path("/tmp/ray")


def run_cli(space: Path, home: Path, tmpdir: Path, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """``archsearch run`` with a fresh TMPDIR (where Ray would put its folder by default);
    returns the result and the driver's pid (which ends the name of Ray's session folder)."""
    tmpdir.mkdir(exist_ok=True, parents=True)
    env = dict(os.environ, ARCHSEARCH_HOME=str(home), TMPDIR=str(tmpdir), PYTHONUNBUFFERED="1")
    env.pop("RAY_TMPDIR", None)
    env.pop(runner.RAY_TMPDIR_VAR, None)
    proc = subprocess.Popen([sys.executable, "-m", "archsearch.cli", "run", str(space), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def check_rays_folders(home: Path, tmpdir: Path, pid: int, results_before: set) -> Path:
    """Ray's session of driver ``pid`` is under ``<home>/ray``, and nothing of it elsewhere."""
    sessions = [p for p in (home / "ray").iterdir() if p.name.startswith("session_") and p.name.endswith(f"_{pid}")]
    assert len(sessions) == 1, sorted(p.name for p in (home / "ray").iterdir())
    session = sessions[0]
    assert not session.is_symlink() and (session / "logs").is_dir() and any((session / "logs").iterdir())
    assert (session / "sockets").is_dir()
    assert not (tmpdir / "ray").exists()  # Ray's default, $TMPDIR/ray
    assert not list(SYSTEM_RAY.glob(f"session_*_{pid}"))  # nor /tmp/ray (shared with other runs: only this driver's)
    results = Path.home() / "ray_results"
    assert (set(results.iterdir()) if results.exists() else set()) == results_before  # Ray Tune's default results folder
    assert not [p for p in (home / "ray").iterdir() if not p.name.startswith("session")]  # Tune's results folder removed
    return session


def ray_results() -> set:
    results = Path.home() / "ray_results"
    return set(results.iterdir()) if results.exists() else set()


def completed(home: Path) -> list:
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'archsearch.db'}").get_trials()
    return [t.state for t in trials]


@pytest.mark.slow
def test_a_run_keeps_rays_session_under_the_home(tmp_path, tiny_corpus, short_dir):
    short_home = short_dir / "h"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    before = ray_results()
    r, pid = run_cli(space, short_home, tmp_path / "tmp")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "too deep" not in r.stderr  # no link needed
    check_rays_folders(short_home, tmp_path / "tmp", pid, before)
    assert completed(short_home) == [TrialState.COMPLETE] * 2


@pytest.mark.slow
def test_a_home_too_deep_for_rays_sockets_is_reached_through_a_short_link(tmp_path, tiny_corpus, short_dir):
    home = tmp_path / ("d" * 80) / "home"
    tmpdir = short_dir  # where the link goes (a TMPDIR too long for it would send it to /tmp)
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    before = ray_results()
    r, pid = run_cli(space, home, tmpdir)  # not --quiet: the note is shown
    assert r.returncode == 0, r.stdout + r.stderr
    links = tmpdir / f"archsearch-{os.getuid()}"
    [link] = [p for p in links.iterdir() if not p.name.startswith(".")]
    assert link.is_symlink() and link.resolve() == (home / "ray").resolve()
    assert (links.stat().st_mode & 0o777) == 0o700
    note = " ".join(r.stderr.split())
    assert f"note: {home / 'ray'} is too deep for Ray's socket paths; Ray reaches it through the link {link}" in note, note
    assert runner.RAY_TMPDIR_VAR in note
    check_rays_folders(home, tmpdir, pid, before)
    assert completed(home) == [TrialState.COMPLETE] * 2


def test_an_ARCHSEARCH_RAY_TMPDIR_too_long_for_rays_sockets_is_a_usage_error_that_writes_nothing(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    deep = tmp_path / ("x" * 60)
    r = cli("run", str(space), env={"ARCHSEARCH_HOME": str(home), runner.RAY_TMPDIR_VAR: str(deep)}, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert f"{runner.RAY_TMPDIR_VAR}=" in err and "unix socket paths" in err and "at most" in err and "107" in err, err
    assert "Traceback" not in r.stderr
    assert not home.exists() and not deep.exists()


def test_the_ray_folder_limit_leaves_room_for_rays_longest_socket_path():
    # Ray's own check (ray._private.utils.validate_socket_filepath) on the path it would build
    from ray._private.utils import validate_socket_filepath

    pid = 4194304  # the largest Linux pid
    folder = "/" + "t" * (runner.ray_tmp_limit(pid) - 1)
    validate_socket_filepath(f"{folder}/session_2026-12-01_12-20-41_208516_{pid}/sockets/plasma_store.1")
    with pytest.raises(OSError):
        validate_socket_filepath(f"{folder}xxx/session_2026-12-01_12-20-41_208516_{pid}/sockets/plasma_store.1")


@pytest.mark.slow
def test_a_usage_error_found_after_ray_started_leaves_no_ray_folder(tmp_path, tiny_corpus):
    """The cluster's resources are known only once Ray runs: too many CPUs per trial is such
    an error. Ray's session folder is removed again; nothing is left in the home."""
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus, resources={"gpus": 0, "cpus": 999}))
    r = cli("run", str(space), env={"ARCHSEARCH_HOME": str(home)}, timeout=300)
    assert r.returncode == 2 and "resources.cpus: 999 CPU per trial" in r.stderr, r.stdout + r.stderr
    left = sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) if home.exists() else []
    assert not [p for p in left if not p.startswith("data")], left  # at most the prepared data


def _dead_pid(i: int = 0) -> int:
    """A pid no process can have (above the kernel's largest)."""
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except OSError:
        pid_max = 4194304
    return pid_max + 1 + i


def _session(folder: Path, second: int, pid: int) -> Path:
    """A folder named as Ray names a session, started at 12:00:<second> (a log file inside)."""
    path = folder / f"session_2026-12-01_12-00-{second:02d}_000123_{pid}"
    (path / "logs").mkdir(parents=True)
    (path / "logs" / "raylet.out").write_text("log\n")
    return path


def test_old_ray_sessions_are_pruned_but_the_newest_and_those_in_use(tmp_path, caplog):
    """The newest ``keep`` sessions stay, and beyond them every session whose driver may still
    run (its pid alive, its mark naming another host or a live start) or that the run names
    in use; what is removed is removed without following links, what is not a session stays."""
    folder, outside = tmp_path / "ray", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me\n")
    newest = [_session(folder, 50 - i, _dead_pid(i)) for i in range(2)]
    dead = [_session(folder, 10 + i, _dead_pid(10 + i)) for i in range(3)]
    (dead[0] / "logs" / "escape").symlink_to(outside, target_is_directory=True)  # removed as a link, not followed
    live = _session(folder, 5, os.getppid())  # another driver, alive (the test's parent process)
    current = _session(folder, 1, _dead_pid(20))  # named in use by the run
    other_host = _session(folder, 2, _dead_pid(21))
    (other_host / runner.SESSION_MARK).write_text(f"not-{runner.socket.gethostname()} {_dead_pid(21)} 1\n")
    reused = _session(folder, 3, os.getpid())  # its driver's pid now belongs to a later process
    (reused / runner.SESSION_MARK).write_text(f"{runner.socket.gethostname()} {os.getpid()} 1\n")
    marked_live = _session(folder, 4, _dead_pid(22))  # the mark, not the name, tells its driver
    (marked_live / runner.SESSION_MARK).write_text(f"{runner.socket.gethostname()} {os.getpid()} {runner._start_time(os.getpid())}\n")
    link = folder / f"session_2026-12-01_11-00-00_000001_{_dead_pid(30)}"
    link.symlink_to(outside, target_is_directory=True)
    (folder / "session_latest").symlink_to(newest[0], target_is_directory=True)
    other = folder / "tiny-1764590400-123"  # Ray Tune's results folder of a run, not a session
    other.mkdir()

    removed = runner.prune_ray_sessions(folder, 2, in_use=(current,))
    assert sorted(removed) == sorted([*dead, reused])
    assert all(not p.exists() for p in removed)
    assert all(p.is_dir() for p in (*newest, live, current, other_host, marked_live, other))
    assert link.is_symlink() and (folder / "session_latest").is_symlink()
    assert (outside / "precious").read_text() == "keep me\n"
    assert not caplog.records
    # keep 0: only the sessions that may be in use stay
    assert sorted(runner.prune_ray_sessions(folder, 0)) == sorted([*newest, current])
    assert {p.name for p in folder.iterdir()} == {p.name for p in (live, other_host, marked_live, link, other)} | {"session_latest"}


def test_pruning_ray_sessions_never_fails_the_run(tmp_path, monkeypatch, caplog):
    """An OSError while pruning is a logged warning naming the folder, never an error."""
    folder = tmp_path / "ray"
    assert runner.prune_ray_sessions(folder, 1) == []  # no folder
    assert "could not look for old Ray sessions" in caplog.text
    caplog.clear()
    old = [_session(folder, i, _dead_pid(i)) for i in range(3)]

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runner.shutil, "rmtree", refuse)
    assert runner.prune_ray_sessions(folder, 1) == []
    assert "could not remove 2 old Ray session folder(s)" in caplog.text and old[0].name in caplog.text
    assert all(p.is_dir() for p in old)


@pytest.mark.parametrize("value, kept", [(None, runner.RAY_SESSIONS_KEPT), ("0", 0), (" 12 ", 12), ("", runner.RAY_SESSIONS_KEPT)])
def test_how_many_ray_sessions_a_run_keeps(monkeypatch, value, kept):
    if value is None:
        monkeypatch.delenv(runner.RAY_SESSIONS_VAR, raising=False)
    else:
        monkeypatch.setenv(runner.RAY_SESSIONS_VAR, value)
    assert runner.ray_sessions_kept() == kept


@pytest.mark.parametrize("value", ["-1", "five", "2.5", "²"])
def test_a_bad_ARCHSEARCH_RAY_SESSIONS_is_a_usage_error(monkeypatch, value):
    monkeypatch.setenv(runner.RAY_SESSIONS_VAR, value)
    with pytest.raises(runner.ConfigError, match=runner.RAY_SESSIONS_VAR):
        runner.ray_sessions_kept()


def test_a_bad_ARCHSEARCH_RAY_SESSIONS_is_a_usage_error_that_writes_nothing(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    r = cli("run", str(space), env={"ARCHSEARCH_HOME": str(home), runner.RAY_SESSIONS_VAR: "-1"}, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert f"{runner.RAY_SESSIONS_VAR}='-1'" in err and "whole number" in err, err
    assert "Traceback" not in r.stderr
    assert not home.exists()
