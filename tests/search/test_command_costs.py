"""The command's fixed costs made visible and trimmed: ``run --json`` timings as laps from the
process's start (through scripts/bench_command.py, which also reads every trial's per-size
rows back from the study), Ray stopped before the summary is written, and what the command
imports before it needs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, tiny_space, write_space

from archsearch.timing import OVERLAPPED

LAPS = ["imports", "space", "checks", "ray_init", "data_wait", "study", "trials", "record", "publish", "summary", "ray_shutdown"]


def test_laps_start_at_the_process_start_and_follow_each_other():
    code = ("import json, time; from archsearch.timing import Laps, process_start; "
            "laps = Laps(start=process_start()); laps.lap('start'); time.sleep(0.2); laps.lap('sleep'); laps.lap('sleep'); "
            "print(json.dumps(laps.into | {'age': time.perf_counter() - process_start()}), flush=True)")  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    outside = time.perf_counter() - t0
    proc.wait()
    d = json.loads(line)
    # the first lap is the interpreter's start, seen from outside too (process start times have 10 ms ticks)
    assert 0 < d["start"] <= outside + 0.02
    assert 0.2 <= d["sleep"] < d["age"]  # a name lapped twice adds up
    assert abs(d["start"] + d["sleep"] - d["age"]) < 0.01  # contiguous: the laps sum to the time since the process started


def _children(pid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines()]


def test_the_embedded_ray_prestarts_no_idle_worker_and_stops_every_process(tmp_path, monkeypatch):
    """No idle workers for the driver (a trial never runs in one). At the end the monitor is
    killed first (its SIGTERM handler would wait on the stopped GCS for Ray's whole grace
    second); Ray stops the rest itself; then the old session folders are pruned (the newest
    ARCHSEARCH_RAY_SESSIONS stay, and those whose driver runs)."""
    import os
    from pathlib import Path

    import ray
    from ray._private import ray_constants

    from archsearch.search.runner import RAY_SESSIONS_VAR, SESSION_MARK, init_ray, stop_embedded_ray

    from ray._private import services

    monkeypatch.setenv("ARCHSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(RAY_SESSIONS_VAR, "1")
    old = {pid: tmp_path / "home" / "ray" / f"session_2000-01-01_00-00-0{i}_000001_{pid}" for i, pid in enumerate((os.getppid(), 2**22 + 1))}
    for folder in old.values():
        (folder / "logs").mkdir(parents=True)
    ray_get_node = services.get_node
    init_ray(None)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert (session / SESSION_MARK).is_file()
    assert services.get_node is ray_get_node  # the prompt wait for the raylet's registration is gone again
    node = ray._private.worker._global_node
    processes = {kind: [info.process for info in infos] for kind, infos in node.all_processes.items()}
    assert processes[ray_constants.PROCESS_TYPE_MONITOR] and processes[ray_constants.PROCESS_TYPE_RAYLET]
    time.sleep(3)  # Ray's prestart for a driver comes within a second or two of its connection
    raylet_children = _children(processes[ray_constants.PROCESS_TYPE_RAYLET][0].pid)
    assert raylet_children and not [c for c in raylet_children if "ray::IDLE" in c], raylet_children
    stop_embedded_ray()
    assert not ray.is_initialized()
    assert session.is_dir() and old[os.getppid()].is_dir() and not old[2**22 + 1].exists()  # a live driver's stays, a dead one's goes
    assert processes[ray_constants.PROCESS_TYPE_MONITOR][0].returncode == -signal.SIGKILL
    for kind, procs in processes.items():
        if kind != ray_constants.PROCESS_TYPE_REAPER:  # the reaper outlives the node by design and ends on its own
            assert all(p.poll() is not None for p in procs), kind
    stop_embedded_ray()  # a no-op once Ray is down


def test_the_prompt_node_wait_answers_what_rays_own_answers(monkeypatch):
    """While the embedded Ray starts, Ray's wait for its raylet first polls the GCS itself (no
    whole-second steps), then gives Ray's own answer; if the polling cannot even begin it is
    Ray's own wait alone."""
    import ray._raylet
    from ray._private import services

    from archsearch.search import runner

    calls = []
    monkeypatch.setattr(services, "get_node", lambda address, node_id: calls.append((address, node_id)) or {"node_id": node_id})

    class Registered:  # the GCS's node table: the node is there at the third look
        looks = 0

        def __init__(self, address):
            self.address = address

        def get_all_node_info(self, timeout, state_filter):
            Registered.looks += 1
            return {type("Id", (), {"hex": lambda self: "ab12"})(): None} if Registered.looks >= 3 else {}

    monkeypatch.setattr(ray._raylet, "GcsClient", Registered)
    ours = services.get_node
    with runner._prompt_node_wait():
        assert services.get_node is not ours
        assert services.get_node("127.0.0.1:1", "ab12") == {"node_id": "ab12"}
    assert services.get_node is ours and Registered.looks == 3 and calls == [("127.0.0.1:1", "ab12")]

    def unreachable(address):
        raise ConnectionError("no GCS")

    monkeypatch.setattr(ray._raylet, "GcsClient", unreachable)
    with runner._prompt_node_wait():
        assert services.get_node("127.0.0.1:1", "cd34") == {"node_id": "cd34"}
    assert calls[-1] == ("127.0.0.1:1", "cd34") and services.get_node is ours


