"""Experiment trackers, opt-in in the space file: what a run logged is read back from a real
MLflow store and from TensorBoard's event files."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest
from helpers import cli, read_trials, tiny_space, write_space

from archsearch.result import SizeRecord
from archsearch.tracking import TrialLog, Trackers


def test_a_bad_tracking_section_is_a_config_error_naming_every_key(tmp_path, tiny_corpus):
    space = tiny_space(tiny_corpus, tracking={"mlflow": {"tracking_uri": 5, "bogus": "x"}, "neptune": True, "tensorboard": "yes",
                                              "wandb": True})  # fmt: skip
    r = cli("validate", str(write_space(tmp_path / "s.yaml", space)), env={"ARCHSEARCH_HOME": str(tmp_path / "home")})
    assert r.returncode == 2, r.stdout + r.stderr
    for key in ("tracking.mlflow.tracking_uri", "tracking.mlflow.bogus", "tracking.neptune: unknown tracker", "tracking.tensorboard: expected"):
        assert key in r.stderr, r.stderr
    if importlib.util.find_spec("wandb") is None:
        assert "tracking.wandb: needs the wandb package" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "home").exists()


class _Broken:
    name = "broken"

    def size(self, *args):
        raise OSError("disk full")

    def finish(self, trial):
        raise ConnectionError("http://user:hunter2@mlflow.example:5000 refused")

    def close(self):
        pass


def test_a_failing_tracker_is_a_warning_with_the_password_masked(caplog):
    rec = SizeRecord(400, "tokens", 400, 300, 6.0, 0.1, 403.4, 0.1, {"total": 10}, 1.0, "cpu", "fp32", [42])
    trackers = Trackers([_Broken()])
    with caplog.at_level(logging.WARNING):
        assert trackers.size(0, "a", {}, rec) == ["broken: OSError: disk full"]
        errors = trackers.finish(TrialLog("s", 0, "a", {}, "COMPLETE", [rec]))
    assert errors and "hunter2" not in errors[0] and "***" in errors[0]
    assert "hunter2" not in caplog.text and "disk full" in caplog.text


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("tensorboard") is None,
                    reason="needs the [tracking] extra (mlflow, tensorboard)")  # fmt: skip
def test_mlflow_and_tensorboard_get_one_run_per_trial(tmp_path, tiny_corpus):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    home = tmp_path / "home"
    space = tiny_space(tiny_corpus, study={"name": "trk"}, tracking={"mlflow": True, "tensorboard": {"log_dir": str(tmp_path / "tb")}})
    r = cli("run", str(write_space(tmp_path / "s.yaml", space)), "--quiet", env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    trials = {t.user_attrs["config_name"]: t for t in read_trials(home / "archsearch.db", "trk")}
    assert not any("tracking_error" in t.user_attrs for t in trials.values())

    # MLflow: the default store under ARCHSEARCH_HOME, experiment = the study
    client = MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("trk")
    runs = {run.data.tags["archsearch.config"]: run for run in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["a", "b"]
    for name, run in runs.items():
        t = trials[name]
        assert run.info.status == "FINISHED" and run.data.tags["archsearch.state"] == "COMPLETE"
        assert run.data.tags["archsearch.trial"] == str(t.number)
        assert run.data.params == {k: str(v) for k, v in t.params.items()}
        history = client.get_metric_history(run.info.run_id, "val_ppl")
        assert [m.step for m in history] == [400, 800, 1600]  # step = training tokens
        assert [m.value for m in history] == pytest.approx([s["val_ppl"] for s in t.user_attrs["sizes"]])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_er")] == [400, 800, 1600]
        for k in ("alpha", "A", "r2", "alpha_low", "alpha_high"):
            assert run.data.metrics[k] == pytest.approx(t.user_attrs[k]), k
        assert run.data.metrics["objective_alpha"] == pytest.approx(t.values[0])
        files = sorted(f.path for f in client.list_artifacts(run.info.run_id))
        assert files == sorted(["config.json", f"trial_{t.number}_{name}_scaling.png", f"trial_{t.number}_{name}_sizes.csv"])
        csv_path = client.download_artifacts(run.info.run_id, f"trial_{t.number}_{name}_sizes.csv", str(tmp_path / f"dl_{name}"))
        assert open(csv_path).readline().startswith("size,train_tokens,val_ppl,")  # PPL first

    # TensorBoard: one event directory per trial
    for name, t in trials.items():
        acc = EventAccumulator(str(tmp_path / "tb" / "trk" / f"trial_{t.number}_{name}"))
        acc.Reload()
        ppl = acc.Scalars("size/val_ppl")
        assert [e.step for e in ppl] == [400, 800, 1600]
        assert [e.value for e in ppl] == pytest.approx([s["val_ppl"] for s in t.user_attrs["sizes"]], rel=1e-6)
        assert acc.Scalars("fit/alpha")[0].value == pytest.approx(t.user_attrs["alpha"], rel=1e-6)


def wandb_records(run_dir):
    """The records of an offline W&B run (its .wandb file: a LevelDB-style log of protobuf
    records after a 7-byte header; recent wandb has no Python reader of its own)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", {"history": [], "summary": {}, "config": {}}
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # padding to the end of a block
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            which = r.WhichOneof("record_type")
            if which == "history":
                out["history"].append({("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in r.history.item})
            elif which == "summary":
                out["summary"].update({("/".join(u.nested_key) or u.key): json.loads(u.value_json) for u in r.summary.update})
            elif which == "run":
                out["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
                out["name"] = r.run.display_name
    return out


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (W&B is optional)")
def test_wandb_offline_runs(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = tiny_space(tiny_corpus, study={"name": "wb"}, tracking={"wandb": {"project": "p"}})
    r = cli("run", str(write_space(tmp_path / "s.yaml", space)), "--quiet", env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    trials = {t.user_attrs["config_name"]: t for t in read_trials(home / "archsearch.db", "wb")}
    assert not any("tracking_error" in t.user_attrs for t in trials.values())
    runs = [wandb_records(d) for d in (home / "wandb" / "wandb").glob("offline-run-*")]
    assert sorted(run["config"]["config_name"] for run in runs) == ["a", "b"]
    for run in runs:
        t = trials[run["config"]["config_name"]]
        assert run["name"] == f"{t.number}_{t.user_attrs['config_name']}"
        assert {k: run["config"][k] for k in t.params} == t.params
        sizes = [h for h in run["history"] if "val_ppl" in h]
        assert [h["_step"] for h in sizes] == [400, 800, 1600]  # step = training tokens
        assert [h["val_ppl"] for h in sizes] == pytest.approx([s["val_ppl"] for s in t.user_attrs["sizes"]])
        assert run["summary"]["alpha"] == pytest.approx(t.user_attrs["alpha"]) and run["summary"]["state"] == "COMPLETE"
        assert any(k.startswith("scaling/") for h in run["history"] for k in h)  # the plot, as an image
    for d in (home / "wandb" / "wandb").glob("offline-run-*"):  # and the per-size table, as a file
        assert len(list((d / "files").glob("trial_*_sizes.csv"))) == 1 and list((d / "files" / "media").rglob("*.png"))


WANDB_ARGV_CHILD = """
import sys
from pathlib import Path

from archsearch.result import SizeRecord
from archsearch.tracking import TrialLog, WandbTracker

rec = SizeRecord(400, "tokens", 400, 300, 6.0, 0.1, 403.4, 0.1, {"total": 10}, 1.0, "cpu", "fp32", [42])
WandbTracker({}, "st", Path(sys.argv[1])).finish(TrialLog("st", 0, "a", {"num_layers": 1}, "COMPLETE", [rec], None, {}, None, {}, []))
"""


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (W&B is optional)")
def test_wandb_runs_hold_no_command_line(tmp_path):
    """W&B's system metadata holds the driver's command line (``wandb sync`` uploads it), and
    ``archsearch run --storage postgresql://user:PASSWORD@host/db`` has the password on it:
    the tracker's offline runs are written without that metadata."""
    home = tmp_path / "home"
    r = subprocess.run([sys.executable, "-c", WANDB_ARGV_CHILD, str(home), "--storage", "postgresql://u:wb-Argv-S3cret@db.example/x"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, WANDB_API_KEY="wb-Env-S3cret" + "0" * 28))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    files = [p for p in (home / "wandb").rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".wandb" for p in files), files  # the run was written
    for p in files:
        data = p.read_bytes()
        assert b"wb-Argv-S3cret" not in data and b"wb-Env-S3cret" not in data, p


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="needs the [tracking] extra (mlflow)")
def test_mlflow_run_status_follows_the_trial_and_nothing_prints(tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    from archsearch.tracking import MlflowTracker

    recs = [SizeRecord(s, "tokens", s, 300, 6.0, 0.1, 1000.0 / s**0.3, 0.1, {"total": 10}, 1.0, "cpu", "fp32", [42],
                       metrics={"val_er": 0.5}) for s in (400, 800, 1600)]  # fmt: skip
    capfd.readouterr()
    tracker = MlflowTracker({"experiment": "exp"}, "st", tmp_path)
    tracker.size(0, "a", {"num_layers": 2}, recs[0])
    tracker.finish(TrialLog("st", 0, "a", {"num_layers": 2}, "PRUNED", recs[:1], reason="the median pruner stopped it"))
    tracker.finish(TrialLog("st", 1, "b", {"num_layers": 3}, "FAIL", [], reason="NonFiniteLoss"))
    tracker.size(2, "c", {"num_layers": 1}, recs[0])  # still running when the run is interrupted
    tracker.close()
    assert capfd.readouterr() == ("", "")  # MLflow's INFO lines about its tables stay quiet
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    runs = {r.data.tags["archsearch.config"]: r for r in client.search_runs([client.get_experiment_by_name("exp").experiment_id])}
    assert {k: r.info.status for k, r in runs.items()} == {"a": "KILLED", "b": "FAILED", "c": "KILLED"}
    assert runs["a"].data.tags["archsearch.reason"] == "the median pruner stopped it" and runs["a"].data.metrics["val_ppl"] == pytest.approx(recs[0].val_ppl)


@pytest.mark.slow
def test_a_tracker_that_cannot_be_opened_is_exit_2_and_leaves_no_study(tmp_path, tiny_corpus):
    home = tmp_path / "home"
    space = tiny_space(tiny_corpus, tracking={"mlflow": {"tracking_uri": "http://archsearch:hunter2@127.0.0.1:9"}})
    r = cli("run", str(write_space(tmp_path / "s.yaml", space)), "--quiet", env={"ARCHSEARCH_HOME": str(home)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "tracking (mlflow): cannot open the tracker" in r.stderr and "hunter2" not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr and not (home / "archsearch.db").exists()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="needs the [tracking] extra (mlflow)")
@pytest.mark.parametrize("form", ["file-uri", "path"])
def test_mlflow_file_store_when_named(tmp_path, monkeypatch, form):
    """MLflow 3 refuses its file store by default; a tracking_uri naming one opts in, and
    what was logged reads back from the files (a plain MlflowClient on them)."""
    from mlflow.tracking import MlflowClient

    from archsearch.tracking import MlflowTracker, is_file_store

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # so that the test's end restores the variable as it was
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    store = tmp_path / "mlruns"
    uri = store.as_uri() if form == "file-uri" else str(store)
    assert is_file_store(uri) and not is_file_store("sqlite:///x.db") and not is_file_store("http://h:5000")
    recs = [SizeRecord(s, "tokens", s, 300, 6.0, 0.1, 1000.0 / s**0.3, 0.1, {"total": 10}, 1.0, "cpu", "fp32", [42])
            for s in (400, 800)]  # fmt: skip
    tracker = MlflowTracker({"tracking_uri": uri, "experiment": "exp"}, "st", tmp_path / "home")
    for rec in recs:
        tracker.size(0, "a", {"num_layers": 2}, rec)
    tracker.finish(TrialLog("st", 0, "a", {"num_layers": 2}, "COMPLETE", recs, fit={"alpha": -0.3, "r2": 0.9}))
    assert not (tmp_path / "home" / "mlflow").exists()  # not the default SQLite store
    assert (store / "meta.yaml").exists() or any(store.glob("*/meta.yaml"))  # MLflow's file layout
    client = MlflowClient(store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params == {"num_layers": "2"} and run.data.metrics["alpha"] == -0.3
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_ppl")] == [(r.train_tokens, r.val_ppl) for r in recs]


def test_bad_tracking_values_are_quoted_short_and_masked():
    """As in the rest of a space file: a huge bad value is cut, not echoed; passwords hidden."""
    from archsearch.tracking import parse_tracking

    problems: list[str] = []
    parse_tracking({"x" * 5000: 1, "mlflow": {"tracking_uri": ["a"] * 100_000}, "tensorboard": "http://u:hunter2@h/" + "q" * 5000}, problems)
    assert len(problems) == 3 and all(len(p) < 200 for p in problems), problems
    assert "... (5,002 chars): unknown tracker" in problems[0] and "<a list of 100,000 items>" in problems[1]
    assert "hunter2" not in problems[2] and "u:***@h" in problems[2]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None,
                    reason="needs the [tracking] extra (tensorboard)")  # fmt: skip
def test_tensorboard_folders_of_long_or_odd_config_names_stay_under_the_study(tmp_path):
    """A search's label past a file name's 255 bytes, or a '/' from a user family's categorical."""
    from archsearch.tracking import TensorBoardTracker

    rec = SizeRecord(400, "tokens", 400, 300, 6.0, 0.1, 403.4, 0.1, {"total": 10}, 1.0, "cpu", "fp32", [42])
    tracker = TensorBoardTracker({"log_dir": str(tmp_path / "tb")}, "st", tmp_path / "home")
    names = [",".join(f"phase1.param_{i}=0.{i:020d}" for i in range(12)), "cell=../../../escaped"]
    for number, name in enumerate(names):
        tracker.size(number, name, {}, rec)
    tracker.close()
    folders = sorted(p for p in (tmp_path / "tb" / "st").iterdir())
    assert len(folders) == 2 and all(len(p.name) <= 255 and any(p.iterdir()) for p in folders)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]  # nothing beside it


@pytest.mark.parametrize("text, secret", [
    ("API request to http://me:hunter2@mlflow:5000/api/2.0/x failed", "hunter2"),
    ("API request to https://me:p@ss@w0rd@mlflow.example/api failed", "ss@w0rd"),  # a raw '@' in the password
    ("API request to https://mlflow.example/api?token=tok-S3cret&x=1 failed", "tok-S3cret"),
    ("https://mlflow.example/?x=1&api_key=key-S3cret", "key-S3cret"),
])  # fmt: skip
def test_tracking_errors_hide_every_form_of_a_credential(text, secret):
    from archsearch.tracking import _mask

    shown = _mask(text)
    assert secret not in shown and "***" in shown, shown
    assert "failed" in shown or "x=1" in shown  # the rest of the message stays