def test_validate_and_the_runner_import_none_of_the_heavy_modules():
    """`archsearch validate` loads neither torch, Ray, Optuna, SciPy's stats, matplotlib nor
    pandas; the runner module (imported by `run` before Ray starts) none but what Ray's start
    itself needs: scipy.stats (a second of imports) comes with the first fit."""
    heavy = ("torch", "ray", "ray.tune", "optuna", "scipy.stats", "matplotlib", "pandas")
    code = ("import sys\nfrom archsearch.cli import main\ntry:\n    main(['validate', 'spaces/quickstart.yaml'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
            "import archsearch.search.runner\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout.splitlines()
    assert out[-2:] == ["[]", "[]"]


@pytest.mark.slow  # a whole `archsearch run` (~20-40 s on 2 cores); the laps themselves: test_run.py and the tests above
def test_bench_command_reports_the_laps_and_every_trials_sizes(tmp_path, tiny_corpus):
    """scripts/bench_command.py on a tiny grid: the command's --json timings are the laps (in
    order, their sum within the command's wall time), and the rows of every trial's sizes come
    back from the study with their phases."""
    space = write_space(tmp_path / "s.yaml", tiny_space(tiny_corpus))
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "scripts/bench_command.py", str(space), "-n", "1", "--set", "data.sizes={tokens: [400, 800]}",
                        "--set", f"data.cache_dir={tiny_corpus['cache_dir']}", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = json.loads(out.read_text())["runs"]
    assert [k for k in row["timings"] if k not in OVERLAPPED] == LAPS and {"data", "warm_imports", "late_imports"} <= set(row["timings"])
    assert all(v >= 0 for v in row["timings"].values())
    assert 0 < row["laps_sum_s"] <= row["wall_s"] and row["exit_s"] == row["wall_s"] - row["laps_sum_s"]
    assert len(row["worker_start_s"]) == 2 and 0 < row["after_last_trial_s"] < row["wall_s"]
    sizes = row["sizes"]
    assert sorted((s["config"], s["train_tokens"]) for s in sizes) == [("a", 400), ("a", 800), ("b", 400), ("b", 800)]
    for s in sizes:
        assert {"phase1_s", "contexts_s", "er_s", "phase2_s"} <= set(s) and s["seconds"] >= s["phase1_s"] + s["phase2_s"]
        assert s["phase1_iterations"] >= 1 and s["phase2_epochs"] >= 1 and s["val_step_us"] > 0 and s["device"] == "cpu"


@pytest.mark.slow  # two embedded Ray starts in fresh processes (~10-20 s on 2 cores)
def test_profile_ray_init_times_rays_steps_and_the_wait_for_the_raylet(tmp_path):
    """scripts/profile_ray_init.py: per start, Ray's steps (Node's start methods, the wait for
    the raylet's registration) from inside, for archsearch's prompt wait and Ray's own."""
    out = tmp_path / "ray_init.json"
    r = subprocess.run([sys.executable, "scripts/profile_ray_init.py", "-n", "1", "--variants", "prompt,ray_wait+imports", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(out.read_text())
    for variant in ("prompt", "ray_wait+imports"):
        (row,) = d["runs"][variant]
        steps = [name for name, _, _ in row["steps"]]
        assert {"start_gcs_server", "start_api_server", "start_raylet", "get_node"} <= set(steps)
        assert 0 < row["node_wait_s"] < row["init_ray_s"] and row["first_actor_s"] > 0
    assert d["runs"]["ray_wait+imports"][0]["beside_imports"]["seconds"] > 0
    assert set(d["summary"]) == {"prompt", "ray_wait+imports"}
